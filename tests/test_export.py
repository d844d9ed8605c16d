"""The exported SavedModel: right answers, and clear errors for bad serving inputs."""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_free import export

SHAPE = (8, 8, 1)
UINT8_EXPECTS = re.escape("serving_default expects uint8 images of shape [N, 8, 8, 1] (0-255); got")
FLOAT_EXPECTS = re.escape("serve expects float32 images of shape [N, 8, 8, 1] in [0, 1]; got")
LOADER_EXPECTS = re.escape("serve expects float images of shape [N, 8, 8, 1] in [0, 1]; got")
# (2, 8, 8, 1, 1): a trailing axis; the spec's static rank had made the rank check pass.
BAD_SHAPES = [(8, 8, 1), (4, 8, 8), (4, 9, 8, 1), (4, 8, 8, 3), (2, 4, 8, 8, 1), (2, 8, 8, 1, 1)]


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


# --- Convolutions: empty batches and the rank check come before the model ---


@pytest.fixture(scope="module")
def conv_exported(tmp_path_factory):
    # small_cnn hits oneDNN's convolution, which fails on an empty batch and
    # gave AbortedError for a [2, 8, 8, 1, 1] batch.
    from tf_free import models

    model = models.get_model("small_cnn", SHAPE, 3)
    export_dir = str(tmp_path_factory.mktemp("conv") / "model")
    export.export_saved_model(model, export_dir)
    return export_dir, tf.saved_model.load(export_dir), model


def test_conv_model_gives_the_models_logits(conv_exported):
    export_dir, loaded, model = conv_exported
    x = uint8_batch()
    expected = model(x / 255.0).numpy()
    out = loaded.signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        export.load_logits_fn(export_dir)(x / 255.0), expected, rtol=1e-4, atol=1e-5
    )


def test_empty_batch_gives_empty_outputs(conv_exported):
    export_dir, loaded, _ = conv_exported
    out = loaded.signatures["serving_default"](images=tf.zeros((0, *SHAPE), tf.uint8))
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "logits": ((0, 3), tf.float32),
        "probabilities": ((0, 3), tf.float32),
    }
    out = loaded.signatures["serve"](images=tf.zeros((0, *SHAPE), tf.float32))
    assert (out["output_0"].shape, out["output_0"].dtype) == ((0, 3), tf.float32)
    empty = tf.zeros((0, *SHAPE), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(empty)
        logits = loaded.serve(empty)
        total = tf.reduce_sum(logits)
    assert (logits.shape, logits.dtype) == ((0, 3), tf.float32)
    assert tape.gradient(total, empty).shape == (0, *SHAPE)  # `serve` stays differentiable
    assert export.load_logits_fn(export_dir)(np.zeros((0, *SHAPE))).shape == (0, 3)


@pytest.mark.parametrize("shape", [(2, 8, 8, 1, 1), (0, 8, 8, 1, 1), (2, 8, 8, 1, 3)])
def test_rank_is_checked_before_the_model_runs(conv_exported, shape):
    export_dir, loaded, _ = conv_exported
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=UINT8_EXPECTS + " uint8 " + shown(shape)
    ):
        loaded.signatures["serving_default"](images=tf.zeros(shape, tf.uint8))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=FLOAT_EXPECTS + " float32 " + shown(shape)
    ):
        loaded.signatures["serve"](images=tf.zeros(shape, tf.float32))
    logits_fn = export.load_logits_fn(export_dir)
    with pytest.raises(ValueError, match=LOADER_EXPECTS + " float32 " + shown(shape) + "$"):
        logits_fn(np.zeros(shape, np.float32))
    unknown_rank = tf.function(logits_fn, input_signature=[tf.TensorSpec(None, tf.float32)])
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=FLOAT_EXPECTS + " float32 " + shown(shape)
    ):
        unknown_rank(np.zeros(shape, np.float32))


# --- The export target: only tf_free's own exports are replaced ---


def dense_model(seed):
    """Flatten + Dense(3) with weights drawn from `seed`; returns (model, kernel, bias)."""
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(3)])
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    kernel, bias = (w.astype(np.float64) for w in model.get_weights())
    return model, kernel, bias


def assert_serves(export_dir, kernel, bias):
    """`export_dir` loads and gives the logits of the model with these weights."""
    x = uint8_batch(3, seed=2) / 255.0
    np.testing.assert_allclose(
        export.load_logits_fn(export_dir)(x), reference_logits(x, kernel, bias), atol=1e-4
    )


