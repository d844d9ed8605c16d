"""Tests for tf_free.models: the registry, shapes, parameter counts and input handling.

Each ported model is checked against an independent forward pass written with raw `tf.nn`
ops after its official code: the wide ResNet after Madry et al.'s `model.py`
(MadryLab/cifar10_challenge), ResNet-50 after torchvision's `ResNet._forward_impl` and
`Bottleneck.forward` (explicit symmetric padding as torch's, -inf padding for the max
pool), PreAct ResNet-18 after locuslab/fast_adversarial's `PreActResNet.forward` and
`PreActBlock.forward`. Parameter counts are checked against closed forms and against the
counts of the official models (torch `parameters()` for the torch ones). Large models are
built but never run at full size.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_free.models import IMAGENET_MEAN, IMAGENET_STD, MODELS, get_model
from tf_free.models.layers import ChannelPad, PerImageStandardization
from tf_free.models.resnet import BLOCKS

# Small but representative builds of every registered model: (input_shape, kwargs).
SMALL = {
    "small_cnn": ((28, 28, 1), {}),
    "preact_resnet18": ((32, 32, 3), {}),
    "wide_resnet": ((32, 32, 3), {"depth": 8, "width": 1}),
    "resnet50": ((32, 32, 3), {}),
    "resnet101": ((32, 32, 3), {}),
    "resnet152": ((32, 32, 3), {}),
}
NUM_CLASSES = 7


def _images(shape, n=2, seed=0):
    return np.random.RandomState(seed).uniform(0, 1, (n, *shape)).astype("float32")


def _small(name, **overrides):
    shape, kwargs = SMALL.get(name, ((32, 32, 3), {}))
    keras.utils.set_random_seed(0)
    return get_model(name, shape, NUM_CLASSES, **{**kwargs, **overrides}), shape


def test_registry_holds_the_paper_models():
    assert {"wide_resnet", "resnet50", "resnet101", "resnet152"} <= set(MODELS)


def test_get_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'wrn'"):
        get_model("wrn", (32, 32, 3), 10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_shape_and_input_gradient(name):
    model, shape = _small(name)
    assert model.output_shape == (None, NUM_CLASSES)
    assert model.get_layer("logits").get_config()["activation"] == "linear"
    x = tf.constant(_images(shape, n=3))
    labels = tf.constant([0, 3, 6])
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = model(x, training=False)
        loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    grad = tape.gradient(loss, x)
    assert logits.shape == (3, NUM_CLASSES)
    assert np.all(np.isfinite(logits))
    assert grad is not None and grad.shape == x.shape
    assert np.all(np.isfinite(grad)) and np.any(grad.numpy() != 0)


def _wrn_param_count(depth, width, num_classes, in_channels=3):
    """Closed-form count for Madry's WRN: conv kernels, 4 values per BN channel, dense."""
    units = (depth - 2) // 6
    filters = [16, 16 * width, 32 * width, 64 * width]
    convs, bn_channels = 9 * in_channels * 16, 0
    for stage in range(3):
        for unit in range(units):
            cin = filters[stage] if unit == 0 else filters[stage + 1]
            cout = filters[stage + 1]
            convs += 9 * cin * cout + 9 * cout * cout
            bn_channels += cin + cout
    bn_channels += filters[3]
    return convs + 4 * bn_channels + filters[3] * num_classes + num_classes


@pytest.mark.parametrize("depth,width", [(8, 1), (14, 2), (32, 10)])
def test_wide_resnet_param_count(depth, width):
    model = get_model("wide_resnet", (32, 32, 3), 10, depth=depth, width=width)
    assert model.count_params() == _wrn_param_count(depth, width, 10)
    assert model.name == f"wrn_{depth}_{width}"
    if (depth, width) == (32, 10):
        assert model.count_params() == 45_924_346  # WRN-32-10: 45.9M, 31 conv layers
        convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
        assert len(convs) == 31
        assert [c.filters for c in convs[:2]] == [16, 160]
        assert model.get_layer("unit_3_4_conv2").output.shape == (None, 8, 8, 640)


