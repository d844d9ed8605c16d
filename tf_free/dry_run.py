"""`python -m tf_free.train --dry_run`: the run's plan, from its settings alone.

The model (its parameter count), the data and augmentation, the method, the
budget in passes, batches and iterations, the LR schedule with its boundaries
in iterations, which variables the weight decay covers, ε and the evaluation.
Reads no data and trains nothing.
"""

from __future__ import annotations

import math

from tf_free import experiment, runtime
from tf_free.config import TrainConfig


def describe_plan(config: TrainConfig) -> str:
    """The run's plan, as `--dry_run` prints it: reads no data, trains nothing."""
    config.validate()
    info = experiment.dataset_info(config)
    budget = experiment.build_plan(config, info)
    num_train = budget.num_train_examples
    _, base = experiment.build_model(config, info)
    params = sum(int(math.prod(w.shape)) for w in base.trainable_weights)
    optimizer = experiment.build_optimizer(config, budget)
    optimizer.build(base.trainable_variables)
    decayed = [v for v in base.trainable_variables if optimizer.decays(v)]
    decayed_params = sum(int(math.prod(v.shape)) for v in decayed)
    eps = config.epsilon
    log_every = config.resolved_log_every(budget.total_iterations)
    lines = [
        f"model        {config.model}: {params:,} trainable parameters, input "
        f"{tuple(info.image_shape)}, {info.num_classes} classes",
        f"data         {config.dataset}: {num_train:,} training examples, batch "
        f"{config.batch_size}, augmentation: {_augmentation(config, info)}",
        f"method       {_method(config)}"
        + (
            "; overfit guard: PGD-5 on a training batch "
            + (
                f"every {config.overfit_check_every} batches"
                if config.overfit_check_every
                else "after every pass"
            )
            + f", stop at a drop > {config.overfit_drop:g}"
            if config.guarded
            else ""
        ),
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
        "examples, "
        + (
            f"every {config.eval_every_iterations:,} iterations"
            if config.eval_every_iterations
            else f"every {config.eval_every} pass(es)"
        )
        + " and at the end",
        f"steps        {_steps_per_loop(config)}",
        f"tensorboard  training scalars every {log_every:,} iterations "
        f"({budget.total_iterations // log_every:,} points), step axis: iterations",
    ]
    lines += [f"warning      {w}" for w in config.warnings()]
    return "\n".join(lines)


def _steps_per_loop(config: TrainConfig) -> str:
    steps = runtime.resolve_steps_per_loop(config.steps_per_loop, config.model)
    text = f"{steps} per tf.function call" + (
        "" if config.steps_per_loop else " (--steps_per_loop=0: automatic on this machine)"
    )
    checkpoint_every = config.resolved_checkpoint_every(steps)
    if not checkpoint_every:
        return text + "; checkpoints at the ends of passes"
    rounded = (
        f" (--checkpoint_every={config.checkpoint_every} rounded up to a multiple of {steps})"
        if checkpoint_every != config.checkpoint_every
        else ""
    )
    return text + f"; a checkpoint every {checkpoint_every} batches{rounded} and every pass end"


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
    if config.method == "fast":
        step = config.fast_training_step_size
        return (
            f"fast (FGSM, {config.fast_init} start; Wong et al. 2020), step {step:g}/255 = "
            f"{step / 255:.6g}, 2 forward/backward passes per iteration"
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
