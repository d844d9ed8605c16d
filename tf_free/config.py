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

METHODS = ("free", "pgd", "fast", "natural")
FAST_INITS = ("random", "zero", "previous")
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
_PIXELS = " (0-255 units)"
_ABSENT = object()


class ConfigError(ValueError):
    """A bad setting, reported before any work starts."""


def setting(
    default,
    help: str,
    *,
    kind: type | str | None = None,
    choices=None,
    minimum=None,
    above=None,
    below=None,
    unit: str = "",
    runtime: bool = False,
    legacy=_ABSENT,
):
    """Declares one setting: its default, flag help, bounds and role, in one place.

    Args:
      default: the value when not given (None: unset, a method's own default).
      help: the flag's help text.
      kind: int, float, str, bool or "floats" (a comma-separated list); by default
        the type of `default`.
      choices: the allowed values.
      minimum, above, below: bounds (>= minimum, > above, < below); numbers
        must also be finite.
      unit: appended to the error message, e.g. " (0-255 units)".
      runtime: True when the setting does not change what is trained, so a run
        may resume with another value.
      legacy: the value a run's config.json written before this setting existed
        was trained with (defaults to `default`).
    """
    return dataclasses.field(
        default=default,
        metadata=dict(
            help=help,
            kind=kind or type(default),
            choices=choices,
            minimum=minimum,
            above=above,
            below=below,
            unit=unit,
            runtime=runtime,
            legacy=default if legacy is _ABSENT else legacy,
        ),
    )


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs, each setting declared once (see `setting`).

    ε and step sizes are in 0-255 pixel units. The flags of `tf_free.train`
    are made from these declarations (`define_flags`); a model's own
    hyperparameters are declared with the model (`tf_free.models.MODELS`) and
    travel in `model_hparams`.
    """

    # Data and method.
    dataset: str = setting(
        "fashion_mnist",
        "TFDS image-classification dataset; first-class: mnist, fashion_mnist, cifar10, "
        "cifar100, imagenet2012. fashion_mnist works offline from Debian's files.",
    )
    data_dir: str | None = setting(
        None,
        "TFDS data_dir (ImageNet tars go in <data_dir>/downloads/manual).",
        kind=str,
        runtime=True,
    )
    method: str = setting(
        "free",
        "free (Alg. 2), pgd (K-PGD, Alg. 1), fast (FGSM with a random start, Wong et al. 2020) "
        "or natural.",
        choices=METHODS,
    )
    m: int = setting(8, "Free training: replays of each minibatch (m).", minimum=1)
    # Attack budget, in 0-255 pixel units.
    epsilon: float = setting(
        25.5,
        "L-inf budget ε in 0-255 pixel units (8 on CIFAR, 4 on ImageNet).",
        minimum=0,
        unit=" (0-255 pixel units)",
    )
    step_size: float | None = setting(
        None,
        "Free training: δ step in 0-255 units (default ε).",
        kind=float,
        above=0,
        unit=_PIXELS,
    )
    free_delta_projection: str = setting(
        "valid_image",
        "Free training: after its step δ is kept so that x+δ is a valid image (valid_image, "
        "as locuslab/fast_adversarial), or only in the ε-ball with x+δ clipped in the forward "
        "pass (epsilon_ball, as the paper's own CIFAR and ImageNet codes).",
        choices=DELTA_PROJECTIONS,
    )
    pgd_steps: int = setting(7, "PGD training: attack steps K.", minimum=1)
    pgd_step_size: float | None = setting(
        None,
        "PGD training: step in 0-255 units (default 2.5·ε/K).",
        kind=float,
        above=0,
        unit=_PIXELS,
    )
    pgd_attack_bn: str = setting(
        "train",
        "PGD training: batch norm mode of the K attack passes; train (batch statistics, moving "
        "averages updated, as Madry et al.'s and locuslab's codes) or inference.",
        choices=ATTACK_BN_MODES,
        legacy="inference",
    )
    fast_step_size: float | None = setting(
        None,
        "Fast training: the FGSM step α in 0-255 units (default 1.25·ε, the paper's 10/255 at "
        "ε=8/255).",
        kind=float,
        above=0,
        unit=_PIXELS,
    )
    fast_init: str = setting(
        "random",
        "Fast training: δ's start, random (uniform in the ε-ball), zero (FGSM training) or "
        "previous (the last batch's δ).",
        choices=FAST_INITS,
    )
    overfit_guard: str = setting(
        "auto",
        "The catastrophic-overfitting guard of Wong et al. (PGD-5 on a fixed training batch "
        "after every pass; a drop above --overfit_drop stops training and restores the weights "
        "of the check before): on, off, or auto (on for --method=fast).",
        choices=("auto", "on", "off"),
    )
    overfit_check_every: int = setting(
        0,
        "The guard checks every N batches; 0: after every pass.",
        minimum=0,
        unit=" (batches)",
    )
    overfit_drop: float = setting(
        0.2,
        "The guard stops training when PGD-5 accuracy on its batch falls by more than this "
        "(a fraction in (0, 1]).",
        above=0,
    )
    # Budget and optimisation.
    epochs: float = setting(
        8,
        "Natural-epoch budget; free training makes ceil(epochs/m) passes over the data.",
        kind=float,
        above=0,
        unit=" (natural-epoch budget)",
    )
    iterations: int | None = setting(
        None,
        "Budget in optimizer iterations (replays count), instead of --epochs: training stops "
        "after iterations/m batches, within a pass if need be (the paper's CIFAR code: 80000).",
        kind=int,
        minimum=1,
    )
    batch_size: int = setting(128, "Global batch size (split across replicas).", minimum=1)
    crop_padding: int = setting(
        4,
        "CIFAR augmentation: zero-pad this many pixels per side, then random-crop (the paper's "
        "CIFAR code pads 2, locuslab/fast_adversarial 4).",
        minimum=0,
        unit=" (pixels)",
    )
    lr: float = setting(0.05, "Peak learning rate.", above=0)
    lr_schedule: str = setting(
        "cosine", "Schedule over optimizer iterations (replays count).", choices=LR_SCHEDULES
    )
    lr_boundaries: tuple[float, ...] = setting(
        (),
        "piecewise: boundaries in --lr_boundary_unit, e.g. 100,150 (epochs).",
        kind="floats",
    )
    lr_boundary_unit: str = setting(
        "epochs",
        "Unit of --lr_boundaries: natural epochs, or optimizer iterations (replays count).",
        choices=LR_BOUNDARY_UNITS,
    )
    lr_decay: float = setting(0.1, "piecewise: factor applied at each boundary.", above=0)
    weight_decay: float = setting(
        0.0,
        "L2 weight decay, coupled through the momentum as in both official codes (wd·w added "
        "to the gradient).",
        minimum=0,
    )
    weight_decay_vars: str = setting(
        "kernels",
        "Variables the weight decay covers: kernels (conv and dense kernels, as the paper's "
        "CIFAR code) or all (biases and batch norm too, as torch SGD in the ImageNet code).",
        choices=DECAY_VARIABLES,
        # Before 0.2 the decay was Keras's decoupled form on every variable.
        legacy="keras_decoupled",
    )
    momentum: float = setting(0.9, "SGD momentum.", minimum=0, below=1)
    # Model.
    model: str = setting(
        "small_cnn",
        "small_cnn, preact_resnet18, wide_resnet, resnet50, resnet101 or resnet152.",
    )
    model_hparams: dict = dataclasses.field(
        default_factory=dict,
        metadata=dict(flag=False, runtime=False, legacy={}),
    )
    # Output and execution.
    model_dir: str = setting(
        "runs/quickstart",
        "Run folder: config, TensorBoard logs, checkpoints, results.",
        runtime=True,
    )
    export_dir: str | None = setting(
        None, "SavedModel folder (default <model_dir>/export).", kind=str, runtime=True
    )
    strategy: str = setting(
        "auto",
        "tf.distribute strategy; auto mirrors over >1 GPU; multi_worker reads TF_CONFIG "
        "(scripts/launch_local_workers.sh); tpu is untested.",
        choices=STRATEGIES,
        runtime=True,
    )
    jit_compile: str = setting(
        "auto",
        "XLA; auto = on with GPUs/TPUs (per replica under tf.distribute), off on CPU (slower "
        "there).",
        choices=JIT_CHOICES,
        runtime=True,
    )
    cpu_devices: int = setting(
        1,
        "Without GPUs: split the CPU into N logical devices; --strategy=mirrored then runs N "
        "replicas (to try multi-replica training on any machine).",
        minimum=1,
        runtime=True,
    )
    mixed_precision: str = setting(
        "none",
        "Keras mixed precision: bf16 or fp16 compute (float32 variables, δ and loss).",
        choices=tuple(PRECISIONS),
    )
    seed: int = setting(0, "Seed for weights, data order and attacks.", minimum=0, below=2**31)
    deterministic: bool = setting(
        False,
        "TensorFlow op determinism: the same run gives the same weights, also when resumed.",
        runtime=True,
    )
    # Checkpoints and resuming.
    checkpoint_every: int = setting(
        200,
        "Checkpoint every N batches, and at the end of every pass (0: pass ends only). Started "
        "again with the same --model_dir, a run resumes from its latest checkpoint.",
        minimum=0,
        unit=" (batches)",
        runtime=True,
    )
    steps_per_loop: int = setting(
        0,
        "Training steps (batches) per tf.function call, as Keras's steps_per_execution: "
        "fewer Python dispatches on accelerators. 0: automatic (1 on CPU; on GPUs/TPUs about "
        "100 ms of steps per call, from a per-model estimate). --checkpoint_every is rounded "
        "up to a multiple of it; callbacks see each call as one batch.",
        minimum=0,
        unit=" (batches)",
        runtime=True,
    )
    overwrite: bool = setting(
        False,
        "Start again in a --model_dir that holds a run (its checkpoints, logs, results and "
        "export are deleted). Without it, a run with other settings there is an error.",
        runtime=True,
    )
    allow_large_epsilon: bool = setting(
        False,
        f"Allow --epsilon above {MAX_EPSILON} (0-255 units), where an image can be erased.",
        runtime=True,
    )
    # Evaluation during training.
    eval_every: int = setting(
        1,
        "Evaluate robustness every N passes over the data (and at the end).",
        minimum=1,
        unit=" (passes)",
        runtime=True,
    )
    eval_every_iterations: int = setting(
        0,
        "Evaluate robustness every N optimizer iterations (replays count) instead of every "
        "--eval_every passes (and at the end); 0: use --eval_every.",
        minimum=0,
        unit=" (iterations)",
        runtime=True,
    )
    log_every: int = setting(
        0,
        "Write the training scalars (adversarial loss and accuracy, learning rate, δ "
        "statistics, time) to TensorBoard every N optimizer iterations; 0: about 100 points "
        "per run.",
        minimum=0,
        unit=" (iterations)",
        runtime=True,
    )
    eval_attack: str = setting(
        "pgd",
        "The attack of the robustness evaluation: pgd (K steps of --eval_pgd_step_size, random "
        "start) or apgd-ce (K iterations of AutoAttack's step-size-free APGD on cross-entropy).",
        choices=EVAL_ATTACKS,
        runtime=True,
    )
    eval_examples: int = setting(
        10000, "Validation examples for the robustness evaluation.", minimum=1, runtime=True
    )
    eval_pgd_steps: int = setting(
        20,
        "Steps (iterations) K of the evaluation attack, PGD-K or APGD-CE-K.",
        minimum=1,
        runtime=True,
    )
    eval_pgd_step_size: float = setting(
        2.55,
        "Evaluation PGD step in 0-255 units (random start).",
        above=0,
        unit=_PIXELS,
        runtime=True,
    )
    # Quick tries and tests.
    train_examples: int | None = setting(
        None, "Use only the first N training examples.", kind=int, minimum=1
    )
    verbose: int = setting(
        1,
        "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch.",
        choices=(0, 1, 2),
        runtime=True,
    )

    def validate(self) -> None:
        """Raises ConfigError for the first bad value (no I/O)."""
        from tf_free import models  # models import keras: keep this module light

        for field in dataclasses.fields(self):
            if field.metadata.get("flag", True):
                message = _check_setting(
                    field.name, getattr(self, field.name), field.metadata, field.default
                )
                if message:
                    raise ConfigError(message)
        checks = [
            (
                self.allow_large_epsilon or not self.epsilon > MAX_EPSILON,
                f"--epsilon={self.epsilon} (0-255 units) is above {MAX_EPSILON} (0.5 of the "
                "pixel range), where a perturbation can erase any image; ε is in 0-255 units "
                "(8 means 8/255). Pass --allow_large_epsilon if you mean it",
            ),
            (
                list(self.lr_boundaries) == sorted(set(self.lr_boundaries)),
                f"--lr_boundaries must increase, got {list(self.lr_boundaries)}",
            ),
            (
                not (self.eval_every_iterations and self.eval_every != 1),
                f"give one of --eval_every={self.eval_every} (passes) and "
                f"--eval_every_iterations={self.eval_every_iterations}, not both",
            ),
            (
                self.overfit_drop <= 1,
                f"--overfit_drop is a fraction of the batch in (0, 1], got {self.overfit_drop}",
            ),
            (
                not (self.guarded and self.strategy == "multi_worker"),
                "--overfit_guard runs on one process: use --strategy=mirrored (or auto), or "
                "--overfit_guard=off with --strategy=multi_worker",
            ),
            (
                self.model in models.MODELS,
                f"unknown --model {self.model!r}; choose one of {sorted(models.MODELS)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        spec = models.MODELS[self.model]
        unknown = sorted(set(self.model_hparams) - set(spec.hyperparameters))
        if unknown:
            raise ConfigError(
                f"--model={self.model} has no hyperparameters {unknown}; it has "
                f"{sorted(spec.hyperparameters)}"
            )
        for name, value in self.resolved_model_hparams().items():
            hparam = spec.hyperparameters[name]
            if not hparam.valid(value):
                raise ConfigError(f"--{hparam.flag} must be {hparam.requirement}, got {value}")

    def resolved_model_hparams(self) -> dict:
        """The model's hyperparameters: the registered defaults, updated by `model_hparams`."""
        from tf_free import models

        spec = models.MODELS.get(self.model)
        return {**(spec.defaults() if spec else {}), **self.model_hparams}

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
    def guarded(self) -> bool:
        """Whether the catastrophic-overfitting guard runs (auto: for fast training)."""
        return self.overfit_guard == "on" or (
            self.overfit_guard == "auto" and self.method == "fast"
        )

    def resolved_checkpoint_every(self, steps_per_loop: int) -> int:
        """--checkpoint_every rounded up to a multiple of the steps per call (0 stays 0)."""
        return -(-self.checkpoint_every // steps_per_loop) * steps_per_loop

    def resolved_log_every(self, total_iterations: int) -> int:
        """--log_every, or (0) about 100 training points over the run's iterations."""
        return self.log_every or max(1, round(total_iterations / 100))

    @property
    def replays(self) -> int:
        return self.m if self.method == "free" else 1

    @property
    def free_step_size(self) -> float:
        """Free training's δ step, 0-255 units (default ε, as the paper)."""
        return self.epsilon if self.step_size is None else self.step_size

    @property
    def fast_training_step_size(self) -> float:
        """Fast training's FGSM step α, 0-255 units (default 1.25·ε, as Wong et al.)."""
        return 1.25 * self.epsilon if self.fast_step_size is None else self.fast_step_size

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


def _check_setting(name: str, value, meta, default) -> str | None:
    """The error message for a value that its declaration does not allow, else None."""
    kind, unit = meta["kind"], meta["unit"]
    if value is None:
        return None if default is None else f"--{name} must be given"
    if meta["choices"] is not None:
        if value not in meta["choices"]:
            return f"--{name} must be one of {tuple(meta['choices'])}, got {value!r}"
        return None
    if kind is bool:
        return None if isinstance(value, bool) else f"--{name} must be true or false"
    if kind is str:
        return None if isinstance(value, str) else f"--{name} must be a string, got {value!r}"
    if kind == "floats":
        ok = all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in value)
        return None if ok else f"--{name} must be finite numbers >= 0, got {list(value)}"
    low, above, below = meta["minimum"], meta["above"], meta["below"]
    if kind is int:
        ok = _is_int(value)
        if below is not None:
            ok = ok and low <= value < below
            return (
                None
                if ok
                else f"--{name} must be an integer in [{low}, {'2^31' if below == 2**31 else below}){unit}, got {value}"
            )
        ok = ok and (low is None or value >= low)
        return None if ok else f"--{name} must be >= {low} (an integer){unit}, got {value}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if below is not None:
        ok = ok and low <= value < below
        return None if ok else f"--{name} must be in [{low:g}, {below:g}), got {value}"
    if above is not None:
        ok = ok and value > above
        return None if ok else f"--{name} must be > {above:g} and finite{unit}, got {value}"
    ok = ok and (low is None or value >= low)
    return None if ok else f"--{name} must be a finite number >= {low:g}{unit}, got {value}"


