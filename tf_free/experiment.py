"""One training run: config -> data -> strategy -> fit -> evaluation -> export.

`tf_free.train` parses flags into a `TrainConfig` and calls
`train_and_evaluate`; tests and scripts call it directly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import keras
import tensorflow as tf
from absl import logging

from tf_free import attacks, callbacks, data, export, loop, models
from tf_free.free import FreeAdversarialModel, PGDAdversarialModel

METHODS = ("free", "pgd", "natural")
LR_SCHEDULES = ("piecewise", "cosine", "cyclic")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
PRECISIONS = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
JIT_CHOICES = ("auto", "true", "false")


class ConfigError(ValueError):
    """A bad setting, reported before any work starts."""


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs. ε and step sizes are in 0-255 pixel units."""

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    method: str = "free"
    m: int = 8
    epsilon: float = 25.5
    step_size: float | None = None
    pgd_steps: int = 7
    pgd_step_size: float | None = None
    epochs: float = 8
    batch_size: int = 128
    lr: float = 0.05
    lr_schedule: str = "cosine"
    lr_boundaries: tuple[float, ...] = ()
    lr_decay: float = 0.1
    weight_decay: float = 0.0
    momentum: float = 0.9
    model: str = "small_cnn"
    wrn_depth: int = 32
    wrn_width: int = 10
    model_dir: str = "runs/quickstart"
    export_dir: str | None = None
    strategy: str = "auto"
    jit_compile: str = "auto"
    cpu_devices: int = 1
    mixed_precision: str = "none"
    seed: int = 0
    deterministic: bool = False
    checkpoint_every: int = 200
    overwrite: bool = False
    eval_every: int = 1
    eval_examples: int = 10000
    eval_pgd_steps: int = 20
    eval_pgd_step_size: float = 2.55
    train_examples: int | None = None
    verbose: int = 1

    def validate(self) -> None:
        """Raises ConfigError for any bad value (no I/O)."""
        checks = [
            (self.method in METHODS, f"--method must be one of {METHODS}, got {self.method!r}"),
            (self.m >= 1, f"--m (replays) must be >= 1, got {self.m}"),
            (self.epsilon >= 0, f"--epsilon must be >= 0 (0-255 units), got {self.epsilon}"),
            (
                self.step_size is None or self.step_size > 0,
                f"--step_size must be > 0 (0-255 units), got {self.step_size}",
            ),
            (self.pgd_steps >= 1, f"--pgd_steps must be >= 1, got {self.pgd_steps}"),
            (
                self.pgd_step_size is None or self.pgd_step_size > 0,
                f"--pgd_step_size must be > 0 (0-255 units), got {self.pgd_step_size}",
            ),
            (self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"--lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}",
            ),
            (self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (
                self.model in models.MODELS,
                f"unknown --model {self.model!r}; choose one of {sorted(models.MODELS)}",
            ),
            (
                self.strategy in STRATEGIES,
                f"--strategy must be one of {STRATEGIES}, got {self.strategy!r}",
            ),
            (
                self.jit_compile in JIT_CHOICES,
                f"--jit_compile must be one of {JIT_CHOICES}, got {self.jit_compile!r}",
            ),
            (
                self.model != "wide_resnet"
                or (self.wrn_depth >= 8 and (self.wrn_depth - 2) % 6 == 0),
                f"--wrn_depth must be 6n+2 (8, 14, ..., 32), got {self.wrn_depth}",
            ),
            (
                self.mixed_precision in PRECISIONS,
                f"--mixed_precision must be one of {tuple(PRECISIONS)}, got {self.mixed_precision!r}",
            ),
            (self.cpu_devices >= 1, f"--cpu_devices must be >= 1, got {self.cpu_devices}"),
            (
                self.checkpoint_every >= 0,
                f"--checkpoint_every must be >= 0 (batches), got {self.checkpoint_every}",
            ),
            (self.eval_every >= 1, f"--eval_every must be >= 1, got {self.eval_every}"),
            (self.eval_examples >= 1, f"--eval_examples must be >= 1, got {self.eval_examples}"),
            (self.eval_pgd_steps >= 1, f"--eval_pgd_steps must be >= 1, got {self.eval_pgd_steps}"),
            (
                self.train_examples is None or self.train_examples >= 1,
                f"--train_examples must be >= 1, got {self.train_examples}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def passes(self) -> int:
        """Passes over the data: the natural-epoch budget / m for free training."""
        if self.method == "free":
            return max(1, math.ceil(self.epochs / self.m))
        return max(1, math.ceil(self.epochs))

    @property
    def replays(self) -> int:
        return self.m if self.method == "free" else 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


# Settings that do not change what is trained: a run may resume with other values.
RUNTIME_FIELDS = frozenset(
    {
        "data_dir",
        "model_dir",
        "export_dir",
        "strategy",
        "jit_compile",
        "cpu_devices",
        "deterministic",
        "checkpoint_every",
        "overwrite",
        "eval_every",
        "eval_examples",
        "eval_pgd_steps",
        "eval_pgd_step_size",
        "verbose",
    }
)
# What a run folder holds; --overwrite removes exactly these.
RUN_FILES = ("config.json", "checkpoints", "logs", "results.json", "export", "eval.json")


def prepare_model_dir(config: TrainConfig, chief: bool = True) -> None:
    """Checks that `model_dir` is new, or holds this same run (to resume), or --overwrite.

    With --overwrite (on the chief) the previous run's files are deleted.

    Raises ConfigError naming the settings that differ from the run already
    there; nothing in the folder is touched then.
    """
    check_model_dir_writable(config.model_dir)
    path = os.path.join(config.model_dir, "config.json")
    if config.overwrite and chief:
        for name in RUN_FILES:
            target = os.path.join(config.model_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
        logging.info("--overwrite: removed the previous run in %s", config.model_dir)
    if os.path.exists(path) and not config.overwrite:
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"--model_dir {config.model_dir!r} holds an unreadable config.json ({e}); "
                "use another --model_dir, or --overwrite to start again there"
            ) from e
        new = json.loads(config.to_json())
        differences = [
            f"{key}={old.get(key)!r} there, {new[key]!r} now"
            for key in sorted(new)
            if key not in RUNTIME_FIELDS and old.get(key) != new[key]
        ]
        if differences:
            raise ConfigError(
                f"--model_dir {config.model_dir!r} holds another run ("
                + "; ".join(differences)
                + "). Use another --model_dir, or --overwrite to replace that run"
            )


def checkpoint_dir(model_dir: str) -> str:
    """Where a run folder's checkpoints are."""
    return os.path.join(model_dir, "checkpoints")


def write_config(config: TrainConfig) -> None:
    """`model_dir/config.json`, atomically (another worker may be reading it)."""
    path = os.path.join(config.model_dir, "config.json")
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json())
    os.replace(path + ".tmp", path)


def check_model_dir_writable(model_dir: str) -> None:
    """Raises ConfigError unless `model_dir` exists (or can be made) and takes files."""
    try:
        os.makedirs(model_dir, exist_ok=True)
        probe = os.path.join(model_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--model_dir {model_dir!r} is not writable: {e.strerror}") from e


def configure_cpu_devices(cpu_devices: int) -> None:
    """Without GPUs, splits the CPU into `cpu_devices` logical devices.

    A stand-in for a multi-GPU machine: `--strategy=mirrored` then runs one
    replica per logical CPU. It must run before TensorFlow initialises.
    """
    if cpu_devices <= 1 or tf.config.list_physical_devices("GPU"):
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) < cpu_devices:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices
        )


def build_strategy(name: str, cpu_devices: int = 1) -> tf.distribute.Strategy:
    """The tf.distribute strategy; create it before any other TensorFlow op runs.

    auto: mirrored when more than one GPU is visible, else default. mirrored:
    all GPUs, or without GPUs the first `cpu_devices` logical CPUs.
    multi_worker: MultiWorkerMirroredStrategy, cluster from TF_CONFIG (see
    scripts/launch_local_workers.sh). tpu: TPUStrategy on the TPU the
    environment names (untested here: no TPU).
    """
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "mirrored":
        devices = None
        if not gpus:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")][:cpu_devices]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ConfigError(
                "--strategy=multi_worker needs TF_CONFIG (the cluster and this worker's "
                "index); scripts/launch_local_workers.sh sets it for workers on this machine"
            )
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError as e:
            raise ConfigError(f"TF_CONFIG is not valid JSON: {e}") from e
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as e:
            raise ConfigError(f"--strategy=tpu: no TPU found ({e})") from e
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def resolve_jit(setting: str, strategy: tf.distribute.Strategy, method: str = "free"):
    """How to XLA-compile training: False, True (Keras, the whole step) or "per_replica".

    auto: on for GPUs/TPUs, off on CPU-only machines, where XLA made these
    models slower here (scripts/benchmark.py: small CNN 41.7 vs 19.6
    ms/iteration, PreAct ResNet-18 766 vs 591), as Keras's own "auto" does.
    With several replicas Keras cannot compile the step, which holds the
    all-reduce (keras-team/keras#18716, #19005); free and PGD training then
    compile each replica's forward/backward ("per_replica") and leave the
    all-reduce outside. Natural training (a plain Keras model) goes on without
    XLA, with a log line.
    """
    if setting == "false":
        return False
    if setting == "auto":
        accelerators = tf.config.list_physical_devices("GPU") + tf.config.list_physical_devices(
            "TPU"
        )
        if not accelerators:
            return False
    if strategy.num_replicas_in_sync == 1 and not isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ):
        return True
    if method == "natural":
        logging.warning(
            "XLA is off: natural training under tf.distribute (%d replicas) is not "
            "XLA-compiled (Keras disables it, keras-team/keras#18716); training goes on.",
            strategy.num_replicas_in_sync,
        )
        return False
    logging.info(
        "XLA: each of the %d replicas compiles its own forward/backward; the all-reduce "
        "stays outside XLA.",
        strategy.num_replicas_in_sync,
    )
    return "per_replica"


