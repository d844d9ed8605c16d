"""Pieces shared by the models."""

import keras
import numpy as np


def normalize(inputs, mean=None, std=None):
    """Per-channel (x - mean) / std inside the model; identity when both are None."""
    if mean is None and std is None:
        return inputs
    channels = inputs.shape[-1]
    mean = np.broadcast_to(np.asarray(0.0 if mean is None else mean, "float32"), (channels,))
    std = np.broadcast_to(np.asarray(1.0 if std is None else std, "float32"), (channels,))
    return keras.layers.Normalization(mean=mean, variance=np.square(std), name="normalize")(inputs)


@keras.saving.register_keras_serializable(package="tf_free")
class PerImageStandardization(keras.layers.Layer):
    """`tf.image.per_image_standardization` as a layer (Madry et al.'s CIFAR input step).

    Each image is shifted by its own mean and divided by
    `max(stddev, 1 / sqrt(num_elements))`, all channels pooled. The statistics are computed
    in float32 whatever the dtype policy, and the output is cast to the compute dtype.

    Madry's code feeds pixels in [0, 255]; here inputs are multiplied by `pixel_scale`
    first. The result does not depend on that scale except through the stddev floor, so the
    default 255 standardises an image in [0, 1] exactly as Madry's code did its 0-255
    version (the floor only matters for near-constant images). `pixel_scale=1` is
    `tf.image.per_image_standardization` of the inputs as given.

    Args:
      pixel_scale: scale of the original pixels relative to the inputs.
      **kwargs: passed to `keras.layers.Layer`.
    """

    def __init__(self, pixel_scale=255.0, **kwargs):
        super().__init__(**kwargs)
        self.pixel_scale = float(pixel_scale)

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32") * self.pixel_scale
        axes = tuple(range(1, len(x.shape)))
        num_elements = int(np.prod(x.shape[1:]))
        mean = keras.ops.mean(x, axis=axes, keepdims=True)
        stddev = keras.ops.std(x, axis=axes, keepdims=True)
        floor = 1.0 / float(np.sqrt(num_elements))
        out = (x - mean) / keras.ops.maximum(stddev, floor)
        return keras.ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "pixel_scale": self.pixel_scale}


@keras.saving.register_keras_serializable(package="tf_free")
class ChannelPad(keras.layers.Layer):
    """Zero-pads the channel (last) axis with `before` and `after` channels.

    Args:
      before: zero channels put in front.
      after: zero channels put behind.
      **kwargs: passed to `keras.layers.Layer`.
    """

    def __init__(self, before, after, **kwargs):
        super().__init__(**kwargs)
        self.before = int(before)
        self.after = int(after)

    def call(self, inputs):
        pad = [[0, 0]] * (len(inputs.shape) - 1) + [[self.before, self.after]]
        return keras.ops.pad(inputs, pad)

    def compute_output_shape(self, input_shape):
        channels = input_shape[-1]
        if channels is not None:
            channels += self.before + self.after
        return (*input_shape[:-1], channels)

    def get_config(self):
        return {**super().get_config(), "before": self.before, "after": self.after}
