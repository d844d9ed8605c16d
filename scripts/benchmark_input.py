"""Images per second per host core of the ImageNet input pipelines, and the cores that feed N GPUs.

    python scripts/benchmark_input.py --json_out=input.json        # about 6 minutes on 2 cores
    python scripts/benchmark_input.py --from_json=input.json --gpu_steps_per_second=4.96  # V100

What is timed is `tf_free.data.build_dataset("imagenet2012", ...)`, the very pipeline
`tf_free.train` reads ImageNet with: TFDS's reader (a parallel interleave over the shards),
the 10,000-image shuffle buffer, one stateless seed per image, a parallel map of
`imagenet_train_preprocess` (decode only a random-resized crop, resize to 224 with
antialiasing, flip) or `imagenet_eval_preprocess` (decode the whole image, resize the shorter
side to 256, centre crop 224), batch and prefetch; seeded as `tf_free.train` seeds it (the
training split one pass at a time, `epoch=` the round).

Only the images are the benchmark's: --num_images synthetic photographs per split, smooth
random images (noise at scales of 64 to 2 pixels, upsampled, plus a little pixel noise: about
100 kB per image at quality 90, where ImageNet's training JPEGs average about 110 kB; pure
noise would give several times that), widths and heights drawn uniformly from --widths and
--heights (by default 400-640 x 300-500, around ImageNet's typical 500 x 375), written with
`tf.io.encode_jpeg(quality=90)`. They are packed as the two ImageNet tars TFDS expects and
TFDS prepares `imagenet2012` from them (--shards shards per split) in --work_dir, so that
`build_dataset` reads TFDS's own TFRecords, as it does with the real dataset. On a host with
many cores, raise --copies (each image stored that many times) so that a round lasts a second
or more: a round's images are --num_images x --copies less a few batches.

Cores: every core count in --cores (`all`: the CPUs this process may use) is measured in a
fresh process pinned to that many logical CPUs (`os.sched_setaffinity` before TensorFlow
starts, so that TensorFlow's thread pools and tf.data's autotuning see k CPUs).
Images/s/core = images/s on k CPUs / k. The process's CPU time is also recorded: images per
CPU-second is the rate per fully busy core, and is less sensitive to other load on the
machine than the wall clock; a CPU use well under k says the pipeline left cores idle.

tf.data variants (--variants), each on top of `build_dataset`'s own dataset:
  as_built             what `tf_free.train` runs.
  private_pool         `options.threading.private_threadpool_size` = k.
  intra_op_1           `options.threading.max_intra_op_parallelism` = 1 (one thread per op,
                       parallelism across images only).
  map_fusion           `options.experimental_optimization.map_fusion` = True.
  no_map_batch_fusion  `options.experimental_optimization.map_and_batch_fusion` = False (the
                       fusion is on by default: this shows what it is worth).
  tuned                private_pool + intra_op_1 + map_fusion.
  unseeded             `build_dataset(seed=None)`: non-deterministic order (parallel map and
                       reader), as a run without a seed; the others keep `tf_free.train`'s
                       reproducible order and are bit-identical to `as_built`.
Besides, `read` (training split only) is TFDS's reader alone, without decoding: the records/s
that reading the shards costs, for comparison. TFDS already interleaves the shards in
parallel (16 at a time).

A round builds a pipeline, takes --warmup_batches batches (start-up, filling the shuffle
buffer) and times the next ones up to one batch before the end of the split; --repeats rounds
per variant, the variants interleaved and their order rotated every round, so that
background load hits all of them alike. The tables give the median round (and the best).

The GPU table: images per second that N GPUs consume = N x --per_gpu_batch x
--gpu_steps_per_second / m, since free training replays each minibatch m times (m = 1 is
natural training); cores needed = that / the training pipeline's images/s/core measured on
the most CPUs (the lower, conservative rate: scaling over cores is sublinear; or, with
--per_core_rate=cpu, images per CPU-second, for a machine shared with other work), rounded
up, for the pipeline as built and for the fastest reproducible variant. The default step rate,
9.28 steps/s of 256 images, is NVIDIA's ResNet-50 v1.5 TensorFlow figure for one A100 with
mixed precision and XLA (2375 images/s; DeepLearningExamples,
TensorFlow/Classification/ConvNets/resnet50v1.5/README.md, "Training performance results").
The training loop itself (Python, the all-reduce, kernel launches) needs host CPU on top.

--json_out writes the measurements; --from_json prints the tables again from such a file
(no measuring) with other GPU flags.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from absl import app, flags, logging

# Quiet TensorFlow's C++ start-up chatter unless the caller chose a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow is imported inside functions only: a measuring process pins itself to its CPUs
# before TensorFlow starts.

PIPELINES = ("train", "eval")
VARIANTS = (
    "as_built",
    "private_pool",
    "intra_op_1",
    "map_fusion",
    "no_map_batch_fusion",
    "tuned",
    "unseeded",
)
# Variants whose output is bit for bit that of `as_built` (the GPU table's candidates).
REPRODUCIBLE = tuple(v for v in VARIANTS if v != "unseeded")
READ = "read"  # TFDS's reader alone (training split): records/s without decoding
GPU_TABLE_M = (1, 2, 4, 8)
IMAGENET_VALIDATION = 50_000  # validation labels in TFDS's list: the most validation images
# Version of the synthetic data's recipe, part of the --work_dir marker.
RECIPE = 1

FLAGS = flags.FLAGS
flags.DEFINE_integer(
    "num_images", 640, "Synthetic JPEGs per split (training and validation).", lower_bound=1
)
flags.DEFINE_integer(
    "copies",
    1,
    "Store every synthetic JPEG this many times per split (under other names): longer rounds "
    "on a many-core host without generating more images.",
    lower_bound=1,
)
flags.DEFINE_list("widths", ["400", "640"], "Range of image widths, min,max (uniform).")
flags.DEFINE_list("heights", ["300", "500"], "Range of image heights, min,max (uniform).")
flags.DEFINE_integer("quality", 90, "JPEG quality of the synthetic images.", lower_bound=1)
flags.DEFINE_integer(
    "shards", 8, "TFRecord shards per split that TFDS writes (ImageNet: 1024).", lower_bound=1
)
flags.DEFINE_integer("image_size", 224, "Output side: crop size of both pipelines.", lower_bound=1)
flags.DEFINE_integer(
    "batch_size",
    32,
    "Batch size of the pipelines (the cost per image hardly depends on it).",
    lower_bound=1,
)
flags.DEFINE_integer(
    "warmup_batches", 3, "Untimed batches per round (start-up, shuffle buffer).", lower_bound=1
)
flags.DEFINE_integer(
    "repeats", 5, "Timed rounds per variant; the median is reported.", lower_bound=1
)
flags.DEFINE_list(
    "cores",
    ["1", "all"],
    "Logical CPU counts to measure on, each in a process pinned to that many CPUs "
    "('all': every CPU this process may use).",
)
flags.DEFINE_list("variants", list(VARIANTS), f"tf.data variants to time, of {','.join(VARIANTS)}.")
flags.DEFINE_list("gpus", ["1", "2", "4", "8"], "GPU counts of the GPU table.")
flags.DEFINE_integer(
    "per_gpu_batch", 256, "GPU table: images per GPU per training step.", lower_bound=1
)
flags.DEFINE_float(
    "gpu_steps_per_second",
    9.28,
    "GPU table: natural training steps per second of one GPU at --per_gpu_batch (default: "
    "NVIDIA's ResNet-50 v1.5 figure for an A100 with mixed precision and XLA, 2375 images/s "
    "at 256 per GPU; a V100: 1270 images/s, 4.96 steps/s).",
)
flags.DEFINE_list(
    "m_values", [str(m) for m in GPU_TABLE_M], "GPU table: replays m of free training."
)
flags.DEFINE_enum(
    "per_core_rate",
    "wall",
    ["wall", "cpu"],
    "GPU table: the rate per core, wall (images/s on k cores / k) or cpu (images per "
    "CPU-second: what a fully busy core would give; for a machine shared with other work).",
)
flags.DEFINE_string(
    "work_dir",
    None,
    "Folder for the synthetic JPEGs and TFDS's prepared copy; kept, and reused by a later run "
    "with the same data flags. Default: a temporary folder, removed at the end.",
)
flags.DEFINE_integer("seed", 0, "Seed of the synthetic images and of the pipelines.")
flags.DEFINE_string("json_out", None, "Also write the configuration and measurements here.")
flags.DEFINE_string(
    "from_json",
    None,
    "Print the tables from this --json_out file, with the GPU flags given; measures nothing.",
)
# Internal: set by the parent for the process that measures on a subset of the CPUs.
flags.DEFINE_string("worker_cpus", None, "(internal) CPUs to pin this measuring process to.")
flags.DEFINE_string("worker_json", None, "(internal) where the measuring process writes.")


# --------------------------------------------------------------------------------------------
# Arithmetic of the GPU table
# --------------------------------------------------------------------------------------------


def images_needed(gpus: int, per_gpu_batch: int, steps_per_second: float, m: int) -> float:
    """Fresh images per second that `gpus` GPUs consume: free training replays each batch m times."""
    return gpus * per_gpu_batch * steps_per_second / m


def cores_needed(images_per_second: float, per_core: float) -> int:
    """Cores that deliver `images_per_second` at `per_core` images/s each, rounded up."""
    # round() first, so that an exact multiple (5.0000000001 from float error) is not rounded up
    return math.ceil(round(images_per_second / per_core, 6))


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def _positive_ints(name: str, values) -> list[int]:
    try:
        numbers = [int(v) for v in values]
    except ValueError:
        raise app.UsageError(
            f"--{name} must be positive integers, got {','.join(values)!r}"
        ) from None
    if not numbers or min(numbers) < 1:
        raise app.UsageError(f"--{name} must be positive integers, got {','.join(values)!r}")
    return numbers


def _range(name: str) -> tuple[int, int]:
    low_high = _positive_ints(name, getattr(FLAGS, name))
    if len(low_high) != 2 or low_high[0] > low_high[1]:
        raise app.UsageError(
            f"--{name} must be min,max with min <= max, got {','.join(getattr(FLAGS, name))}"
        )
    return low_high[0], low_high[1]


def core_counts() -> list[int]:
    """--cores as integers, each at most the CPUs this process may use."""
    available = len(os.sched_getaffinity(0))
    counts = []
    for value in FLAGS.cores:
        if value == "all":
            counts.append(available)
            continue
        try:
            k = int(value)
        except ValueError:
            k = 0
        if not 1 <= k <= available:
            raise app.UsageError(
                f"--cores: {value!r} is not 'all' or an integer from 1 to {available} "
                "(the CPUs this process may use)"
            )
        counts.append(k)
    return sorted(set(counts))


def timed_batches(num_images: int, batch_size: int, warmup: int) -> int:
    """Batches timed per round: all full batches after the warm-up, less one (end of the split)."""
    return num_images // batch_size - warmup - 1


def check_flags() -> None:
    """Raises app.UsageError for inconsistent flags, before anything is built."""
    unknown = sorted(set(FLAGS.variants) - set(VARIANTS))
    if unknown or not FLAGS.variants:
        raise app.UsageError(
            f"--variants: unknown {','.join(unknown) or '(none given)'}; "
            f"choose from {','.join(VARIANTS)}"
        )
    _positive_ints("gpus", FLAGS.gpus)
    _positive_ints("m_values", FLAGS.m_values)
    if not FLAGS.gpu_steps_per_second > 0:
        raise app.UsageError(
            f"--gpu_steps_per_second must be > 0, got {FLAGS.gpu_steps_per_second}"
        )
    if FLAGS.from_json:
        return
    _range("widths")
    _range("heights")
    if not FLAGS.worker_json:  # a measuring process may use only its own CPUs
        core_counts()
    if FLAGS.quality > 100:
        raise app.UsageError(f"--quality must be from 1 to 100, got {FLAGS.quality}")
    if FLAGS.num_images * FLAGS.copies > IMAGENET_VALIDATION:
        raise app.UsageError(
            f"--num_images x --copies = {FLAGS.num_images * FLAGS.copies}: at most "
            f"{IMAGENET_VALIDATION:,} (the validation labels TFDS has)"
        )
    if timed_batches(FLAGS.num_images * FLAGS.copies, FLAGS.batch_size, FLAGS.warmup_batches) < 1:
        need = (FLAGS.warmup_batches + 2) * FLAGS.batch_size
        raise app.UsageError(
            f"--num_images={FLAGS.num_images} x --copies={FLAGS.copies} leaves no batch to time: "
            f"a round takes --warmup_batches={FLAGS.warmup_batches} batches of "
            f"--batch_size={FLAGS.batch_size}, times at least one and stops a batch before the "
            f"end; give --num_images x --copies >= {need}"
        )


# --------------------------------------------------------------------------------------------
# Synthetic ImageNet
# --------------------------------------------------------------------------------------------


def synthetic_image(rng, height: int, width: int):
    """A smooth random uint8 photograph-like image: noise at scales of 64, 16, 4 and 2 pixels
    (bicubic upsampling) plus pixel noise. At quality 90 about 110 kB at 520 x 400 pixels."""
    import numpy as np
    import tensorflow as tf

    def layer(cell, amplitude):
        grid = rng.normal(size=(height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        return amplitude * tf.image.resize(grid, [height, width], method="bicubic")

    image = 115.0 + layer(64, 45) + layer(16, 18) + layer(4, 20) + layer(2, 20)
    image += rng.normal(scale=6.0, size=(height, width, 3)).astype(np.float32)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _data_settings() -> dict:
    return {
        "recipe": RECIPE,
        "num_images": FLAGS.num_images,
        "copies": FLAGS.copies,
        "widths": list(_range("widths")),
        "heights": list(_range("heights")),
        "quality": FLAGS.quality,
        "shards": FLAGS.shards,
        "seed": FLAGS.seed,
    }


def _add_file(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def prepare_synthetic_imagenet(work_dir: str) -> dict:
    """Writes the JPEGs as ImageNet's two tars and has TFDS prepare imagenet2012 from them.

    Returns the data's description (sizes); reuses a preparation with the same settings.
    """
    settings = _data_settings()
    marker = os.path.join(work_dir, "synthetic.json")
    tfds_dir = os.path.join(work_dir, "tfds")
    if os.path.exists(marker):
        with open(marker) as f:
            previous = json.load(f)
        if previous["settings"] == settings:
            print(f"Reusing the synthetic ImageNet in {tfds_dir}", flush=True)
            return previous
        shutil.rmtree(tfds_dir, ignore_errors=True)
        os.remove(marker)

    import keras
    import numpy as np
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    (w_min, w_max), (h_min, h_max) = settings["widths"], settings["heights"]
    rng = np.random.default_rng(FLAGS.seed)
    n = FLAGS.num_images
    print(
        f"Writing {n} synthetic JPEGs (quality {FLAGS.quality}) per split to {work_dir}", flush=True
    )
    bar = keras.utils.Progbar(n, unit_name="image")
    jpegs, shapes = [], []
    for i in range(n):
        height, width = int(rng.integers(h_min, h_max + 1)), int(rng.integers(w_min, w_max + 1))
        image = synthetic_image(rng, height, width)
        jpegs.append(tf.io.encode_jpeg(image, quality=FLAGS.quality).numpy())
        shapes.append((height, width))
        bar.update(i + 1)

    manual = os.path.join(tfds_dir, "downloads", "manual")
    os.makedirs(manual, exist_ok=True)
    with open(imagenet_common.label_names_file()) as f:
        synsets = f.read().split()[:10]
    total = n * FLAGS.copies  # image j is jpegs[j % n]
    # Training tar: one tar per class (synset), each of "<synset>_<j>.JPEG" files.
    with tarfile.open(os.path.join(manual, "ILSVRC2012_img_train.tar"), "w") as train_tar:
        for c, synset in enumerate(synsets):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for j in range(c, total, len(synsets)):
                    _add_file(class_tar, f"{synset}_{j}.JPEG", jpegs[j % n])
            _add_file(train_tar, f"{synset}.tar", inner.getvalue())
    # Validation tar: "ILSVRC2012_val_<8 digits>.JPEG"; TFDS labels them from its own list.
    with tarfile.open(os.path.join(manual, "ILSVRC2012_img_val.tar"), "w") as val_tar:
        for j in range(total):
            _add_file(val_tar, f"ILSVRC2012_val_{j + 1:08d}.JPEG", jpegs[j % n])

    print(f"TFDS prepares imagenet2012 ({FLAGS.shards} shards per split)", flush=True)
    builder = tfds.builder("imagenet2012", data_dir=tfds_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual, num_shards=FLAGS.shards)
    )
    shutil.rmtree(manual)  # the tars are no longer needed
    sizes = [len(j) for j in jpegs]
    description = {
        "settings": settings,
        "mean_kb": statistics.mean(sizes) / 1e3,
        "min_kb": min(sizes) / 1e3,
        "max_kb": max(sizes) / 1e3,
        "mean_height": statistics.mean(h for h, _ in shapes),
        "mean_width": statistics.mean(w for _, w in shapes),
    }
    with open(marker, "w") as f:
        json.dump(description, f, indent=2)
    return description


# --------------------------------------------------------------------------------------------
# Measuring (in a process pinned to its CPUs)
# --------------------------------------------------------------------------------------------


def make_pipeline(pipeline: str, variant: str, tfds_dir: str, cpus: int, round_index: int):
    """The dataset of one round: `build_dataset` as `tf_free.train` calls it, plus the variant."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from tf_free import data

    if variant == READ:
        builder = tfds.builder("imagenet2012", data_dir=tfds_dir)
        ds = builder.as_dataset(
            split="train",
            shuffle_files=True,
            read_config=tfds.ReadConfig(shuffle_seed=FLAGS.seed + round_index, try_autocache=False),
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        ds = ds.map(lambda ex: (ex["image"], ex["label"]), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(FLAGS.batch_size).prefetch(tf.data.AUTOTUNE)

    seed = None if variant == "unseeded" else FLAGS.seed
    if pipeline == "train":
        ds = data.build_dataset(
            "imagenet2012",
            "train",
            batch_size=FLAGS.batch_size,
            training=True,
            data_dir=tfds_dir,
            seed=seed,
            image_size=FLAGS.image_size,
            epoch=round_index,  # as tf_free.train: the dataset of one pass
        )
    else:
        ds = data.build_dataset(
            "imagenet2012",
            "validation",
            batch_size=FLAGS.batch_size,
            training=False,
            data_dir=tfds_dir,
            seed=seed,
            image_size=FLAGS.image_size,
        )
    options = tf.data.Options()
    if variant in ("private_pool", "tuned"):
        options.threading.private_threadpool_size = cpus
    if variant in ("intra_op_1", "tuned"):
        options.threading.max_intra_op_parallelism = 1
    if variant in ("map_fusion", "tuned"):
        options.experimental_optimization.map_fusion = True
    if variant == "no_map_batch_fusion":
        options.experimental_optimization.map_and_batch_fusion = False
    return ds.with_options(options)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_round(ds, warmup: int, batches: int) -> dict:
    """Takes `warmup` batches, then times `batches` more: images/s and CPU-seconds used."""
    iterator = iter(ds)
    for _ in range(warmup):
        next(iterator)
    images = 0
    cpu0, start = _cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        images += int(next(iterator)[1].shape[0])
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    del iterator
    return {"images": images, "seconds": seconds, "cpu_seconds": cpu}


def measure(tfds_dir: str) -> dict:
    """Times every (pipeline, variant) --repeats rounds, interleaved, order rotated per round."""
    import keras

    cpus = len(os.sched_getaffinity(0))
    tasks = [(p, v) for p in PIPELINES for v in VARIANTS if v in FLAGS.variants]
    tasks.append(("train", READ))
    batches = timed_batches(FLAGS.num_images * FLAGS.copies, FLAGS.batch_size, FLAGS.warmup_batches)
    rounds = {task: [] for task in tasks}
    print(
        f"Timing {len(tasks)} pipelines x {FLAGS.repeats} rounds on {cpus} CPU(s) "
        f"({batches} batches of {FLAGS.batch_size} per round)",
        flush=True,
    )
    bar = keras.utils.Progbar(len(tasks) * FLAGS.repeats, unit_name="round")
    done = 0
    for r in range(FLAGS.repeats):
        shift = r % len(tasks)
        for pipeline, variant in tasks[shift:] + tasks[:shift]:
            ds = make_pipeline(pipeline, variant, tfds_dir, cpus, r)
            rounds[(pipeline, variant)].append(time_round(ds, FLAGS.warmup_batches, batches))
            done += 1
            bar.update(done)
    rows = []
    for (pipeline, variant), timed in rounds.items():
        rates = [t["images"] / t["seconds"] for t in timed]
        per_cpu_second = [t["images"] / t["cpu_seconds"] for t in timed if t["cpu_seconds"] > 0]
        per_cpu_second = statistics.median(per_cpu_second) if per_cpu_second else None
        rows.append(
            {
                "pipeline": pipeline,
                "variant": variant,
                "cores": cpus,
                "images_per_second": statistics.median(rates),
                "best_images_per_second": max(rates),
                "per_core": statistics.median(rates) / cpus,
                "images_per_cpu_second": per_cpu_second,
                "cpu_use": statistics.median(t["cpu_seconds"] / t["seconds"] for t in timed),
                "rounds": timed,
            }
        )
    return {"cores": cpus, "cpus": sorted(os.sched_getaffinity(0)), "rows": rows}


def worker_main() -> None:
    """The measuring process: pin, then start TensorFlow, time, write --worker_json."""
    cpus = [int(c) for c in FLAGS.worker_cpus.split("+")]
    os.sched_setaffinity(0, cpus)  # before TensorFlow starts its threads: they inherit it
    result = measure(os.path.join(FLAGS.work_dir, "tfds"))
    with open(FLAGS.worker_json, "w") as f:
        json.dump(result, f)


def run_worker(cpus: list[int], work_dir: str) -> dict:
    """Runs the measuring on `cpus` in a fresh process (this script, --worker_cpus)."""
    out = os.path.join(work_dir, f"measure_{len(cpus)}.json")
    command = [
        sys.executable,
        os.path.abspath(__file__),
        *sys.argv[1:],
        f"--work_dir={work_dir}",
        f"--worker_cpus={'+'.join(str(c) for c in cpus)}",
        f"--worker_json={out}",
    ]
    done = subprocess.run(command, env={**os.environ, "TMPDIR": tempfile.gettempdir()})
    if done.returncode != 0:
        raise RuntimeError(f"measuring on {len(cpus)} CPU(s) failed (exit {done.returncode})")
    with open(out) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _label(row) -> str:
    return "read only (no decoding)" if row["variant"] == READ else row["variant"]


def pipeline_table(rows: list[dict]) -> str:
    """Markdown: images/s and images/s/core of every pipeline, variant and core count."""
    base = {
        (r["pipeline"], r["cores"]): r["images_per_second"]
        for r in rows
        if r["variant"] == "as_built"
    }
    order = {v: i for i, v in enumerate((*VARIANTS, READ))}
    lines = [
        "| pipeline | tf.data variant | cores | images/s | best | images/s/core "
        "| images/CPU-s | CPU use | vs as built |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        rows, key=lambda r: (PIPELINES.index(r["pipeline"]), order[r["variant"]], r["cores"])
    ):
        reference = base.get((r["pipeline"], r["cores"]))
        versus = "-"
        if reference and r["variant"] != READ:
            versus = f"{r['images_per_second'] / reference:.2f}"
        per_cpu_second = r["images_per_cpu_second"]
        per_cpu_second = "-" if per_cpu_second is None else f"{per_cpu_second:.1f}"
        lines.append(
            f"| {r['pipeline']} | {_label(r)} | {r['cores']} | {r['images_per_second']:.0f} "
            f"| {r['best_images_per_second']:.0f} | {r['per_core']:.1f} | {per_cpu_second} "
            f"| {r['cpu_use']:.2f} | {versus} |"
        )
    return "\n".join(lines)


def chosen_rates(rows: list[dict], rate: str = "wall") -> list[tuple[str, float, int]]:
    """(variant, images/s/core, cores) of the training pipeline on the most cores measured: as
    built, and the fastest reproducible variant if it is another. `rate`: "wall" (images/s / k)
    or "cpu" (images per CPU-second)."""
    key = "per_core" if rate == "wall" else "images_per_cpu_second"
    train = [
        r for r in rows if r["pipeline"] == "train" and r["variant"] in REPRODUCIBLE and r.get(key)
    ]
    if not train:
        raise app.UsageError("no training pipeline measured: nothing to base the GPU table on")
    most = max(r["cores"] for r in train)
    train = {r["variant"]: r for r in train if r["cores"] == most}
    chosen = []
    if "as_built" in train:
        chosen.append(("as_built", train["as_built"][key], most))
    best = max(train.values(), key=lambda r: r[key])
    if best["variant"] != "as_built":
        chosen.append((best["variant"], best[key], most))
    return chosen


def gpu_table(
    per_core: float, gpus: list[int], per_gpu_batch: int, steps: float, ms: list[int]
) -> str:
    """Markdown: cores needed to feed N GPUs for every m, at `per_core` images/s/core."""
    header = "| GPUs | images/s, m=1 | " + " | ".join(f"cores, m={m}" for m in ms) + " |"
    lines = [header, "|---|---|" + "---|" * len(ms)]
    for n in gpus:
        cells = [str(cores_needed(images_needed(n, per_gpu_batch, steps, m), per_core)) for m in ms]
        lines.append(
            f"| {n} | {images_needed(n, per_gpu_batch, steps, 1):.0f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def report(results: dict) -> str:
    """Both tables, as Markdown with a line of context each."""
    rows = results["rows"]
    gpus = _positive_ints("gpus", FLAGS.gpus)
    ms = _positive_ints("m_values", FLAGS.m_values)
    steps, batch = FLAGS.gpu_steps_per_second, FLAGS.per_gpu_batch
    d = results.get("dataset", {})
    copies = results["config"].get("copies", 1)
    parts = [
        f"Input pipelines ({results['config']['num_images']} synthetic JPEGs"
        f"{f' x {copies} copies' if copies > 1 else ''} per split, "
        f"mean {d.get('mean_width', 0):.0f} x {d.get('mean_height', 0):.0f}, "
        f"{d.get('mean_kb', 0):.0f} kB; batch {results['config']['batch_size']}, output "
        f"{results['config']['image_size']}; {results['host']['cpu']}, "
        f"{results['host']['cpus']} logical CPUs):",
        "",
        pipeline_table(rows),
    ]
    unit = "images/s/core" if FLAGS.per_core_rate == "wall" else "images per CPU-second"
    for variant, per_core, cores in chosen_rates(rows, FLAGS.per_core_rate):
        parts += [
            "",
            f"Cores to feed N GPUs at {steps:g} steps/s of {batch} images each, free training "
            f"with m replays (m=1: natural training), at the training pipeline's "
            f"{per_core:.1f} {unit} ({variant}, measured on {cores} cores):",
            "",
            gpu_table(per_core, gpus, batch, steps, ms),
        ]
    return "\n".join(parts)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # TFDS logs every dataset it constructs
        logging.set_verbosity(logging.WARNING)
    check_flags()
    if FLAGS.worker_json:
        worker_main()
        return
    if FLAGS.from_json:
        with open(FLAGS.from_json) as f:
            results = json.load(f)
        print(report(results))
        return

    counts = core_counts()
    available = sorted(os.sched_getaffinity(0))
    temporary = FLAGS.work_dir is None
    work_dir = tempfile.mkdtemp(prefix="benchmark_input_") if temporary else FLAGS.work_dir
    # TFDS leaves empty temporary folders behind (DatasetInfo.initialize_from_bucket): here
    # and in the measuring processes (TMPDIR), they go into the work folder.
    tempfile.tempdir = os.path.join(work_dir, "tmp")
    os.makedirs(tempfile.tempdir, exist_ok=True)
    try:
        start = time.perf_counter()
        dataset = prepare_synthetic_imagenet(work_dir)
        prepared = time.perf_counter() - start
        rows = []
        for k in counts:
            rows += run_worker(available[:k], work_dir)["rows"]
        results = {
            "config": {
                "num_images": FLAGS.num_images,
                "copies": FLAGS.copies,
                "batch_size": FLAGS.batch_size,
                "image_size": FLAGS.image_size,
                "warmup_batches": FLAGS.warmup_batches,
                "timed_batches": timed_batches(
                    FLAGS.num_images * FLAGS.copies, FLAGS.batch_size, FLAGS.warmup_batches
                ),
                "repeats": FLAGS.repeats,
                "shards": FLAGS.shards,
                "cores": counts,
                "variants": [v for v in VARIANTS if v in FLAGS.variants],
            },
            "host": {
                "cpu": _cpu_name(),
                "cpus": len(available),
                "load_average": os.getloadavg(),
                "python": platform.python_version(),
            },
            "dataset": dataset,
            "seconds": {"prepare": prepared, "total": time.perf_counter() - start},
            "rows": rows,
        }
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
    import tensorflow as tf

    results["host"]["tensorflow"] = tf.__version__
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=2)
    print()
    print(report(results))
    print(
        f"\n({results['seconds']['total']:.0f} s in all, of which {results['seconds']['prepare']:.0f} s "
        f"writing and preparing the images; load average at the end "
        f"{results['host']['load_average'][0]:.1f})"
    )


if __name__ == "__main__":
    app.run(main)
