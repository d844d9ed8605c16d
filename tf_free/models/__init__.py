"""Image classifiers that map float images in [0, 1] to logits, and their registry.

Input normalisation sits inside each model (per-channel mean/std, or per-image
standardisation for `wide_resnet`), so attacks and the exported model see raw pixels.

Registered names: `small_cnn`, `preact_resnet18` (locuslab/fast_adversarial's),
`wide_resnet` (Madry et al.'s WRN, 32-10 by default), `resnet50`, `resnet101`, `resnet152`
(torchvision's ResNet v1.5, built here; randomly initialised).

To add a model: write its builder `f(input_shape, num_classes, *, mean, std, **hparams)`
and add one `ModelSpec` to `MODELS`. Its hyperparameters are declared there once; the
flags of `tf_free.train`, their checks and the run's config.json follow from that entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tf_free.models.preact_resnet import preact_resnet18
from tf_free.models.resnet import IMAGENET_MEAN, IMAGENET_STD, resnet50, resnet101, resnet152
from tf_free.models.small_cnn import small_cnn
from tf_free.models.wide_resnet import wide_resnet


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """One model hyperparameter: its flag, default, help and check."""

    flag: str
    default: Any
    help: str
    valid: Callable[[Any], bool]
    requirement: str  # what `valid` asks, for the error message


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model.

    Attributes:
      build: `build(input_shape, num_classes, **kwargs)` returning a keras.Model of logits.
      normalization: "dataset" (the builder takes the dataset's per-channel `mean`/`std`)
        or "own" (the model normalises each image itself, as Madry's WRN).
      hyperparameters: keyword arguments of `build`, by name.
    """

    build: Callable
    normalization: str = "dataset"
    hyperparameters: dict[str, Hyperparameter] = dataclasses.field(default_factory=dict)

    def defaults(self) -> dict:
        return {name: h.default for name, h in self.hyperparameters.items()}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MODELS = {
    "small_cnn": ModelSpec(small_cnn),
    "preact_resnet18": ModelSpec(preact_resnet18),
    "wide_resnet": ModelSpec(
        wide_resnet,
        # Madry's WRN standardises each image itself, instead of mean/std.
        normalization="own",
        hyperparameters={
            "depth": Hyperparameter(
                "wrn_depth",
                32,
                "wide_resnet depth, 6n+2 (the paper's WRN-32-10: 32).",
                lambda d: _is_int(d) and d >= 8 and (d - 2) % 6 == 0,
                "6n+2 (8, 14, ..., 32)",
            ),
            "width": Hyperparameter(
                "wrn_width",
                10,
                "wide_resnet width factor.",
                lambda w: _is_int(w) and w >= 1,
                "an integer >= 1",
            ),
        },
    ),
    "resnet50": ModelSpec(resnet50),
    "resnet101": ModelSpec(resnet101),
    "resnet152": ModelSpec(resnet152),
}

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODELS",
    "Hyperparameter",
    "ModelSpec",
    "build",
    "get_model",
    "preact_resnet18",
    "resnet50",
    "resnet101",
    "resnet152",
    "small_cnn",
    "wide_resnet",
]


def get_model(name: str, input_shape, num_classes: int, **kwargs):
    """Builds the model registered as `name` (see `MODELS`) with the builder's own arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name].build(input_shape, num_classes, **kwargs)


def build(name: str, input_shape, num_classes: int, *, mean, std, hyperparameters=None):
    """Builds `name` for a dataset: its mean/std where the model uses them, and its
    hyperparameters (the registered defaults for those not given)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    spec = MODELS[name]
    kwargs = {**spec.defaults(), **(hyperparameters or {})}
    if spec.normalization == "dataset":
        kwargs.update(mean=mean, std=std)
    return spec.build(input_shape, num_classes, **kwargs)
