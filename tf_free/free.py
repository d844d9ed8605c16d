"""Adversarial training as Keras models.

`FreeAdversarialModel` is Alg. 2 of "Adversarial Training for Free!"
(Shafahi et al., NeurIPS 2019); `PGDAdversarialModel` is Alg. 1, K-PGD
adversarial training (Madry et al.), the baseline the paper compares against.
Both wrap a base model that maps float images in [clip_min, clip_max] to
logits, and train it with `compile()` and `fit()` like any Keras model.
"""

from __future__ import annotations

import inspect
import math

import keras
import tensorflow as tf

from tf_free import attacks, evaluation

DELTA_PROJECTIONS = ("valid_image", "epsilon_ball")
ATTACK_BN_MODES = ("train", "inference")


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
        self._xla_per_replica = False

    def call(self, inputs, training=False):
        return self.base_model(inputs, training=training)

    def compile(self, *args, jit_compile="auto", **kwargs):
        """Keras's compile, plus `jit_compile="per_replica"`.

        Keras XLA-compiles the whole train step, which under tf.distribute
        with several replicas it does not support (keras-team/keras#18716,
        #19005): the step holds the all-reduce. "per_replica" instead compiles
        each replica's own computation (forward, backward and, for PGD
        training, the attack) with `tf.function(jit_compile=True)` and leaves
        the all-reduce and the optimizer update outside XLA, so it works
        under MirroredStrategy and MultiWorkerMirroredStrategy.
        """
        self._xla_per_replica = jit_compile == "per_replica"
        super().compile(
            *args, jit_compile=False if self._xla_per_replica else jit_compile, **kwargs
        )

    @property
    def xla_per_replica(self) -> bool:
        """Compiled with `jit_compile="per_replica"` (and XLA not disabled since)."""
        return self._xla_per_replica

    def uses_xla(self) -> bool:
        """Whether XLA compiles the train step, or each replica's part of it.

        True with Keras's `jit_compile=True` (the whole step) and with
        `jit_compile="per_replica"`.
        """
        return self.jit_compile is True or self._xla_per_replica

    def disable_xla(self) -> None:
        """Runs the train step without XLA from now on (e.g. after XLA failed to compile it).

        A train function made before (Keras's `make_train_function`, or
        `tf_free.loop`'s) still holds the compiled step: make it again.
        """
        self.jit_compile = False
        self._xla_per_replica = False

    def fit(self, *args, **kwargs):
        """Keras's `fit`; a `tf.data.Dataset` as `x` or `validation_data` runs without
        tf.data's autotuning unless its options set it (`evaluation.without_autotune`)."""
        call = _fit_arguments(self, args, kwargs)
        return super().fit(*call.args, **call.kwargs)

    def _per_replica(self, fn):
        """`fn` as it runs on each replica: XLA-compiled with "per_replica"."""
        return self._xla(fn.__name__) if self._xla_per_replica else fn

    def _xla(self, name):
        # One compiled function per method, made once (the m replays share
        # it) and kept out of Keras/checkpoint tracking.
        cache = self.__dict__.setdefault("_xla_functions", {})
        if name not in cache:
            cache[name] = tf.function(getattr(self, name), jit_compile=True)
        return cache[name]

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

    `delta_projection` says how δ is kept after its step:
    - "valid_image" (default): δ is clipped to ±ε and then so that x+δ is a
      valid image, as locuslab/fast_adversarial `CIFAR10/train_free.py`
      L103-104 does;
    - "epsilon_ball": δ is only clipped to ±ε and the model sees
      clip(x+δ, clip_min, clip_max), as the paper's own codes do
      (ashafahi/free_adv_train `free_model.py` L50-51 and `free_train.py` L56-59;
      mahyarnajibi/FreeAdversarialTraining `main_free.py` L182-183, L199-200).
      The two differ only in the δ carried to the next minibatch.
    The forward pass always sees clip(x+δ), so its gradient is zero on pixels
    the clip saturates.
    """

    def __init__(
        self,
        base_model: keras.Model,
        *,
        epsilon: float,
        replays: int,
        step_size: float | None = None,
        delta_projection: str = "valid_image",
        clip_min: float = 0.0,
        clip_max: float = 1.0,
        **kwargs,
    ):
        super().__init__(base_model, clip_min=clip_min, clip_max=clip_max, **kwargs)
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        if delta_projection not in DELTA_PROJECTIONS:
            raise ValueError(
                f"delta_projection must be one of {DELTA_PROJECTIONS}, got {delta_projection!r}"
            )
        if isinstance(replays, bool) or int(replays) != replays or replays < 1:
            raise ValueError(f"replays (m) must be an integer >= 1, got {replays!r}")
        if step_size is not None and step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.epsilon = float(epsilon)
        self.replays = int(replays)
        self.step_size = self.epsilon if step_size is None else float(step_size)
        self.delta_projection = delta_projection
        self._perturbation = None

    @property
    def perturbation(self) -> tf.Variable | None:
        """δ, one copy per replica (None until the first batch or `build_perturbation`)."""
        return None if self._perturbation is None else self._perturbation.variable

    def build_perturbation(self, batch_shape) -> tf.Variable:
        """Creates δ = 0 of shape [per-replica batch, *image shape], if absent.

        `fit` and `train_on_batch` call this with the first batch's shape; call
        it yourself when driving `train_step` from your own loop (as
        `tf_free.loop` does), or before `fit` on inputs whose shape it cannot read.
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
            # one copy per replica; MEAN, not NONE: with NONE, saving and export
            # fail ("Could not convert from tf.VariableAggregation NONE to
            # tf.distribute.ReduceOp"). Checkpoints go through `_Perturbation`.
            variable = tf.Variable(
                tf.zeros(batch_shape, tf.float32),
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.MEAN,
                name="perturbation",
            )
        self._perturbation = _Perturbation(variable, self.distribute_strategy)
        return variable

    def fit(self, *args, **kwargs):
        """Keras's `fit`, after creating δ from the shape of the first batch.

        Takes Keras's arguments. δ gets the first batch's per-replica shape, read
        from arrays (with `batch_size`, 32 by default), a `tf.data.Dataset` (its
        first element), a `tf.distribute.DistributedDataset`, a
        `keras.utils.PyDataset` (`x[0]`) or a Python generator (its first batch,
        which is then trained on as usual). For other inputs, call
        `build_perturbation` first. A later `fit` may use batches as large as
        the first one, not larger. A `tf.data.Dataset` runs without tf.data's
        autotuning unless its options set it (`evaluation.without_autotune`).
        """
        call = _fit_arguments(self, args, kwargs)
        x = call.arguments.get("x")
        if inspect.isgenerator(x):
            first = next(x)
            call.arguments["x"] = _prepend(first, x)  # the peeked batch is trained on
            self.build_perturbation(self._split_shape(_images(first).shape))
        else:
            shape = self._first_batch_shape(x, call.arguments)
            if shape is not None:
                self.build_perturbation(shape)
            elif self.perturbation is None:
                raise ValueError(
                    f"FreeAdversarialModel.fit cannot read the batch shape of a "
                    f"{type(x).__name__}: call build_perturbation((per-replica batch, "
                    "*image shape)) first"
                )
        return super().fit(*call.args, **call.kwargs)

    def train_on_batch(self, x, y=None, *args, **kwargs):
        """Keras's `train_on_batch`, after creating δ of `x`'s shape.

        Under tf.distribute each replica then takes the whole of `x`, as Keras does.
        """
        self.build_perturbation(keras.ops.shape(x))
        return super().train_on_batch(x, y, *args, **kwargs)

    def _first_batch_shape(self, x, arguments) -> tf.TensorShape | None:
        """Per-replica shape of the first batch `fit` will train on (None: unknown)."""
        if isinstance(x, (tf.data.Dataset, tf.distribute.DistributedDataset)):
            if isinstance(x, tf.data.Dataset):  # distributed as fit distributes it
                x = self.distribute_strategy.experimental_distribute_dataset(x.take(1))
            images = _images(next(iter(x)))
            return self.distribute_strategy.experimental_local_results(images)[0].shape
        if isinstance(x, keras.utils.PyDataset):
            return self._split_shape(_images(x[0]).shape)
        if hasattr(x, "shape"):  # arrays, batched as keras.Model.fit batches them
            rows = int(x.shape[0])
            split = arguments.get("validation_split")
            if split and arguments.get("validation_data") is None:
                rows = int(math.floor(rows * (1.0 - split)))  # the training part
            batch_size = arguments.get("batch_size")
            steps = arguments.get("steps_per_epoch")
            if batch_size is None:
                batch_size = math.ceil(rows / steps) if steps else 32
            return self._split_shape([min(batch_size, rows), *x.shape[1:]])
        return None

    def _split_shape(self, global_shape) -> tf.TensorShape:
        """The first replica's part of a global batch of this shape, as `fit` splits it."""
        global_shape = tf.TensorShape(global_shape)
        rows = tf.data.Dataset.from_tensors(tf.zeros([global_shape[0]]))  # only rows are split
        split = next(iter(self.distribute_strategy.experimental_distribute_dataset(rows)))
        local = self.distribute_strategy.experimental_local_results(split)[0]
        return tf.TensorShape([local.shape[0], *global_shape[1:]])

    def _unpack(self, data):
        """(x as δ's dtype, y, sample_weight, rows): a final batch may be smaller than δ."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.perturbation is None:
            raise ValueError("call build_perturbation(batch_shape) before train_step")
        x = tf.cast(x, self.perturbation.dtype)
        return x, y, sample_weight, tf.shape(x)[0]

    def _store(self, delta, batch):
        """δ's first `batch` rows ← `delta`; the rows beyond a short batch keep their values."""
        self.perturbation.assign(tf.concat([delta, self.perturbation.read_value()[batch:]], axis=0))

    def train_step(self, data):
        x, y, sample_weight, batch = self._unpack(data)
        # Alg. 2: replay the minibatch m times. A Python loop (unrolled; m is
        # small): Keras runs train_step without AutoGraph, so `for _ in
        # tf.range(m)` raises OperatorNotAllowedInGraphError, and a
        # tf.while_loop around optimizer.apply fails under MirroredStrategy
        # (its merge_call cannot run inside control flow).
        for _ in range(self.replays):
            delta = self.perturbation.read_value()[:batch]
            # ONE forward pass on x+δ and ONE backward pass for both g_θ and
            # g_adv = ∇δ loss (one GradientTape, in `_replay_gradients`).
            y_pred, loss, weight_grads, delta_grad = self._per_replica(self._replay_gradients)(
                x, y, sample_weight, delta
            )
            # θ ← θ − τ·g_θ, by the optimizer (the all-reduce over replicas).
            self.optimizer.apply(weight_grads, self.trainable_variables)
            # δ ← clip(δ + step·sign(g_adv), −ε, ε) (a non-finite g_adv from
            # an fp16 overflow gives no step), with x+δ kept valid for
            # "valid_image"; the rows beyond a short batch keep their values.
            delta = tf.clip_by_value(
                delta + self.step_size * attacks.gradient_sign(delta_grad),
                -self.epsilon,
                self.epsilon,
            )
            if self.delta_projection == "valid_image":
                delta = tf.clip_by_value(x + delta, self.clip_min, self.clip_max) - x
            self._store(delta, batch)
        # Metrics from the last replay's logits, as the paper reports training.
        return self._metrics_result(x, y, y_pred, loss, sample_weight)

    def _replay_gradients(self, x, y, sample_weight, delta):
        """One forward pass on x+δ, one backward pass: (logits, loss, g_θ, g_adv)."""
        with tf.GradientTape() as tape:
            tape.watch(delta)
            x_adv = tf.clip_by_value(x + delta, self.clip_min, self.clip_max)
            y_pred, loss, scaled_loss = self._forward(x_adv, y, sample_weight)
        weight_grads, delta_grad = tape.gradient(scaled_loss, [self.trainable_variables, delta])
        return y_pred, loss, weight_grads, delta_grad

    def get_config(self):
        return {
            **super().get_config(),
            "epsilon": self.epsilon,
            "replays": self.replays,
            "step_size": self.step_size,
            "delta_projection": self.delta_projection,
        }


