"""The stall at the end of a Keras `fit` on a tf.data dataset (and of tf_free's passes and evaluations).

    python scripts/fit_stall.py                          # about 1.5 min on 2 CPU cores
    python scripts/fit_stall.py --calls=8 --call_seconds=1.9
    python scripts/fit_stall.py --paths=keras_fit --call_seconds=6.7   # the issue's 6.7 s calls

Prints, over --calls calls, the seconds from the end of a call's last step to its
return (the stall), before and after the workaround, for:

- `keras.Model.fit` on a repeated dataset: as it is (before), and with
  `options.autotune.enabled = False` (after);
- `tf_free.FreeAdversarialModel.fit`: on a dataset that sets autotuning on (as
  every dataset was before tf_free turned it off in `fit`), and on a plain one;
- `tf_free.loop.fit`, per pass: the wait where the pass's iterator is dropped (at
  the next pass's `iter()`, or at the return after the last pass), on datasets
  that set autotuning on (as every dataset was before the loop turned it off),
  and on plain ones;
- `tf_free.callbacks.RobustnessEvaluation`, per evaluation: the seconds spent
  deleting its iterators (its clean pass and its attacked pass), on a dataset that
  sets autotuning on, and on a plain one.

The cause is tf.data's autotuning, not Keras's epoch iterator or the callbacks
(TensorFlow 2.21). Each iterator of a dataset with autotuning on (tf.data's
default) runs a thread, `Model::OptimizeLoop` (tensorflow/core/framework/model.cc),
that re-tunes the pipeline at doubling intervals and sleeps on a condition variable
in between. Deleting the iterator (Keras's epoch iterator when `fit` returns; a
`for` loop over a dataset at its end) cancels that thread and waits for it
(`RootDataset::Iterator::~Iterator`). But the cancellation
(`tsl::CancellationManager::StartCancelWithStatus`) runs the thread's wake-up
callback before it marks itself cancelled: a thread that wakes at once still finds
`IsCancelled()` false and sleeps again until its next optimization, and the
deletion waits for it. The optimizations come 20·(2^k − 1) ms after the
iterator's first element (..., 0.62, 1.26, 2.54, 5.10, 10.22, 20.46, 40.94 s, then
every 60 s), so a stalled call returns at the next of those times: a PreAct-18
`fit` of 6.7 s returned at 10.2 s. Whether the woken thread runs first is a race;
on a busy 2-core machine it did in about half the calls. `TF_CPP_VMODULE=model=2`
shows it: a stalled deletion logs one more "Waiting for N ms." and returns N ms
later.

The workaround: a dataset without autotuning has no such thread.

    options = tf.data.Options()
    options.autotune.enabled = False
    dataset = dataset.with_options(options)

AUTOTUNE parallelism then stays at its start value, min(16, CPU cores), and
prefetch buffers grow as they need. `tf_free.evaluation.without_autotune` does
this unless the dataset's options set `autotune.enabled`; `fit` on tf_free's
models, `tf_free.loop.fit`, `RobustnessEvaluation` and `evaluation.evaluate_attacks`
apply it. The ImageNet pipeline (`data.build_dataset`) sets autotuning on, for its
decoding on many-core hosts, and pays the wait: up to 60 s a pass.

Each call is sized from a warm-up to train (or, for an evaluation, attack) for
about --call_seconds. The default, 0.95 s, lies between two optimizations (0.62
and 1.26 s), so a stalled call waits about 0.3 s; with 1.9 s, about 0.65 s.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time

from absl import app, flags, logging

# Quiet TensorFlow's C++ start-up chatter unless the caller chose a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_free import FreeAdversarialModel, attacks, callbacks, loop  # noqa: E402

PATHS = ("keras_fit", "free_fit", "loop_fit", "evaluation")

flags.DEFINE_integer("calls", 6, "Timed calls per row (passes, for loop.fit).", lower_bound=1)
flags.DEFINE_float(
    "call_seconds",
    0.95,
    "About how long each call trains (or evaluates, for its attacked pass).",
    lower_bound=0,
)
flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
flags.DEFINE_integer("replays", 2, "FreeAdversarialModel's m.", lower_bound=1)
flags.DEFINE_integer("eval_pgd_steps", 5, "The evaluation's PGD steps.", lower_bound=1)
flags.DEFINE_list("paths", list(PATHS), f"Which of {', '.join(PATHS)} to time.")
flags.DEFINE_float(
    "stall_seconds", 0.1, "A call whose wait is longer counts as stalled (in the table)."
)
flags.DEFINE_string("json_out", None, "Also write the rows here.")
FLAGS = flags.FLAGS

IMAGE_SHAPE, CLASSES = (28, 28, 1), 10


def _data(rows: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(rows, *IMAGE_SHAPE)).astype("float32"), rng.integers(0, CLASSES, rows)


def _base_model():
    return keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(CLASSES),
        ]
    )


def _compile(model):
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _autotune(dataset, enabled: bool):
    """`dataset` with `options.autotune.enabled` set (True: tf.data's default, said explicitly)."""
    options = tf.data.Options()
    options.autotune.enabled = enabled
    return dataset.with_options(options)


def _steps_for(seconds_per_step: float) -> int:
    return max(2, math.ceil(FLAGS.call_seconds / max(seconds_per_step, 1e-4)))


class _Clock(keras.callbacks.Callback):
    """When a call's steps end and, per pass (Keras's epoch), when it begins and its first step."""

    def __init__(self):
        super().__init__()
        self.last_step = self.train_end = None
        self.pass_begin, self.first_step, self.step_ends = {}, {}, []
        self._pass = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._pass = epoch
        self.pass_begin[epoch] = time.perf_counter()

    def on_train_batch_begin(self, batch, logs=None):
        self.first_step.setdefault(self._pass, time.perf_counter())

    def on_train_batch_end(self, batch, logs=None):
        self.last_step = time.perf_counter()
        self.step_ends.append(self.last_step)

    def on_train_end(self, logs=None):
        self.train_end = time.perf_counter()

    def seconds_per_step(self) -> float:
        """The median time between two step ends (the first step's warm-up left out)."""
        return statistics.median(b - a for a, b in zip(self.step_ends, self.step_ends[1:]))


def _fit_tails(model, make_dataset, steps: int, calls: int):
    """Per `fit` call: (seconds from its last step's end to its return, seconds until then)."""
    tails, seconds = [], []
    for _ in range(calls):
        clock = _Clock()
        start = time.perf_counter()
        model.fit(make_dataset(), epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[clock])
        tails.append(time.perf_counter() - clock.last_step)
        seconds.append(clock.last_step - start)
    return tails, seconds


def _warm_up_fit(model, make_dataset) -> int:
    """Traces `fit`'s step; the steps per call that take about --call_seconds."""
    model.fit(make_dataset(), epochs=1, steps_per_epoch=2, verbose=0)
    clock = _Clock()
    model.fit(make_dataset(), epochs=1, steps_per_epoch=6, verbose=0, callbacks=[clock])
    return _steps_for(clock.seconds_per_step())


def keras_fit(with_workaround: bool, calls: int):
    """The reproduction: plain Keras `fit` calls on a repeated dataset."""
    x, y = _data(8 * FLAGS.batch_size, seed=0)

    def make_dataset():
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.batch_size).repeat()
        if with_workaround:
            options = tf.data.Options()
            options.autotune.enabled = False
            dataset = dataset.with_options(options)
        return dataset

    model = _compile(_base_model())
    steps = _warm_up_fit(model, make_dataset)
    return _fit_tails(model, make_dataset, steps, calls)