def _count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def _randomize_batch_norm(model, seed):
    """Non-trivial BN statistics and affine parameters, so a forward pass tests them."""
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, c))
            layer.beta.assign(rng.normal(0, 0.2, c))
            layer.moving_mean.assign(rng.normal(0, 0.2, c))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))


def _assert_torch_batch_norm(model):
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns
    for layer in bns:
        assert layer.momentum == 0.9 and layer.epsilon == 1e-5  # torch momentum 0.1, eps 1e-5
        if not layer.built:
            continue
        np.testing.assert_array_equal(layer.gamma.numpy(), 1.0)
        np.testing.assert_array_equal(layer.beta.numpy(), 0.0)


def _assert_torch_linear_init(dense):
    """nn.Linear's default: weight and bias uniform within +-1/sqrt(fan_in)."""
    bound = 1.0 / np.sqrt(dense.kernel.shape[0])
    for values, rtol in ((dense.kernel.numpy(), 0.02), (dense.bias.numpy(), 0.2)):
        assert np.abs(values).max() <= bound
        np.testing.assert_allclose(values.std(), bound / np.sqrt(3.0), rtol=rtol)


# torchvision's `parameters()` and (running_mean, running_var) buffer counts for 1000 classes.
TORCHVISION_COUNTS = {
    "resnet50": (25_557_032, 53_120),
    "resnet101": (44_549_160, 105_344),
    "resnet152": (60_192_808, 151_424),
}


def _torchvision_resnet_counts(blocks, num_classes, in_channels=3):
    """Closed form for torchvision's bottleneck ResNet: (trainable, BN moving statistics)."""
    weights, bn_channels = 49 * in_channels * 64, 64  # conv1 7x7, bn1
    inplanes = 64
    for stage, planes in enumerate((64, 128, 256, 512)):
        for block in range(blocks[stage]):
            weights += inplanes * planes + 9 * planes * planes + planes * 4 * planes
            bn_channels += 6 * planes
            if block == 0:  # downsample: conv1x1 + BN
                weights += inplanes * 4 * planes
                bn_channels += 4 * planes
            inplanes = 4 * planes
    weights += inplanes * num_classes + num_classes
    return weights + 2 * bn_channels, 2 * bn_channels


@functools.cache
def _imagenet_resnet(name):
    keras.utils.set_random_seed(0)
    return get_model(name, (224, 224, 3), 1000)


@pytest.mark.parametrize("name", sorted(TORCHVISION_COUNTS))
def test_resnet_param_counts_match_torchvision(name):
    model = _imagenet_resnet(name)
    depth = int(name.removeprefix("resnet"))
    trainable, moving = TORCHVISION_COUNTS[name]
    assert _count(model.trainable_weights) == trainable
    assert _count(model.non_trainable_weights) == moving  # BN moving mean and variance
    assert _torchvision_resnet_counts(BLOCKS[depth], 1000) == (trainable, moving)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 1 + 3 * sum(BLOCKS[depth]) + 4  # stem, 3 per block, 4 downsamples
    assert not any(conv.use_bias for conv in convs)
    assert [len([c for c in convs if c.name.startswith(f"layer{s}_")]) for s in (1, 2, 3, 4)] == [
        3 * n + 1 for n in BLOCKS[depth]
    ]


