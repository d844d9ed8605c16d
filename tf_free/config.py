"""A run's settings, checked in one place before any work starts, and its budget.

`TrainConfig` holds every setting of `tf_free.train` (ε and step sizes in the
paper's 0-255 pixel units). `validate()` rejects every bad value with a one-line
`ConfigError`; `warnings()` names settings that are legal but probably not what
the user meant. `plan(config, num_train)` turns the budget into passes, batches
and iterations without reading any data, for the run and for `--dry_run`.

Vocabulary: the budget is in natural epochs (`epochs`, the paper's unit) or in
optimizer iterations (`iterations`); a pass is one sweep over the data;
iterations count replays (free training makes m iterations per batch).
"""

from __future__ import annotations

import dataclasses
import json
import math

METHODS = ("free", "pgd", "natural")
LR_SCHEDULES = ("piecewise", "cosine", "cyclic")
LR_BOUNDARY_UNITS = ("epochs", "iterations")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
PRECISIONS = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
JIT_CHOICES = ("auto", "true", "false")
DECAY_VARIABLES = ("kernels", "all")
ATTACK_BN_MODES = ("train", "inference")
DELTA_PROJECTIONS = ("valid_image", "epsilon_ball")
EVAL_ATTACKS = ("pgd", "apgd-ce")
# ε above this (0-255 units; 0.5 in [0, 1]) can erase any image: an error
# unless --allow_large_epsilon.
MAX_EPSILON = 127.5


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
    free_delta_projection: str = "valid_image"
    pgd_steps: int = 7
    pgd_step_size: float | None = None
    pgd_attack_bn: str = "train"
    epochs: float = 8
    iterations: int | None = None
    batch_size: int = 128
    crop_padding: int = 4
    lr: float = 0.05
    lr_schedule: str = "cosine"
    lr_boundaries: tuple[float, ...] = ()
    lr_boundary_unit: str = "epochs"
    lr_decay: float = 0.1
    weight_decay: float = 0.0
    weight_decay_vars: str = "kernels"
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
    allow_large_epsilon: bool = False
    eval_every: int = 1
    eval_attack: str = "pgd"
    eval_examples: int = 10000
    eval_pgd_steps: int = 20
    eval_pgd_step_size: float = 2.55
    train_examples: int | None = None
    verbose: int = 1

    def validate(self) -> None:
        """Raises ConfigError for the first bad value (no I/O)."""
        from tf_free import models  # models import keras: keep this module light

        def finite(value) -> bool:
            return isinstance(value, (int, float)) and math.isfinite(value)

        def positive(value) -> bool:
            return finite(value) and value > 0

        def one_of(name, value, choices):
            return (value in choices, f"--{name} must be one of {tuple(choices)}, got {value!r}")

        checks = [
            one_of("method", self.method, METHODS),
            (
                _is_int(self.m) and self.m >= 1,
                f"--m (replays) must be an integer >= 1, got {self.m}",
            ),
            (
                finite(self.epsilon) and self.epsilon >= 0,
                f"--epsilon must be a finite number >= 0 (0-255 pixel units), got {self.epsilon}",
            ),
            (
                self.allow_large_epsilon or not self.epsilon > MAX_EPSILON,
                f"--epsilon={self.epsilon} (0-255 units) is above {MAX_EPSILON} (0.5 of the "
                "pixel range), where a perturbation can erase any image; ε is in 0-255 units "
                "(8 means 8/255). Pass --allow_large_epsilon if you mean it",
            ),
            (
                self.step_size is None or positive(self.step_size),
                f"--step_size must be > 0 and finite (0-255 units), got {self.step_size}",
            ),
            one_of("free_delta_projection", self.free_delta_projection, DELTA_PROJECTIONS),
            (
                _is_int(self.pgd_steps) and self.pgd_steps >= 1,
                f"--pgd_steps must be an integer >= 1, got {self.pgd_steps}",
            ),
            (
                self.pgd_step_size is None or positive(self.pgd_step_size),
                f"--pgd_step_size must be > 0 and finite (0-255 units), got {self.pgd_step_size}",
            ),
            one_of("pgd_attack_bn", self.pgd_attack_bn, ATTACK_BN_MODES),
            (
                positive(self.epochs),
                f"--epochs (natural-epoch budget) must be a finite number > 0, got {self.epochs}",
            ),
            (
                self.iterations is None or (_is_int(self.iterations) and self.iterations >= 1),
                f"--iterations must be an integer >= 1, got {self.iterations}",
            ),
            (
                _is_int(self.batch_size) and self.batch_size >= 1,
                f"--batch_size must be >= 1, got {self.batch_size}",
            ),
            (
                _is_int(self.crop_padding) and self.crop_padding >= 0,
                f"--crop_padding must be an integer >= 0 (pixels), got {self.crop_padding}",
            ),
            (positive(self.lr), f"--lr must be a finite number > 0, got {self.lr}"),
            one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES),
            (
                all(finite(b) and b >= 0 for b in self.lr_boundaries),
                f"--lr_boundaries must be finite numbers >= 0, got {list(self.lr_boundaries)}",
            ),
            (
                list(self.lr_boundaries) == sorted(set(self.lr_boundaries)),
                f"--lr_boundaries must increase, got {list(self.lr_boundaries)}",
            ),
            one_of("lr_boundary_unit", self.lr_boundary_unit, LR_BOUNDARY_UNITS),
            (
                positive(self.lr_decay),
                f"--lr_decay must be a finite number > 0, got {self.lr_decay}",
            ),
            (
                finite(self.weight_decay) and self.weight_decay >= 0,
                f"--weight_decay must be a finite number >= 0, got {self.weight_decay}",
            ),
            one_of("weight_decay_vars", self.weight_decay_vars, DECAY_VARIABLES),
            (
                finite(self.momentum) and 0 <= self.momentum < 1,
                f"--momentum must be in [0, 1), got {self.momentum}",
            ),
            (
                self.model in models.MODELS,
                f"unknown --model {self.model!r}; choose one of {sorted(models.MODELS)}",
            ),
            (
                self.model != "wide_resnet"
                or (
                    _is_int(self.wrn_depth)
                    and self.wrn_depth >= 8
                    and (self.wrn_depth - 2) % 6 == 0
                ),
                f"--wrn_depth must be 6n+2 (8, 14, ..., 32), got {self.wrn_depth}",
            ),
            (
                self.model != "wide_resnet" or (_is_int(self.wrn_width) and self.wrn_width >= 1),
                f"--wrn_width must be an integer >= 1, got {self.wrn_width}",
            ),
            one_of("strategy", self.strategy, STRATEGIES),
            one_of("jit_compile", self.jit_compile, JIT_CHOICES),
            one_of("mixed_precision", self.mixed_precision, PRECISIONS),
            (
                _is_int(self.cpu_devices) and self.cpu_devices >= 1,
                f"--cpu_devices must be >= 1, got {self.cpu_devices}",
            ),
            (
                _is_int(self.seed) and 0 <= self.seed < 2**31,
                f"--seed must be an integer in [0, 2^31), got {self.seed}",
            ),
            (
                _is_int(self.checkpoint_every) and self.checkpoint_every >= 0,
                f"--checkpoint_every must be >= 0 (batches), got {self.checkpoint_every}",
            ),
            (
                _is_int(self.eval_every) and self.eval_every >= 1,
                f"--eval_every must be >= 1 (passes), got {self.eval_every}",
            ),
            one_of("eval_attack", self.eval_attack, EVAL_ATTACKS),
            (
                _is_int(self.eval_examples) and self.eval_examples >= 1,
                f"--eval_examples must be >= 1, got {self.eval_examples}",
            ),
            (
                _is_int(self.eval_pgd_steps) and self.eval_pgd_steps >= 1,
                f"--eval_pgd_steps must be an integer >= 1, got {self.eval_pgd_steps}",
            ),
            (
                positive(self.eval_pgd_step_size),
                f"--eval_pgd_step_size must be > 0 and finite (0-255 units), "
                f"got {self.eval_pgd_step_size}",
            ),
            (
                self.train_examples is None
                or (_is_int(self.train_examples) and self.train_examples >= 1),
                f"--train_examples must be >= 1, got {self.train_examples}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def warnings(self) -> list[str]:
        """Legal settings that are probably not what the user meant (one line each)."""
        found = []
        if self.method == "free" and self.iterations is None and self.m > self.epochs:
            budget = self.passes * self.m
            found.append(
                f"--m={self.m} is larger than the budget of {self.epochs:g} natural epochs: "
                f"free training makes at least one pass of m replays, so the budget rises to "
                f"{budget:g} natural epochs of iterations ({budget / self.epochs:.3g}x); lower "
                "--m or raise --epochs"
            )
        if self.lr_boundaries and self.lr_schedule != "piecewise":
            found.append(f"--lr_boundaries is ignored by --lr_schedule={self.lr_schedule}")
        if self.iterations is not None and self.method == "free" and self.iterations % self.m:
            found.append(
                f"--iterations={self.iterations} is not a multiple of --m={self.m}: training "
                f"stops after {self.iterations // self.m} whole batches "
                f"({self.iterations // self.m * self.m} iterations)"
            )
        return found

    @property
    def passes(self) -> int:
        """Passes over the data for an epoch budget: ceil(epochs / m) for free training."""
        if self.method == "free":
            return max(1, math.ceil(self.epochs / self.m))
        return max(1, math.ceil(self.epochs))

    @property
    def replays(self) -> int:
        return self.m if self.method == "free" else 1

    @property
    def free_step_size(self) -> float:
        """Free training's δ step, 0-255 units (default ε, as the paper)."""
        return self.epsilon if self.step_size is None else self.step_size

    @property
    def pgd_training_step_size(self) -> float:
        """K-PGD training's step, 0-255 units (default Madry et al.'s 2.5·ε/K)."""
        if self.pgd_step_size is not None:
            return self.pgd_step_size
        return 2.5 * self.epsilon / self.pgd_steps

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        "allow_large_epsilon",
        "eval_every",
        "eval_attack",
        "eval_examples",
        "eval_pgd_steps",
        "eval_pgd_step_size",
        "verbose",
    }
)
# What a run folder's config.json lacked before a setting existed: the value
# that reproduces how such runs were trained.
LEGACY_DEFAULTS = {
    "free_delta_projection": "valid_image",
    "pgd_attack_bn": "inference",
    "iterations": None,
    "crop_padding": 4,
    "lr_boundary_unit": "epochs",
    "weight_decay_vars": "keras_decoupled",
    "allow_large_epsilon": False,
    "eval_attack": "pgd",
}


