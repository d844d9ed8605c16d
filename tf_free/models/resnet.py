"""ResNet-50/101/152 from `keras.applications` (weights=None), the ImageNet models.

`keras.applications`' own ResNet preprocessing (caffe-style BGR mean subtraction on 0-255
pixels) is not part of those models and is not used here. These models take RGB images in
[0, 1] and normalise them inside the model with the `mean`/`std` the caller passes,
normally `IMAGENET_MEAN` and `IMAGENET_STD` as in the free-training ImageNet code.
"""

import keras

from tf_free.models.layers import normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resnet(application, input_shape, num_classes, mean, std, name):
    inputs = keras.Input(input_shape, name="images")
    x = normalize(inputs, mean, std)
    backbone = application(include_top=False, weights=None, input_tensor=x, pooling="avg")
    outputs = keras.layers.Dense(num_classes, name="logits")(backbone.output)
    return keras.Model(inputs, outputs, name=name)


def resnet50(input_shape, num_classes, *, mean=None, std=None, name="resnet50"):
    """ResNet-50 (`keras.applications.ResNet50`, weights=None) with a dense logits head.

    Global average pooling and `Dense(num_classes)` without softmax replace the ImageNet
    classifier; with 1000 classes the model has the same 25.6M parameters as
    `ResNet50(include_top=True, weights=None)`.

    Args:
      input_shape: (H, W, C) of RGB float images in [0, 1]; at least 32x32.
      num_classes: number of logits.
      mean: per-channel mean subtracted inside the model (e.g. `IMAGENET_MEAN`).
      std: per-channel std divided inside the model (e.g. `IMAGENET_STD`).
      name: model name.

    Returns:
      A functional `keras.Model` returning logits.
    """
    return _resnet(keras.applications.ResNet50, input_shape, num_classes, mean, std, name)


def resnet101(input_shape, num_classes, *, mean=None, std=None, name="resnet101"):
    """ResNet-101 (`keras.applications.ResNet101`, weights=None); arguments as `resnet50`."""
    return _resnet(keras.applications.ResNet101, input_shape, num_classes, mean, std, name)


def resnet152(input_shape, num_classes, *, mean=None, std=None, name="resnet152"):
    """ResNet-152 (`keras.applications.ResNet152`, weights=None); arguments as `resnet50`."""
    return _resnet(keras.applications.ResNet152, input_shape, num_classes, mean, std, name)