@pytest.mark.parametrize("name", sorted(TORCHVISION_COUNTS))
def test_resnet_is_torchvision_v1_5(name):
    model = _imagenet_resnet(name)
    depth = int(name.removeprefix("resnet"))
    stem = model.get_layer("conv1")
    assert (stem.kernel_size, stem.strides, stem.padding) == ((7, 7), (2, 2), "valid")
    assert model.get_layer("conv1_pad").padding == ((3, 3), (3, 3))
    assert model.get_layer("maxpool_pad").padding == ((1, 1), (1, 1))
    pool = model.get_layer("maxpool")
    assert (pool.pool_size, pool.strides, pool.padding) == ((3, 3), (2, 2), "valid")
    assert stem.output.shape[1:3] == (112, 112) and pool.output.shape[1:3] == (56, 56)
    for stage, blocks in enumerate(BLOCKS[depth], start=1):
        planes = 64 * 2 ** (stage - 1)
        for block in range(blocks):
            prefix = f"layer{stage}_{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            conv1, conv2, conv3 = (model.get_layer(f"{prefix}_conv{i}") for i in (1, 2, 3))
            # v1.5: the stride is on the 3x3 conv, never on the first 1x1.
            assert (conv1.kernel_size, conv1.strides, conv1.filters) == ((1, 1), (1, 1), planes)
            assert (conv2.kernel_size, conv2.strides, conv2.filters) == (
                (3, 3),
                (stride,) * 2,
                planes,
            )
            assert (conv3.kernel_size, conv3.strides, conv3.filters) == ((1, 1), (1, 1), 4 * planes)
            if stride == 2:  # torch's symmetric padding 1, not Keras's asymmetric "same"
                assert conv2.padding == "valid"
                assert model.get_layer(f"{prefix}_conv2_pad").padding == ((1, 1), (1, 1))
            else:
                assert conv2.padding == "same"
            names = {layer.name for layer in model.layers}
            if block == 0:
                down = model.get_layer(f"{prefix}_downsample_0")
                assert (down.kernel_size, down.strides) == ((1, 1), (stride,) * 2)
                assert down.filters == 4 * planes and down.padding == "valid"
                assert isinstance(
                    model.get_layer(f"{prefix}_downsample_1"), keras.layers.BatchNormalization
                )
            else:
                assert f"{prefix}_downsample_0" not in names
        out = model.get_layer(f"layer{stage}_{blocks - 1}_out").output
        assert out.shape[1:] == (56 // 2 ** (stage - 1),) * 2 + (256 * 2 ** (stage - 1),)
    _assert_torch_batch_norm(model)


def test_resnet_initialisers_match_torchvision():
    model = _imagenet_resnet("resnet50")
    # kaiming_normal_(mode="fan_out", nonlinearity="relu"): N(0, 2 / (9 * 512)), not truncated.
    kernel = model.get_layer("layer4_0_conv2").kernel.numpy()
    np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 512)), rtol=0.01)
    assert np.abs(kernel).max() > 4 * kernel.std()
    stem = model.get_layer("conv1").kernel.numpy()  # fan_out 7 * 7 * 64
    np.testing.assert_allclose(stem.std(), np.sqrt(2.0 / (49 * 64)), rtol=0.03)
    _assert_torch_linear_init(model.get_layer("logits"))  # fan_in 2048


def _torch_out_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


@pytest.mark.parametrize("size", [225, 97, 33])
def test_resnet_spatial_sizes_follow_torch_arithmetic(size):
    model = get_model("resnet50", (size, size, 3), 10)
    size = _torch_out_size(size, 7, 2, 3)
    assert model.get_layer("conv1").output.shape[1] == size
    size = _torch_out_size(size, 3, 2, 1)
    assert model.get_layer("maxpool").output.shape[1] == size
    for stage, blocks in enumerate(BLOCKS[50], start=1):
        if stage > 1:
            size = _torch_out_size(size, 3, 2, 1)
        assert model.get_layer(f"layer{stage}_{blocks - 1}_out").output.shape[1:3] == (size, size)


def _torch_conv(model, name, x, stride, padding):
    """nn.Conv2d(..., padding=padding, bias=False): explicit symmetric zero padding."""
    pads = [[0, 0], [padding, padding], [padding, padding], [0, 0]]
    return tf.nn.conv2d(x, model.get_layer(name).kernel, stride, pads)


