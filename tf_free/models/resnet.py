"""ResNet-50/101/152 as torchvision builds them (ResNet v1.5), the ImageNet models.

The free-training ImageNet code (mahyarnajibi/FreeAdversarialTraining, `main_free.py`
line 67) builds its model with `torchvision.models.__dict__[arch]()`, arch `resnet50` by
default (`configs.yml`). These builders port `torchvision/models/resnet.py` of torchvision
0.28 (pytorch/vision) layer by layer: `Bottleneck` (lines 108-163; the stride on `conv2`,
line 135), `ResNet.__init__` (stem lines 197-200, `fc` line 206, init loop lines 208-213),
`ResNet._make_layer` (lines 225-264), `ResNet._forward_impl` (lines 266-282) and the block
counts of `resnet50`/`resnet101`/`resnet152` (lines 763, 795, 827). The names below are
that file's:

- stem: `conv1` 7x7/2 with padding 3, `bn1`, ReLU, `maxpool` 3x3/2 with padding 1;
- four stages (`layer1`-`layer4`) of 3/4/6/3 (ResNet-50), 3/4/23/3 (ResNet-101) or
  3/8/36/3 (ResNet-152) bottlenecks with 64, 128, 256, 512 planes and 4x expansion;
- each bottleneck is conv1x1, BN, ReLU, conv3x3 (with the stride: the "v1.5" placement,
  where `keras.applications` and the original paper put it on the first 1x1), BN, ReLU,
  conv1x1, BN, add, ReLU;
- the first block of every stage has a projection shortcut (`downsample`): conv1x1 with
  the stage's stride (1, 2, 2, 2) and BN;
- global average pooling (`avgpool`) and a dense layer (`fc`) to the logits.

Convolutions have no bias and `kaiming_normal_(mode="fan_out", nonlinearity="relu")`
weights; BN starts at gamma 1, beta 0 (`zero_init_residual=False`, torchvision's default)
with torch's momentum 0.1 (Keras 0.9) and eps 1e-5; the dense layer keeps `nn.Linear`'s
default init (torchvision's init loop leaves it alone). With 1000 classes the trainable
parameters are torchvision's `parameters()`: 25,557,032 / 44,549,160 / 60,192,808.

Where these models differ from torchvision's:

- inputs are NHWC RGB images in [0, 1] and the per-channel `mean`/`std` normalisation is
  the model's first layer; `main_free.py` (lines 184-185) normalises outside the model;
- Keras updates the BN moving variance with the biased batch variance, torch with the
  unbiased one (see `layers.torch_batch_norm`);
- the max pool pads with zeros where torch pads with -inf; it follows a ReLU, so every
  window holds a value >= 0 and the result is the same.

`keras.applications`' ResNet preprocessing (caffe-style BGR mean subtraction) is not used.
"""

import keras

from tf_free.models.layers import (
    normalize,
    torch_batch_norm,
    torch_conv2d,
    torch_kaiming_normal_fan_out,
    torch_linear,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Blocks per stage, torchvision's `resnet50`/`resnet101`/`resnet152` `layers` argument.
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_PLANES = (64, 128, 256, 512)
_EXPANSION = 4


def _conv_bn(x, filters, kernel_size, stride, name, bn_name):
    x = torch_conv2d(
        x,
        filters,
        kernel_size,
        stride,
        padding=(kernel_size - 1) // 2,
        name=name,
        kernel_initializer=torch_kaiming_normal_fan_out(),
    )
    return torch_batch_norm(bn_name)(x)


def _bottleneck(x, planes, stride, name):
    """torchvision's `Bottleneck.forward`: the stride sits on the 3x3 `conv2`."""
    out_filters = planes * _EXPANSION
    shortcut = x
    if stride != 1 or x.shape[-1] != out_filters:
        # `_make_layer`'s `downsample`: conv1x1(inplanes, planes * 4, stride) + BN.
        shortcut = _conv_bn(
            x, out_filters, 1, stride, f"{name}_downsample_0", f"{name}_downsample_1"
        )
    out = _conv_bn(x, planes, 1, 1, f"{name}_conv1", f"{name}_bn1")
    out = keras.layers.ReLU(name=f"{name}_relu1")(out)
    out = _conv_bn(out, planes, 3, stride, f"{name}_conv2", f"{name}_bn2")
    out = keras.layers.ReLU(name=f"{name}_relu2")(out)
    out = _conv_bn(out, out_filters, 1, 1, f"{name}_conv3", f"{name}_bn3")
    out = keras.layers.Add(name=f"{name}_add")([out, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(out)


def _resnet(depth, input_shape, num_classes, mean, std, name):
    inputs = keras.Input(input_shape, name="images")
    x = normalize(inputs, mean, std)
    x = _conv_bn(x, 64, 7, 2, "conv1", "bn1")
    x = keras.layers.ReLU(name="relu")(x)
    # Zero padding equals torch's -inf padding here: the inputs are ReLU outputs (>= 0).
    x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)
    for stage, (planes, blocks) in enumerate(zip(_PLANES, BLOCKS[depth]), start=1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            x = _bottleneck(x, planes, stride, name=f"layer{stage}_{block}")
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = torch_linear(x, num_classes, name="logits")
    return keras.Model(inputs, outputs, name=name)


def resnet50(input_shape, num_classes, *, mean=None, std=None, name="resnet50"):
    """torchvision's ResNet-50 (v1.5; see the module docstring for the differences).

    Layer names follow torchvision's module names (`layer2_0_conv2` is `layer2[0].conv2`,
    `layer1_0_downsample_0` is `layer1[0].downsample[0]`), except `fc`, which is `logits`.

    Args:
      input_shape: (H, W, C) of RGB float images in [0, 1]; at least 32x32.
      num_classes: number of logits.
      mean: per-channel mean subtracted inside the model (e.g. `IMAGENET_MEAN`).
      std: per-channel std divided inside the model (e.g. `IMAGENET_STD`).
      name: model name.

    Returns:
      A functional `keras.Model` returning logits.
    """
    return _resnet(50, input_shape, num_classes, mean, std, name)


def resnet101(input_shape, num_classes, *, mean=None, std=None, name="resnet101"):
    """torchvision's ResNet-101 (v1.5); arguments as `resnet50`."""
    return _resnet(101, input_shape, num_classes, mean, std, name)


def resnet152(input_shape, num_classes, *, mean=None, std=None, name="resnet152"):
    """torchvision's ResNet-152 (v1.5); arguments as `resnet50`."""
    return _resnet(152, input_shape, num_classes, mean, std, name)
