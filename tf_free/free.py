"""Adversarial training as Keras models.

`FreeAdversarialModel` is Alg. 2 of "Adversarial Training for Free!"
(Shafahi et al., NeurIPS 2019); `PGDAdversarialModel` is Alg. 1, K-PGD
adversarial training (Madry et al.), the baseline the paper compares against.
Both wrap a base model that maps float images in [clip_min, clip_max] to
logits, and train it with `compile()` and `fit()` like any Keras model.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_free import attacks


def _unscaled(loss):
    # Under a tf.distribute strategy `compute_loss` returns loss / replicas, so
    # that summing gradients over replicas gives the global mean; the logged
    # value must be the true one (as keras.src.losses.loss.unscale_loss_for_distribution).
    return loss * tf.distribute.get_strategy().num_replicas_in_sync


class _AdversarialModel(keras.Model):
    """Shared plumbing: delegates `call` to the base model, logs the loss."""

    def __init__(self, base_model: keras.Model, *, clip_min=0.0, clip_max=1.0, **kwargs):
        super().__init__(**kwargs)
        if not clip_min < clip_max:
            raise ValueError(f"need clip_min < clip_max, got {clip_min} and {clip_max}")
        self.base_model = base_model
        self.clip_min = float(clip_min)
        self.clip_max = float(clip_max)

    def call(self, inputs, training=False):
        return self.base_model(inputs, training=training)

    def _forward(self, x, y, sample_weight):
        """Forward pass in training mode: logits, loss, loss to differentiate."""
        y_pred = self(x, training=True)
        loss = self.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        return y_pred, loss, self.optimizer.scale_loss(loss)

    def _metrics_result(self, x, y, y_pred, loss, sample_weight):
        # The pattern of keras-io's custom_train_step guide: feed the "loss"
        # tracker ourselves, then the compiled metrics.
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(_unscaled(loss), sample_weight=tf.shape(y_pred)[0])
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def get_config(self):
        return {
            "base_model": keras.saving.serialize_keras_object(self.base_model),
            "clip_min": self.clip_min,
            "clip_max": self.clip_max,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["base_model"] = keras.saving.deserialize_keras_object(config["base_model"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="tf_free")
class FreeAdversarialModel(_AdversarialModel):
    """Free adversarial training (Alg. 2): m replays per minibatch, δ for free.

    Each minibatch is replayed `replays` times. Each replay makes ONE forward
    pass on x+δ and ONE backward pass, which gives both the weight gradient
    (applied by the optimizer) and the input gradient, which updates δ:

        δ ← clip(δ + step_size · sign(∇δ loss), −ε, ε),  x+δ ∈ [clip_min, clip_max].

    δ is never reset: the next minibatch starts from the last δ (warm start).
    It lives in the variable `perturbation`, shape [per-replica batch, *image
    shape], one copy per replica under tf.distribute; it is created, as zeros,
    from the first batch that `fit` sees. A smaller final batch uses (and
    updates) only the first rows of δ.

    `optimizer.iterations` advances once per replay, as in the paper, where
    free training's iterations are counted in replays: a learning-rate
    schedule keyed on iterations sees m steps per minibatch.

    With `epsilon=0` this is natural training with minibatch replay (Fig. 1).
    """

    def __init__(
        self,
        base_model: keras.Model,
        *,
        epsilon: float,
        replays: int,
        step_size: float | None = None,
        clip_min: float = 0.0,
        clip_max: float = 1.0,
        **kwargs,
    ):
        super().__init__(base_model, clip_min=clip_min, clip_max=clip_max, **kwargs)
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        if isinstance(replays, bool) or int(replays) != replays or replays < 1:
            raise ValueError(f"replays (m) must be an integer >= 1, got {replays!r}")
        if step_size is not None and step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.epsilon = float(epsilon)
        self.replays = int(replays)
        self.step_size = self.epsilon if step_size is None else float(step_size)
        self.perturbation = None

    def build_perturbation(self, batch_shape) -> tf.Variable:
        """Creates δ = 0 of shape [per-replica batch, *image shape], if absent.

        `fit` calls this with the first batch's shape; call it yourself only
        when driving `train_step` from your own loop.
        """
        batch_shape = tf.TensorShape(batch_shape)
        if self.perturbation is not None:
            capacity = self.perturbation.shape
            if batch_shape[0] > capacity[0] or batch_shape[1:] != capacity[1:]:
                raise ValueError(
                    f"FreeAdversarialModel's perturbation has shape {capacity} (per-replica "
                    f"batch, image); it cannot take per-replica batches of shape {batch_shape}. "
                    "Use a new model to train with a larger batch or other images."
                )
            return self.perturbation
        if not batch_shape.is_fully_defined():
            raise ValueError(f"need a fully defined per-replica batch shape, got {batch_shape}")
        with self.distribute_strategy.scope():
            # A plain tf.Variable (not a Keras weight): δ is training state, like
            # optimizer slots, and not part of the served model. ON_READ keeps
            # one copy per replica; MEAN (not NONE) lets checkpoints and export
            # handle it (see TECH_NOTES.md).
            self.perturbation = tf.Variable(
                tf.zeros(batch_shape, tf.float32),
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.MEAN,
                name="perturbation",
            )
        return self.perturbation

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras peeks at the first batch here before it traces train_step
        # (keras/src/backend/tensorflow/trainer.py); δ needs that batch's
        # per-replica shape, which the traced step only knows as [None, ...].
        if data_batch is None and iterator is not None:
            for _, _, batches in iterator:
                data_batch = next(batches)
                break
        if data_batch is not None:
            x = keras.utils.unpack_x_y_sample_weight(data_batch)[0]
            x = self.distribute_strategy.experimental_local_results(x)[0]
            self.build_perturbation(x.shape)
        super()._maybe_symbolic_build(
            iterator=iterator, data_batch=None if iterator else data_batch
        )

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.perturbation is None:
            raise ValueError("call build_perturbation(batch_shape) before train_step")
        x = tf.cast(x, self.perturbation.dtype)
        batch = tf.shape(x)[0]  # a final batch may be smaller than δ
        # Alg. 2: replay the minibatch m times. A Python loop (unrolled; m is
        # small): tf.range is not allowed here, and tf.while_loop around
        # optimizer.apply fails under MirroredStrategy (TECH_NOTES.md).
        for _ in range(self.replays):
            delta = self.perturbation.read_value()[:batch]
            # ONE forward pass on x+δ ...
            with tf.GradientTape() as tape:
                tape.watch(delta)
                x_adv = tf.clip_by_value(x + delta, self.clip_min, self.clip_max)
                y_pred, loss, scaled_loss = self._forward(x_adv, y, sample_weight)
            # ... and ONE backward pass for both g_θ and g_adv = ∇δ loss.
            weights = self.trainable_variables
            weight_grads, delta_grad = tape.gradient(scaled_loss, [weights, delta])
            # θ ← θ − τ·g_θ, by the optimizer.
            self.optimizer.apply(weight_grads, weights)
            # δ ← clip(δ + step·sign(g_adv), −ε, ε), with x+δ kept valid (a
            # non-finite g_adv from an fp16 overflow gives no step); the
            # rows beyond a short batch keep their values.
            delta = tf.clip_by_value(
                delta + self.step_size * attacks.gradient_sign(delta_grad),
                -self.epsilon,
                self.epsilon,
            )
            delta = tf.clip_by_value(x + delta, self.clip_min, self.clip_max) - x
            self.perturbation.assign(
                tf.concat([delta, self.perturbation.read_value()[batch:]], axis=0)
            )
        # Metrics from the last replay's logits, as the paper reports training.
        return self._metrics_result(x, y, y_pred, loss, sample_weight)

    def get_config(self):
        return {
            **super().get_config(),
            "epsilon": self.epsilon,
            "replays": self.replays,
            "step_size": self.step_size,
        }


@keras.saving.register_keras_serializable(package="tf_free")
class PGDAdversarialModel(_AdversarialModel):
    """K-PGD adversarial training (Alg. 1; Madry et al.): the paper's baseline.

    For each minibatch: K steps of `tf_free.attacks.pgd` (K forward and
    backward passes, weights frozen) find x_adv, then one forward/backward
    pass on x_adv updates the weights. About K+1 times natural training's cost.
    The attack runs the model in inference mode (batch norm statistics are not
    updated by the K attack passes).
    """

    def __init__(
        self,
        base_model: keras.Model,
        *,
        epsilon: float,
        steps: int,
        step_size: float,
        random_start: bool = True,
        clip_min: float = 0.0,
        clip_max: float = 1.0,
        **kwargs,
    ):
        super().__init__(base_model, clip_min=clip_min, clip_max=clip_max, **kwargs)
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps (K) must be an integer >= 1, got {steps!r}")
        if step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.epsilon = float(epsilon)
        self.steps = int(steps)
        self.step_size = float(step_size)
        self.random_start = bool(random_start)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = tf.cast(x, tf.float32)
        # Alg. 1, inner loop: x_adv by K-step PGD on the current weights, with
        # a fresh random start for every iteration.
        x_adv = attacks.pgd(
            lambda images: self(images, training=False),
            x,
            y,
            epsilon=self.epsilon,
            step_size=self.step_size,
            steps=self.steps,
            random_start=self.random_start,
            clip_min=self.clip_min,
            clip_max=self.clip_max,
            seed=self.optimizer.iterations,
            # Every step on every example: an early stop would make x_adv
            # depend on which examples share the (per-replica) batch.
            early_stop=False,
        )
        x_adv = tf.stop_gradient(x_adv)
        # Alg. 1, outer step: one SGD step on the loss at x_adv.
        with tf.GradientTape() as tape:
            y_pred, loss, scaled_loss = self._forward(x_adv, y, sample_weight)
        weights = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled_loss, weights), weights)
        return self._metrics_result(x_adv, y, y_pred, loss, sample_weight)

    def get_config(self):
        return {
            **super().get_config(),
            "epsilon": self.epsilon,
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.random_start,
        }