def _torch_bn(model, name, x, training):
    """nn.BatchNorm2d's output: batch statistics (biased variance) in training, else running."""
    layer = model.get_layer(name)
    if training:
        mean, variance = tf.nn.moments(x, [0, 1, 2])
    else:
        mean, variance = layer.moving_mean, layer.moving_variance
    return tf.nn.batch_normalization(x, mean, variance, layer.beta, layer.gamma, 1e-5)


def _torch_linear(model, x):
    dense = model.get_layer("logits")
    return tf.matmul(x, dense.kernel) + dense.bias


def _torchvision_forward(model, images, blocks, training):
    """torchvision's `ResNet._forward_impl` with `Bottleneck` blocks, op by op (NHWC)."""

    def conv_bn(x, conv, bn, stride, padding):
        return _torch_bn(model, bn, _torch_conv(model, conv, x, stride, padding), training)

    x = tf.nn.relu(conv_bn(images, "conv1", "bn1", 2, 3))
    x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=-np.inf)  # MaxPool2d pads -inf
    x = tf.nn.max_pool2d(x, 3, 2, "VALID")
    inplanes = 64
    for stage, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for block in range(num_blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            name = f"layer{stage}_{block}"
            out = tf.nn.relu(conv_bn(x, f"{name}_conv1", f"{name}_bn1", 1, 0))
            out = tf.nn.relu(conv_bn(out, f"{name}_conv2", f"{name}_bn2", stride, 1))
            out = conv_bn(out, f"{name}_conv3", f"{name}_bn3", 1, 0)
            identity = x
            if stride != 1 or inplanes != 4 * planes:
                identity = conv_bn(x, f"{name}_downsample_0", f"{name}_downsample_1", stride, 0)
            x = tf.nn.relu(out + identity)
            inplanes = 4 * planes
    return _torch_linear(model, tf.reduce_mean(x, [1, 2]))


@pytest.mark.parametrize("size", [64, 49])
def test_resnet50_matches_torchvision_graph(size):
    keras.utils.set_random_seed(7)
    model = get_model("resnet50", (size, size, 3), 5)
    _randomize_batch_norm(model, seed=7)
    x = _images((size, size, 3), n=4, seed=7)
    for training in (False, True):  # inference first: training=True moves the statistics
        expected = _torchvision_forward(model, tf.constant(x), BLOCKS[50], training).numpy()
        scale = np.abs(expected).max()
        np.testing.assert_allclose(
            model(x, training=training), expected, rtol=1e-4, atol=1e-4 * scale
        )


def _preact_param_count(num_classes, in_channels=3):
    """Closed form for locuslab's PreActResNet18: conv kernels, BN gamma/beta, linear."""
    weights, bn_channels, cin = 9 * in_channels * 64, 0, 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            weights += 9 * cin * cout + 9 * cout * cout
            bn_channels += cin + cout
            if stage > 0 and block == 0:
                weights += cin * cout  # 1x1 projection shortcut
            cin = cout
    bn_channels += 512
    return weights + 2 * bn_channels + 512 * num_classes + num_classes


def test_preact_resnet18_param_count_matches_locuslab():
    model = get_model("preact_resnet18", (32, 32, 3), 10)
    assert _count(model.trainable_weights) == _preact_param_count(10) == 11_172_170
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 1 + 16 + 3 and not any(conv.use_bias for conv in convs)
    _assert_torch_batch_norm(model)


def test_preact_resnet18_projection_sees_the_raw_block_input():
    """locuslab's PreActBlock.forward, line 24: `shortcut = self.shortcut(x)`."""
    model = get_model("preact_resnet18", (32, 32, 3), 10)
    names = {layer.name for layer in model.layers}
    previous = {2: "stage1_block2_add", 3: "stage2_block2_add", 4: "stage3_block2_add"}
    for stage, block_input in previous.items():
        shortcut = model.get_layer(f"stage{stage}_block1_shortcut")
        assert shortcut.input is model.get_layer(block_input).output
        assert shortcut.input is not model.get_layer(f"stage{stage}_block1_relu1").output
        assert (shortcut.kernel_size, shortcut.strides, shortcut.padding) == (
            (1, 1),
            (2, 2),
            "valid",
        )
        assert model.get_layer(f"stage{stage}_block1_bn1").input is shortcut.input
        conv1 = model.get_layer(f"stage{stage}_block1_conv1")
        assert conv1.padding == "valid" and conv1.strides == (2, 2)
        assert model.get_layer(f"stage{stage}_block1_conv1_pad").padding == ((1, 1), (1, 1))
    # Identity shortcuts elsewhere: the add takes the block input itself.
    assert not {f"stage1_block{b}_shortcut" for b in (1, 2)} & names
    add = model.get_layer("stage3_block2_add")
    assert model.get_layer("stage3_block1_add").output in add.input


def test_preact_resnet18_initialisers_match_torch_defaults():
    keras.utils.set_random_seed(0)
    model = get_model("preact_resnet18", (32, 32, 3), 10)
    # nn.Conv2d's default kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    kernel = model.get_layer("stage4_block2_conv2").kernel.numpy()
    bound = 1.0 / np.sqrt(9 * 512)
    assert np.abs(kernel).max() <= bound
    np.testing.assert_allclose(np.abs(kernel).max(), bound, rtol=1e-3)
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3.0), rtol=0.01)
    _assert_torch_linear_init(model.get_layer("logits"))


