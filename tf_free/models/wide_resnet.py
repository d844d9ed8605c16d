"""Madry et al.'s CIFAR wide ResNet (WRN-32-10), the CIFAR model of free adversarial training.

Follows `model.py` of MadryLab/cifar10_challenge, which ashafahi/free_adv_train copies in
`free_model.py`:

- per-image standardisation of the input (`tf.image.per_image_standardization`);
- a 3x3 stem convolution with 16 filters;
- three stages of `(depth - 2) / 6` pre-activation residual units (5 for depth 32) with
  `[16 * width, 32 * width, 64 * width]` filters (160, 320, 640 for width 10) and strides
  1, 2, 2;
- each unit is BN, leaky ReLU (0.1), 3x3 conv (with the stride), BN, leaky ReLU, 3x3 conv.
  The first unit of the first stage activates before the branch split, so its shortcut
  carries the activated input ("activate_before_residual"); every other unit's shortcut
  carries the raw input;
- when a unit changes the width, the shortcut is a stride x stride average pool followed
  by zero-padding the channels equally on both sides (no projection convolution);
- final BN, leaky ReLU (0.1), global average pooling and a dense layer to the logits.

Convolutions have no bias and use `normal(stddev=sqrt(2 / (k * k * filters_out)))`
initialisation, the dense layer `uniform_unit_scaling(1.0)` weights and a zero bias, batch
normalisation a momentum (decay) of 0.9 and epsilon 1e-3 (tf.contrib defaults), all as in
Madry's code. Madry's weight decay covers the conv and dense kernels (`DW`) only.
"""

import keras

from tf_free.models.layers import ChannelPad, PerImageStandardization, normalize

_LEAK = 0.1


def _conv(x, filters, stride, name):
    return keras.layers.Conv2D(
        filters,
        3,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer=keras.initializers.VarianceScaling(
            2.0, mode="fan_out", distribution="untruncated_normal"
        ),
        name=name,
    )(x)


def _bn_act(x, name):
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name=f"{name}_bn")(x)
    return keras.layers.LeakyReLU(negative_slope=_LEAK, name=f"{name}_relu")(x)


def _residual(x, out_filters, stride, activate_before_residual, name):
    """Madry's `_residual`: a two-conv pre-activation unit with a parameter-free shortcut."""
    in_filters = x.shape[-1]
    if activate_before_residual:
        x = _bn_act(x, f"{name}_init")
        shortcut = x
    else:
        shortcut = x
        x = _bn_act(x, f"{name}_init")
    x = _conv(x, out_filters, stride, f"{name}_conv1")
    x = _bn_act(x, f"{name}_sub2")
    x = _conv(x, out_filters, 1, f"{name}_conv2")
    if in_filters != out_filters:
        if stride != 1:
            # Madry pools with padding "VALID"; "same" is identical for even sizes and keeps
            # odd sizes aligned with the strided "same" convolution.
            shortcut = keras.layers.AveragePooling2D(
                stride, strides=stride, padding="same", name=f"{name}_shortcut_pool"
            )(shortcut)
        pad = (out_filters - in_filters) // 2
        shortcut = ChannelPad(pad, out_filters - in_filters - pad, name=f"{name}_shortcut_pad")(
            shortcut
        )
    elif stride != 1:
        raise ValueError("a strided unit must change the number of filters")
    return keras.layers.Add(name=f"{name}_add")([x, shortcut])


def wide_resnet(
    input_shape,
    num_classes,
    *,
    depth=32,
    width=10,
    per_image_standardization=True,
    mean=None,
    std=None,
    name=None,
):
    """Madry et al.'s CIFAR wide ResNet; the defaults build WRN-32-10 (45.9M parameters).

    Args:
      input_shape: (H, W, C) of float images in [0, 1].
      num_classes: number of logits.
      depth: total depth; `(depth - 2) / 6` residual units per stage, so depth must be 8, 14,
        20, 26, 32, ... (32 gives Madry's 5 units per stage).
      width: widening factor; the stages have 16, 32 and 64 times `width` filters.
      per_image_standardization: standardise each image by its own mean and stddev inside
        the model, as Madry's code does. Set to False to use `mean`/`std` instead.
      mean: per-channel mean subtracted inside the model; only with
        `per_image_standardization=False`.
      std: per-channel std divided inside the model; only with
        `per_image_standardization=False`.
      name: model name; defaults to `wrn_{depth}_{width}`.

    Returns:
      A functional `keras.Model` returning logits.

    Raises:
      ValueError: if `depth` is not 6n + 2 with n >= 1, `width` is not a positive integer,
        or `mean`/`std` are given together with per-image standardisation.
    """
    if int(depth) != depth or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"wide_resnet depth must be 6n + 2 with n >= 1 (8, 14, 20, 26, 32, ...); got {depth}"
        )
    if int(width) != width or width < 1:
        raise ValueError(f"wide_resnet width must be a positive integer; got {width}")
    if per_image_standardization and (mean is not None or std is not None):
        raise ValueError(
            "wide_resnet standardises each image itself; pass per_image_standardization=False "
            "to normalise with mean/std instead"
        )
    depth, width = int(depth), int(width)
    units = (depth - 2) // 6

    inputs = keras.Input(input_shape, name="images")
    if per_image_standardization:
        x = PerImageStandardization(name="per_image_standardization")(inputs)
    else:
        x = normalize(inputs, mean, std)
    x = _conv(x, 16, 1, "init_conv")
    stages = ((16 * width, 1, True), (32 * width, 2, False), (64 * width, 2, False))
    for stage, (filters, stride, activate_before_residual) in enumerate(stages, start=1):
        x = _residual(x, filters, stride, activate_before_residual, f"unit_{stage}_0")
        for unit in range(1, units):
            x = _residual(x, filters, 1, False, f"unit_{stage}_{unit}")
    x = _bn_act(x, "unit_last")
    x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    outputs = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.VarianceScaling(
            1.0, mode="fan_in", distribution="uniform"
        ),
        name="logits",
    )(x)
    return keras.Model(inputs, outputs, name=name or f"wrn_{depth}_{width}")
