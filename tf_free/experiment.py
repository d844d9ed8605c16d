"""One training run: config -> data -> strategy -> fit -> evaluation -> export.

`tf_free.train` parses flags into a `TrainConfig` and calls
`train_and_evaluate`; tests and scripts call it directly.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import keras
import tensorflow as tf
from absl import logging

from tf_free import callbacks, data, export, loop, models, optimization, run_lock
from tf_free.config import (  # noqa: F401 - re-exported: the config's home is tf_free.config
    JIT_CHOICES,
    LR_SCHEDULES,
    METHODS,
    PRECISIONS,
    RUNTIME_FIELDS,
    STRATEGIES,
    ConfigError,
    TrainConfig,
    differences,
    from_json_dict,
    plan,
)
from tf_free.evaluation import attack_from_name, evaluate_attacks, to_markdown  # noqa: F401
from tf_free.free import FreeAdversarialModel, PGDAdversarialModel

# What a run folder holds; --overwrite removes exactly these.
RUN_FILES = ("config.json", "checkpoints", "logs", "results.json", "export", "eval.json")


def prepare_model_dir(config: TrainConfig, chief: bool = True) -> None:
    """Checks that `model_dir` is new, or holds this same run (to resume), or --overwrite.

    With --overwrite (on the chief) the previous run's files are deleted,
    and so are a stranded export's staging folders.

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
        export.remove_staging(export_dir(config))
        logging.info("--overwrite: removed the previous run in %s", config.model_dir)
    if os.path.exists(path) and not config.overwrite:
        try:
            with open(path) as f:
                old = from_json_dict(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(
                f"--model_dir {config.model_dir!r} holds an unreadable config.json ({e}); "
                "use another --model_dir, or --overwrite to start again there"
            ) from e
        found = differences(old, config)
        if found:
            raise ConfigError(
                f"--model_dir {config.model_dir!r} holds another run ("
                + "; ".join(found)
                + "). Use another --model_dir, or --overwrite to replace that run"
            )


def export_dir(config: TrainConfig) -> str:
    """Where the run's SavedModel goes: --export_dir, or <model_dir>/export."""
    return config.export_dir or os.path.join(config.model_dir, "export")


def checkpoint_dir(model_dir: str) -> str:
    """Where a run folder's checkpoints are."""
    return os.path.join(model_dir, "checkpoints")


def write_config(config: TrainConfig) -> None:
    """`model_dir/config.json`, atomically (another worker may be reading it)."""
    path = os.path.join(config.model_dir, "config.json")
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json())
    os.replace(path + ".tmp", path)


def check_model_dir_writable(model_dir: str, create: bool = True) -> None:
    """Raises ConfigError unless `model_dir` exists (or can be made) and takes files.

    With `create=False` it only checks that no file stands in the way, and
    creates nothing.
    """
    ancestor = os.path.abspath(model_dir)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"--model_dir {model_dir!r} is not writable: {ancestor} is a file")
    if not create:
        return
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