def _locuslab_forward(model, images, training):
    """locuslab's `PreActResNet.forward` with `PreActBlock`s, op by op (NHWC)."""
    x = _torch_conv(model, "stem", images, 1, 1)
    in_planes = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            name = f"stage{stage}_block{block + 1}"
            out = tf.nn.relu(_torch_bn(model, f"{name}_bn1", x, training))
            shortcut = x
            if stride != 1 or in_planes != planes:
                shortcut = _torch_conv(model, f"{name}_shortcut", x, stride, 0)
            out = _torch_conv(model, f"{name}_conv1", out, stride, 1)
            out = tf.nn.relu(_torch_bn(model, f"{name}_bn2", out, training))
            x = _torch_conv(model, f"{name}_conv2", out, 1, 1) + shortcut
            in_planes = planes
    x = tf.nn.relu(_torch_bn(model, "final_bn", x, training))
    x = tf.nn.avg_pool2d(x, 4, 4, "VALID")  # F.avg_pool2d(out, 4)
    return _torch_linear(model, tf.reshape(x, [x.shape[0], -1]))


def test_preact_resnet18_matches_locuslab_graph():
    keras.utils.set_random_seed(8)
    model = get_model("preact_resnet18", (32, 32, 3), 10)
    _randomize_batch_norm(model, seed=8)
    x = _images((32, 32, 3), n=4, seed=8)
    for training in (False, True):
        expected = _locuslab_forward(model, tf.constant(x), training).numpy()
        scale = np.abs(expected).max()
        np.testing.assert_allclose(
            model(x, training=training), expected, rtol=1e-4, atol=1e-4 * scale
        )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mean_std_normalisation_is_inside_the_model(name):
    shape = SMALL.get(name, ((32, 32, 3), {}))[0]
    channels = shape[-1]
    mean = np.asarray((IMAGENET_MEAN * 2)[:channels], "float32")
    std = np.asarray((IMAGENET_STD * 2)[:channels], "float32")
    overrides = {"per_image_standardization": False} if name == "wide_resnet" else {}
    with_norm, _ = _small(name, mean=mean, std=std, **overrides)
    without, _ = _small(name, **overrides)
    without.set_weights(with_norm.get_weights())
    x = _images(shape, n=2, seed=1)
    np.testing.assert_allclose(
        with_norm(x, training=False),
        without((x - mean) / std, training=False),
        rtol=1e-4,
        atol=1e-4,
    )
    assert with_norm.layers[1].name == "normalize"


