"""The exported SavedModel: right answers, and clear errors for bad serving inputs."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_free import export

SHAPE = (8, 8, 1)
UINT8_EXPECTS = re.escape("serving_default expects uint8 images of shape [N, 8, 8, 1] (0-255); got")
FLOAT_EXPECTS = re.escape("serve expects float32 images of shape [N, 8, 8, 1] in [0, 1]; got")
LOADER_EXPECTS = re.escape("serve expects float images of shape [N, 8, 8, 1] in [0, 1]; got")
BAD_SHAPES = [(8, 8, 1), (4, 8, 8), (4, 9, 8, 1), (4, 8, 8, 3), (2, 4, 8, 8, 1)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(3)])
    kernel, bias = (w.astype(np.float64) for w in model.get_weights())
    export_dir = str(tmp_path_factory.mktemp("export") / "model")
    export.export_saved_model(model, export_dir)
    loaded = tf.saved_model.load(export_dir)
    return export_dir, loaded, kernel, bias


def reference_logits(images, kernel, bias):
    """Dense(Flatten(images)) in float64 numpy: independent of Keras and of the export."""
    return np.asarray(images, np.float64).reshape(len(images), -1) @ kernel + bias


def shown(shape):
    return re.escape("[" + ", ".join(map(str, shape)) + "]")


def uint8_batch(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *SHAPE), dtype=np.uint8)


def test_serving_default_signature_spec(exported):
    _, loaded, _, _ = exported
    args, kwargs = loaded.signatures["serving_default"].structured_input_signature
    assert args == ()
    assert list(kwargs) == ["images"]
    assert kwargs["images"].dtype == tf.uint8
    assert kwargs["images"].shape.as_list() == [None, *SHAPE]
    _, kwargs = loaded.signatures["serve"].structured_input_signature
    assert kwargs["images"].dtype == tf.float32
    assert kwargs["images"].shape.as_list() == [None, *SHAPE]


def test_correct_inputs_give_the_models_logits(exported):
    export_dir, loaded, kernel, bias = exported
    x = uint8_batch()
    expected = reference_logits(x / 255.0, kernel, bias)
    out = loaded.signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-5)
    probabilities = np.exp(expected) / np.exp(expected).sum(-1, keepdims=True)
    np.testing.assert_allclose(out["probabilities"], probabilities, rtol=1e-5, atol=1e-6)
    x_float = (x / 255.0).astype(np.float32)
    np.testing.assert_allclose(loaded.serve(x_float), expected, rtol=1e-5, atol=1e-5)
    serve_sig = loaded.signatures["serve"](images=tf.constant(x_float))
    np.testing.assert_allclose(serve_sig["output_0"], expected, rtol=1e-5, atol=1e-5)
    logits_fn = export.load_logits_fn(export_dir)
    np.testing.assert_allclose(logits_fn(x / 255.0), expected, rtol=1e-5, atol=1e-5)  # float64


def test_valid_edge_inputs_are_accepted(exported):
    export_dir, loaded, kernel, bias = exported
    edges = np.zeros((2, *SHAPE), np.float32)
    edges[1] = 1.0  # both ends of [0, 1] are valid
    np.testing.assert_allclose(
        loaded.serve(edges), reference_logits(edges, kernel, bias), rtol=1e-5, atol=1e-5
    )
    assert loaded.serve(np.zeros((0, *SHAPE), np.float32)).shape == (0, 3)
    out = loaded.signatures["serving_default"](images=tf.zeros((0, *SHAPE), tf.uint8))
    assert out["logits"].shape == (0, 3)


@pytest.mark.parametrize("shape", BAD_SHAPES)
def test_serving_signature_rejects_bad_shapes(exported, shape):
    # The signature is what TF Serving runs; before the in-graph check, [4, 8, 8]
    # gave logits without any error and the others failed inside Flatten.
    _, loaded, _, _ = exported
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=UINT8_EXPECTS + " uint8 " + shown(shape)
    ):
        loaded.signatures["serving_default"](images=tf.zeros(shape, tf.uint8))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=FLOAT_EXPECTS + " float32 " + shown(shape)
    ):
        loaded.signatures["serve"](images=tf.zeros(shape, tf.float32))


@pytest.mark.parametrize(
    "dtype, name", [(tf.float64, "double"), (tf.int32, "int32"), (tf.float32, "float")]
)
def test_serving_signature_rejects_bad_dtypes(exported, dtype, name):
    # TF itself rejects these before the graph runs, naming both dtypes.
    _, loaded, _, _ = exported
    images = tf.cast(tf.fill((4, *SHAPE), 200), dtype)
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=f"expected to be a uint8 tensor but is a {name} tensor",
    ):
        loaded.signatures["serving_default"](images=images)


def test_serve_signature_rejects_uint8(exported):
    _, loaded, _, _ = exported
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="expected to be a float tensor but is a uint8 tensor"
    ):
        loaded.signatures["serve"](images=tf.constant(uint8_batch()))


@pytest.mark.parametrize(
    "shape, dtype",
    [((4, 9, 8, 1), tf.float32), ((4, 8, 8), tf.float32), ((4, *SHAPE), tf.uint8)]
    + [((4, *SHAPE), tf.float64)],
)
def test_restored_functions_name_both_specs(exported, shape, dtype):
    # `loaded.serve(x)` is bound to the exported TensorSpec by TF, before any graph runs.
    _, loaded, _, _ = exported
    received = re.escape(f"TensorSpec(shape={shape}, dtype={dtype!r}")
    expected = re.escape(f"TensorSpec(shape=(None, 8, 8, 1), dtype={tf.float32!r}")
    with pytest.raises(TypeError, match=f"Can not cast {received}.* to {expected}"):
        loaded.serve(tf.zeros(shape, dtype))


@pytest.mark.parametrize("shape", BAD_SHAPES)
def test_load_logits_fn_rejects_bad_shapes(exported, shape):
    export_dir, _, _, _ = exported
    logits_fn = export.load_logits_fn(export_dir)
    with pytest.raises(ValueError, match=LOADER_EXPECTS + " float32 " + shown(shape) + "$"):
        logits_fn(np.zeros(shape, np.float32))


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.bool_])
def test_load_logits_fn_rejects_non_float_dtypes(exported, dtype):
    export_dir, _, _, _ = exported
    logits_fn = export.load_logits_fn(export_dir)
    name = tf.as_dtype(dtype).name
    with pytest.raises(ValueError, match=LOADER_EXPECTS + f" {name} " + shown((4, *SHAPE))):
        logits_fn(np.zeros((4, *SHAPE), dtype))


@pytest.mark.parametrize(
    "values, message",
    [
        ([0.0, 255.0], r"values in \[0, 255\] \(0-255 pixels\? divide by 255\)\]"),
        ([-0.5, 0.25], r"values in \[-0.5, 0.5\]\]"),  # no 0-255 hint
        ([0.0, 1.0001], r"values in \[0, 1.0001\] \(0-255"),
        ([0.5, np.nan], r"NaN values\]"),
    ],
)
def test_serve_rejects_values_outside_the_unit_interval(exported, values, message):
    export_dir, loaded, _, _ = exported
    images = np.full((4, *SHAPE), 0.5, np.float32)
    images[0, 0, 0, 0], images[3, 7, 7, 0] = values
    pattern = FLOAT_EXPECTS + " " + message
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        loaded.serve(images)
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        loaded.signatures["serve"](images=tf.constant(images))
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        export.load_logits_fn(export_dir)(images.astype(np.float64))


def test_gradient_flows_through_the_checked_serve(exported):
    export_dir, loaded, kernel, _ = exported
    x = tf.constant(uint8_batch(2, seed=1) / 255.0, tf.float32)
    # d(sum of logits)/d(pixel) is the pixel's row of the kernel, summed over classes.
    expected = np.broadcast_to(kernel.sum(axis=1).reshape(SHAPE), x.shape)
    with tf.GradientTape() as tape:
        tape.watch(x)
        total = tf.reduce_sum(loaded.serve(x))
    np.testing.assert_allclose(tape.gradient(total, x), expected, rtol=1e-5, atol=1e-6)
    x64 = tf.cast(x, tf.float64)  # load_logits_fn casts; the gradient comes back through the cast
    with tf.GradientTape() as tape:
        tape.watch(x64)
        total = tf.reduce_sum(export.load_logits_fn(export_dir)(x64))
    np.testing.assert_allclose(tape.gradient(total, x64), expected, rtol=1e-5, atol=1e-6)


def test_load_logits_fn_in_a_tf_function_with_unknown_shapes(exported):
    # As in attacks.accuracy_under_attack: symbolic images whose size is not known
    # when traced pass the Python checks; the graph still rejects a wrong size.
    export_dir, _, kernel, bias = exported
    logits_fn = export.load_logits_fn(export_dir)
    run = tf.function(logits_fn, input_signature=[tf.TensorSpec([None] * 4, tf.float32)])
    x = uint8_batch(3) / 255.0
    np.testing.assert_allclose(run(x), reference_logits(x, kernel, bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=FLOAT_EXPECTS + r" float32 \[3, 9, 8, 1\]"
    ):
        run(np.zeros((3, 9, 8, 1), np.float32))
    unknown_rank = tf.function(logits_fn, input_signature=[tf.TensorSpec(None, tf.float32)])
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=FLOAT_EXPECTS + r" float32 \[4, 8, 8\]"
    ):
        unknown_rank(np.zeros((4, 8, 8), np.float32))