def snapshot(root):
    """Every path under `root` (hidden ones too) with its mode and, for files, its bytes."""
    tree = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            content = None if name in dirs else open(path, "rb").read()
            tree[os.path.relpath(path, root)] = (os.lstat(path).st_mode, content)
    return tree


@pytest.fixture
def user_tree(tmp_path):
    """The reviewer's folders: a README, models and notes, and three runs."""
    (tmp_path / "README.md").write_bytes(b"# My project\n\nDo not overwrite.\n")
    models_dir = tmp_path / "sandbox" / "my_models"
    (models_dir / "old_model_v1" / "variables").mkdir(parents=True)
    (models_dir / "old_model_v1" / "saved_model.pb").write_bytes(b"\x08\x01")
    (models_dir / "notes.txt").write_text("v1 was trained with eps=0.3\n")
    for run in ("run1", "run2", "run3"):
        checkpoints = tmp_path / "sandbox" / "runs" / run / "checkpoints"
        checkpoints.mkdir(parents=True)
        (checkpoints / "checkpoint").write_text('model_checkpoint_path: "ckpt-3"\n')
        (checkpoints / "ckpt-3.index").write_bytes(b"\x00index")
        (checkpoints.parent / "config.json").write_text(json.dumps({"run": run}))
    plain = tmp_path / "sandbox" / "plain_saved_model"
    tf.saved_model.save(tf.Module(), str(plain))  # a SavedModel, but not a tf_free export
    return tmp_path