def _free_model():
    return _compile(FreeAdversarialModel(_base_model(), epsilon=8 / 255, replays=FLAGS.replays))


def free_fit(with_workaround: bool, calls: int):
    """`FreeAdversarialModel.fit`: it turns autotuning off unless the dataset sets it."""
    x, y = _data(8 * FLAGS.batch_size, seed=0)

    def make_dataset():
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.batch_size).repeat()
        return dataset if with_workaround else _autotune(dataset, True)

    model = _free_model()
    steps = _warm_up_fit(model, make_dataset)
    return _fit_tails(model, make_dataset, steps, calls)


def loop_fit(with_workaround: bool, calls: int):
    """`tf_free.loop.fit`, per pass: the wait where the pass's iterator is dropped."""
    x, y = _data(8 * FLAGS.batch_size, seed=0)

    def make_dataset(pass_, skip):
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.batch_size).repeat()
        dataset = dataset.skip(skip)
        return dataset if with_workaround else _autotune(dataset, True)

    model = _free_model()
    model.build_perturbation((FLAGS.batch_size, *IMAGE_SHAPE))
    strategy = tf.distribute.get_strategy()

    def run(passes, batches, clocks=()):
        with tempfile.TemporaryDirectory() as folder:
            state = loop.TrainState(model, folder, strategy)
            loop.fit(
                model,
                make_dataset,
                strategy=strategy,
                passes=passes,
                batches_per_pass=batches,
                state=state,
                callbacks=list(clocks),
                verbose=0,
            )

    run(1, 2)  # traces the step
    clock = _Clock()
    run(1, 6, [clock])
    steps = _steps_for(clock.seconds_per_step())
    clock = _Clock()
    run(calls, steps, [clock])
    returned = time.perf_counter()
    # Pass p's iterator goes when pass p+1 makes its own (between on_epoch_begin
    # and its first step; this also holds making that pass's dataset), and the
    # last one when fit returns.
    tails = [clock.first_step[p] - clock.pass_begin[p] for p in range(1, calls)]
    begins = [clock.pass_begin[p] for p in range(calls)] + [clock.train_end]
    return tails + [returned - clock.train_end], [b - a for a, b in zip(begins, begins[1:])]


