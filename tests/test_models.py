"""Tests for tf_free.models: the registry, shapes, parameter counts and input handling.

The wide ResNet is checked against an independent forward pass written with raw `tf.nn`
ops after the graph of Madry et al.'s `model.py` (MadryLab/cifar10_challenge), and its
parameter count against a closed-form count. Large models are built but never run at
full size.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_free.models import IMAGENET_MEAN, IMAGENET_STD, MODELS, get_model
from tf_free.models.layers import ChannelPad, PerImageStandardization

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


def test_resnet50_param_count_matches_keras_applications():
    model = get_model("resnet50", (224, 224, 3), 1000)
    reference = keras.applications.ResNet50(weights=None, classifier_activation=None)
    assert model.count_params() == reference.count_params() == 25_636_712


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
