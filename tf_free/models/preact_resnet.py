"""PreAct ResNet-18 (He et al., 2016) as the CIFAR model of fast_adversarial.

Ports `CIFAR10/preact_resnet.py` of locuslab/fast_adversarial: `PreActBlock` (lines 6-28),
`PreActResNet` (lines 59-89) and `PreActResNet18` (lines 92-93, blocks [2, 2, 2, 2]):

- a 3x3 stem convolution with 64 filters (line 63), no BN or ReLU after it;
- four stages of two pre-activation blocks with 64, 128, 256, 512 filters and strides
  1, 2, 2, 2 (lines 64-67);
- each block is BN, ReLU, 3x3 conv (with the stride), BN, ReLU, 3x3 conv, add (lines
  23-27). When the block changes the stride or width, the shortcut is a 1x1 conv with the
  stride (lines 17-20) applied to the block's raw input `x`, not to the BN-ReLU output
  (line 24: `shortcut = self.shortcut(x)`; the same file's `PreActBottleneck`, line 51,
  and kuangliu/pytorch-cifar feed it the pre-activated `out`);
- final BN and ReLU (line 85), average pooling (line 86) and a linear layer (line 88).

Convolutions have no bias and torch's default `nn.Conv2d` init, the linear layer torch's
default `nn.Linear` init, BN torch's defaults (momentum 0.1, i.e. Keras 0.9, and eps
1e-5): locuslab's file sets none of them. With 10 classes the model has 11,172,170
trainable parameters, the count of the torch model's `parameters()`.

Where this model differs from locuslab's:

- inputs are NHWC images in [0, 1] and the per-channel `mean`/`std` normalisation is the
  model's first layer; locuslab's training scripts normalise outside the model;
- the pooling is global; locuslab's `F.avg_pool2d(out, 4)` (line 86) is global only for
  the 4x4 maps of 32x32 inputs (the only size its linear layer accepts), where the two
  agree;
- Keras updates the BN moving variance with the biased batch variance, torch with the
  unbiased one (see `layers.torch_batch_norm`).
"""

import keras

from tf_free.models.layers import (
    normalize,
    torch_batch_norm,
    torch_conv2d,
    torch_default_kernel_initializer,
    torch_linear,
)


def _conv(x, filters, kernel_size, stride, name):
    # torch's padding=1 for 3x3, padding 0 for the 1x1 shortcut (lines 13, 15, 19).
    return torch_conv2d(
        x,
        filters,
        kernel_size,
        stride,
        padding=(kernel_size - 1) // 2,
        name=name,
        kernel_initializer=torch_default_kernel_initializer(),
    )


def _preact_block(x, filters, stride, name):
    """locuslab's `PreActBlock.forward` (lines 22-28)."""
    out = torch_batch_norm(f"{name}_bn1")(x)
    out = keras.layers.ReLU(name=f"{name}_relu1")(out)
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        # Line 24 projects the raw block input `x`, not the pre-activated `out`.
        shortcut = _conv(x, filters, 1, stride, f"{name}_shortcut")
    out = _conv(out, filters, 3, stride, f"{name}_conv1")
    out = torch_batch_norm(f"{name}_bn2")(out)
    out = keras.layers.ReLU(name=f"{name}_relu2")(out)
    out = _conv(out, filters, 3, 1, f"{name}_conv2")
    return keras.layers.Add(name=f"{name}_add")([out, shortcut])


def preact_resnet18(input_shape, num_classes, *, mean=None, std=None, name="preact_resnet18"):
    """locuslab's PreAct ResNet-18 (see the module docstring for the differences).

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
    x = _conv(x, 64, 3, 1, "stem")
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _preact_block(x, filters, stride, name=f"stage{stage + 1}_block{block + 1}")
    x = torch_batch_norm("final_bn")(x)
    x = keras.layers.ReLU(name="final_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = torch_linear(x, num_classes, name="logits")
    return keras.Model(inputs, outputs, name=name)