FILE_ADVICE = "give a new or empty folder, or a previous tf_free export"
REFUSALS = {
    "a file": (
        "README.md",
        None,
        "export_dir {export_dir} is a file: " + FILE_ADVICE,
    ),
    "a folder with other files": (
        "sandbox/my_models",
        None,
        "export_dir {export_dir} is a folder with other contents (not a tf_free export, no "
        "assets.extra/tf_free_export.json): " + FILE_ADVICE + "; tf_free only replaces its own "
        "exports",
    ),
    "a SavedModel without the marker": (
        "sandbox/plain_saved_model",
        None,
        "export_dir {export_dir} is a folder with other contents (not a tf_free export, no "
        "assets.extra/tf_free_export.json): " + FILE_ADVICE + "; tf_free only replaces its own "
        "exports",
    ),
    "the run folder": (
        "sandbox/runs/run3",
        "sandbox/runs/run3",
        "export_dir {export_dir} is the run folder (model_dir): exporting there would delete "
        "the run; use e.g. {model_dir}/export",
    ),
    "a folder holding the run": (
        "sandbox/runs",
        "sandbox/runs/run3",
        "export_dir {export_dir} contains the run folder {model_dir}: exporting there would "
        "delete it; use e.g. {model_dir}/export",
    ),
    "a folder two levels up": (
        "sandbox",
        "sandbox/runs/run3",
        "export_dir {export_dir} contains the run folder {model_dir}: exporting there would "
        "delete it; use e.g. {model_dir}/export",
    ),
    "a path below a file": (
        "README.md/export",
        None,
        "export_dir {export_dir} cannot be created: {root}/README.md is a file; " + FILE_ADVICE,
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_export_refuses_targets_it_would_destroy(user_tree, case):
    relative, model_relative, message = REFUSALS[case]
    export_dir = str(user_tree / relative)
    model_dir = str(user_tree / model_relative) if model_relative else None
    root = os.path.realpath(user_tree)
    message = "^" + re.escape(message.format(export_dir=export_dir, model_dir=model_dir, root=root))
    before = snapshot(user_tree)
    with pytest.raises(export.ExportTargetError, match=message + "$"):
        export.check_export_target(export_dir, model_dir)
    model, _, _ = dense_model(1)
    with pytest.raises(export.ExportTargetError, match=message + "$"):
        export.export_saved_model(model, export_dir, model_dir=model_dir)
    assert snapshot(user_tree) == before  # byte-identical, and no staging folder left
    assert issubclass(export.ExportTargetError, ValueError)


def test_export_refuses_the_runs_own_folders(user_tree):
    run = str(user_tree / "sandbox" / "runs" / "run3")
    for name in ("checkpoints", "logs"):  # "logs" does not exist yet: refused all the same
        for export_dir in (os.path.join(run, name), os.path.join(run, name, "export")):
            with pytest.raises(
                export.ExportTargetError,
                match=f"^export_dir {re.escape(export_dir)} is in the run's {name}: use e.g. "
                + re.escape(run)
                + "/export$",
            ):
                export.check_export_target(export_dir, run, run_files=("checkpoints", "logs"))
    export.check_export_target(os.path.join(run, "export"), run, run_files=("checkpoints",))


def test_export_accepts_new_empty_and_own_targets(user_tree):
    model, kernel, bias = dense_model(1)
    new = str(user_tree / "not" / "yet" / "there")  # the parent does not exist either
    export.check_export_target(new, str(user_tree / "sandbox" / "runs" / "run3"))
    assert export.export_saved_model(model, new) == new
    assert_serves(new, kernel, bias)
    empty = user_tree / "empty"
    empty.mkdir()
    export.check_export_target(str(empty))
    export.export_saved_model(model, str(empty))
    assert_serves(str(empty), kernel, bias)
    run = str(user_tree / "sandbox" / "runs" / "run3")
    export.check_export_target(os.path.join(run, "export"), run, run_files=("checkpoints",))
    export.export_saved_model(model, os.path.join(run, "export"), model_dir=run)
    # A tf_free export is replaced, and nothing is left beside it.
    newer, kernel, bias = dense_model(2)
    export.check_export_target(new)
    export.export_saved_model(newer, new)
    assert_serves(new, kernel, bias)
    assert os.listdir(os.path.dirname(new)) == ["there"]


def test_a_symlinked_export_is_replaced_where_it_points(tmp_path):
    model, _, _ = dense_model(1)
    real = str(tmp_path / "models" / "v1")
    export.export_saved_model(model, real)
    link = tmp_path / "current"
    link.symlink_to(real)
    newer, kernel, bias = dense_model(2)
    export.export_saved_model(newer, str(link))
    assert link.is_symlink() and os.readlink(link) == real
    assert_serves(real, kernel, bias)
    assert sorted(os.listdir(tmp_path / "models")) == ["v1"]


def test_the_marker_describes_the_export(tmp_path):
    import tf_free

    model, _, _ = dense_model(1)
    export_dir = str(tmp_path / "model")
    export.export_saved_model(model, export_dir)
    info = export.export_info(export_dir)
    with open(os.path.join(export_dir, "assets.extra", "tf_free_export.json")) as f:
        assert json.load(f) == info
    assert info.pop("created").endswith("+00:00")
    assert info == {
        "format": "tf_free export",
        "tf_free_version": tf_free.__version__,
        "tensorflow_version": tf.__version__,
        "model": model.name,
        "image_shape": list(SHAPE),
        "num_classes": 3,
    }
    assert export.export_info(str(tmp_path)) is None


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_permissions_follow_the_umask(tmp_path, umask):
    # tempfile.mkdtemp made the export 0700: a model server running as another
    # user could not read it.
    model, _, _ = dense_model(1)
    previous = os.umask(umask)
    try:
        export.export_saved_model(model, str(tmp_path / "models" / "model"))
    finally:
        os.umask(previous)
    modes = [os.stat(tmp_path / "models").st_mode]
    modes += [mode for mode, _ in snapshot(tmp_path / "models").values()]
    for mode in modes:
        others = stat.S_IRGRP | stat.S_IROTH | (stat.S_IXGRP | stat.S_IXOTH) * stat.S_ISDIR(mode)
        if umask == 0o022:
            assert mode & others == others, oct(mode)
        else:
            assert mode & 0o077 == 0, oct(mode)
    assert len(modes) >= 8  # folders and files: variables/, assets.extra/, ...


# --- A kill during an export: the next export or load recovers ---


class Killed(BaseException):
    """Stands in for SIGKILL: no `except Exception` handler runs."""


KILL_POINTS = {
    # name: (the names in the parent after the kill, which export wins)
    "while writing": ({"model", ".model.tf_free-staging"}, "old"),
    "between the renames": ({".model.tf_free-old", ".model.tf_free-staging"}, "new"),
    "before removing the old export": ({"model", ".model.tf_free-old"}, "new"),
    "first export, before its rename": ({".model.tf_free-staging"}, "new"),
}


def export_killed(monkeypatch, model, export_dir, point):
    staging, old = export.staging_paths(export_dir)
    real_replace, real_remove = os.replace, export._remove

    def replace(src, dst):
        if src == staging:
            raise Killed
        real_replace(src, dst)

    def remove(path):
        if path == old:
            raise Killed
        real_remove(path)

    def write_marker(*args):
        raise Killed

    with monkeypatch.context() as patch:
        if point == "while writing":
            patch.setattr(export, "_write_marker", write_marker)
        elif point == "before removing the old export":
            patch.setattr(export, "_remove", remove)
        else:
            patch.setattr(os, "replace", replace)
        with pytest.raises(Killed):
            export.export_saved_model(model, export_dir)


@pytest.mark.parametrize("by", ["load_logits_fn", "the next export"])
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_export_is_recovered(tmp_path, monkeypatch, caplog, point, by):
    left, winner = KILL_POINTS[point]
    export_dir = str(tmp_path / "model")
    old_model, *old_weights = dense_model(1)
    new_model, *new_weights = dense_model(2)
    if not point.startswith("first"):
        export.export_saved_model(old_model, export_dir)
    export_killed(monkeypatch, new_model, export_dir, point)
    assert set(os.listdir(tmp_path)) == left
    staging, _ = export.staging_paths(export_dir)
    if by == "load_logits_fn":
        with caplog.at_level("WARNING"):
            assert_serves(export_dir, *(new_weights if winner == "new" else old_weights))
        said = [r.getMessage() for r in caplog.records if r.name == "absl"]
        if "model" in left:
            # An export is in place: a reader removes nothing (an export may be
            # writing its staging folder now); the next export or recovery does.
            assert said == [] and set(os.listdir(tmp_path)) == left
            assert export.recover_export(export_dir) == (
                "removed the leftovers of an interrupted export beside " + export_dir
            )
        else:
            assert said == [f"completed an interrupted export: moved {staging} to {export_dir}"]
    else:
        third, *third_weights = dense_model(3)
        export.export_saved_model(third, export_dir)
        assert_serves(export_dir, *third_weights)
    assert export.recover_export(export_dir) is None  # nothing left to do
    assert os.listdir(tmp_path) == ["model"]


def test_an_unfinished_new_export_gives_back_the_old_one(tmp_path):
    export_dir = str(tmp_path / "model")
    old_model, *old_weights = dense_model(1)
    export.export_saved_model(old_model, export_dir)
    staging, old = export.staging_paths(export_dir)
    shutil.copytree(export_dir, staging)
    os.remove(os.path.join(staging, "assets.extra", "tf_free_export.json"))  # not complete
    os.rename(export_dir, old)
    assert export.recover_export(export_dir) == (
        f"undid an interrupted export: moved the previous export {old} back to {export_dir}"
    )
    assert os.listdir(tmp_path) == ["model"]
    assert_serves(export_dir, *old_weights)


def test_a_reader_leaves_an_export_being_written_alone(tmp_path):
    # As if a first export were writing its staging folder now (no marker yet):
    # evaluating the target must not delete it.
    export_dir = str(tmp_path / "model")
    staging, _ = export.staging_paths(export_dir)
    os.makedirs(os.path.join(staging, "variables"))
    before = snapshot(tmp_path)
    with pytest.raises(
        export.ExportError, match=f"^no SavedModel at {re.escape(export_dir)}: it does not exist$"
    ):
        export.load_logits_fn(export_dir)
    assert export.recover_export(export_dir, missing_only=True) is None
    assert snapshot(tmp_path) == before
    assert export.recover_export(export_dir) == "removed an unfinished export beside " + export_dir
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_sigkill_between_the_renames_is_recovered_by_load_logits_fn(tmp_path):
    # A real kill, in a child process: the state it leaves is what recovery sees.
    export_dir = str(tmp_path / "model")
    old_model, _, _ = dense_model(1)
    export.export_saved_model(old_model, export_dir)
    new_model, *new_weights = dense_model(2)
    np.savez(tmp_path / "weights.npz", *new_model.get_weights())
    script = f"""
import os, signal
import keras, numpy as np
from tf_free import export
real_replace = os.replace
def replace(src, dst):
    if src.endswith(export.STAGING_SUFFIX):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
model = keras.Sequential([keras.Input({SHAPE}), keras.layers.Flatten(), keras.layers.Dense(3)])
weights = np.load({str(tmp_path / "weights.npz")!r})
model.set_weights([weights[f"arr_{{i}}"] for i in range(len(weights.files))])
export.export_saved_model(model, {export_dir!r})
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert set(os.listdir(tmp_path)) == {
        "weights.npz",
        ".model.tf_free-old",
        ".model.tf_free-staging",
    }
    assert_serves(export_dir, *new_weights)
    assert sorted(os.listdir(tmp_path)) == ["model", "weights.npz"]


def test_remove_staging_removes_the_leftovers_only(tmp_path, monkeypatch):
    export_dir = str(tmp_path / "model")
    export.export_saved_model(dense_model(1)[0], export_dir)
    export_killed(monkeypatch, dense_model(2)[0], export_dir, "before removing the old export")
    assert export.remove_staging(export_dir) == [export.staging_paths(export_dir)[1]]
    assert os.listdir(tmp_path) == ["model"]
    assert export.remove_staging(export_dir) == []
    export_killed(monkeypatch, dense_model(2)[0], export_dir, "between the renames")
    assert export.remove_staging(export_dir) == list(export.staging_paths(export_dir))
    assert os.listdir(tmp_path) == []  # with --overwrite the previous export goes too


# --- Clear errors for what is not a (readable) SavedModel ---

NOT_A_SAVED_MODEL = (
    "(no saved_model.pb): give a tf_free export, or evaluate a training run with "
    "--model_dir=<the run's folder>"
)


@pytest.mark.parametrize(
    "make, message",
    [
        (None, "no SavedModel at {path}: it does not exist"),
        ("file", "{path} is a file, not a SavedModel folder"),
        ("empty", "{path} is not a SavedModel " + NOT_A_SAVED_MODEL),
        (
            "run",
            "{path} is a training run folder, not a SavedModel (no saved_model.pb): "
            "evaluate the run with --model_dir={path}",
        ),
        (
            "run checkpoints",
            "{path} is a checkpoint folder, not a SavedModel (no saved_model.pb): "
            "evaluate its run with --model_dir={run}",
        ),
        (
            "checkpoints",
            "{path} is a checkpoint folder, not a SavedModel (no saved_model.pb): "
            "evaluate a training run with --model_dir=<the run's folder>",
        ),
    ],
)
def test_load_logits_fn_says_what_is_not_a_saved_model(tmp_path, make, message):
    run = tmp_path / "run"
    path = {"run": run, "run checkpoints": run / "checkpoints"}.get(make, tmp_path / "thing")
    if make == "file":
        path.write_text("x")
    elif make == "empty":
        path.mkdir()
    elif make is not None:
        checkpoints = path if make == "checkpoints" else run / "checkpoints"
        checkpoints.mkdir(parents=True)
        (checkpoints / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
        (checkpoints / "ckpt-1.index").write_bytes(b"\x00")
        if make.startswith("run"):
            (run / "config.json").write_text("{}")
    expected = message.format(path=path, run=run)
    with pytest.raises(export.ExportError, match="^" + re.escape(expected) + "$"):
        export.load_logits_fn(str(path))


@pytest.mark.parametrize(
    "damage, detail",
    [
        (
            "half of saved_model.pb",
            "saved_model.pb is truncated or corrupt (Error parsing message "
            "with type 'tensorflow.SavedModel': Wire format was corrupt)",
        ),
        (
            "empty saved_model.pb",
            "saved_model.pb is truncated or corrupt (no MetaGraph in 0 bytes)",
        ),
        (
            "half of the variables",
            "a file is missing, truncated or corrupt (Read less bytes than requested)",
        ),
    ],
)
def test_load_logits_fn_says_the_saved_model_is_damaged(exported, tmp_path, damage, detail):
    export_dir = str(tmp_path / "model")
    shutil.copytree(exported[0], export_dir)
    if "variables" in damage:
        path = os.path.join(export_dir, "variables", "variables.data-00000-of-00001")
    else:
        path = os.path.join(export_dir, "saved_model.pb")
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[: len(content) // 2] if damage.startswith("half") else b"")
    expected = f"cannot read the SavedModel at {export_dir}: {detail}; export it again"
    with pytest.raises(export.ExportError, match="^" + re.escape(expected) + "$"):
        export.load_logits_fn(export_dir)
    assert issubclass(export.ExportError, ValueError)


def test_an_export_of_tf_free_0_1_without_the_marker_is_still_ours(tmp_path):
    """0.1 wrote no marker: its two signatures identify it, so re-running an old run can export."""
    model, kernel, bias = dense_model(1)
    old = str(tmp_path / "export")
    export.export_saved_model(model, old)
    shutil.rmtree(os.path.join(old, "assets.extra"))  # as tf_free 0.1 left it
    assert export.export_info(old) == {"format": "tf_free export", "version": "0.1 (no marker)"}
    export.check_export_target(old)
    export.export_saved_model(model, old)
    assert export.export_info(old)["format"] == "tf_free export"
    assert os.path.exists(os.path.join(old, export.MARKER))
    assert_serves(old, kernel, bias)
    # A stray file beside the SavedModel: not recognised any more.
    shutil.rmtree(os.path.join(old, "assets.extra"))
    (tmp_path / "export" / "notes.txt").write_text("mine")
    assert export.export_info(old) is None
