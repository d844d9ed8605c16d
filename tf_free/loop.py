"""The training loop of `tf_free.train`: `strategy.run(model.train_step)`, resumable.

Keras's `fit` cannot resume within an epoch, does not checkpoint δ, and is
broken under MultiWorkerMirroredStrategy in Keras 3 (keras-team/keras#20585).
This is the thin loop of TensorFlow's custom-training guide
(https://www.tensorflow.org/tutorials/distribute/custom_training): the same
`train_step` under any strategy, Keras callbacks (progress bar, TensorBoard,
robustness) called as `fit` calls them, and a `tf.train.CheckpointManager`
holding everything a resumed run needs:

- the model's weights, the optimizer's slots and `iterations` (so the
  learning-rate schedule continues), δ for every replica (`free._Perturbation`);
- the pass over the data, the number of batches done in it (the data order of
  a pass is a function of the seed and the pass: `data.build_dataset(epoch=,
  skip=)`), and the training time so far.

Words: the budget is in natural epochs; a pass is one sweep over the data, of
`batches_per_pass` batches; an iteration is one optimizer step, so free
training's m replays of a batch are m iterations. Keras's callbacks keep their
own words: `on_epoch_begin(epoch)` is called once per pass, and
`params["epochs"]` is the number of passes.

TensorFlow writes a checkpoint's files first and then, atomically, the
`checkpoint` index that names the latest one, so a kill mid-save leaves the
previous checkpoint as the latest.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from collections.abc import Callable

import keras
import tensorflow as tf
from absl import logging

from tf_free import evaluation


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that cannot be written)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored into this run."""


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Worker 0 (or the only process) writes TensorBoard logs, checkpoints and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Waits for every worker (a no-op in one process): an all-reduce of nothing."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)