def test_per_image_standardization_layer_matches_tf_image():
    rng = np.random.RandomState(2)
    x = rng.uniform(0, 1, (4, 8, 8, 3)).astype("float32")
    x[1] = 0.3  # constant image: the stddev floor decides
    x[2] = 0.5 + rng.uniform(0, 0.01, (8, 8, 3))  # near-constant, stddev below 1/sqrt(192)
    x[3] *= 0.5  # stddev about 0.14, above the floor 1/sqrt(192) = 0.072
    reference = tf.image.per_image_standardization(x).numpy()
    layer = PerImageStandardization(pixel_scale=1.0)
    np.testing.assert_allclose(layer(x), reference, rtol=1e-5, atol=1e-5)
    # The default standardises [0, 1] images exactly as Madry's code did their 0-255 version.
    np.testing.assert_allclose(
        PerImageStandardization()(x),
        tf.image.per_image_standardization(x * 255.0),
        rtol=1e-5,
        atol=1e-5,
    )
    # The two differ only on the near-constant image.
    unscaled = PerImageStandardization()(x).numpy()
    assert not np.allclose(unscaled[2], reference[2], atol=1e-3)
    np.testing.assert_allclose(unscaled[[0, 1, 3]], reference[[0, 1, 3]], rtol=1e-5, atol=1e-5)


def test_per_image_standardization_under_mixed_precision():
    x = _images((8, 8, 3), n=2)
    layer = PerImageStandardization(dtype="mixed_float16")
    out = layer(x)
    assert out.dtype == tf.float16
    np.testing.assert_allclose(
        tf.cast(out, tf.float32), tf.image.per_image_standardization(x), atol=1e-2
    )


def test_wide_resnet_standardises_each_image_inside():
    model, shape = _small("wide_resnet")
    assert isinstance(model.layers[1], PerImageStandardization)
    x = _images(shape, n=2, seed=3)
    # Per-image standardisation makes the logits blind to a per-image affine intensity change.
    np.testing.assert_allclose(
        model(x, training=False), model(0.5 * x + 0.2, training=False), atol=1e-4
    )


def test_wide_resnet_rejects_mean_std_with_per_image_standardization():
    with pytest.raises(ValueError, match="per_image_standardization=False"):
        get_model("wide_resnet", (32, 32, 3), 10, depth=8, width=1, mean=[0.5] * 3)


@pytest.mark.parametrize(
    "kwargs",
    [{"depth": 10}, {"depth": 33}, {"depth": 2}, {"depth": 8.5}, {"width": 0}, {"width": 1.5}],
)
def test_wide_resnet_rejects_bad_depth_or_width(kwargs):
    with pytest.raises(ValueError, match="wide_resnet (depth|width)"):
        get_model("wide_resnet", (32, 32, 3), 10, **{"depth": 8, "width": 1, **kwargs})