class _TimedDeletion:
    """A dataset iterator whose deletion (where the stall is) is timed into `seconds`."""

    def __init__(self, iterator, seconds: list[float]):
        self._iterator, self._seconds = iterator, seconds

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._iterator)

    def __del__(self):
        start = time.perf_counter()
        del self._iterator
        self._seconds.append(time.perf_counter() - start)


@contextlib.contextmanager
def _timed_iterator_deletions(seconds: list[float]):
    """Meanwhile, a Python loop over a tf.data.Dataset times the deletion of its iterator."""
    iterate = tf.data.Dataset.__iter__
    tf.data.Dataset.__iter__ = lambda dataset: _TimedDeletion(iterate(dataset), seconds)
    try:
        yield
    finally:
        tf.data.Dataset.__iter__ = iterate


def evaluation_tails(with_workaround: bool, calls: int):
    """`RobustnessEvaluation.evaluate()`: the seconds spent deleting its iterators."""
    model = _free_model()
    model.build_perturbation((FLAGS.batch_size, *IMAGE_SHAPE))
    model(tf.zeros((1, *IMAGE_SHAPE)))

    def make_callback(batches, log_dir):
        x, y = _data(batches * FLAGS.batch_size, seed=1)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.batch_size)
        callback = callbacks.RobustnessEvaluation(
            dataset if with_workaround else _autotune(dataset, True),
            log_dir=log_dir,
            epsilon=8 / 255,
            step_size=2 / 255,
            steps=FLAGS.eval_pgd_steps,
            verbose=False,
        )
        callback.set_model(model)
        return callback

    with tempfile.TemporaryDirectory() as folder:
        make_callback(1, folder).evaluate()  # traces the attack
        # Sized so that the attacked pass takes about --call_seconds (the clean one less).
        attack, kwargs = make_callback(1, folder)._attack()
        dataset = make_callback(3, folder).dataset
        seconds = []
        start = time.perf_counter()
        with _timed_iterator_deletions(seconds):
            attacks.accuracy_under_attack(model, dataset, attack, verbose=False, **kwargs)
        batches = _steps_for((time.perf_counter() - start - sum(seconds)) / 3)
        callback = make_callback(batches, folder)
        tails, durations = [], []
        for _ in range(calls):
            seconds = []
            start = time.perf_counter()
            with _timed_iterator_deletions(seconds):
                callback.evaluate()
            tails.append(sum(seconds))
            durations.append(time.perf_counter() - start - tails[-1])
    return tails, durations


ROWS = {
    "keras_fit": (
        keras_fit,
        "keras.Model.fit, repeated dataset",
        ("as it is (before)", "options.autotune.enabled = False (after)"),
    ),
    "free_fit": (
        free_fit,
        "FreeAdversarialModel.fit",
        ("dataset sets autotune.enabled = True (before)", "plain dataset (after)"),
    ),
    "loop_fit": (
        loop_fit,
        "tf_free.loop.fit, per pass",
        ("dataset sets autotune.enabled = True (before)", "plain dataset (after)"),
    ),
    "evaluation": (
        evaluation_tails,
        "RobustnessEvaluation, per evaluation",
        ("dataset sets autotune.enabled = True (before)", "plain dataset (after)"),
    ),
}


def measure(paths, calls: int) -> list[dict]:
    rows = []
    for path in paths:
        function, name, settings = ROWS[path]
        for with_workaround, setting in zip((False, True), settings):
            tails, seconds = function(with_workaround, calls)
            rows.append(
                {
                    "path": path,
                    "name": name,
                    "setting": setting,
                    "workaround": with_workaround,
                    "tails": tails,
                    "call_seconds": seconds,
                    "median": statistics.median(tails),
                    "mean": statistics.fmean(tails),
                    "max": max(tails),
                    "stalled": sum(t > FLAGS.stall_seconds for t in tails),
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "name"}), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| path | dataset | calls | call s | stalled | wait after the last step, s: median "
        "| mean | max | each call |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        each = " ".join(f"{t:.2f}" for t in r["tails"])
        lines.append(
            f"| {r['name']} | {r['setting']} | {len(r['tails'])} "
            f"| {statistics.median(r['call_seconds']):.2f} | {r['stalled']} "
            f"| {r['median']:.3f} | {r['mean']:.3f} | {r['max']:.3f} | {each} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    unknown = set(FLAGS.paths) - set(PATHS)
    if unknown:
        raise app.UsageError(f"unknown --paths {sorted(unknown)}; choose from {PATHS}")
    logging.set_verbosity(logging.WARNING)  # not the loop's and the checkpoints' INFO lines
    started = time.perf_counter()
    rows = measure([p for p in PATHS if p in FLAGS.paths], FLAGS.calls)
    print(
        f"\nTensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU(s), "
        f"load average {os.getloadavg()[0]:.2f}, {platform.platform()}; "
        f"{time.perf_counter() - started:.0f} s. Stalled: waited more than "
        f"{FLAGS.stall_seconds:g} s.\n"
    )
    print(table(rows))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
