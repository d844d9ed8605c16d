"""One training run: small named builders, and `train_and_evaluate` that uses them in order.

`tf_free.train` parses flags into a `TrainConfig` and calls
`train_and_evaluate`; `scripts/benchmark.py` times what `build_trainer` builds,
so it measures exactly the step that `tf_free.train` runs.

Vocabulary: the budget is in natural epochs (or optimizer iterations); a pass
is one sweep over the data, made of batches; iterations count replays (free
training makes m iterations per batch).
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import keras
import tensorflow as tf
from absl import logging

from tf_free import (
    callbacks,
    data,
    evaluation,
    export,
    guard,
    loop,
    models,
    optimization,
    run_folder,
    runtime,
    summaries,
)
from tf_free.config import ConfigError, Plan, TrainConfig, plan
from tf_free.fast import FastAdversarialModel
from tf_free.free import FreeAdversarialModel, PGDAdversarialModel

# --- Builders ------------------------------------------------------------------------


def dataset_info(config: TrainConfig) -> data.DatasetSpec:
    """The dataset's shape, classes, splits and size, without reading it."""
    try:
        return data.dataset_info(config.dataset, config.data_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def build_plan(config: TrainConfig, info) -> Plan:
    """The run's passes, batches and iterations over the training examples it uses."""
    num_train = info.num_train_examples
    if config.train_examples:
        num_train = min(num_train or config.train_examples, config.train_examples)
    if not num_train:
        raise ConfigError(f"the size of {config.dataset!r} is unknown until it is prepared")
    return plan(config, num_train, drop_remainder=runtime.drops_remainder(config.strategy))


def build_lr_schedule(
    config: TrainConfig, budget: Plan
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


def build_optimizer(config: TrainConfig, budget: Plan) -> optimization.MomentumSGD:
    """Momentum SGD with coupled weight decay, as both official codes train."""
    return optimization.MomentumSGD(
        build_lr_schedule(config, budget),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        decay_variables=config.weight_decay_vars,
    )


def build_model(config: TrainConfig, info) -> tuple[keras.Model, keras.Model]:
    """Returns (trainable model, base model that maps images to logits)."""
    base = models.build(
        config.model,
        info.image_shape,
        info.num_classes,
        mean=info.mean,
        std=info.std,
        hyperparameters=config.resolved_model_hparams(),
    )
    epsilon = config.epsilon / 255.0
    if config.method == "free":
        model = FreeAdversarialModel(
            base,
            epsilon=epsilon,
            replays=config.m,
            # Unset: the model's default, ε (so ε=0 is natural training replayed m times).
            step_size=None if config.step_size is None else config.step_size / 255.0,
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
    elif config.method == "fast":
        model = FastAdversarialModel(
            base,
            epsilon=epsilon,
            step_size=config.fast_training_step_size / 255.0 if epsilon else None,
            init=config.fast_init,
            seed=config.seed,
        )
    else:
        model = base
    return model, base


@dataclasses.dataclass
class Trainer:
    """What a run trains: the compiled model, its base (images -> logits) and optimizer."""

    model: keras.Model
    base: keras.Model
    optimizer: optimization.MomentumSGD
    jit_compile: bool | str


def build_trainer(
    config: TrainConfig, info, budget: Plan, strategy: tf.distribute.Strategy
) -> Trainer:
    """Builds and compiles the model and optimizer in `strategy`'s scope, with every
    variable a checkpoint holds created (so that restoring fills them all)."""
    jit = runtime.resolve_jit(config.jit_compile, strategy, config.method)
    adversarial = config.method != "natural"
    with strategy.scope():
        model, base = build_model(config, info)
        optimizer = build_optimizer(config, budget)
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
        optimizer.build(model.trainable_variables)
        if isinstance(model, FreeAdversarialModel):
            replica_batch = config.batch_size // strategy.num_replicas_in_sync
            model.build_perturbation((replica_batch, *base.input_shape[1:]))
    return Trainer(model, base, optimizer, jit)


def build_train_dataset_fn(config: TrainConfig, info):
    """`make(pass_index, skip_batches)`: the training batches of one pass, resumable mid-pass."""
    drop_remainder = runtime.drops_remainder(config.strategy)
    padding = {"crop_padding": config.crop_padding} if info.augmentation == "cifar" else {}

    def make(epoch: int, skip_batches: int) -> tf.data.Dataset:
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
            **padding,
        )

    return make


def build_eval_dataset(config: TrainConfig, info) -> tf.data.Dataset:
    """The first --eval_examples examples of the evaluation split, unaugmented."""
    return data.build_dataset(
        config.dataset,
        info.eval_split,
        batch_size=min(config.batch_size, 500),
        training=False,
        data_dir=config.data_dir,
        num_examples=config.eval_examples,
    )


def evaluate_export(model_dir: str, names, num_examples: int | None = None) -> dict:
    """Accuracies (fractions) of a finished run's exported model under the named attacks
    (`evaluation.evaluate_attacks`), on the first `num_examples` examples of its evaluation
    split (None: all), with the run's ε and evaluation step; batches of 500."""
    config = dataclasses.replace(
        run_folder.read_config(model_dir), batch_size=500, eval_examples=num_examples
    )
    logits_fn = export.load_logits_fn(run_folder.export_dir(config))
    return evaluation.evaluate_attacks(
        logits_fn,
        build_eval_dataset(config, dataset_info(config)),
        names,
        epsilon=config.epsilon / 255.0,
        step_size=config.eval_pgd_step_size / 255.0,
    )


def eval_example_count(config: TrainConfig, info) -> int:
    """The examples the evaluation uses: --eval_examples, or the whole split if it is
    smaller (from TFDS's metadata: no data is read)."""
    size = data.split_size(config.dataset, info.eval_split, config.data_dir)
    return min(config.eval_examples, size) if size else config.eval_examples


def build_robustness_callback(config: TrainConfig, info):
    """Clean and attacked accuracy on the evaluation split, to TensorBoard, during training."""
    return callbacks.RobustnessEvaluation(
        build_eval_dataset(config, info),
        log_dir=run_folder.log_dir(config.model_dir),
        epsilon=config.epsilon / 255.0,
        step_size=config.eval_pgd_step_size / 255.0,
        steps=config.eval_pgd_steps,
        attack=config.eval_attack,
        every=config.eval_every,
        every_iterations=config.eval_every_iterations,
        verbose=bool(config.verbose),
        class_names=data.class_names(config.dataset, config.data_dir),
        num_examples=eval_example_count(config, info),
    )


def build_overfit_guard(config: TrainConfig, info):
    """The catastrophic-overfitting guard, on the first training batch of the first pass."""
    images, labels = next(iter(build_train_dataset_fn(config, info)(0, 0).take(1)))
    return guard.OverfitGuard(
        (images, labels),
        epsilon=config.epsilon / 255.0,
        directory=os.path.join(run_folder.checkpoint_dir(config.model_dir), "overfit_guard"),
        drop=config.overfit_drop,
        every=config.overfit_check_every,
        log_dir=run_folder.log_dir(config.model_dir),
        seed=config.seed,
    )


def build_training_summaries(config: TrainConfig, trainer: Trainer, budget: Plan):
    """Training curves every --log_every iterations (about 100 points by default)."""
    return summaries.TrainingSummaries(
        run_folder.log_dir(config.model_dir),
        log_every=config.resolved_log_every(budget.total_iterations),
        epsilon=config.epsilon / 255.0,
        perturbation=getattr(trainer.model, "perturbation", None),
    )


# --- The run -------------------------------------------------------------------------


def train_and_evaluate(config: TrainConfig) -> dict:
    """Trains (or resumes), evaluates and exports one model; returns the final metrics.

    Everything goes to `config.model_dir` (see `tf_free.run_folder`). Started
    again on the same folder, a run resumes from its latest checkpoint (see
    `tf_free.loop`); under multi_worker only the chief writes logs, results and
    the export. One process at a time may train in a run folder.
    """
    # Checks: every setting, the data and the output targets, before any work.
    config.validate()
    for warning in config.warnings():
        logging.warning("%s", warning)
    runtime.configure_cpu_devices(config.cpu_devices)
    strategy = runtime.build_strategy(config.strategy, config.cpu_devices)
    chief = loop.is_chief(strategy)
    info = dataset_info(config)
    run_folder.check_targets(config)
    data.check_available(config.dataset, config.data_dir)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(
            f"--batch_size {config.batch_size} is not divisible by the {replicas} replicas"
        )
    with run_folder.locked(config, chief):
        run_folder.prepare(config, chief)
        loop.barrier(strategy)  # the other workers wait for the chief's --overwrite
        runtime.set_up(config)
        budget = build_plan(config, info)
        trainer, state, resumed = _make_or_restore(config, info, budget, strategy, chief)
        robustness = build_robustness_callback(config, info) if chief else None
        overfit_guard = build_overfit_guard(config, info) if chief and config.guarded else None
        history = _train(config, trainer, budget, state, strategy, robustness, overfit_guard)
        return _finish(
            config, trainer, state, strategy, robustness, history, resumed, overfit_guard
        )


def _make_or_restore(config, info, budget, strategy, chief):
    """The trainer, restored from the folder's latest checkpoint if there is one."""
    trainer = build_trainer(config, info, budget, strategy)
    state = loop.TrainState(trainer.model, run_folder.checkpoint_dir(config.model_dir), strategy)
    try:
        resumed = state.restore()
    except loop.CheckpointError as e:
        raise ConfigError(str(e)) from e
    if chief:  # only now: a run that cannot resume leaves the folder as it was
        run_folder.write_config(config)
        logs = run_folder.log_dir(config.model_dir)
        os.makedirs(logs, exist_ok=True)
        if resumed:  # the points written after the checkpoint come again
            summaries.truncate_after(logs, loop.iterations(trainer.model))
        summaries.write_run_header(config, logs)
    if resumed and int(state.passes_done) >= budget.passes:
        logging.info(
            "%s holds a finished run (%s): evaluating and exporting it",
            config.model_dir,
            state.latest,
        )
    elif resumed:
        logging.info(
            "Resuming from %s: pass %d of %d, batch %d of %d, iteration %d of %d",
            state.latest,
            int(state.passes_done) + 1,
            budget.passes,
            int(state.batches_done),
            budget.batches_per_pass,
            loop.iterations(trainer.model),
            budget.total_iterations,
        )
    return trainer, state, resumed


def _train(config, trainer, budget, state, strategy, robustness, overfit_guard=None):
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
    chief = robustness is not None
    steps_per_loop = runtime.resolve_steps_per_loop(config.steps_per_loop, config.model)
    checkpoint_every = config.resolved_checkpoint_every(steps_per_loop)
    if steps_per_loop > 1:
        logging.info("%d training steps per call (--steps_per_loop)", steps_per_loop)
    if checkpoint_every != config.checkpoint_every:
        logging.warning(
            "--checkpoint_every=%d rounded up to %d, a multiple of --steps_per_loop=%d",
            config.checkpoint_every,
            checkpoint_every,
            steps_per_loop,
        )
    return loop.fit(
        trainer.model,
        build_train_dataset_fn(config, dataset_info(config)),
        strategy=strategy,
        passes=budget.passes,
        batches_per_pass=budget.batches_per_pass,
        total_batches=budget.total_batches,
        state=state,
        callbacks=[
            build_training_summaries(config, trainer, budget),
            *([overfit_guard] if overfit_guard else []),  # before the evaluation: it may restore
            robustness,
        ]
        if chief
        else [],
        checkpoint_every=checkpoint_every,
        steps_per_loop=steps_per_loop,
        verbose=config.verbose if chief else 0,
        # Free and PGD training measure the loss on x+δ / x_adv: say so.
        log_names={"loss": "adv_loss"} if config.method != "natural" else None,
    )


def _finish(
    config, trainer, state, strategy, robustness, history, resumed, overfit_guard=None
) -> dict:
    """The final evaluation, the SavedModel and results.json (on the chief)."""
    model = trainer.model
    fingerprint = loop.weights_fingerprint(model)
    logging.info("final weights: sha256 %s (identical on every worker)", fingerprint)
    if robustness is None:  # every worker exports (as it saves); only the chief's is kept
        temporary = os.path.join(
            config.model_dir, f".export-worker-{strategy.cluster_resolver.task_id}"
        )
        shutil.rmtree(temporary, ignore_errors=True)
        export.export_saved_model(trainer.base, temporary)
        shutil.rmtree(temporary, ignore_errors=True)
        return {"iterations": loop.iterations(model), "weights_sha256": fingerprint}
    final = robustness.last_results or robustness.evaluate()
    target = run_folder.export_dir(config)
    try:
        export.export_saved_model(trainer.base, target, model_dir=config.model_dir)
    except OSError as e:
        raise loop.TrainingError(
            f"could not write the SavedModel to {target}: {e.strerror or e}. The trained "
            f"model is in the checkpoint {state.latest}; free space and run the same command "
            "again to export it"
        ) from e
    results = {
        **final,
        "train_minutes": float(state.seconds) / 60,  # without evaluation
        "eval_minutes": float(state.eval_seconds) / 60,  # during training
        "iterations": loop.iterations(model),
        "resumed": resumed,
        "weights_sha256": fingerprint,
        "epsilon": config.epsilon / 255.0,
        "eval_examples": config.eval_examples,
        "log_dir": os.path.abspath(run_folder.log_dir(config.model_dir)),
        "export_dir": os.path.abspath(target),
    }
    prefix = "adv_" if config.method != "natural" else ""
    if history.history.get(f"{prefix}loss"):  # empty when a finished run is started again
        for name in ("loss", "accuracy"):
            results[f"train_{prefix}{name}"] = float(history.history[f"{prefix}{name}"][-1])
    if overfit_guard is not None and overfit_guard.fired:
        results["overfit_guard"] = overfit_guard.report
    run_folder.write_json(os.path.join(config.model_dir, "results.json"), results)
    info = dataset_info(config)
    summaries.write_final(
        run_folder.log_dir(config.model_dir),
        results,
        f"the first {eval_example_count(config, info)} {info.eval_split} examples",
    )
    return results
