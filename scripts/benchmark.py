"""Times natural, free (Alg. 2) and K-PGD (Alg. 1) training on one model, in one process.

    python scripts/benchmark.py --model=small_cnn --batch_size=128 --m=8
    python scripts/benchmark.py --model=preact_resnet18 --batch_size=64 --m=4 --jit_compile=both

Every method trains the same architecture (fresh weights from the same seed) on the same
synthetic data: random uniform images in [0, 1] and random labels, held in memory and
repeated by tf.data, so input cost is negligible. Each method is built, compiled and warmed
up (the warm-up `fit` includes tracing and XLA compilation and is not timed); then the
methods are timed round-robin, `--repeats` `fit` calls of `--iterations` batches each, with
the order rotated every repeat so that background load hits all of them alike. A step is
timed from `on_train_batch_begin` to `on_train_batch_end` (which waits for the step's
results), so `fit`'s per-call set-up is left out. The table gives the median and the best
repeat; on a shared machine the best is the steadier estimate of the ratios.

One ITERATION is one optimizer step. Natural and PGD training make one per batch; free
training replays each batch m times and makes m per batch, so its time per iteration is its
time per batch / m. Images/s counts images through a training forward/backward pass:
iterations x batch / time. The paper's claims are free/natural ≈ 1 per iteration and
K-PGD/natural ≈ K + 1. Free training runs m steps per call of the compiled function and
natural training one, so with small models the per-call dispatch (about a millisecond)
flatters free training; `--steps_per_execution=m` evens that out.

Runs unchanged on GPUs: GPUs are only listed for information and, when present, used for
the memory column (peak `tf.config.experimental.get_memory_info("GPU:0")` while the method
is built and warmed up). On CPU the column is how much the process's resident memory grew
while the method was built and warmed up: approximate, since memory freed by one method is
reused by the next. `build_strategy` is the hook for other tf.distribute strategies.

Scaling over replicas (weak scaling):

    python scripts/benchmark.py --strategy=mirrored --replicas=all --model=preact_resnet18 \
        --batch_size=64 --m=4 --jit_compile=both

times every replica count R in `--replicas` (`all`: 1..number of GPUs, or of `--cpu_devices`
logical CPUs on a machine without GPUs) under a MirroredStrategy over the first R devices.
`--batch_size` is then the PER-REPLICA batch: the global batch is batch_size x R, so each
device does the same work at every R. Scaling efficiency = images/s(R) / (R x images/s(1))
(relative to the smallest R given if 1 is not), per method and XLA setting; the Markdown
table goes to stdout and to `--json_out`. The methods are interleaved within each replica
count, but the replica counts run one after another, so on a shared machine a change of
background load between them shows up in the efficiency (each result records the load).

XLA under several replicas: Keras's `jit_compile=True` compiles the whole train step, all-
reduce included, and fails under MirroredStrategy with more than one replica. So "XLA on"
means `jit_compile="per_replica"` for free and PGD training (each replica's forward/backward
and attack XLA-compiled, the all-reduce outside XLA); in scaling runs at every R, 1
included, so that every R runs the same code. Natural training is a plain Keras model,
which cannot be compiled per replica: with XLA on it is timed (whole step) at one replica
only, and at R > 1 only its XLA-off rows exist.

Without GPUs the replicas are logical devices of one CPU: they share its cores, and one
logical device already uses all of them through intra-op threads, so CPU efficiencies say
next to nothing about multi-GPU scaling (expect about 1/R). Measure on GPUs for that figure.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time

from absl import app, flags, logging

# Quiet TensorFlow's C++ start-up chatter unless the caller chose a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# Runnable as `python scripts/benchmark.py` from the repository root without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tf_free  # noqa: E402
from tf_free import experiment, models  # noqa: E402

# (height/width, channels, classes) when --image_size/--channels/--num_classes are not given.
DEFAULT_SHAPES = {
    "small_cnn": (28, 1, 10),
    "preact_resnet18": (32, 3, 10),
    "wide_resnet": (32, 3, 10),
    "resnet50": (224, 3, 1000),
    "resnet101": (224, 3, 1000),
    "resnet152": (224, 3, 1000),
}
METHODS = ("natural", "free", "pgd")
POLICIES = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model",
    "small_cnn",
    "A name in tf_free.models.MODELS: small_cnn (28x28x1), preact_resnet18 (32x32x3), ...",
)
flags.DEFINE_integer("image_size", None, "Image height and width (default: the model's).")
flags.DEFINE_integer("channels", None, "Image channels (default: the model's).")
flags.DEFINE_integer("num_classes", None, "Number of classes (default: the model's).")
flags.DEFINE_integer(
    "batch_size", 64, "Global batch size; with --replicas, the per-replica batch.", lower_bound=1
)
flags.DEFINE_integer("m", 4, "Free training: replays of each minibatch.", lower_bound=1)
flags.DEFINE_integer("pgd_steps", 7, "PGD training: attack steps K.", lower_bound=1)
flags.DEFINE_float("epsilon", 8.0, "L-inf budget in 0-255 pixel units.", lower_bound=0)
flags.DEFINE_float("pgd_step_size", 2.0, "PGD attack step in 0-255 pixel units.", lower_bound=0)
flags.DEFINE_enum("jit_compile", "true", ["true", "false", "both"], "XLA for the train step.")
flags.DEFINE_enum("mixed_precision", "none", list(POLICIES), "Keras dtype policy.")
flags.DEFINE_enum(
    "strategy", "default", ["default", "mirrored"], "tf.distribute strategy (see build_strategy)."
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
    "warmup", 3, "Untimed batches per method (tracing, XLA compilation).", lower_bound=1
)
flags.DEFINE_integer(
    "repeats", 3, "Timed fit calls per method; the median is reported.", lower_bound=1
)
flags.DEFINE_integer("iterations", 4, "Batches (train steps) per timed fit call.", lower_bound=1)
flags.DEFINE_integer(
    "steps_per_execution",
    1,
    "Keras steps_per_execution for every method (amortises per-call dispatch; must divide "
    "--warmup and --iterations).",
    lower_bound=1,
)
flags.DEFINE_list("methods", list(METHODS), "Methods to time, a subset of natural,free,pgd.")
flags.DEFINE_integer("seed", 0, "Seed for data and weights.")
flags.DEFINE_integer("data_batches", 4, "Distinct synthetic batches held in memory.", lower_bound=1)
flags.DEFINE_string("json_out", None, "Also write the configuration and results here as JSON.")


def replica_devices() -> list[str]:
    """The devices replicas run on: the GPUs, else the first --cpu_devices logical CPUs."""
    devices = tf.config.list_logical_devices("GPU")
    devices = devices or tf.config.list_logical_devices("CPU")[: FLAGS.cpu_devices]
    return [d.name for d in devices]


def build_strategy(name: str, replicas: int | None = None) -> tf.distribute.Strategy:
    """The hook for distributed timing: `default` is one device, `mirrored` the first
    `replicas` of `replica_devices()` (all of them when `replicas` is None).

    Models are built and compiled in `strategy.scope()` and `fit` splits the global batch,
    so another strategy only needs a branch here (and, for multi-worker, a custom loop:
    Keras 3's `fit` does not work under MultiWorkerMirroredStrategy, keras-team/keras#20585).
    """
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(replica_devices()[:replicas])
    return tf.distribute.get_strategy()


def xla_setting(method, xla, replicas, scaling):
    """The jit_compile `method` is compiled with in the XLA on/off pass; None: not timed.

    Keras's jit_compile=True (the whole step) fails under more than one replica; free and
    PGD training then use "per_replica" (in scaling runs at every R, so all R run the same
    code). Natural training is a plain Keras model: XLA-compiled at one replica only.
    """
    if not xla:
        return False
    if method == "natural":
        return True if replicas == 1 else None
    return "per_replica" if replicas > 1 or scaling else True


def xla_label(setting):
    return {False: "off", True: "whole step", "per_replica": "per replica"}[setting]


class BatchTimer(keras.callbacks.Callback):
    """Wall time of each train step, from on_train_batch_begin to on_train_batch_end.

    Overriding on_train_batch_end makes Keras call it synchronously with the logs turned
    into Python floats, which waits for the step to finish (also on a GPU).
    """

    def __init__(self):
        super().__init__()
        self.times = []
        self._start = None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if logs:
            float(next(iter(logs.values())))  # already a float; a sync if it is not
        self.times.append(time.perf_counter() - self._start)


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


def input_shape(model_name):
    size, channels, classes = DEFAULT_SHAPES.get(model_name, (None, None, None))
    size = FLAGS.image_size or size
    channels = FLAGS.channels or channels
    classes = FLAGS.num_classes or classes
    if None in (size, channels, classes):
        raise app.UsageError(f"give --image_size, --channels and --num_classes for {model_name}")
    return (size, size, channels), classes


def synthetic_dataset(shape, num_classes, batch_size, num_batches, seed):
    """Random uniform images in [0, 1], random labels; in memory, repeated forever."""
    rng = np.random.default_rng(seed)
    n = batch_size * num_batches
    images = rng.uniform(0.0, 1.0, size=(n, *shape)).astype("float32")
    labels = rng.integers(0, num_classes, size=(n,)).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    ds = ds.batch(batch_size, drop_remainder=True).cache().repeat()
    return ds.prefetch(tf.data.AUTOTUNE)


def build_trainer(method, shape, num_classes, jit):
    """A compiled Keras model for `method`, on a fresh base model from the seed."""
    keras.utils.set_random_seed(FLAGS.seed)
    base = models.get_model(FLAGS.model, shape, num_classes)
    eps = FLAGS.epsilon / 255.0
    if method == "natural":
        model = base
    elif method == "free":
        model = tf_free.FreeAdversarialModel(base, epsilon=eps, replays=FLAGS.m)
    elif method == "pgd":
        model = tf_free.PGDAdversarialModel(
            base, epsilon=eps, steps=FLAGS.pgd_steps, step_size=FLAGS.pgd_step_size / 255.0
        )
    else:
        raise ValueError(method)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit,
        steps_per_execution=FLAGS.steps_per_execution,
    )
    return model, base


def _label(method):
    return {"natural": "natural", "free": f"free m={FLAGS.m}", "pgd": f"PGD-{FLAGS.pgd_steps}"}[
        method
    ]


def _time_round_robin(methods, trainers, ds):
    """`--repeats` rounds; each times every method once, in an order rotated per round."""
    for repeat in range(FLAGS.repeats):
        order = methods[repeat % len(methods) :] + methods[: repeat % len(methods)]
        for method in order:
            t = trainers[method]
            steps_per_batch = FLAGS.m if method == "free" else 1
            timer = BatchTimer()
            start = time.perf_counter()
            t["model"].fit(
                ds,
                steps_per_epoch=FLAGS.iterations,
                epochs=1,
                verbose=0,
                shuffle=False,
                callbacks=[timer],
            )
            wall = time.perf_counter() - start
            # With steps_per_execution > 1 the timer sees one "batch" per execution.
            t["per_iteration"].append(sum(timer.times) / (FLAGS.iterations * steps_per_batch))
            t["fit_overhead"].append(wall - sum(timer.times))
            t["step_ms"].append([round(1e3 * x, 3) for x in timer.times])


def time_methods(methods, jit, settings, strategy, ds, batch, shape, num_classes):
    """Builds and warms up every method, then times them round-robin.

    Interleaving the repeats (natural, free, pgd, natural, ...; the order rotates each
    repeat) exposes every method to the same background load, so the ratios stay
    meaningful on a shared machine even when the absolute times drift. `jit` is the pass
    (XLA on or off), `settings[method]` the jit_compile the method is compiled with and
    `batch` the global batch.
    """
    trainers = {}
    replicas = strategy.num_replicas_in_sync
    load = _load_average()
    for method in methods:
        logging.info(
            "building and warming up %s, %d replica(s), jit_compile=%s",
            method,
            replicas,
            settings[method],
        )
        rss_before = _rss_bytes()
        with PeakMemory() as memory:
            with strategy.scope():
                model, base = build_trainer(method, shape, num_classes, settings[method])
            start = time.perf_counter()
            model.fit(ds, steps_per_epoch=FLAGS.warmup, epochs=1, verbose=0, shuffle=False)
            warmup_s = time.perf_counter() - start
        trainers[method] = {
            "model": model,
            "base": base,
            "memory": memory,
            "rss_before": rss_before,
            "warmup_s": warmup_s,
            "iterations_before": int(model.optimizer.iterations.numpy()),
            "per_iteration": [],
            "fit_overhead": [],
            "step_ms": [],
        }
    # One more untimed batch each, now that all are built: a method's first step after the
    # others' warm-ups is slow (memory handed back and touched again; +50-100 ms seen).
    for method in methods:
        trainers[method]["model"].fit(
            ds, steps_per_epoch=FLAGS.steps_per_execution, epochs=1, verbose=0, shuffle=False
        )
        trainers[method]["iterations_before"] = int(
            trainers[method]["model"].optimizer.iterations.numpy()
        )
    # Python's cyclic GC would otherwise sweep the objects left by tracing in the middle of
    # a timed step (tens of ms); collect now and pause it while timing, as timeit does.
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        _time_round_robin(methods, trainers, ds)
    finally:
        if gc_was_enabled:
            gc.enable()

    results = []
    for method in methods:
        t = trainers[method]
        steps_per_batch = FLAGS.m if method == "free" else 1
        counted = int(t["model"].optimizer.iterations.numpy()) - t["iterations_before"]
        expected = FLAGS.repeats * FLAGS.iterations * steps_per_batch
        if counted != expected:  # e.g. a loss-scale optimizer skipping steps
            logging.warning(
                "%s: optimizer counted %d iterations, expected %d", method, counted, expected
            )
        seconds = statistics.median(t["per_iteration"])
        memory = t["memory"]
        results.append(
            {
                "method": method,
                "label": _label(method),
                "jit_compile": jit,
                "xla": xla_label(settings[method]),
                "replicas": replicas,
                "global_batch": batch,
                "load_average_before": load,
                "ms_per_iteration": 1e3 * seconds,
                "ms_per_iteration_repeats": [1e3 * s for s in t["per_iteration"]],
                "ms_per_iteration_min": 1e3 * min(t["per_iteration"]),
                "ms_per_batch": 1e3 * seconds * steps_per_batch,
                "images_per_s": batch / seconds,
                "iterations_per_batch": steps_per_batch,
                "optimizer_iterations_timed": counted,
                "fit_overhead_ms_per_call": 1e3 * statistics.median(t["fit_overhead"]),
                "ms_per_timed_call_by_repeat": t["step_ms"],
                "warmup_s": t["warmup_s"],
                "memory_kind": memory.kind,
                "peak_memory_mib": memory.peak / 2**20,
                "memory_growth_mib": None
                if memory.gpus
                else (memory.peak - t["rss_before"]) / 2**20,
                "params": int(t["base"].count_params()),
            }
        )
    trainers.clear()
    keras.backend.clear_session()
    gc.collect()
    return results


def _load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def print_table(rows, title):
    natural = next((r for r in rows if r["method"] == "natural"), None)
    gpu = rows and rows[0]["memory_growth_mib"] is None
    mem = "GPU peak MiB" if gpu else "+RSS MiB"
    print(f"\n{title}")
    header = (
        f"{'method':<12}{'ms/iteration':>14}{'ms/batch':>11}{'images/s':>11}"
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
            f"{r['label']:<12}{r['ms_per_iteration']:>14.2f}{r['ms_per_batch']:>11.2f}"
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
            if r["method"] == "pgd":
                print(
                    f"PGD-{FLAGS.pgd_steps}/natural = {r['ratio_to_natural']:.2f} (median), "
                    f"{r['best_ratio_to_natural']:.2f} (best)  "
                    f"(ideal about {FLAGS.pgd_steps + 1})"
                )


def scaling_table(results):
    """Adds `scaling_efficiency` to every result; returns the Markdown table.

    Efficiency = images/s(R) / (R x images/s(R0) / R0), R0 the smallest R timed with the
    same method and XLA setting (1 when 1 was timed).
    """
    lines = [
        "| replicas | global batch | XLA | method | ms/iteration | images/s | efficiency |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {"off": 0, "whole step": 1, "per replica": 2}
    rows = sorted(
        results, key=lambda r: (order[r["xla"]], METHODS.index(r["method"]), r["replicas"])
    )
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
    if FLAGS.model not in models.MODELS:
        raise app.UsageError(f"--model must be one of {sorted(models.MODELS)}")
    methods = [m.strip() for m in FLAGS.methods if m.strip()]
    if not methods or set(methods) - set(METHODS):
        raise app.UsageError(f"--methods must be a subset of {','.join(METHODS)}")
    if FLAGS.warmup % FLAGS.steps_per_execution or FLAGS.iterations % FLAGS.steps_per_execution:
        raise app.UsageError("--steps_per_execution must divide --warmup and --iterations")
    if FLAGS.replicas and FLAGS.strategy != "mirrored":
        raise app.UsageError("--replicas needs --strategy=mirrored")
    experiment.configure_cpu_devices(FLAGS.cpu_devices)  # before TensorFlow initialises
    shape, num_classes = input_shape(FLAGS.model)
    keras.mixed_precision.set_global_policy(POLICIES[FLAGS.mixed_precision])
    counts = replica_counts()
    scaling = bool(counts)
    if not scaling:
        strategy = build_strategy(FLAGS.strategy)
        counts = [strategy.num_replicas_in_sync]
        if FLAGS.batch_size % counts[0]:
            raise app.UsageError(f"--batch_size must be divisible by the {counts[0]} replicas")
    jits = {"true": [True], "false": [False], "both": [True, False]}[FLAGS.jit_compile]

    gpus = tf.config.list_physical_devices("GPU")
    print(
        f"tf_free benchmark: TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPU cores, "
        f"GPUs: {[g.name for g in gpus] or 'none'}"
    )
    print(
        f"model={FLAGS.model} input={shape} classes={num_classes} batch={FLAGS.batch_size} "
        f"m={FLAGS.m} K={FLAGS.pgd_steps} policy={keras.mixed_precision.global_policy().name} "
        f"strategy={FLAGS.strategy} (replicas: {','.join(map(str, counts))}) "
        f"warmup={FLAGS.warmup} repeats={FLAGS.repeats} "
        f"iterations/repeat={FLAGS.iterations} batches"
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
            strategy = build_strategy("mirrored", replicas)
        batch = FLAGS.batch_size * replicas if scaling else FLAGS.batch_size
        ds = synthetic_dataset(shape, num_classes, batch, FLAGS.data_batches, FLAGS.seed)
        for jit in jits:
            settings = {m: xla_setting(m, jit, replicas, scaling) for m in methods}
            timed = [m for m in methods if settings[m] is not None]
            if timed:
                results += time_methods(
                    timed, jit, settings, strategy, ds, batch, shape, num_classes
                )
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
            if not rows:
                continue
            print_table(
                rows,
                f"{replicas} replica(s), global batch {rows[0]['global_batch']}, "
                f"XLA {'on' if jit else 'off'}",
            )
    if True in jits and max(counts) > 1 and "natural" in methods:
        print(
            "\nXLA on with more than one replica: free/PGD use jit_compile='per_replica'; "
            "natural (a plain Keras model, which Keras cannot XLA-compile under several "
            "replicas) is timed with XLA off only there."
        )
    table = None
    if scaling:
        table = scaling_table(results)
        print(
            f"\nWeak scaling (per-replica batch {FLAGS.batch_size}; efficiency = images/s(R) / "
            f"(R x images/s({counts[0]})) per method and XLA setting; median over repeats):\n"
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
                "mixed_precision strategy warmup repeats iterations steps_per_execution seed "
                "data_batches cpu_devices"
            ).split()
        }
        config.update(
            input_shape=list(shape),
            num_classes=num_classes,
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