# Settings that do not change what is trained: a run may resume with other values.
RUNTIME_FIELDS = frozenset(
    f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("runtime")
)


def from_json_dict(saved: dict) -> TrainConfig:
    """A `TrainConfig` from a run's config.json, of this or an earlier version.

    A setting the file lacks takes its declared `legacy` value: how runs were
    trained before the setting existed. Model hyperparameters saved at the top
    level (before 0.2: `wrn_depth`, `wrn_width`) move into `model_hparams`.
    """
    from tf_free import models

    values = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name in saved:
            values[field.name] = saved[field.name]
        elif "legacy" in field.metadata:
            values[field.name] = field.metadata["legacy"]
    if values.get("lr_boundaries") is not None:
        values["lr_boundaries"] = tuple(values["lr_boundaries"])
    spec = models.MODELS.get(values.get("model", TrainConfig.model))
    if spec is not None and "model_hparams" not in saved:
        values["model_hparams"] = {
            name: saved[h.flag] for name, h in spec.hyperparameters.items() if h.flag in saved
        }
    return TrainConfig(**values)


def effective_settings(config: TrainConfig) -> dict:
    """The settings that decide what is trained, defaults resolved, unused ones left out.

    Two runs train the same thing exactly when these are equal, so an unset
    step size equals one given as ε, and a cosine schedule ignores
    `lr_boundaries`.
    """
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_FIELDS}
    settings["lr_boundaries"] = list(config.lr_boundaries)
    settings["model_hparams"] = config.resolved_model_hparams()
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
    if config.method == "fast":
        settings["fast_step_size"] = config.fast_training_step_size
    else:
        for key in ("fast_step_size", "fast_init"):
            settings.pop(key)
    settings["overfit_guard"] = config.guarded
    if not config.guarded:
        for key in ("overfit_check_every", "overfit_drop"):
            settings.pop(key)
    if config.lr_schedule != "piecewise":
        for key in ("lr_boundaries", "lr_decay", "lr_boundary_unit"):
            settings.pop(key)
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


