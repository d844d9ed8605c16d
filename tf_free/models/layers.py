"""Pieces shared by the models, and PyTorch's default layer settings for the ported models."""

import keras
import numpy as np

# torch.nn.BatchNorm2d defaults: running = (1 - 0.1) * running + 0.1 * batch, i.e. Keras
# momentum 0.9, and eps 1e-5 (Keras defaults to 0.99 and 1e-3).
TORCH_BN_MOMENTUM = 0.9
TORCH_BN_EPSILON = 1e-5


def torch_batch_norm(name):
    """`BatchNormalization` with `torch.nn.BatchNorm2d`'s defaults (gamma 1, beta 0).

    One difference remains: torch updates its running variance with the unbiased batch
    variance (times n / (n - 1), n = batch x height x width), Keras with the biased one.
    The moving variance is smaller by that factor, under 0.1% for n >= 1024.
    """
    return keras.layers.BatchNormalization(
        momentum=TORCH_BN_MOMENTUM, epsilon=TORCH_BN_EPSILON, name=name
    )


def torch_default_kernel_initializer():
    """`nn.Conv2d`/`nn.Linear`'s default weight init as a Keras initialiser.

    torch's `reset_parameters` calls `kaiming_uniform_(weight, a=sqrt(5))`: gain
    sqrt(2 / (1 + 5)) = sqrt(1 / 3), bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in), with
    fan_in = in_channels * kernel area, which is Keras's fan_in of an HWIO kernel.
    `VarianceScaling(1/3, "fan_in", "uniform")` has the bound sqrt(3 * (1/3) / fan_in).
    """
    return keras.initializers.VarianceScaling(1.0 / 3.0, mode="fan_in", distribution="uniform")


def torch_kaiming_normal_fan_out():
    """torch `kaiming_normal_(w, mode="fan_out", nonlinearity="relu")`: N(0, 2 / fan_out).

    Not truncated; fan_out = out_channels * kernel area, as Keras computes it for HWIO.
    """
    return keras.initializers.VarianceScaling(
        2.0, mode="fan_out", distribution="untruncated_normal"
    )


def torch_linear(x, units, name):
    """`Dense(units)` initialised as torch's default `nn.Linear(x.shape[-1], units)`.

    torch draws the weight with `kaiming_uniform_(a=sqrt(5))` and the bias from
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)); both have the bound 1 / sqrt(fan_in). A Keras bias
    initialiser only sees the bias's own shape, so the bound is fixed here from the input.
    """
    bound = 1.0 / float(np.sqrt(x.shape[-1]))
    return keras.layers.Dense(
        units,
        kernel_initializer=torch_default_kernel_initializer(),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound),
        name=name,
    )(x)


def torch_conv2d(x, filters, kernel_size, stride, padding, name, kernel_initializer):
    """`nn.Conv2d(..., padding=padding, bias=False)` with torch's symmetric zero padding.

    Keras "same" pads (0, 1) rather than (1, 1) when a 3x3 stride-2 convolution meets an
    even size, which shifts every output pixel against torch's. Explicit `ZeroPadding2D`
    followed by a "valid" convolution gives torch's output size floor((n + 2p - k) / s) + 1
    and alignment for every size. Stride 1 with p = (k - 1) / 2 > 0 keeps "same", which is
    the same computation.

    Args:
      x: NHWC input tensor.
      filters: output channels.
      kernel_size: square kernel size.
      stride: square stride.
      padding: zeros added on each side, as torch's `padding`.
      name: layer name; the padding layer is `{name}_pad`.
      kernel_initializer: Keras initialiser for the kernel.

    Returns:
      The output tensor.
    """
    conv_padding = "valid"
    if padding and stride == 1 and 2 * padding == kernel_size - 1:
        conv_padding = "same"
    elif padding:
        x = keras.layers.ZeroPadding2D(padding, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding=conv_padding,
        use_bias=False,
        kernel_initializer=kernel_initializer,
        name=name,
    )(x)


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