def from_json_dict(saved: dict) -> TrainConfig:
    """A `TrainConfig` from a run's config.json, of this or an earlier version."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {**LEGACY_DEFAULTS, **{k: v for k, v in saved.items() if k in fields}}
    if values.get("lr_boundaries") is not None:
        values["lr_boundaries"] = tuple(values["lr_boundaries"])
    return TrainConfig(**values)


def effective_settings(config: TrainConfig) -> dict:
    """The settings that decide what is trained, defaults resolved, unused ones left out.

    Two runs train the same thing exactly when these are equal, so an unset
    step size equals one given as ε, and a cosine schedule ignores
    `lr_boundaries`.
    """
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_FIELDS}
    settings["lr_boundaries"] = list(config.lr_boundaries)
    if config.method == "free":
        settings["step_size"] = config.free_step_size
    else:
        for key in ("m", "step_size", "free_delta_projection"):
            settings.pop(key)
    if config.method == "pgd":
        settings["pgd_step_size"] = config.pgd_training_step_size
    else:
        for key in ("pgd_steps", "pgd_step_size", "pgd_attack_bn"):
            settings.pop(key)
    if config.lr_schedule != "piecewise":
        for key in ("lr_boundaries", "lr_decay", "lr_boundary_unit"):
            settings.pop(key)
    if config.model != "wide_resnet":
        settings.pop("wrn_depth")
        settings.pop("wrn_width")
    if config.weight_decay == 0:
        settings.pop("weight_decay_vars")
    if not config.dataset.startswith("cifar"):
        settings.pop("crop_padding")
    if config.iterations is not None:
        settings.pop("epochs")
    else:
        settings.pop("iterations")
    return settings


def differences(old: TrainConfig, new: TrainConfig) -> list[str]:
    """Each effective setting that differs, as "key=old there, new now"."""
    before, after = effective_settings(old), effective_settings(new)
    return [
        f"{key}={before.get(key)!r} there, {after.get(key)!r} now"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The budget of a run, in the units the loop uses.

    Attributes:
      batches_per_pass: batches in one pass over the training examples.
      passes: passes over the data (the last may be partial).
      total_batches: batches the run trains on.
      replays: optimizer iterations per batch (m for free training, else 1).
      total_iterations: optimizer iterations (replays count).
      natural_epochs: the budget in natural epochs (total iterations / batches per pass).
      lr_boundaries: piecewise boundaries in optimizer iterations.
    """

    batches_per_pass: int
    passes: int
    total_batches: int
    replays: int
    total_iterations: int
    natural_epochs: float
    lr_boundaries: tuple[int, ...]


