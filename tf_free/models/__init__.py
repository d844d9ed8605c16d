"""Image classifiers that map float images in [0, 1] to logits.

Mean/std normalisation sits inside each model, so attacks and the exported
model see raw pixels.
"""

from tf_free.models.preact_resnet import preact_resnet18
from tf_free.models.small_cnn import small_cnn

MODELS = {
    "small_cnn": small_cnn,
    "preact_resnet18": preact_resnet18,
}


def get_model(name: str, input_shape, num_classes: int, **kwargs):
    """Builds the model registered as `name` (see `MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](input_shape, num_classes, **kwargs)