def _madry_forward(model, images, units):
    """Inference-mode forward pass following Madry's `model.py` op by op (tf.nn, 0-255 input)."""

    def conv(name, x, stride):
        kernel = model.get_layer(name).kernel
        return tf.nn.conv2d(x, kernel, [1, stride, stride, 1], "SAME")

    def bn(name, x):
        layer = model.get_layer(name)
        return tf.nn.batch_normalization(
            x, layer.moving_mean, layer.moving_variance, layer.beta, layer.gamma, 1e-3
        )

    def relu(x):
        return tf.where(x < 0.0, 0.1 * x, x)

    def residual(x, name, in_filter, out_filter, stride, activate_before_residual):
        if activate_before_residual:
            x = relu(bn(f"{name}_init_bn", x))
            orig_x = x
        else:
            orig_x = x
            x = relu(bn(f"{name}_init_bn", x))
        x = conv(f"{name}_conv1", x, stride)
        x = conv(f"{name}_conv2", relu(bn(f"{name}_sub2_bn", x)), 1)
        if in_filter != out_filter:
            orig_x = tf.nn.avg_pool(orig_x, stride, stride, "VALID")
            half = (out_filter - in_filter) // 2
            orig_x = tf.pad(orig_x, [[0, 0], [0, 0], [0, 0], [half, half]])
        return x + orig_x

    x = tf.map_fn(tf.image.per_image_standardization, images * 255.0)
    x = conv("init_conv", x, 1)
    filters = [16] + [model.get_layer(f"unit_{s}_0_conv1").filters for s in (1, 2, 3)]
    for stage, stride in zip((1, 2, 3), (1, 2, 2)):
        x = residual(x, f"unit_{stage}_0", filters[stage - 1], filters[stage], stride, stage == 1)
        for i in range(1, units):
            x = residual(x, f"unit_{stage}_{i}", filters[stage], filters[stage], 1, False)
    x = tf.reduce_mean(relu(bn("unit_last_bn", x)), [1, 2])
    dense = model.get_layer("logits")
    return tf.matmul(x, dense.kernel) + dense.bias


def test_wide_resnet_matches_madry_graph():
    keras.utils.set_random_seed(4)
    model = get_model("wide_resnet", (16, 16, 3), 5, depth=14, width=2)
    rng = np.random.RandomState(4)
    for layer in model.layers:  # non-trivial BN statistics and affine parameters
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, c))
            layer.beta.assign(rng.normal(0, 0.2, c))
            layer.moving_mean.assign(rng.normal(0, 0.2, c))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.momentum == 0.9 and layer.epsilon == 1e-3
        if isinstance(layer, keras.layers.Conv2D):
            assert not layer.use_bias
        if isinstance(layer, keras.layers.LeakyReLU):
            assert layer.negative_slope == pytest.approx(0.1)
    model.get_layer("logits").bias.assign(rng.normal(0, 1, 5))
    x = _images((16, 16, 3), n=3, seed=5)
    np.testing.assert_allclose(
        model(x, training=False), _madry_forward(model, x, units=2), rtol=1e-4, atol=1e-4
    )


def test_wide_resnet_initialisers_match_madry():
    model = get_model("wide_resnet", (32, 32, 3), 10, depth=8, width=4)
    kernel = model.get_layer("unit_3_0_conv2").kernel.numpy()  # 3x3x256x256
    np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 256)), rtol=0.02)
    dense = model.get_layer("logits").kernel.numpy()  # uniform_unit_scaling(1.0), fan_in 256
    assert np.abs(dense).max() <= np.sqrt(3.0 / 256)
    np.testing.assert_allclose(dense.std(), np.sqrt(1.0 / 256), rtol=0.15)


def test_channel_pad_and_odd_sizes():
    x = np.ones((1, 2, 2, 3), "float32")
    out = ChannelPad(2, 3)(x).numpy()
    assert out.shape == (1, 2, 2, 8)
    np.testing.assert_array_equal(out[..., 2:5], 1.0)
    assert out[..., :2].sum() == 0 and out[..., 5:].sum() == 0
    model = get_model("wide_resnet", (7, 7, 1), 3, depth=8, width=1)  # 7 -> 4 -> 2
    assert model(_images((7, 7, 1)), training=False).shape == (2, 3)


def test_wide_resnet_saves_loads_and_compiles_with_xla(tmp_path):
    model, shape = _small("wide_resnet", width=2)
    x = _images(shape, n=2, seed=6)
    expected = model(x, training=False)
    path = tmp_path / "wrn.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored(x, training=False), expected, rtol=1e-5, atol=1e-5)
    xla = tf.function(lambda images: model(images, training=False), jit_compile=True)
    np.testing.assert_allclose(xla(tf.constant(x)), expected, rtol=1e-4, atol=1e-4)