def plan(config: TrainConfig, num_train: int, drop_remainder: bool = False) -> Plan:
    """The passes, batches and iterations of `config` over `num_train` examples.

    An epoch budget trains whole passes: ceil(epochs / m) for free training,
    as mahyarnajibi/FreeAdversarialTraining `main_free.py` L47 does. An
    iteration budget (ashafahi/free_adv_train `free_train.py` L97: `for ii in
    range(train_steps)`, a new batch every m iterations) stops after
    floor(iterations / m) batches, within a pass if need be.
    """
    if drop_remainder:
        batches_per_pass = num_train // config.batch_size
    else:
        batches_per_pass = math.ceil(num_train / config.batch_size)
    if batches_per_pass < 1:
        raise ConfigError(
            f"fewer training examples ({num_train}) than --batch_size ({config.batch_size})"
        )
    replays = config.replays
    if config.iterations is not None:
        total_batches = config.iterations // replays
        if total_batches < 1:
            raise ConfigError(
                f"--iterations={config.iterations} is fewer than one batch of m replays"
            )
        passes = math.ceil(total_batches / batches_per_pass)
    else:
        passes = config.passes
        total_batches = passes * batches_per_pass
    total_iterations = total_batches * replays
    boundaries = ()
    if config.lr_schedule == "piecewise":
        scale = batches_per_pass if config.lr_boundary_unit == "epochs" else 1
        boundaries = tuple(int(round(b * scale)) for b in config.lr_boundaries)
    return Plan(
        batches_per_pass=batches_per_pass,
        passes=passes,
        total_batches=total_batches,
        replays=replays,
        total_iterations=total_iterations,
        natural_epochs=total_iterations / batches_per_pass,
        lr_boundaries=boundaries,
    )