@keras.saving.register_keras_serializable(package="tf_free")
class PGDAdversarialModel(_AdversarialModel):
    """K-PGD adversarial training (Alg. 1; Madry et al.): the paper's baseline.

    For each minibatch: K steps of `tf_free.attacks.pgd` (K forward and
    backward passes, weights frozen) find x_adv, then one forward/backward
    pass on x_adv updates the weights. About K+1 times natural training's cost.

    The attack is `tf_free.attacks.pgd(select="last")`: a random start, then
    exactly K signed-gradient steps, and the weights are trained on the K-th
    iterate, as in Madry et al.'s code (MadryLab/cifar10_challenge
    `pgd_attack.py` L43-61, `LinfPGDAttack.perturb`, called by `train.py` L103).

    `attack_bn` is the mode of the K attack passes:
    - "train" (default), as the official codes: batch norm normalises with the
      batch's own statistics, and each attack pass also moves the moving
      averages (K+1 updates per iteration), as a model in training mode does
      in Madry et al.'s TF code (`tf.contrib.layers.batch_norm(...,
      updates_collections=None, is_training=True)`, ashafahi/free_adv_train
      `free_model.py` L116-117, the same model code) and in
      locuslab/fast_adversarial `CIFAR10/train_pgd.py` (`model.train()`, L72);
    - "inference": the attack sees the moving averages and changes nothing
      (a weaker adversary during training; tf_free's behaviour before 0.2).
    Models without batch norm (the small CNN) train the same either way.
    """

    def __init__(
        self,
        base_model: keras.Model,
        *,
        epsilon: float,
        steps: int,
        step_size: float,
        random_start: bool = True,
        attack_bn: str = "train",
        clip_min: float = 0.0,
        clip_max: float = 1.0,
        **kwargs,
    ):
        super().__init__(base_model, clip_min=clip_min, clip_max=clip_max, **kwargs)
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        if attack_bn not in ATTACK_BN_MODES:
            raise ValueError(f"attack_bn must be one of {ATTACK_BN_MODES}, got {attack_bn!r}")
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps (K) must be an integer >= 1, got {steps!r}")
        if step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.epsilon = float(epsilon)
        self.steps = int(steps)
        self.step_size = float(step_size)
        self.random_start = bool(random_start)
        self.attack_bn = attack_bn

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = tf.cast(x, tf.float32)
        x_adv, y_pred, loss, grads = self._per_replica(self._attack_and_gradients)(
            x, y, sample_weight
        )
        # Alg. 1, outer step: one SGD step on the loss at x_adv.
        self.optimizer.apply(grads, self.trainable_variables)
        return self._metrics_result(x_adv, y, y_pred, loss, sample_weight)

    def _attack_and_gradients(self, x, y, sample_weight):
        """x_adv by K-step PGD, then one forward/backward pass on it."""
        # Alg. 1, inner loop: x_adv by K-step PGD on the current weights, with
        # a fresh random start for every iteration.
        x_adv = attacks.pgd(
            lambda images: self(images, training=self.attack_bn == "train"),
            x,
            y,
            epsilon=self.epsilon,
            step_size=self.step_size,
            steps=self.steps,
            random_start=self.random_start,
            clip_min=self.clip_min,
            clip_max=self.clip_max,
            seed=self.optimizer.iterations,
            # The K-th iterate after exactly K passes, as Madry et al.'s training
            # attack: no pass on the clean or final images, no early stop (which
            # would make x_adv depend on which examples share the batch).
            select="last",
        )
        x_adv = tf.stop_gradient(x_adv)
        with tf.GradientTape() as tape:
            y_pred, loss, scaled_loss = self._forward(x_adv, y, sample_weight)
        return x_adv, y_pred, loss, tape.gradient(scaled_loss, self.trainable_variables)

    def get_config(self):
        return {
            **super().get_config(),
            "epsilon": self.epsilon,
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.random_start,
            "attack_bn": self.attack_bn,
        }