def build_lr_schedule(
    config: TrainConfig, budget
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate as a function of optimizer iterations (replays count).

    Piecewise boundaries come from `budget.lr_boundaries` (given in natural
    epochs or in iterations, converted by `config.plan`), so a boundary falls
    at the same point of the budget whatever m is.
    """
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(config.lr, budget.total_iterations)
    if config.lr_schedule == "cyclic":
        return optimization.CyclicLR(config.lr, budget.total_iterations)
    if not budget.lr_boundaries:
        return config.lr
    values = [config.lr * config.lr_decay**i for i in range(len(budget.lr_boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(list(budget.lr_boundaries), values)


def build_optimizer(config: TrainConfig, budget) -> optimization.MomentumSGD:
    """Momentum SGD with coupled weight decay, as both official codes train."""
    return optimization.MomentumSGD(
        build_lr_schedule(config, budget),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        decay_variables=config.weight_decay_vars,
    )


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
        model = FreeAdversarialModel(
            base,
            epsilon=epsilon,
            replays=config.m,
            step_size=config.free_step_size / 255.0,
            delta_projection=config.free_delta_projection,
        )
    elif config.method == "pgd":
        model = PGDAdversarialModel(
            base,
            epsilon=epsilon,
            steps=config.pgd_steps,
            step_size=config.pgd_training_step_size / 255.0,
            attack_bn=config.pgd_attack_bn,
        )
    else:
        model = base
    return model, base


def describe_plan(config: TrainConfig) -> str:
    """The run's plan, as `--dry_run` prints it: reads no data, trains nothing."""
    config.validate()
    try:
        info = data.dataset_info(config.dataset, config.data_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    num_train = info.num_train_examples
    if config.train_examples:
        num_train = min(num_train or config.train_examples, config.train_examples)
    if not num_train:
        raise ConfigError(f"the size of {config.dataset!r} is unknown until it is prepared")
    budget = plan(config, num_train, drop_remainder=config.strategy in ("multi_worker", "tpu"))
    _, base = build_model(config, info)
    params = sum(int(math.prod(w.shape)) for w in base.trainable_weights)
    optimizer = build_optimizer(config, budget)
    optimizer.build(base.trainable_variables)
    decayed = [v for v in base.trainable_variables if optimizer.decays(v)]
    decayed_params = sum(int(math.prod(v.shape)) for v in decayed)
    eps = config.epsilon
    lines = [
        f"model        {config.model}: {params:,} trainable parameters, input "
        f"{tuple(info.image_shape)}, {info.num_classes} classes",
        f"data         {config.dataset}: {num_train:,} training examples, batch "
        f"{config.batch_size}, augmentation: {_augmentation(config, info)}",
        f"method       {_method(config)}",
        f"budget       {budget.passes} passes x {budget.batches_per_pass} batches per pass"
        + (
            f" (last pass {budget.total_batches - (budget.passes - 1) * budget.batches_per_pass})"
            if budget.total_batches % budget.batches_per_pass
            else ""
        )
        + f" = {budget.total_batches:,} batches x {budget.replays} replays = "
        f"{budget.total_iterations:,} iterations ({budget.natural_epochs:.4g} natural epochs)",
        f"lr           {_lr(config, budget)}",
        f"optimizer    momentum SGD {config.momentum:g}, weight decay {config.weight_decay:g} "
        + (
            f"(coupled, as an L2 loss term) on {config.weight_decay_vars}: {len(decayed)} "
            f"variables, {decayed_params:,} parameters"
            if config.weight_decay
            else "(none)"
        ),
        f"epsilon      {eps:g}/255 = {eps / 255:.6g}",
        f"evaluation   {_eval_attack(config)}, on {config.eval_examples:,} {info.eval_split} "
        f"examples, every {config.eval_every} pass(es)",
    ]
    lines += [f"warning      {w}" for w in config.warnings()]
    return "\n".join(lines)


def _augmentation(config: TrainConfig, info) -> str:
    if info.augmentation == "cifar":
        return f"zero-pad {config.crop_padding} px, random crop {info.image_shape[0]}, flip"
    if info.augmentation == "imagenet":
        return "random-resized crop 224 + flip (eval: resize 256, centre crop 224)"
    return "none (shuffling only)"


def _method(config: TrainConfig) -> str:
    if config.method == "free":
        step = config.free_step_size
        return (
            f"free (Alg. 2), m={config.m}, δ step {step:g}/255 = {step / 255:.6g}, "
            f"δ kept {'in the ε-ball, x+δ clipped' if config.free_delta_projection == 'epsilon_ball' else 'so that x+δ is a valid image'}"
        )
    if config.method == "pgd":
        step = config.pgd_training_step_size
        return (
            f"PGD-{config.pgd_steps} training (Alg. 1), step {step:g}/255 = {step / 255:.6g}, "
            f"random start, attack batch norm in {config.pgd_attack_bn} mode"
        )
    return "natural"


def _eval_attack(config: TrainConfig) -> str:
    if config.eval_attack == "apgd-ce":
        return f"APGD-CE-{config.eval_pgd_steps} (step size adaptive, from 2ε)"
    step = config.eval_pgd_step_size
    return f"PGD-{config.eval_pgd_steps}, step {step:g}/255 = {step / 255:.6g}, random start"


def _lr(config: TrainConfig, budget) -> str:
    if config.lr_schedule == "piecewise":
        if not budget.lr_boundaries:
            return f"constant {config.lr:g}"
        values = [config.lr * config.lr_decay**i for i in range(len(budget.lr_boundaries) + 1)]
        steps = ", then ".join(
            f"{v:g} after iteration {b:,}" for v, b in zip(values[1:], budget.lr_boundaries)
        )
        return f"piecewise: {values[0]:g}, then {steps}"
    if config.lr_schedule == "cyclic":
        return (
            f"cyclic: 0 -> {config.lr:g} at iteration {budget.total_iterations // 2:,} -> 0 at "
            f"{budget.total_iterations:,}"
        )
    return f"cosine from {config.lr:g} to 0 over {budget.total_iterations:,} iterations"


def train_and_evaluate(config: TrainConfig) -> dict:
    """Trains (or resumes), evaluates and exports one model; returns the final metrics.

    Everything goes to `config.model_dir`: `config.json`, TensorBoard logs in
    `logs/`, checkpoints in `checkpoints/`, `results.json`, and the SavedModel
    in `export/` (or `config.export_dir`). Started again on the same folder, a
    run resumes from its latest checkpoint (see `tf_free.loop`); under
    multi_worker only the chief writes logs, results and the export. One
    process at a time may train in a run folder (`run_lock`).
    """
    config.validate()
    for warning in config.warnings():
        logging.warning("%s", warning)
    configure_cpu_devices(config.cpu_devices)
    strategy = build_strategy(config.strategy, config.cpu_devices)
    chief = loop.is_chief(strategy)
    try:
        info = data.dataset_info(config.dataset, config.data_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    check_model_dir_writable(config.model_dir, create=False)
    target = export_dir(config)
    try:
        export.check_export_target(
            target, config.model_dir, run_files=tuple(f for f in RUN_FILES if f != "export")
        )
    except export.ExportTargetError as e:
        raise ConfigError(str(e)) from e
    data.check_available(config.dataset, config.data_dir)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(
            f"--batch_size {config.batch_size} is not divisible by the {replicas} replicas"
        )
    lock = None
    if chief:  # the workers of a multi-worker run join under the chief's lock
        check_model_dir_writable(config.model_dir)
        try:
            lock = run_lock.RunLock(config.model_dir).acquire()
        except run_lock.RunLockedError as e:
            raise ConfigError(str(e)) from e
    try:
        return _train_and_evaluate(config, strategy, chief, info, target)
    finally:
        if lock is not None:
            lock.release()


def _train_and_evaluate(config, strategy, chief, info, target) -> dict:
    prepare_model_dir(config, chief)
    loop.barrier(strategy)  # the other workers wait for the chief's --overwrite
    jit = resolve_jit(config.jit_compile, strategy, config.method)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    # fp16 wraps the optimizer in a LossScaleOptimizer at compile(); the input
    # gradient stays scaled, which only its sign survives (attacks.gradient_sign).
    keras.mixed_precision.set_global_policy(PRECISIONS[config.mixed_precision])
    replicas = strategy.num_replicas_in_sync

    num_train = config.train_examples or info.num_train_examples
    if config.train_examples:
        num_train = min(num_train, info.num_train_examples)
    # Across workers (and on TPUs) every step needs a full batch on every
    # replica: drop the last partial one. MirroredStrategy takes it (free.py).
    drop_remainder = config.strategy in ("multi_worker", "tpu")
    budget = plan(config, num_train, drop_remainder)

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
            **({"crop_padding": config.crop_padding} if info.augmentation == "cifar" else {}),
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
        optimizer = build_optimizer(config, budget)
        adversarial = config.method != "natural"
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            # Free and PGD training measure accuracy on x+δ / x_adv: say so.
            metrics=[
                keras.metrics.SparseCategoricalAccuracy(
                    name="adv_accuracy" if adversarial else "accuracy"
                )
            ],
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
    if resumed and int(state.epoch) >= budget.passes:
        logging.info(
            "%s holds a finished run (%s): evaluating and exporting it",
            config.model_dir,
            state.latest,
        )
    elif resumed:
        logging.info(
            "Resuming from %s: pass %d of %d, batch %d of %d, iteration %d of %d",
            state.latest,
            int(state.epoch) + 1,
            budget.passes,
            int(state.batch),
            budget.batches_per_pass,
            loop.iterations(model),
            budget.total_iterations,
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
            attack=config.eval_attack,
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
        budget.replays,
        config.dataset,
        budget.passes,
        budget.batches_per_pass,
        budget.replays,
        budget.total_iterations,
    )
    history = loop.fit(
        model,
        make_train_dataset,
        strategy=strategy,
        epochs=budget.passes,
        steps_per_epoch=budget.batches_per_pass,
        total_steps=budget.total_batches,
        state=state,
        callbacks=[keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False), robustness]
        if chief
        else [],
        checkpoint_every=config.checkpoint_every,
        verbose=config.verbose if chief else 0,
        # Free and PGD training measure the loss on x+δ / x_adv: say so.
        log_names={"loss": "adv_loss"} if adversarial else None,
    )
    fingerprint = loop.weights_fingerprint(model)
    logging.info("final weights: sha256 %s (identical on every worker)", fingerprint)
    if not chief:  # every worker exports (as it saves); only the chief's is kept
        temporary = os.path.join(
            config.model_dir, f".export-worker-{strategy.cluster_resolver.task_id}"
        )
        shutil.rmtree(temporary, ignore_errors=True)
        export.export_saved_model(base, temporary)
        shutil.rmtree(temporary, ignore_errors=True)
        return {"iterations": loop.iterations(model), "weights_sha256": fingerprint}
    final = robustness.last_results or robustness.evaluate()
    try:
        export.export_saved_model(base, target, model_dir=config.model_dir)
    except OSError as e:
        raise loop.TrainingError(
            f"could not write the SavedModel to {target}: {e.strerror or e}. The trained "
            f"model is in the checkpoint {state.latest}; free space and run the same command "
            "again to export it"
        ) from e
    results = {
        **final,
        "train_minutes": float(state.seconds) / 60,
        "iterations": loop.iterations(model),
        "resumed": resumed,
        "weights_sha256": fingerprint,
        "epsilon": epsilon,
        "eval_examples": config.eval_examples,
        "log_dir": os.path.abspath(log_dir),
        "export_dir": os.path.abspath(target),
    }
    prefix = "adv_" if adversarial else ""
    if history.history.get(f"{prefix}loss"):  # empty when a finished run is started again
        for name in ("loss", "accuracy"):
            results[f"train_{prefix}{name}"] = float(history.history[f"{prefix}{name}"][-1])
    _write_json_atomically(os.path.join(config.model_dir, "results.json"), results)
    return results


def _write_json_atomically(path: str, value) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)