def weights_fingerprint(model: keras.Model) -> str:
    """sha256 of the model's weights: equal on every worker after a synchronous step."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(keras.ops.convert_to_numpy(weight).tobytes())
    return digest.hexdigest()


class TrainState:
    """The model, the optimizer and where training is, as one checkpoint.

    `passes_done` passes are complete and `batches_done` batches of the next
    one; `seconds` of training so far (without evaluation: the loop stops the
    clock around callbacks) and `eval_seconds` of evaluation. In the checkpoint they keep the keys
    of the first runs' checkpoints (`epoch`, `batch_in_epoch`, `train_seconds`),
    which therefore still restore.
    """

    def __init__(self, model: keras.Model, directory: str, strategy, max_to_keep: int = 2):
        self.model = model
        self.passes_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.batches_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch_in_epoch")
        # Training time without evaluation (`start_clock`/`stop_clock`), and
        # the time of the evaluations during training.
        self.seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="train_seconds")
        self.eval_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="eval_seconds")
        parts = dict(
            model=model,
            optimizer=model.optimizer,
            # Checkpoint keys: unchanged, or existing runs no longer resume.
            epoch=self.passes_done,
            batch_in_epoch=self.batches_done,
            train_seconds=self.seconds,
        )
        self.checkpoint = tf.train.Checkpoint(**parts, eval_seconds=self.eval_seconds)
        # A checkpoint of tf_free 0.2 or earlier has no eval_seconds.
        self._without_eval_seconds = tf.train.Checkpoint(**parts)
        self._clock_since = None
        self._unsaved_seconds = 0.0
        self.directory = directory
        self.chief = is_chief(strategy)
        # Every worker saves (the δ gather is a collective); only the chief's
        # copy is kept (https://www.tensorflow.org/tutorials/distribute/multi_worker_with_keras).
        write_dir = directory
        if not self.chief:
            write_dir = os.path.join(directory, f".worker-{strategy.cluster_resolver.task_id}")
        self.manager = tf.train.CheckpointManager(self.checkpoint, write_dir, max_to_keep)

    @property
    def latest(self) -> str | None:
        return tf.train.latest_checkpoint(self.directory)

    def restore(self) -> bool:
        """Restores the latest checkpoint of `directory`; False if there is none."""
        path = self.latest
        if path is None:
            return False
        try:
            keys = {name for name, _ in tf.train.list_variables(path)}
            checkpoint = (
                self.checkpoint
                if "eval_seconds/.ATTRIBUTES/VARIABLE_VALUE" in keys
                else self._without_eval_seconds
            )
            checkpoint.restore(path).assert_existing_objects_matched()
        except Exception as e:  # noqa: BLE001 - TF raises OpError, ValueError, IndexError...
            reason = str(e).strip().splitlines()[0][:400]
            raise CheckpointError(
                f"cannot restore checkpoint {path}: {reason}. It is left as it is; use "
                "another --model_dir, or --overwrite to start this one again."
            ) from e
        return True

    def start_clock(self) -> None:
        """Training time runs until `stop_clock` (kept in Python; `seconds` at each save)."""
        self._clock_since = time.time()

    def stop_clock(self) -> None:
        if self._clock_since is not None:
            self._unsaved_seconds += time.time() - self._clock_since
            self._clock_since = None

    def train_seconds(self) -> float:
        """Training time so far, the running clock included."""
        running = time.time() - self._clock_since if self._clock_since is not None else 0.0
        return float(self.seconds) + self._unsaved_seconds + running

    def save_at(self, passes_done: int, batches_done: int) -> None:
        """Checkpoints "`passes_done` passes and `batches_done` batches of the next done"."""
        running = self._clock_since is not None
        now = time.time()
        self.stop_clock()  # the checkpoint holds the time until now
        self.seconds.assign_add(self._unsaved_seconds)
        self._unsaved_seconds = 0.0
        self.passes_done.assign(passes_done)
        self.batches_done.assign(batches_done)
        self.save()
        if running:
            self._clock_since = now  # saving counts as training time

    def save(self) -> str:
        try:
            path = self.manager.save(checkpoint_number=iterations(self.model))
        except (tf.errors.OpError, OSError) as e:
            # TF prefixes the OS's reason ("No space left on device") with op names.
            reason = (getattr(e, "message", None) or str(e)).strip().rsplit("; ", 1)[-1]
            for partial in tf.io.gfile.glob(os.path.join(self.manager.directory, "*_temp")):
                tf.io.gfile.rmtree(partial)
            raise TrainingError(
                f"could not write a checkpoint to {self.manager.directory}: {reason}. "
                f"The previous checkpoint ({self.latest or 'none'}) is kept."
            ) from e
        if not self.chief:
            shutil.rmtree(self.manager.directory, ignore_errors=True)
        return path


def fit(
    model: keras.Model,
    make_dataset: Callable[[int, int], tf.data.Dataset],
    *,
    strategy: tf.distribute.Strategy,
    passes: int,
    batches_per_pass: int,
    state: TrainState,
    total_batches: int | None = None,
    callbacks: list[keras.callbacks.Callback] = (),
    checkpoint_every: int = 0,
    steps_per_loop: int = 1,
    verbose: int = 1,
    log_names: dict[str, str] | None = None,
) -> keras.callbacks.History:
    """Trains from where `state` stands to `passes` passes; checkpoints as it goes.

    Args:
      make_dataset: (pass, batches to skip) -> that pass's dataset of global
        batches, the same on every worker (the strategy shards it).
      passes: sweeps over the data (the last may be partial: `total_batches`).
      batches_per_pass: batches in a whole pass.
      state: restored (or fresh) `TrainState`; saved at the end of every pass
        and every `checkpoint_every` batches (0: at the ends of passes only; a
        multiple of `steps_per_loop`).
      total_batches: stop after this many batches in all (the last pass is
        then partial); default passes × batches_per_pass. Each batch is one
        call of `model.train_step`: free training's m replays of it count as
        m iterations of the optimizer, not here.
      callbacks: Keras callbacks, called as Keras's `fit` calls them, with a
        pass as Keras's epoch.
      steps_per_loop: batches per call of the step function (Keras's
        `steps_per_execution`, Orbit's `steps_per_loop`): fewer Python
        dispatches on accelerators. The calls end at multiples of it within a
        pass (and at the pass's end), and the callbacks see each call as Keras
        shows `steps_per_execution`: `on_train_batch_begin(first batch)`,
        `on_train_batch_end(last batch)`. The same batches in the same order
        as one step per call: with op determinism, the same weights bit for bit.
      log_names: renames the step's outputs for the progress bar, the
        callbacks and History (e.g. {"loss": "adv_loss"}).

    Raises:
      TrainingError: the loss became NaN or infinite (the checkpoint before it
        is kept), or a checkpoint could not be written.
      ValueError: `checkpoint_every` is not a multiple of `steps_per_loop`.
    """
    if steps_per_loop < 1 or (checkpoint_every and checkpoint_every % steps_per_loop):
        raise ValueError(
            f"checkpoint_every={checkpoint_every} must be a multiple of steps_per_loop="
            f"{steps_per_loop} >= 1 (TrainConfig.resolved_checkpoint_every rounds it)"
        )
    callback_list = keras.callbacks.CallbackList(
        list(callbacks),
        add_history=True,
        add_progbar=verbose != 0,
        model=model,
        verbose=verbose,
        epochs=passes,
        steps=batches_per_pass,
        # For tf_free's callbacks: the state, whose `train_seconds()` is the
        # training time so far and which keeps the evaluation time.
        train_state=state,
    )

    if total_batches is None:
        total_batches = passes * batches_per_pass
    log_names = log_names or {}
    train_function = _make_train_function(model, strategy)
    start_pass = int(state.passes_done)
    first_dataset = None
    if start_pass < passes:
        first_dataset = make_dataset(start_pass, int(state.batches_done))
        _build_metrics(model, strategy, first_dataset.element_spec)
    model.stop_training = False
    callback_list.on_train_begin()
    logs = {}
    for pass_ in range(start_pass, passes):
        if model.stop_training:  # e.g. a callback's on_train_begin: the run has ended
            break
        skip = int(state.batches_done) if pass_ == start_pass else 0
        model.reset_metrics()
        callback_list.on_epoch_begin(pass_)
        dataset = first_dataset if pass_ == start_pass else make_dataset(pass_, 0)
        iterator = iter(_distribute(strategy, dataset))
        # Training time: the steps, the input and the checkpoints, without the
        # callbacks (evaluation, logging, the progress bar).
        state.start_clock()
        position = skip
        # The last pass of an iteration budget may stop within the data.
        batches_this_pass = min(batches_per_pass, total_batches - pass_ * batches_per_pass)
        batch = skip
        while batch < batches_this_pass:
            # Up to the next multiple of steps_per_loop (a resumed pass realigns).
            steps = min(steps_per_loop - batch % steps_per_loop, batches_this_pass - batch)
            state.stop_clock()
            callback_list.on_train_batch_begin(batch)
            state.start_clock()
            try:
                logs = train_function(iterator, tf.constant(steps))
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
                if not (_uses_xla(model) and batch == skip and pass_ == start_pass):
                    raise
                # XLA's compile error comes before the step changes any state;
                # only the batch was taken: start the pass's iterator again.
                logging.warning(
                    "XLA cannot compile this train step (%s); training goes on without XLA.",
                    str(e).strip().splitlines()[0][:300],
                )
                _disable_xla(model)
                train_function = _make_train_function(model, strategy)
                iterator = iter(_distribute(strategy, make_dataset(pass_, skip)))
                logs = train_function(iterator, tf.constant(steps))
            logs = {k: float(v) for k, v in logs.items()}
            last = batch + steps - 1
            if not math.isfinite(logs["loss"]):
                where = f"batch {last + 1}" if steps == 1 else f"batches {batch + 1}-{last + 1}"
                raise TrainingError(
                    f"the training loss is {logs['loss']} at pass {pass_ + 1}, {where} "
                    f"(iteration {iterations(model)}); stopped. "
                    f"The last good checkpoint is kept: {state.latest or 'none'}."
                )
            logs = {log_names.get(k, k): v for k, v in logs.items()}
            position = batch = last + 1
            state.stop_clock()
            callback_list.on_train_batch_end(last, logs)
            state.start_clock()
            # After the callbacks: a run killed between the two resumes from
            # the previous checkpoint and writes this batch's summaries again
            # (the resumed run first cuts its logs back to the checkpoint).
            if (
                checkpoint_every
                and position % checkpoint_every == 0
                and position < batches_this_pass
            ):
                state.save_at(pass_, position)
            if model.stop_training:
                break
        state.stop_clock()
        # Evaluation and TensorBoard first, then the pass's checkpoint: a run
        # killed in between redoes the pass's end, so its summaries are
        # written once, never skipped.
        callback_list.on_epoch_end(pass_, logs)
        if position == batches_this_pass:
            state.save_at(pass_ + 1, 0)
        else:  # stopped by a callback
            state.save_at(pass_, position)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
    logging.info(
        "training done: %d pass(es), %d iterations", int(state.passes_done), iterations(model)
    )
    return model.history


def _uses_xla(model) -> bool:
    """XLA compiles (part of) the step: a tf_free model's `uses_xla()`, else Keras's jit_compile."""
    if hasattr(model, "uses_xla"):  # FreeAdversarialModel, PGDAdversarialModel
        return model.uses_xla()
    return model.jit_compile is True  # a plain keras.Model (natural training)


def _disable_xla(model) -> None:
    if hasattr(model, "disable_xla"):
        model.disable_xla()
    else:
        model.jit_compile = False


def train_function(model, strategy, dataset: tf.data.Dataset):
    """The step `fit` runs, and an iterator over `dataset` distributed as `fit` does it.

    `step(iterator, steps=1)` trains on the next `steps` global batches and
    returns the metrics after the last (the mean over replicas). For timing
    steps (scripts/benchmark.py).
    """
    _build_metrics(model, strategy, dataset.element_spec)
    function = _make_train_function(model, strategy)
    return (
        lambda iterator, steps=1: function(iterator, tf.constant(steps)),
        iter(_distribute(strategy, dataset)),
    )


def _make_train_function(model, strategy):
    """`steps` training steps on the next global batches in one call, as Keras's fit
    makes its step (with `steps_per_execution`): the count is a tensor, so one trace
    serves every count, and the steps are a `tf.while_loop`, not an unrolled graph."""
    step_function = model.train_step
    if model.jit_compile is True:  # one replica: XLA-compile the whole step, as fit does
        step_function = tf.function(model.train_step, jit_compile=True)

    def one_step(iterator):
        outputs = strategy.run(step_function, args=(next(iterator),))
        # As Keras's fit: the mean over replicas of each replica's metric results.
        return {k: strategy.reduce("MEAN", v, axis=None) for k, v in outputs.items()}

    @tf.function
    def train_function(iterator, steps):
        outputs = one_step(iterator)
        for _ in tf.range(steps - 1):
            outputs = one_step(iterator)
        return outputs

    return train_function


def _build_metrics(model, strategy, element_spec) -> None:
    """Creates the loss and metric variables before `train_function` is traced.

    Under MirroredStrategy a tf.function that creates variables on its first
    call fails ("You must feed a value for placeholder tensor"); Keras's `fit`
    builds them beforehand too (`_symbolic_build`). One zero example of the
    dataset's structure is enough: no data is read.
    """
    example = tf.nest.map_structure(lambda s: tf.zeros([1, *s.shape[1:]], s.dtype), element_spec)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(example)
    with strategy.scope():
        y_pred = model(x)
        model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    model.reset_metrics()


def _distribute(strategy, dataset: tf.data.Dataset):
    """Splits each global batch into contiguous per-replica slices, in replica order.

    Within one process that is what `experimental_distribute_dataset` does.
    Across workers its auto-sharding would deal examples out one by one;
    instead every worker reads the same global batches and keeps its own
    replicas' slices, so replica i gets rows [i·b, (i+1)·b) whatever the
    number of workers (and δ's rows mean the same thing in a checkpoint).
    """
    # Deleting an autotuned iterator (at the end of every pass) can wait up to 60 s for
    # tf.data's autotuning thread: its lost wake-up in Model::OptimizeLoop
    # (https://github.com/tensorflow/tensorflow/blob/v2.21.0/tensorflow/core/framework/model.cc;
    # scripts/fit_stall.py). Off unless the dataset's options set it (ImageNet keeps it).
    dataset = evaluation.without_autotune(dataset)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return strategy.experimental_distribute_dataset(dataset)

    def worker_dataset(context: tf.distribute.InputContext):
        local = context.num_replicas_in_sync // context.num_input_pipelines
        first = context.input_pipeline_id * local

        def own_slices(*batch):
            per_replica = tf.shape(batch[0])[0] // context.num_replicas_in_sync
            rows = tf.range(first * per_replica, (first + local) * per_replica)
            return tf.data.Dataset.from_tensor_slices(
                tuple(
                    tf.reshape(tf.gather(t, rows), tf.concat([[local, -1], tf.shape(t)[1:]], 0))
                    for t in batch
                )
            )

        return dataset.flat_map(own_slices)

    return strategy.distribute_datasets_from_function(worker_dataset)


class CallCallback(keras.callbacks.Callback):
    """A callback that counts the batches of each call: `loop.fit` with `steps_per_loop`
    calls `on_train_batch_begin(first)` and `on_train_batch_end(last)` once per call, as
    Keras does with `steps_per_execution`. Without a begin (driven by hand), one batch."""

    _first_batch = None

    def on_train_batch_begin(self, batch, logs=None):
        self._first_batch = batch

    def _batches_in_call(self, batch) -> int:
        first, self._first_batch = self._first_batch, None
        return 1 if first is None else batch - first + 1


def reached_multiple(before: int, after: int, every: int) -> bool:
    """Whether a count going from `before` to `after` reached a multiple of `every`."""
    return after // every > before // every


def iterations(model: keras.Model) -> int:
    """`optimizer.iterations` as an int (`int()` fails on a multi-worker variable)."""
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations.value))
