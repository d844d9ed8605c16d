"""A small CNN for MNIST-sized images: conv32-conv64-dense256."""

import keras

from tf_free.models.layers import normalize


def small_cnn(input_shape, num_classes, *, mean=None, std=None, name="small_cnn"):
    """Two 3x3 conv + max-pool blocks (32, 64 filters), a 256-unit dense layer.

    Args:
      input_shape: (H, W, C) of float images in [0, 1].
      num_classes: number of logits.
      mean: per-channel mean subtracted inside the model (None: no shift).
      std: per-channel std divided inside the model (None: no scale).
      name: model name.

    Returns:
      A functional `keras.Model` returning logits.
    """
    inputs = keras.Input(input_shape, name="images")
    x = normalize(inputs, mean, std)
    for filters in (32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)