def _fit_arguments(model, args, kwargs) -> inspect.BoundArguments:
    """Keras's `fit` arguments, bound; its tf.data datasets without tf.data's autotuning."""
    call = inspect.signature(super(_AdversarialModel, model).fit).bind(*args, **kwargs)
    for name in ("x", "validation_data"):
        if name in call.arguments:
            # Keras's fit would wait at its end for tf.data autotuning's lost wake-up (Model::OptimizeLoop in https://github.com/tensorflow/tensorflow/blob/v2.21.0/tensorflow/core/framework/model.cc).
            call.arguments[name] = evaluation.without_autotune(call.arguments[name])
    return call


def _images(batch):
    """The inputs of a batch (x, y[, sample_weight]) or (x,)."""
    return keras.utils.unpack_x_y_sample_weight(batch)[0]


def _prepend(first, rest):
    """A generator of `first`, then the rest (what `fit` sees of a peeked generator)."""
    yield first
    yield from rest


# The TensorFlow internal of this module, fenced here: checked on TF 2.21.0 with
# Keras 3.15.1 (Keras's own TF backend builds on the same internals: its layers
# are `tf.__internal__.tracking.AutoTrackable`s, keras/src/backend/tensorflow/
# trackable.py).
#
# δ must be checkpointed as every replica's rows (the copies of the ON_READ
# variable differ: each replica holds the δ of its own part of the batch) and
# restored under another replica count. Only a `tf.__internal__.tracking.
# Trackable` can say which tensors `tf.train.Checkpoint` saves for it
# (`_serialize_to_tensors`) and how they are restored (`_restore_from_tensors`).
# The public ways fail; tried with two MirroredStrategy replicas holding
# different values:
# - the ON_READ `tf.Variable` itself in the checkpoint (as an attribute, or in
#   a `tf.Module`): TF saves the MEAN over the replicas, in the per-replica
#   shape, so the replicas' δ are lost, and restoring under another replica
#   count fails ("Received incompatible tensor with shape (4, 2) when
#   attempting to restore variable with shape (8, 2)");
# - the same with a changing batch dimension (shape=[None, ...]): the MEAN is
#   saved too, and restored under one replica it silently gives a δ of 4 rows
#   where the global batch has 8;
# - one global variable of [global batch, ...] (shape=[None, ...]; created in
#   the strategy's scope, so a MirroredVariable) that each replica writes its
#   rows of, by slice assignment or `scatter_update`: the replicas' copies
#   diverge, and the checkpoint holds replica 0's copy only;
# - `tf.train.experimental.PythonState`: δ goes through a host string
#   (`.ATTRIBUTES/py_state`), not the float tensor
#   `model/_perturbation/.ATTRIBUTES/global_perturbation` that the checkpoints
#   of existing runs hold, so they would no longer restore;
# - Keras 3's `save_own_variables`/`load_own_variables` serve `.weights.h5` and
#   `.keras` files: `tf.train.Checkpoint` never calls them.
# (Not tried: a public global copy kept in sync by `loop.TrainState` before a
# save and after a restore; a plain `tf.train.Checkpoint(model=...)`, as in
# tests/test_distribute.py, would then save a stale δ and restore none.)
_InternalTrackable = tf.__internal__.tracking.Trackable


