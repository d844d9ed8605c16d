""" "Fast" adversarial training: FGSM with a random start (Wong, Rice & Kolter, ICLR 2020).

"Fast is better than free: Revisiting adversarial training" trains on one
FGSM step from a random point of the ε-ball, at twice natural training's cost
per batch. Ported from locuslab/fast_adversarial `CIFAR10/train_fgsm.py`
(commit 1d94c4e), the training loop at L91-122:

- L97-101: δ starts at 0 (`--delta-init zero`), uniform in [-ε, ε] (`random`,
  the default), or the previous batch's δ (`previous`); a random start is
  then clamped so that x+δ is a valid image (`clamp(delta, lower_limit - X,
  upper_limit - X)`);
- L102-106: one forward pass on x+δ with the model in training mode (batch
  norm uses and updates its batch statistics, as `model.train()` does) and
  one backward pass for ∇δ;
- L107-108: δ ← clamp(δ + α·sign(∇δ), -ε, ε), then clamped so that x+δ is a
  valid image;
- L110-115: a second forward pass on x+δ and one optimizer step on its loss
  (the first pass's weight gradients are dropped: `opt.zero_grad()`).

α defaults to 1.25ε (the paper's 10/255 at ε=8/255, `--alpha 10`).

Where this differs, on purpose:
- the random start is drawn from a stateless generator seeded by (`seed`,
  the optimizer's iteration), the global batch's noise sliced per replica,
  so a run is reproducible and two replicas draw exactly what one device
  draws (torch draws from its global generator). When Keras XLA-compiles the
  whole step (`jit_compile=True`), XLA derives the generator's key from the
  seed its own way: another draw, from the same distribution;
- ε is in the units of the images (the model normalises inside), where
  locuslab scales ε per channel by the normalisation's std: the same ball;
- the last δ is kept (in `perturbation`, per replica, checkpointed) for every
  `init`, so that TensorBoard's δ statistics show it; only "previous" starts
  from it.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_free import attacks
from tf_free.free import FreeAdversarialModel

INITS = ("random", "zero", "previous")


@keras.saving.register_keras_serializable(package="tf_free")
class FastAdversarialModel(FreeAdversarialModel):
    """FGSM-RS adversarial training: per batch, one FGSM step from a random start.

    Two forward/backward passes per batch, one optimizer step (one
    iteration). Shares `FreeAdversarialModel`'s δ storage (`perturbation`,
    `build_perturbation`, its checkpointing and `fit`), with one replay.

    Args:
      base_model: maps float images in [clip_min, clip_max] to logits.
      epsilon: L∞ radius, in the images' units.
      step_size: the FGSM step α; default 1.25·ε.
      init: "random" (uniform in the ε-ball, then kept a valid image), "zero"
        (with α = ε this is plain FGSM training) or "previous" (the last
        batch's δ).
      seed: the random start's seed.
    """

    def __init__(
        self,
        base_model: keras.Model,
        *,
        epsilon: float,
        step_size: float | None = None,
        init: str = "random",
        seed: int = 0,
        clip_min: float = 0.0,
        clip_max: float = 1.0,
        **kwargs,
    ):
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        kwargs.pop("replays", None)  # from get_config: always one
        kwargs.pop("delta_projection", None)
        super().__init__(
            base_model,
            epsilon=epsilon,
            replays=1,
            step_size=1.25 * epsilon if step_size is None and epsilon > 0 else step_size,
            delta_projection="valid_image",
            clip_min=clip_min,
            clip_max=clip_max,
            **kwargs,
        )
        self.init = init
        self.seed = int(seed)

    def train_step(self, data):
        x, y, sample_weight, batch = self._unpack(data)
        # L97-101: the start, kept a valid image.
        delta = self._start(x, batch)
        # L102-108: one forward/backward pass for ∇δ, then the FGSM step.
        delta = self._per_replica(self._fgsm_step)(x, y, sample_weight, delta)
        # L110-115: one forward/backward pass on x+δ, one optimizer step.
        y_pred, loss, grads = self._per_replica(self._weight_gradients)(x, y, sample_weight, delta)
        self.optimizer.apply(grads, self.trainable_variables)
        self._store(delta, batch)
        return self._metrics_result(x, y, y_pred, loss, sample_weight)

    def _start(self, x, batch):
        if self.init == "zero":
            return tf.zeros_like(x)
        if self.init == "previous":
            return self.perturbation.read_value()[:batch]
        # The global batch's noise, this replica's rows of it: the same draw
        # for any number of replicas (the loop gives replica i rows [i·b, (i+1)·b)).
        context = tf.distribute.get_replica_context()
        replicas, replica = context.num_replicas_in_sync, context.replica_id_in_sync_group
        noise = tf.random.stateless_uniform(
            tf.concat([[batch * replicas], tf.shape(x)[1:]], 0),
            seed=tf.stack(
                [tf.cast(self.seed, tf.int64), tf.cast(self.optimizer.iterations, tf.int64)]
            ),
            minval=-self.epsilon,
            maxval=self.epsilon,
            alg="philox",
        )
        delta = noise[replica * batch : (replica + 1) * batch]
        return tf.clip_by_value(x + delta, self.clip_min, self.clip_max) - x

    def _fgsm_step(self, x, y, sample_weight, delta):
        """One forward/backward pass on x+δ (training mode): δ + α·sign(∇δ), projected."""
        with tf.GradientTape() as tape:
            tape.watch(delta)
            _, _, scaled_loss = self._forward(x + delta, y, sample_weight)
        gradient = tape.gradient(scaled_loss, delta)
        delta = tf.clip_by_value(
            delta + self.step_size * attacks.gradient_sign(gradient), -self.epsilon, self.epsilon
        )
        return tf.clip_by_value(x + delta, self.clip_min, self.clip_max) - x

    def _weight_gradients(self, x, y, sample_weight, delta):
        """One forward/backward pass on x+δ for the weights: (logits, loss, gradients)."""
        with tf.GradientTape() as tape:
            y_pred, loss, scaled_loss = self._forward(x + delta, y, sample_weight)
        return y_pred, loss, tape.gradient(scaled_loss, self.trainable_variables)

    def get_config(self):
        config = super().get_config()
        for key in ("replays", "delta_projection"):
            config.pop(key, None)
        return {**config, "init": self.init, "seed": self.seed}
