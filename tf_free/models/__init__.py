"""Image classifiers that map float images in [0, 1] to logits.

Input normalisation sits inside each model (per-channel mean/std, or per-image
standardisation for `wide_resnet`), so attacks and the exported model see raw pixels.

Registered names: `small_cnn`, `preact_resnet18` (locuslab/fast_adversarial's),
`wide_resnet` (Madry et al.'s WRN, 32-10 by default), `resnet50`, `resnet101`, `resnet152`
(torchvision's ResNet v1.5, built here; randomly initialised).
"""

from tf_free.models.preact_resnet import preact_resnet18
from tf_free.models.resnet import IMAGENET_MEAN, IMAGENET_STD, resnet50, resnet101, resnet152
from tf_free.models.small_cnn import small_cnn
from tf_free.models.wide_resnet import wide_resnet

MODELS = {
    "small_cnn": small_cnn,
    "preact_resnet18": preact_resnet18,
    "wide_resnet": wide_resnet,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
}

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODELS",
    "get_model",
    "preact_resnet18",
    "resnet50",
    "resnet101",
    "resnet152",
    "small_cnn",
    "wide_resnet",
]


def get_model(name: str, input_shape, num_classes: int, **kwargs):
    """Builds the model registered as `name` (see `MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](input_shape, num_classes, **kwargs)
