"""PreAct ResNet-18 (He et al., 2016), the CIFAR model of fast_adversarial."""

import keras

from tf_free.models.layers import normalize


def _preact_block(x, filters, stride, name):
    out = keras.layers.BatchNormalization(name=f"{name}_bn1")(x)
    out = keras.layers.ReLU(name=f"{name}_relu1")(out)
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        # The projection sees the pre-activated input, as in the paper's code.
        shortcut = keras.layers.Conv2D(
            filters, 1, strides=stride, use_bias=False, name=f"{name}_shortcut"
        )(out)
    out = keras.layers.Conv2D(
        filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1"
    )(out)
    out = keras.layers.BatchNormalization(name=f"{name}_bn2")(out)
    out = keras.layers.ReLU(name=f"{name}_relu2")(out)
    out = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(out)
    return keras.layers.Add(name=f"{name}_add")([out, shortcut])


def preact_resnet18(input_shape, num_classes, *, mean=None, std=None, name="preact_resnet18"):
    """PreAct ResNet-18: four stages of two pre-activation blocks (64-512 filters).

    Args:
      input_shape: (H, W, C) of float images in [0, 1].
      num_classes: number of logits.
      mean: per-channel mean subtracted inside the model.
      std: per-channel std divided inside the model.
      name: model name.

    Returns:
      A functional `keras.Model` returning logits.
    """
    inputs = keras.Input(input_shape, name="images")
    x = normalize(inputs, mean, std)
    x = keras.layers.Conv2D(64, 3, padding="same", use_bias=False, name="stem")(x)
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _preact_block(x, filters, stride, name=f"stage{stage + 1}_block{block + 1}")
    x = keras.layers.BatchNormalization(name="final_bn")(x)
    x = keras.layers.ReLU(name="final_relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)
