"""Times natural, free (Alg. 2), fast (FGSM-RS) and K-PGD (Alg. 1) training as `tf_free.train` runs them.

    python scripts/benchmark.py --model=small_cnn --batch_size=128 --m=8
    python scripts/benchmark.py --model=preact_resnet18 --batch_size=64 --m=4 --jit_compile=both

What is timed is what `tf_free.train` builds and runs. The flags make a `TrainConfig`;
`tf_free.runtime` makes the strategy, seeds and dtype policy; `experiment.build_trainer`
builds the compiled model and optimizer (the same model, step sizes, optimizer, mixed
precision and XLA rule as a run: PGD training steps 2.5ε/K unless --pgd_step_size); and a
step is one call of the train function of `tf_free.loop`, `strategy.run(model.train_step)`
on the next global batch. A line per method prints what was built (model class, parameters,
step sizes, XLA mode), read from those objects.

Only the data are the benchmark's: random uniform images in [0, 1] of the dataset's shape
(--dataset, by default the model's usual one) and random labels, held in memory and repeated
by tf.data, so input cost is negligible. Each method is built and warmed up (--warmup steps,
which include tracing and XLA compilation, not timed); then the methods are timed
round-robin, --repeats rounds of --iterations steps each, with the order rotated every round
so that background load hits all of them alike. A step is timed from the call of the train
function until its outputs are Python floats (as the loop converts them), which waits for
the step to finish, also on a GPU. Steps are timed, not whole `fit` calls: the loop's
callbacks and checkpoints are left out. The table gives the median and the best round; on a
shared machine the best is the steadier estimate of the ratios.

One ITERATION is one optimizer step. Natural, fast and PGD training make one per batch; free
training replays each batch m times and makes m per batch, so its time per iteration is its
time per batch / m. Images/s counts images through a training forward/backward pass:
iterations x batch / time. The paper's claims are free/natural ≈ 1 per iteration and
K-PGD/natural ≈ K + 1; fast training's is about 2 (FGSM's pass, then the weights'). A call of the train function runs m steps of free training and one
of natural training, so with small models the fixed cost of a call flatters free training.

Memory column: on GPUs the peak `tf.config.experimental.get_memory_info("GPU:0")` while the
method is built and warmed up; on CPU how much the process's resident memory grew meanwhile
(approximate: memory freed by one method is reused by the next).

Scaling over replicas (weak scaling):

    python scripts/benchmark.py --strategy=mirrored --replicas=all --model=preact_resnet18 \
        --batch_size=64 --m=4 --jit_compile=both

times every replica count R in --replicas (`all`: 1..number of GPUs, or of --cpu_devices
logical CPUs on a machine without GPUs) under a MirroredStrategy over the first R devices.
--batch_size is then the PER-REPLICA batch: the global batch is batch_size x R, so each
device does the same work at every R. Scaling efficiency = images/s(R) / (R x images/s(1))
(relative to the smallest R given if 1 is not), per method and XLA mode; the Markdown table
goes to stdout and to --json_out. The methods are interleaved within each replica count, but
the replica counts run one after another, so on a shared machine a change of background load
between them shows up in the efficiency (each result records the load).

XLA follows `tf_free.runtime.resolve_jit`: with one replica Keras compiles the whole step;
with several, free and PGD training compile each replica's forward/backward and attack
("per replica", the all-reduce outside XLA), and natural training (a plain Keras model)
runs without XLA, so it has no XLA-on row there. One departure, in scaling runs only: free
and PGD training are compiled per replica at R=1 too, so that every R runs the same code.

Without GPUs the replicas are logical devices of one CPU: they share its cores, and one
logical device already uses all of them through intra-op threads, so CPU efficiencies say
next to nothing about multi-GPU scaling. Measure on GPUs for that figure.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time

from absl import app, flags, logging

# Quiet TensorFlow's C++ start-up chatter unless the caller chose a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_free import experiment, loop, run_folder, runtime, summaries  # noqa: E402
from tf_free.config import METHODS, PRECISIONS, ConfigError, TrainConfig  # noqa: E402

# The dataset whose shape a model is timed on when --dataset is not given.
USUAL_DATASETS = {
    "small_cnn": "fashion_mnist",
    "preact_resnet18": "cifar10",
    "wide_resnet": "cifar10",
    "resnet50": "imagenet2012",
    "resnet101": "imagenet2012",
    "resnet152": "imagenet2012",
}
ORDER = ("natural", "free", "fast", "pgd")  # table order
LOGGED = "free+log"  # free training with the TensorBoard summaries (--log_every)


def _base(method: str) -> str:
    """The method a timed variant trains: "free" of "free+log" and of "free*8"."""
    return method.split("+")[0].split("*")[0]


def _steps_per_call(method: str) -> int:
    """Training steps per call of the train function: N of "free*N" (--steps_per_loop), or 1."""
    return int(method.split("*")[1]) if "*" in method else 1


FLAGS = flags.FLAGS
flags.DEFINE_string("model", "small_cnn", "A model of tf_free.train's --model.")
flags.DEFINE_string(
    "dataset",
    None,
    "The dataset whose image shape, classes and normalisation the model is built for "
    "(default: fashion_mnist for small_cnn, cifar10 for the CIFAR models, imagenet2012 for "
    "the ResNets). No data are read.",
)
flags.DEFINE_integer("image_size", None, "Image height and width (default: the dataset's).")
flags.DEFINE_integer("channels", None, "Image channels (default: the dataset's).")
flags.DEFINE_integer("num_classes", None, "Number of classes (default: the dataset's).")
flags.DEFINE_integer(
    "batch_size", 64, "Global batch size; with --replicas, the per-replica batch.", lower_bound=1
)
flags.DEFINE_integer("m", 4, "Free training: replays of each minibatch.", lower_bound=1)
flags.DEFINE_integer("pgd_steps", 7, "PGD training: attack steps K.", lower_bound=1)
flags.DEFINE_float("epsilon", 8.0, "L-inf budget in 0-255 pixel units.", lower_bound=0)
flags.DEFINE_float(
    "pgd_step_size",
    None,
    "PGD training step in 0-255 pixel units (default 2.5·ε/K, as tf_free.train).",
)
flags.DEFINE_enum(
    "jit_compile",
    "true",
    ["true", "false", "both"],
    "XLA, as tf_free.train's --jit_compile (both: time each method with and without).",
)
flags.DEFINE_enum("mixed_precision", "none", list(PRECISIONS), "Keras mixed precision.")
flags.DEFINE_enum(
    "strategy",
    "default",
    ["auto", "default", "mirrored"],
    "tf.distribute strategy, as tf_free.train's --strategy.",
)
flags.DEFINE_list(
    "replicas",
    [],
    "Weak scaling: replica counts to time, e.g. 1,2,4, or 'all' (1..number of GPUs, or of "
    "--cpu_devices logical CPUs without GPUs). Needs --strategy=mirrored; --batch_size is "
    "then per replica.",
)
flags.DEFINE_integer(
    "cpu_devices",
    1,
    "Without GPUs, split the CPU into this many logical devices for --strategy=mirrored.",
    lower_bound=1,
)
flags.DEFINE_integer(
    "warmup", 3, "Untimed steps per method (tracing, XLA compilation).", lower_bound=1
)
flags.DEFINE_integer(
    "repeats", 3, "Timed rounds per method; the median is reported.", lower_bound=1
)
flags.DEFINE_integer("iterations", 4, "Batches (train steps) per timed round.", lower_bound=1)
flags.DEFINE_list("methods", list(ORDER), "Methods to time, a subset of natural,free,fast,pgd.")
flags.DEFINE_integer("seed", 0, "Seed for data and weights.")
flags.DEFINE_integer("data_batches", 4, "Distinct synthetic batches held in memory.", lower_bound=1)
flags.DEFINE_integer(
    "log_every",
    0,
    "Also time free training with the TensorBoard training summaries tf_free.train writes "
    "(tf_free.summaries.TrainingSummaries) every N iterations, interleaved with the others, "
    "and print their overhead; 0: off. tf_free.train's default is about 100 points per run "
    "(the quick start: every 38 iterations).",
    lower_bound=0,
)
flags.DEFINE_integer(
    "steps_per_loop",
    1,
    "Also time every method with N training steps per call of the train function "
    "(tf_free.train's --steps_per_loop), interleaved with one step per call, and print the "
    "difference per iteration: the Python dispatch that N steps per call saves. 1: off.",
    lower_bound=1,
)
flags.DEFINE_string("json_out", None, "Also write the configuration and results here as JSON.")


def dataset_spec(model_name: str):
    """The `DatasetSpec` the model is built for, with --image_size/--channels/--num_classes."""
    name = FLAGS.dataset or USUAL_DATASETS.get(model_name)
    if name is None:
        raise app.UsageError(f"give --dataset for --model={model_name}")
    info = experiment.dataset_info(TrainConfig(dataset=name))
    height, width, channels = info.image_shape
    size = FLAGS.image_size
    shape = (size or height, size or width, FLAGS.channels or channels)
    if None in shape:
        raise app.UsageError(f"{name} has no fixed image size: give --image_size")
    changes = dict(image_shape=shape, num_classes=FLAGS.num_classes or info.num_classes)
    if shape[-1] != channels:  # the dataset's per-channel statistics no longer fit
        changes.update(mean=None, std=None)
    return dataclasses.replace(info, **changes)


def train_config(method: str, info, batch: int, jit: bool) -> TrainConfig:
    """The `TrainConfig` tf_free.train would run with these flags."""
    config = TrainConfig(
        dataset=info.name,
        method=method,
        m=FLAGS.m,
        epsilon=FLAGS.epsilon,
        pgd_steps=FLAGS.pgd_steps,
        pgd_step_size=FLAGS.pgd_step_size,
        batch_size=batch,
        model=FLAGS.model,
        mixed_precision=FLAGS.mixed_precision,
        jit_compile="true" if jit else "false",
        strategy=FLAGS.strategy,
        cpu_devices=FLAGS.cpu_devices,
        seed=FLAGS.seed,
        # The budget (hence the learning-rate schedule) is over the synthetic data.
        train_examples=batch * FLAGS.data_batches,
    )
    try:
        config.validate()
    except ConfigError as e:
        raise app.UsageError(str(e)) from e
    return config


def xla_setting(config: TrainConfig, strategy, scaling: bool):
    """How `config` is compiled (as `runtime.resolve_jit`), or None: not timed.

    Natural training under several replicas has no XLA (resolve_jit turns it off): its
    XLA-on row would repeat the XLA-off one. Scaling runs compile free and PGD training
    per replica at R=1 too, so that every R runs the same code.
    """
    jit = runtime.resolve_jit(config.jit_compile, strategy, config.method)
    if config.jit_compile == "true" and jit is False:
        return None
    if scaling and jit is True and config.method != "natural":
        return "per_replica"
    return jit


def xla_label(model) -> str:
    """The XLA mode of a compiled model, from the model itself."""
    if getattr(model, "xla_per_replica", False):
        return "per replica"
    return "whole step" if model.jit_compile is True else "off"


def build(config: TrainConfig, info, strategy, jit) -> experiment.Trainer:
    """`experiment.build_trainer` after `runtime.set_up`, as tf_free.train builds a run."""
    runtime.set_up(config)  # seed (fresh weights from the same seed), dtype policy
    trainer = experiment.build_trainer(config, info, experiment.build_plan(config, info), strategy)
    if jit != trainer.jit_compile:  # scaling at R=1: per replica (see xla_setting)
        with strategy.scope():
            trainer.model.compile(optimizer=trainer.model.optimizer, jit_compile=jit)
    return trainer


def describe(config: TrainConfig, trainer, strategy) -> str:
    """One line a reader can check: what was built, read from the built objects."""
    model, base = trainer.model, trainer.base
    text = (
        f"built {run_folder.label(config)}: {type(model).__name__}({base.name}), "
        f"{base.count_params():,} parameters, {type(trainer.optimizer).__name__}, "
    )
    if config.method != "natural":
        replays = {
            "free": lambda: f"m={model.replays}",
            "pgd": lambda: f"K={model.steps}",
            "fast": lambda: f"{model.init} start",
        }[config.method]()
        text += (
            f"{replays}, ε={255 * model.epsilon:.4g}/255, step {255 * model.step_size:.4g}/255, "
        )
    return text + (
        f"XLA {xla_label(model)}, policy {model.dtype_policy.name}, "
        f"{strategy.num_replicas_in_sync} replica(s), global batch {config.batch_size}"
    )


def run_step(step, iterator, callback=None, steps=1) -> float:
    """Seconds for one call of `steps` steps, until its outputs are Python floats (as the
    loop reads them), and then `callback.on_train_batch_end` (the TensorBoard summaries) if
    given."""
    start = time.perf_counter()
    if callback is not None:
        callback.on_train_batch_begin(0)  # (the summaries count a call's batches from it)
    logs = {name: float(value) for name, value in step(iterator, steps).items()}
    if callback is not None:
        began = time.perf_counter()
        callback.on_train_batch_end(steps - 1, logs)
        callback.seconds_spent = getattr(callback, "seconds_spent", 0.0) + (
            time.perf_counter() - began
        )
    return time.perf_counter() - start


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: ru_maxrss is KiB (bytes on macOS)
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """Peak device memory on GPU, else the peak RSS sampled every few milliseconds."""

    def __init__(self, interval=0.005):
        self.gpus = tf.config.list_logical_devices("GPU")
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    @property
    def kind(self):
        return "GPU:0 peak" if self.gpus else "peak RSS"

    def __enter__(self):
        if self.gpus:
            tf.config.experimental.reset_memory_stats(self.gpus[0].name)
        else:
            self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.gpus:
            self.peak = tf.config.experimental.get_memory_info(self.gpus[0].name)["peak"]
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


def synthetic_dataset(info, batch_size, num_batches, seed):
    """Random uniform images in [0, 1], random labels; in memory, repeated forever."""
    rng = np.random.default_rng(seed)
    n = batch_size * num_batches
    images = rng.uniform(0.0, 1.0, size=(n, *info.image_shape)).astype("float32")
    labels = rng.integers(0, info.num_classes, size=(n,)).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    ds = ds.batch(batch_size, drop_remainder=True).cache().repeat()
    return ds.prefetch(tf.data.AUTOTUNE)


def _time_round_robin(methods, trainers):
    """--repeats rounds; each times every method once, in an order rotated per round."""
    for repeat in range(FLAGS.repeats):
        order = methods[repeat % len(methods) :] + methods[: repeat % len(methods)]
        for method in order:
            t = trainers[method]
            start = time.perf_counter()
            spent_before = getattr(t["callback"], "seconds_spent", 0.0)
            times = [
                run_step(t["step"], t["iterator"], t["callback"], t["steps"])
                for _ in range(FLAGS.iterations)
            ]
            if t["callback"] is not None:  # the summaries' own share of this round
                spent = t["callback"].seconds_spent - spent_before
                t["callback_share"].append(spent / (sum(times) - spent))
            wall = time.perf_counter() - start
            replays = t["config"].replays
            t["per_iteration"].append(sum(times) / (FLAGS.iterations * t["steps"] * replays))
            t["overhead"].append(wall - sum(times))
            t["step_ms"].append([round(1e3 * x, 3) for x in times])


def time_methods(methods, jit, settings, info, strategy, ds, batch):
    """Builds and warms up every method, then times them round-robin.

    Interleaving the rounds (natural, free, pgd, natural, ...; the order rotates each
    round) exposes every method to the same background load, so the ratios stay
    meaningful on a shared machine even when the absolute times drift. `jit` is the pass
    (XLA on or off), `settings[method]` the jit_compile the method is compiled with and
    `batch` the global batch.
    """
    trainers = {}
    replicas = strategy.num_replicas_in_sync
    load = _load_average()
    if FLAGS.log_every and "free" in methods:
        methods = [*methods, LOGGED]
    if FLAGS.steps_per_loop > 1:
        methods = [*methods, *(f"{m}*{FLAGS.steps_per_loop}" for m in methods if m in ORDER)]
    for method in methods:
        config = train_config(_base(method), info, batch, jit)
        rss_before = _rss_bytes()
        with PeakMemory() as memory:
            trainer = build(config, info, strategy, settings[_base(method)])
            print(describe(config, trainer, strategy), flush=True)
            step, iterator = loop.train_function(trainer.model, strategy, ds)
            start = time.perf_counter()
            for _ in range(FLAGS.warmup):
                run_step(step, iterator, steps=_steps_per_call(method))
            warmup_s = time.perf_counter() - start
        trainers[method] = {
            "config": config,
            "trainer": trainer,
            "step": step,
            "iterator": iterator,
            "memory": memory,
            "rss_before": rss_before,
            "warmup_s": warmup_s,
            "callback": _summaries(trainer, config) if method == LOGGED else None,
            "steps": _steps_per_call(method),
            "callback_share": [],
            "per_iteration": [],
            "overhead": [],
            "step_ms": [],
        }
    # One more untimed step each, now that all are built: a method's first step after the
    # others' warm-ups is slower (memory handed back and touched again).
    for t in trainers.values():
        run_step(t["step"], t["iterator"], steps=t["steps"])
        t["iterations_before"] = loop.iterations(t["trainer"].model)
    # Python's cyclic GC would otherwise sweep the objects left by tracing in the middle of
    # a timed step; collect now and pause it while timing, as timeit does.
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        _time_round_robin(methods, trainers)
    finally:
        if gc_was_enabled:
            gc.enable()

    results = []
    for method in methods:
        t = trainers[method]
        model, base = t["trainer"].model, t["trainer"].base
        replays = t["config"].replays
        counted = loop.iterations(model) - t["iterations_before"]
        expected = FLAGS.repeats * FLAGS.iterations * t["steps"] * replays
        if counted != expected:  # e.g. a loss-scale optimizer skipping steps
            logging.warning(
                "%s: optimizer counted %d iterations, expected %d", method, counted, expected
            )
        seconds = statistics.median(t["per_iteration"])
        memory = t["memory"]
        label = run_folder.label(t["config"])
        results.append(
            {
                "method": method,
                "label": f"{label} +TB"
                if method == LOGGED
                else f"{label} x{t['steps']}/call"
                if t["steps"] > 1
                else label,
                "steps_per_loop": t["steps"],
                "trainer": type(model).__name__,
                "jit_compile": jit,
                "xla": xla_label(model),
                "replicas": replicas,
                "global_batch": batch,
                "step_size_255": 255 * model.step_size if _base(method) != "natural" else None,
                "load_average_before": load,
                "ms_per_iteration": 1e3 * seconds,
                "ms_per_iteration_repeats": [1e3 * s for s in t["per_iteration"]],
                "ms_per_iteration_min": 1e3 * min(t["per_iteration"]),
                "ms_per_batch": 1e3 * seconds * replays,
                "images_per_s": batch / seconds,
                "iterations_per_batch": replays,
                "optimizer_iterations_timed": counted,
                "overhead_ms_per_round": 1e3 * statistics.median(t["overhead"]),
                "ms_per_step_by_repeat": t["step_ms"],
                "warmup_s": t["warmup_s"],
                "memory_kind": memory.kind,
                "peak_memory_mib": memory.peak / 2**20,
                "memory_growth_mib": None
                if memory.gpus
                else (memory.peak - t["rss_before"]) / 2**20,
                "params": int(base.count_params()),
                "summaries_share_by_repeat": t["callback_share"] or None,
            }
        )
    trainers.clear()
    keras.backend.clear_session()
    gc.collect()
    return results


_LOG_DIR = None


def _summaries(trainer, config):
    """The training-summaries callback `tf_free.train` adds, writing to a temporary folder."""
    global _LOG_DIR
    _LOG_DIR = _LOG_DIR or tempfile.TemporaryDirectory(prefix="tf_free_benchmark_logs_")
    callback = summaries.TrainingSummaries(
        tempfile.mkdtemp(dir=_LOG_DIR.name),  # removed at exit
        log_every=FLAGS.log_every,
        epsilon=config.epsilon / 255.0,
        perturbation=getattr(trainer.model, "perturbation", None),
    )
    callback.set_model(trainer.model)
    callback.set_params({})
    callback.on_train_begin()
    callback.on_epoch_begin(0)
    return callback


def _load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def print_table(rows, title):
    natural = next((r for r in rows if r["method"] == "natural"), None)
    gpu = rows and rows[0]["memory_growth_mib"] is None
    mem = "GPU peak MiB" if gpu else "+RSS MiB"
    width = max([12, *(len(r["label"]) + 2 for r in rows)])
    print(f"\n{title}")
    header = (
        f"{'method':<{width}}{'ms/iteration':>14}{'ms/batch':>11}{'images/s':>11}"
        f"{'vs natural':>12}{'best ms/it':>12}{'best vs nat':>13}{mem:>14}{'warm-up s':>11}"
        "   ms/iteration per repeat"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r["ms_per_iteration"] / natural["ms_per_iteration"] if natural else None
        r["ratio_to_natural"] = ratio
        memory = r["peak_memory_mib"] if gpu else r["memory_growth_mib"]
        repeats = " ".join(f"{t:.1f}" for t in r["ms_per_iteration_repeats"])
        ratio_text = f"{ratio:.2f}x" if ratio is not None else "-"
        best = r["ms_per_iteration_min"]
        best_ratio = best / natural["ms_per_iteration_min"] if natural else None
        r["best_ratio_to_natural"] = best_ratio
        best_text = f"{best_ratio:.2f}x" if best_ratio is not None else "-"
        print(
            f"{r['label']:<{width}}{r['ms_per_iteration']:>14.2f}{r['ms_per_batch']:>11.2f}"
            f"{r['images_per_s']:>11.1f}{ratio_text:>12}{best:>12.2f}{best_text:>13}{memory:>14.0f}"
            f"{r['warmup_s']:>11.1f}   {repeats}"
        )
    if natural and natural["xla"] != rows[-1]["xla"]:
        print(f"(natural with XLA {natural['xla']}, the others {rows[-1]['xla']})")
    if natural:
        for r in rows:
            if r["method"] == "free":
                verdict = "ok" if r["ratio_to_natural"] <= 1.10 else "ABOVE target"
                print(
                    f"free/natural = {r['ratio_to_natural']:.3f} (median), "
                    f"{r['best_ratio_to_natural']:.3f} (best)  "
                    f"(ideal 1.0, target <= 1.10: {verdict})"
                )
            if r["method"] == "fast":
                print(
                    f"fast/natural = {r['ratio_to_natural']:.2f} (median), "
                    f"{r['best_ratio_to_natural']:.2f} (best)  (ideal about 2: two "
                    "forward/backward passes per iteration)"
                )
            if r["method"] == "pgd":
                print(
                    f"{r['label']}/natural = {r['ratio_to_natural']:.2f} (median), "
                    f"{r['best_ratio_to_natural']:.2f} (best)  "
                    f"(ideal about {FLAGS.pgd_steps + 1})"
                )
    for r in rows:
        if r["steps_per_loop"] > 1:
            one = next(x for x in rows if x["method"] == _base(r["method"]))
            median = r["ms_per_iteration"] / one["ms_per_iteration"] - 1
            best = r["ms_per_iteration_min"] / one["ms_per_iteration_min"] - 1
            saved = one["ms_per_iteration"] - r["ms_per_iteration"]
            print(
                f"{one['label']}: {r['steps_per_loop']} steps per call against 1: "
                f"{100 * median:+.1f}% per iteration (median), {100 * best:+.1f}% (best); "
                f"{saved:.2f} ms of dispatch saved per iteration (median)."
            )
        if r["method"] == LOGGED:
            free = next(x for x in rows if x["method"] == "free")
            median = r["ms_per_iteration"] / free["ms_per_iteration"] - 1
            best = r["ms_per_iteration_min"] / free["ms_per_iteration_min"] - 1
            share = statistics.median(r["summaries_share_by_repeat"])
            print(
                f"TensorBoard summaries every {FLAGS.log_every} iterations: their own time "
                f"is {100 * share:.2f}% of the training steps' (median over rounds; target "
                f"< 2%). Against free training without them, interleaved: {100 * median:+.2f}% "
                f"per iteration (median), {100 * best:+.2f}% (best), which also holds the "
                "machine's noise between rounds."
            )


def scaling_table(results):
    """Adds `scaling_efficiency` to every result; returns the Markdown table.

    Efficiency = images/s(R) / (R x images/s(R0) / R0), R0 the smallest R timed with the
    same method and XLA mode (1 when 1 was timed).
    """
    lines = [
        "| replicas | global batch | XLA | method | ms/iteration | images/s | efficiency |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {"off": 0, "whole step": 1, "per replica": 2}
    rows = sorted(results, key=lambda r: (order[r["xla"]], ORDER.index(r["method"]), r["replicas"]))
    for r in rows:
        base = min(
            (b for b in results if (b["method"], b["xla"]) == (r["method"], r["xla"])),
            key=lambda b: b["replicas"],
        )
        r["scaling_efficiency"] = (r["images_per_s"] / r["replicas"]) / (
            base["images_per_s"] / base["replicas"]
        )
        lines.append(
            f"| {r['replicas']} | {r['global_batch']} | {r['xla']} | {r['label']} "
            f"| {r['ms_per_iteration']:.2f} | {r['images_per_s']:.1f} "
            f"| {r['scaling_efficiency']:.2f} |"
        )
    return "\n".join(lines)


def replica_devices() -> list[str]:
    """The devices replicas run on: the GPUs, else the first --cpu_devices logical CPUs."""
    devices = tf.config.list_logical_devices("GPU")
    devices = devices or tf.config.list_logical_devices("CPU")[: FLAGS.cpu_devices]
    return [d.name for d in devices]


def scaling_strategy(replicas: int) -> tf.distribute.Strategy:
    """MirroredStrategy over the first `replicas` devices (`runtime.build_strategy` mirrors
    over all GPUs; weak scaling needs the first R of them)."""
    return tf.distribute.MirroredStrategy(replica_devices()[:replicas])


def replica_counts():
    """--replicas as a sorted list of ints (empty without --replicas)."""
    values = [v.strip() for v in FLAGS.replicas if v.strip()]
    if not values:
        return []
    available = len(replica_devices())
    if values == ["all"]:
        return list(range(1, available + 1))
    try:
        counts = sorted({int(v) for v in values})
    except ValueError:
        raise app.UsageError("--replicas must be 'all' or a list of integers") from None
    if counts[0] < 1 or counts[-1] > available:
        where = "GPUs" if tf.config.list_logical_devices("GPU") else "logical CPUs (--cpu_devices)"
        raise app.UsageError(f"--replicas must be in 1..{available}: {available} {where}")
    return counts


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    methods = [m.strip() for m in FLAGS.methods if m.strip()]
    if not methods or set(methods) - set(METHODS):
        raise app.UsageError(f"--methods must be a subset of {','.join(ORDER)}")
    methods = [m for m in ORDER if m in methods]
    if FLAGS.replicas and FLAGS.strategy != "mirrored":
        raise app.UsageError("--replicas needs --strategy=mirrored")
    if FLAGS.steps_per_loop > 1 and FLAGS.replicas:
        raise app.UsageError("--steps_per_loop times one replica count, without --replicas")
    if FLAGS.log_every and (FLAGS.replicas or "free" not in methods):
        raise app.UsageError("--log_every times free training, without --replicas")
    runtime.configure_cpu_devices(FLAGS.cpu_devices)  # before TensorFlow initialises
    info = dataset_spec(FLAGS.model)
    counts = replica_counts()
    scaling = bool(counts)
    if not scaling:
        strategy = runtime.build_strategy(FLAGS.strategy, FLAGS.cpu_devices)
        counts = [strategy.num_replicas_in_sync]
        if FLAGS.batch_size % counts[0]:
            raise app.UsageError(f"--batch_size must be divisible by the {counts[0]} replicas")
    jits = {"true": [True], "false": [False], "both": [True, False]}[FLAGS.jit_compile]
    for method in methods:  # every setting checked before any work
        train_config(method, info, FLAGS.batch_size * counts[0], jits[0])

    gpus = tf.config.list_physical_devices("GPU")
    print(
        f"tf_free benchmark: TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPU cores, "
        f"GPUs: {[g.name for g in gpus] or 'none'}"
    )
    print(
        f"model={FLAGS.model} dataset={info.name} input={info.image_shape} "
        f"classes={info.num_classes} batch={FLAGS.batch_size} m={FLAGS.m} K={FLAGS.pgd_steps} "
        f"precision={FLAGS.mixed_precision} strategy={FLAGS.strategy} "
        f"(replicas: {','.join(map(str, counts))}) warmup={FLAGS.warmup} "
        f"repeats={FLAGS.repeats} iterations/repeat={FLAGS.iterations} batches"
    )
    if scaling:
        print(
            f"Weak scaling over {replica_devices()[: counts[-1]]}: per-replica batch "
            f"{FLAGS.batch_size} fixed, global batch = {FLAGS.batch_size} x replicas."
        )
    results = []
    load_before = _load_average()
    for replicas in counts:
        if scaling:
            strategy = scaling_strategy(replicas)
        batch = FLAGS.batch_size * replicas if scaling else FLAGS.batch_size
        ds = synthetic_dataset(info, batch, FLAGS.data_batches, FLAGS.seed)
        for jit in jits:
            settings = {
                m: xla_setting(train_config(m, info, batch, jit), strategy, scaling)
                for m in methods
            }
            timed = [m for m in methods if settings[m] is not None]
            if timed:
                results += time_methods(timed, jit, settings, info, strategy, ds, batch)
    load_after = _load_average()
    print(
        "\nOne iteration = one optimizer step (free: batch time / m); median over repeats, "
        "methods interleaved."
    )
    if load_before is not None:
        print(
            f"1-min load average: {load_before:.2f} before, {load_after:.2f} after "
            f"({os.cpu_count()} cores; other processes skew absolute times, less the ratios)"
        )
    print(
        "+RSS MiB: growth of the process's resident memory while the method was built and "
        "warmed up (approximate: memory freed by earlier methods is reused)."
        if not gpus
        else "GPU peak MiB: peak GPU:0 memory while the method was built and warmed up."
    )
    for replicas in counts:
        for jit in jits:
            rows = [r for r in results if (r["replicas"], r["jit_compile"]) == (replicas, jit)]
            if rows:
                print_table(
                    rows,
                    f"{replicas} replica(s), global batch {rows[0]['global_batch']}, "
                    f"XLA {'on' if jit else 'off'}",
                )
    if True in jits and max(counts) > 1 and "natural" in methods:
        print(
            "\nXLA on with more than one replica: free/PGD compile each replica's step; "
            "natural training (a plain Keras model) runs without XLA there, as in "
            "tf_free.train, so it is timed only with XLA off (--jit_compile=false or both)."
        )
    table = None
    if scaling:
        table = scaling_table(results)
        print(
            f"\nWeak scaling (per-replica batch {FLAGS.batch_size}; efficiency = images/s(R) / "
            f"(R x images/s({counts[0]})) per method and XLA mode; median over repeats):\n"
        )
        print(table)
        if not gpus:
            print(
                f"\nNo GPUs: the replicas are logical devices of one CPU sharing its "
                f"{os.cpu_count()} cores, and one device already uses all of them through "
                "intra-op threads, so these efficiencies say next to nothing about multi-GPU "
                "scaling. Run on GPUs for that figure."
            )
    if FLAGS.json_out:
        config = {
            name: FLAGS[name].value
            for name in (
                "model batch_size m pgd_steps epsilon pgd_step_size jit_compile "
                "mixed_precision strategy warmup repeats iterations seed data_batches "
                "cpu_devices"
            ).split()
        }
        config.update(
            dataset=info.name,
            input_shape=list(info.image_shape),
            num_classes=info.num_classes,
            methods=methods,
            tensorflow=tf.__version__,
            keras=keras.__version__,
            cpu_count=os.cpu_count(),
            gpus=[g.name for g in gpus],
            replicas=counts,
            weak_scaling=scaling,
            global_batches=[FLAGS.batch_size * r if scaling else FLAGS.batch_size for r in counts],
            load_average_before=load_before,
            load_average_after=load_after,
        )
        with open(FLAGS.json_out, "w") as f:
            json.dump({"config": config, "results": results, "scaling_table": table}, f, indent=2)
        print(f"\nwrote {FLAGS.json_out}")


if __name__ == "__main__":
    app.run(main)