class CyclicLR(keras.optimizers.schedules.LearningRateSchedule):
    """Triangular one-cycle: 0 -> `peak` at 2/5 of training -> 0 (fast_adversarial's)."""

    def __init__(self, peak, total_steps):
        self.peak = float(peak)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        t = tf.cast(step, tf.float32)
        up = max(1.0, 0.4 * self.total_steps)
        down = max(1.0, self.total_steps - up)
        rate = tf.where(t < up, t / up, tf.maximum(0.0, (self.total_steps - t) / down))
        return self.peak * rate

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps}


def build_lr_schedule(config: TrainConfig, iterations_per_epoch: int, total_iterations: int):
    """Schedules keyed on optimizer iterations; boundaries given in natural epochs.

    One natural epoch is `iterations_per_epoch` iterations for every method
    (free training's replays count as iterations), so a boundary in natural
    epochs falls at the same point of the budget whatever m is.
    """
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(config.lr, total_iterations)
    if config.lr_schedule == "cyclic":
        return CyclicLR(config.lr, total_iterations)
    boundaries = [int(round(b * iterations_per_epoch)) for b in config.lr_boundaries]
    if not boundaries:
        return config.lr
    values = [config.lr * config.lr_decay**i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def build_model(config: TrainConfig, info) -> tuple[keras.Model, keras.Model]:
    """Returns (trainable model, base model that maps images to logits)."""
    if config.model == "wide_resnet":
        # Madry's WRN standardises each image itself, instead of mean/std.
        kwargs = {"depth": config.wrn_depth, "width": config.wrn_width}
    else:
        kwargs = {"mean": info.mean, "std": info.std}
    base = models.get_model(config.model, info.image_shape, info.num_classes, **kwargs)
    epsilon = config.epsilon / 255.0
    if config.method == "free":
        step = None if config.step_size is None else config.step_size / 255.0
        model = FreeAdversarialModel(base, epsilon=epsilon, replays=config.m, step_size=step)
    elif config.method == "pgd":
        step = config.pgd_step_size if config.pgd_step_size is not None else 2.5 * config.epsilon
        if config.pgd_step_size is None:
            step /= config.pgd_steps  # Madry et al.'s rule: 2.5 ε / K
        model = PGDAdversarialModel(
            base, epsilon=epsilon, steps=config.pgd_steps, step_size=step / 255.0
        )
    else:
        model = base
    return model, base


def train_and_evaluate(config: TrainConfig) -> dict:
    """Trains (or resumes), evaluates and exports one model; returns the final metrics.

    Everything goes to `config.model_dir`: `config.json`, TensorBoard logs in
    `logs/`, checkpoints in `checkpoints/`, `results.json`, and the SavedModel
    in `export/` (or `config.export_dir`). Started again on the same folder, a
    run resumes from its latest checkpoint (see `tf_free.loop`); under
    multi_worker only the chief writes logs, results and the export.
    """
    config.validate()
    configure_cpu_devices(config.cpu_devices)
    strategy = build_strategy(config.strategy, config.cpu_devices)
    chief = loop.is_chief(strategy)
    try:
        info = data.dataset_info(config.dataset, config.data_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    data.check_available(config.dataset, config.data_dir)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(
            f"--batch_size {config.batch_size} is not divisible by the {replicas} replicas"
        )
    prepare_model_dir(config, chief)
    loop.barrier(strategy)  # the other workers wait for the chief's --overwrite
    jit = resolve_jit(config.jit_compile, strategy, config.method)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    # fp16 wraps the optimizer in a LossScaleOptimizer at compile(); the input
    # gradient stays scaled, which only its sign survives (attacks.gradient_sign).
    keras.mixed_precision.set_global_policy(PRECISIONS[config.mixed_precision])

    num_train = config.train_examples or info.num_train_examples
    if config.train_examples:
        num_train = min(num_train, info.num_train_examples)
    # Across workers (and on TPUs) every step needs a full batch on every
    # replica: drop the last partial one. MirroredStrategy takes it (free.py).
    drop_remainder = config.strategy in ("multi_worker", "tpu")
    if drop_remainder:
        iterations_per_epoch = num_train // config.batch_size
    else:
        iterations_per_epoch = math.ceil(num_train / config.batch_size)
    if iterations_per_epoch < 1:
        raise ConfigError(f"fewer training examples ({num_train}) than --batch_size")
    total_iterations = config.passes * iterations_per_epoch * config.replays

    def make_train_dataset(epoch: int, skip_batches: int) -> tf.data.Dataset:
        return data.build_dataset(
            config.dataset,
            info.train_split,
            batch_size=config.batch_size,
            training=True,
            data_dir=config.data_dir,
            seed=config.seed,
            num_examples=config.train_examples,
            drop_remainder=drop_remainder,
            epoch=epoch,
            skip=skip_batches * config.batch_size,
        )

    eval_ds = data.build_dataset(
        config.dataset,
        info.eval_split,
        batch_size=min(config.batch_size, 500),
        training=False,
        data_dir=config.data_dir,
        num_examples=config.eval_examples,
    )

    with strategy.scope():
        model, base = build_model(config, info)
        optimizer = keras.optimizers.SGD(
            build_lr_schedule(config, iterations_per_epoch, total_iterations),
            momentum=config.momentum,
            weight_decay=config.weight_decay or None,
        )
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=jit,
        )
        # Everything a checkpoint holds exists before it is restored.
        optimizer.build(model.trainable_variables)
        if isinstance(model, FreeAdversarialModel):
            model.build_perturbation((config.batch_size // replicas, *base.input_shape[1:]))

    state = loop.TrainState(model, checkpoint_dir(config.model_dir), strategy)
    try:
        resumed = state.restore()
    except loop.CheckpointError as e:
        raise ConfigError(str(e)) from e
    if chief:  # only now: a run that cannot resume leaves the folder as it was
        write_config(config)
    if resumed and int(state.epoch) >= config.passes:
        logging.info(
            "%s holds a finished run (%s): evaluating and exporting it",
            config.model_dir,
            state.latest,
        )
    elif resumed:
        logging.info(
            "Resuming from %s: epoch %d of %d, batch %d of %d, iteration %d of %d",
            state.latest,
            int(state.epoch) + 1,
            config.passes,
            int(state.batch),
            iterations_per_epoch,
            loop.iterations(model),
            total_iterations,
        )
    log_dir = os.path.join(config.model_dir, "logs")
    epsilon = config.epsilon / 255.0
    # TensorBoard and evaluation on the chief only (the others would write the same).
    robustness = (
        callbacks.RobustnessEvaluation(
            eval_ds,
            log_dir=log_dir,
            epsilon=epsilon,
            step_size=config.eval_pgd_step_size / 255.0,
            steps=config.eval_pgd_steps,
            every=config.eval_every,
            verbose=bool(config.verbose),
            previous_seconds=float(state.seconds),
        )
        if chief
        else None
    )
    logging.info(
        "Training %s (%s, m=%d) on %s: %d pass(es) x %d batches x %d replays = %d iterations",
        config.model,
        config.method,
        config.replays,
        config.dataset,
        config.passes,
        iterations_per_epoch,
        config.replays,
        total_iterations,
    )
    history = loop.fit(
        model,
        make_train_dataset,
        strategy=strategy,
        epochs=config.passes,
        steps_per_epoch=iterations_per_epoch,
        state=state,
        callbacks=[keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False), robustness]
        if chief
        else [],
        checkpoint_every=config.checkpoint_every,
        verbose=config.verbose if chief else 0,
    )
    fingerprint = loop.weights_fingerprint(model)
    logging.info("final weights: sha256 %s (identical on every worker)", fingerprint)
    export_dir = config.export_dir or os.path.join(config.model_dir, "export")
    if not chief:  # every worker exports (as it saves); only the chief's is kept
        temporary = os.path.join(
            config.model_dir, f".export-worker-{strategy.cluster_resolver.task_id}"
        )
        export.export_saved_model(base, temporary)
        shutil.rmtree(temporary, ignore_errors=True)
        return {"iterations": loop.iterations(model), "weights_sha256": fingerprint}
    final = robustness.last_results or robustness.evaluate()
    export.export_saved_model(base, export_dir)
    results = {
        **final,
        "train_minutes": float(state.seconds) / 60,
        "iterations": loop.iterations(model),
        "resumed": resumed,
        "weights_sha256": fingerprint,
        "epsilon": epsilon,
        "eval_examples": config.eval_examples,
        "log_dir": os.path.abspath(log_dir),
        "export_dir": os.path.abspath(export_dir),
    }
    if history.history.get("loss"):  # empty when a finished run is started again
        results["train_loss"] = float(history.history["loss"][-1])
        results["train_accuracy"] = float(history.history["accuracy"][-1])
    with open(os.path.join(config.model_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def evaluate_attacks(logits_fn, dataset, names, *, epsilon, step_size, seed=0, verbose=True):
    """Accuracy (in %) under each named attack: natural, pgdK, cwK, pgdKxR.

    `pgd20x10` is PGD-20 with 10 random restarts; `cw100` is PGD-100 on the
    Carlini-Wagner margin loss (the paper's CW-100 column).
    """
    results = {}
    for name in names:
        kwargs = attack_from_name(name)
        if kwargs is None:
            acc = attacks.accuracy_under_attack(logits_fn, dataset, verbose=verbose)
        else:
            acc = attacks.accuracy_under_attack(
                logits_fn,
                dataset,
                attacks.pgd,
                verbose=verbose,
                epsilon=epsilon,
                step_size=step_size,
                seed=seed,
                **kwargs,
            )
        results[name] = 100.0 * acc
    return results


def attack_from_name(name: str):
    """'natural' -> None; 'pgd20' / 'cw100' / 'pgd20x10' -> pgd keyword arguments."""
    if name == "natural":
        return None
    for prefix, loss in (("pgd", "ce"), ("cw", "cw")):
        if name.startswith(prefix):
            steps, _, restarts = name[len(prefix) :].partition("x")
            if steps.isdigit() and (restarts.isdigit() or not restarts):
                return {"steps": int(steps), "restarts": int(restarts or 1), "loss": loss}
    raise ConfigError(
        f"unknown attack {name!r}: use natural, pgdK, cwK or pgdKxR (K steps, R restarts)"
    )


def to_markdown(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table shaped like the paper's Table 1."""
    header = "| Training | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        cells = [
            f"{row[c]:.2f}%" if isinstance(row.get(c), float) else str(row.get(c, ""))
            for c in columns
        ]
        lines.append(f"| {row['training']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