class _Perturbation(_InternalTrackable):
    """Checkpoints δ as one global tensor: the replicas' δ stacked in replica order.

    A checkpoint of the ON_READ variable itself would store the MEAN over
    replicas. This stores [replicas × per-replica batch, *image] (row i·b+j is
    row j of replica i's δ, i.e. the δ of the global batch's row i·b+j), so a
    checkpoint written under R replicas restores under R' replicas of the same
    global batch: each replica takes its own rows. Works with the default
    strategy, MirroredStrategy and MultiWorkerMirroredStrategy (the gather is a
    collective there: every worker saves, as tf.distribute requires).
    """

    def __init__(self, variable: tf.Variable, strategy: tf.distribute.Strategy):
        self.variable = variable
        self._strategy = strategy

    def _serialize_to_tensors(self):
        local = self._strategy.experimental_local_results(self.variable)
        if len(local) < self._strategy.num_replicas_in_sync:  # other workers hold the rest
            value = self._strategy.gather(self.variable, axis=0)
        else:
            # Concatenated here, not by `gather`: its collective keys clash
            # between two MirroredStrategy objects in one process.
            value = tf.concat([tf.identity(v) for v in local], axis=0)
        return {"global_perturbation": value}

    def _restore_from_tensors(self, restored_tensors):
        value = restored_tensors["global_perturbation"]
        rows = self.variable.shape[0]
        replicas = self._strategy.num_replicas_in_sync
        want = [rows * replicas, *self.variable.shape[1:]]
        if value.shape.as_list() != want:
            raise ValueError(
                f"the checkpoint's perturbation δ has shape {value.shape.as_list()} "
                f"(global batch, image), this run's is {want} ({replicas} replica(s) of "
                f"{rows}): resume with the same global batch size and image size"
            )

        def assign_own_rows():
            i = tf.distribute.get_replica_context().replica_id_in_sync_group
            self.variable.assign(value[i * rows : (i + 1) * rows])

        self._strategy.run(assign_own_rows)
        return tf.no_op()