# --- Flags: one per setting, made from the declarations above ----------------------


def define_flags(flag_values) -> None:
    """Defines an absl flag for every setting of `TrainConfig` and every model hyperparameter.

    Bounds are not given to absl: `TrainConfig.validate` checks every value
    with one message style, whether it came from a flag, a flagfile or Python.
    """
    from absl import flags

    from tf_free import models

    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        if not meta.get("flag", True):
            continue
        kind, choices = meta["kind"], meta["choices"]
        args = (field.name, field.default, meta["help"])
        if kind is bool:
            flags.DEFINE_bool(*args, flag_values=flag_values)
        elif choices is not None and all(isinstance(c, str) for c in choices):
            flags.DEFINE_enum(
                field.name, field.default, list(choices), meta["help"], flag_values=flag_values
            )
        elif kind == "floats":
            flags.DEFINE_list(
                field.name, list(field.default), meta["help"], flag_values=flag_values
            )
        elif kind is int:
            flags.DEFINE_integer(*args, flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(*args, flag_values=flag_values)
        else:
            flags.DEFINE_string(*args, flag_values=flag_values)
    defined = set()
    for spec in models.MODELS.values():
        for hparam in spec.hyperparameters.values():
            if hparam.flag in defined:
                continue
            defined.add(hparam.flag)
            define = {int: flags.DEFINE_integer, float: flags.DEFINE_float}.get(
                type(hparam.default), flags.DEFINE_string
            )
            define(hparam.flag, hparam.default, hparam.help, flag_values=flag_values)


def from_flags(flag_values) -> TrainConfig:
    """The `TrainConfig` of parsed flags (see `define_flags`)."""
    from tf_free import models

    values = {}
    for field in dataclasses.fields(TrainConfig):
        if field.metadata.get("flag", True):
            values[field.name] = flag_values[field.name].value
    try:
        values["lr_boundaries"] = tuple(float(b) for b in values["lr_boundaries"])
    except ValueError as e:
        raise ConfigError(
            f"--lr_boundaries must be numbers separated by commas, got {values['lr_boundaries']}"
        ) from e
    spec = models.MODELS.get(values["model"])
    if spec is not None:
        values["model_hparams"] = {
            name: flag_values[h.flag].value for name, h in spec.hyperparameters.items()
        }
    return TrainConfig(**values)


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
      num_train_examples: the training examples a pass sweeps.
    """

    batches_per_pass: int
    passes: int
    total_batches: int
    replays: int
    total_iterations: int
    natural_epochs: float
    lr_boundaries: tuple[int, ...]
    num_train_examples: int


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
        num_train_examples=num_train,
    )
