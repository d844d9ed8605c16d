"""SavedModel export for serving (TF Serving, `tf.saved_model.load`, other attack tools).

An export folder is only ever replaced when it is a SavedModel that tf_free
wrote: each export carries a marker, `assets.extra/tf_free_export.json`
(`assets.extra` is the SavedModel folder that libraries may add files to and
that neither TensorFlow nor TF Serving loads,
https://github.com/tensorflow/tensorflow/blob/master/tensorflow/python/saved_model/README.md).
`check_export_target` refuses anything else: a file, a folder with other
contents, the run folder or a folder that contains it.

A new export is written to `<parent>/.<name>.tf_free-staging`, completed by
the marker, and then swapped in with two renames (the old export goes to
`<parent>/.<name>.tf_free-old` for a moment). A kill at any point leaves
either the old or the new export at the target, or in one of those two
folders; `recover_export` (called by `export_saved_model` and
`load_logits_fn`) puts it back and removes the rest.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil

import keras
import tensorflow as tf
from absl import logging
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import saved_model_pb2

MARKER = os.path.join("assets.extra", "tf_free_export.json")
STAGING_SUFFIX = ".tf_free-staging"
OLD_SUFFIX = ".tf_free-old"


class ExportError(ValueError):
    """An export or a SavedModel that cannot be used; the message is one line."""


class ExportTargetError(ExportError):
    """An export folder that tf_free must not write to (it would delete something)."""


def staging_paths(export_dir: str) -> tuple[str, str]:
    """The staging and old folders of `export_dir`: `.<name>.tf_free-staging`, `-old`.

    Both sit beside the target (same file system, so the renames are atomic)
    and are named after it, so that the next export or load finds them.
    """
    target = _target(export_dir)
    parent, name = os.path.split(target)
    return (
        os.path.join(parent, f".{name}{STAGING_SUFFIX}"),
        os.path.join(parent, f".{name}{OLD_SUFFIX}"),
    )


def export_info(path: str) -> dict | None:
    """The marker of a tf_free export at `path` (a dict), or None if it is not one.

    The marker is written last, so a folder with a readable marker and a
    `saved_model.pb` is a complete export.
    """
    try:
        with open(os.path.join(path, MARKER)) as f:
            info = json.load(f)
    except FileNotFoundError:
        return _legacy_export_info(path)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != "tf_free export":
        return None
    if not os.path.isfile(os.path.join(path, tf.saved_model.SAVED_MODEL_FILENAME_PB)):
        return None
    return info


def _legacy_export_info(path: str) -> dict | None:
    """An export of tf_free 0.1, before the marker: recognised by its signatures.

    Exactly `serving_default` (uint8 `images` -> logits, probabilities) and
    `serve` (float32 `images`), and nothing else in the folder but what a
    SavedModel holds.
    """
    allowed = {"saved_model.pb", "fingerprint.pb", "variables", "assets"}
    try:
        if not set(os.listdir(path)) <= allowed:
            return None
        graph = saved_model_pb2.SavedModel()
        with open(os.path.join(path, tf.saved_model.SAVED_MODEL_FILENAME_PB), "rb") as f:
            graph.ParseFromString(f.read())
    except (OSError, DecodeError):
        return None
    if len(graph.meta_graphs) != 1:
        return None
    signatures = graph.meta_graphs[0].signature_def
    if set(signatures) - {"__saved_model_init_op"} != {"serving_default", "serve"}:
        return None
    default = signatures["serving_default"]
    if set(default.inputs) != {"images"} or set(default.outputs) != {"logits", "probabilities"}:
        return None
    if default.inputs["images"].dtype != tf.uint8.as_datatype_enum:
        return None
    return {"format": "tf_free export", "version": "0.1 (no marker)"}


def check_export_target(
    export_dir: str, model_dir: str | None = None, *, run_files: tuple[str, ...] = ()
) -> None:
    """Checks that exporting to `export_dir` cannot delete anything but an old export.

    Passes for a path that does not exist (nor need its parent), an empty
    folder, or a tf_free export (see `export_info`).

    Args:
      export_dir: the export target.
      model_dir: the training run's folder, if any: `export_dir` must not be
        it, contain it, or lie in one of its `run_files`.
      run_files: names in `model_dir` that belong to the run (e.g.
        "checkpoints", "logs"); a subfolder like `<model_dir>/export` is fine.

    Raises:
      ExportTargetError: with a one-line message saying what to do.
    """
    target = _target(export_dir)
    advice = "give a new or empty folder, or a previous tf_free export"
    if model_dir is not None:
        run = os.path.realpath(model_dir)
        default = os.path.join(model_dir, "export")
        if target == run:
            raise ExportTargetError(
                f"export_dir {export_dir} is the run folder (model_dir): exporting there "
                f"would delete the run; use e.g. {default}"
            )
        if os.path.commonpath([target, run]) == target:
            raise ExportTargetError(
                f"export_dir {export_dir} contains the run folder {model_dir}: exporting there "
                f"would delete it; use e.g. {default}"
            )
        for name in run_files:
            reserved = os.path.join(run, name)
            if os.path.commonpath([target, reserved]) == reserved:
                raise ExportTargetError(
                    f"export_dir {export_dir} is in the run's {name}: use e.g. {default}"
                )
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ExportTargetError(f"export_dir {export_dir} is a file: {advice}")
    if not os.path.exists(target):
        ancestor = os.path.dirname(target)
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            raise ExportTargetError(
                f"export_dir {export_dir} cannot be created: {ancestor} is a file; {advice}"
            )
        return
    if os.listdir(target) and export_info(target) is None:
        raise ExportTargetError(
            f"export_dir {export_dir} is a folder with other contents (not a tf_free export, "
            f"no {MARKER}): {advice}; tf_free only replaces its own exports"
        )


def recover_export(export_dir: str, *, missing_only: bool = False) -> str | None:
    """Finishes or undoes an export that was interrupted; returns what it did, or None.

    If the target is missing, a complete new export (marker present) in the
    staging folder is moved there; else the old export is moved back. Whatever
    is left in the staging and old folders is then removed. Safe to call again
    if it is itself interrupted. Logs one line if it did something.

    Args:
      export_dir: the export target.
      missing_only: only put back a missing export, and remove nothing while
        the target exists or nothing can be put back: a reader's setting, as
        another process may be writing the staging folder right now.
    """
    target = _target(export_dir)
    staging, old = staging_paths(export_dir)
    if not (os.path.lexists(staging) or os.path.lexists(old)):
        return None
    if os.path.lexists(target):
        if missing_only:
            return None
        done = f"removed the leftovers of an interrupted export beside {target}"
    elif os.path.isdir(staging) and export_info(staging) is not None:
        os.replace(staging, target)
        done = f"completed an interrupted export: moved {staging} to {target}"
    elif os.path.isdir(old):
        # The staging folder is unfinished: an export writes it in full before
        # moving the old one aside, so no live export is writing it now.
        os.replace(old, target)
        done = f"undid an interrupted export: moved the previous export {old} back to {target}"
    elif missing_only:
        return None
    else:
        done = f"removed an unfinished export beside {target}"
    for path in (staging, old):
        _remove(path)
    logging.warning("%s", done)
    return done


def remove_staging(export_dir: str) -> list[str]:
    """Removes `export_dir`'s staging and old folders (for --overwrite); returns them.

    Unlike `recover_export`, puts nothing back: with --overwrite the previous
    export goes too.
    """
    removed = [path for path in staging_paths(export_dir) if os.path.lexists(path)]
    for path in removed:
        _remove(path)
    if removed:
        logging.info("removed the leftovers of an interrupted export: %s", ", ".join(removed))
    return removed


def export_saved_model(
    model: keras.Model, export_dir: str, *, model_dir: str | None = None, verbose: bool = False
) -> str:
    """Writes `model` as a SavedModel with two endpoints, atomically.

    - `serving_default`: uint8 images [N, H, W, C] (0-255) -> {"logits",
      "probabilities"}, for TF Serving.
    - `serve`: float images [N, H, W, C] in [0, 1] -> logits, as
      `model.export` makes it; differentiable, so other tools can attack the
      exported model.

    Both endpoints check their input in the graph, the rank first, and fail
    with an InvalidArgumentError that names the expected and the received
    shape (and, for `serve`, the received value range, e.g. 0-255 floats),
    instead of an opaque error deep in the model or, worse, a silent wrong
    answer. An empty batch gives empty outputs ([0, num_classes]).

    The target is checked first (`check_export_target`): only a missing path,
    an empty folder or an earlier tf_free export is replaced. The SavedModel
    is written next to `export_dir`, marked complete, and renamed into place,
    so a kill never leaves a half-written SavedModel where a good one was
    (see `recover_export`). Folders and files follow the umask.

    Args:
      model: a Keras model mapping float images in [0, 1] to logits (for a
        `FreeAdversarialModel`, pass its `base_model`: δ is training state).
      export_dir: target folder.
      model_dir: the training run's folder, which `export_dir` must not be or
        contain.
      verbose: print the endpoints Keras exports.

    Returns:
      `export_dir`, absolute.

    Raises:
      ExportTargetError: `export_dir` is something else; nothing was written.
    """
    image_shape = tuple(model.input_shape[1:])
    if None in image_shape:
        raise ValueError(f"the model needs a fixed image shape to export, got {image_shape}")
    recover_export(export_dir)
    check_export_target(export_dir, model_dir)
    output = model.compute_output_spec(keras.KerasTensor((None, *image_shape)))
    archive = keras.export.ExportArchive()
    archive.track(model)
    uint8_expects = f"serving_default expects uint8 images of shape {_dims(image_shape)} (0-255)"
    float_expects = f"serve expects float32 images of shape {_dims(image_shape)} in [0, 1]"

    def logits_of(images):
        # An empty batch never reaches the model: TF 2.21's oneDNN convolution
        # fails on it ("input depth must be evenly divisible by filter depth");
        # the same tf.cond workaround as for cuDNN in
        # https://github.com/tensorflow/tensorflow/issues/14657. It keeps the
        # endpoint differentiable and its signature unchanged.
        empty = tf.zeros([0, *output.shape[1:]], output.dtype)
        return tf.cond(
            tf.shape(images)[0] > 0, lambda: model(images, training=False), lambda: empty
        )

    def serve_uint8(images):
        images = _checked(images, image_shape, uint8_expects)
        logits = logits_of(tf.cast(images, tf.float32) / 255.0)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    def serve_float(images):
        return logits_of(_checked(images, image_shape, float_expects, unit_range=True))

    # The first endpoint becomes `serving_default` (TF Serving's default).
    archive.add_endpoint(
        "serving_default",
        serve_uint8,
        input_signature=[tf.TensorSpec((None, *image_shape), tf.uint8, name="images")],
    )
    archive.add_endpoint(
        "serve",
        serve_float,
        input_signature=[tf.TensorSpec((None, *image_shape), tf.float32, name="images")],
    )
    target = _target(export_dir)
    staging, old = staging_paths(export_dir)
    # makedirs, not tempfile.mkdtemp: mkdtemp's mode 0700 hid the export from a
    # model server running as another user.
    os.makedirs(staging)
    try:
        archive.write_out(staging, verbose=verbose)
        _write_marker(staging, model, image_shape, output)
    except Exception:
        _remove(staging)
        raise
    # From here on, a kill (which runs no handler) leaves a state that the next
    # recover_export repairs; an error repairs it at once.
    try:
        if os.path.lexists(target):
            os.replace(target, old)
            os.replace(staging, target)
            _remove(old)
        else:
            os.replace(staging, target)
    except Exception:
        recover_export(export_dir)
        raise
    return os.path.abspath(export_dir)


def _target(export_dir: str) -> str:
    """The real absolute path of `export_dir`: a symlink's folder is replaced, not the link."""
    return os.path.realpath(os.fspath(export_dir))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _write_marker(staging: str, model, image_shape, output) -> None:
    """Writes the marker last, after syncing the SavedModel's files to disk.

    The sync makes "marker present" mean "SavedModel complete" after a power
    cut too, not only after a kill.
    """
    import tf_free  # here: tf_free/__init__.py does not import this module

    for root, _, files in os.walk(staging):
        for name in files:
            _fsync(os.path.join(root, name))
    path = os.path.join(staging, MARKER)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    info = {
        "format": "tf_free export",
        "tf_free_version": tf_free.__version__,
        "tensorflow_version": tf.__version__,
        "model": model.name,
        "image_shape": list(image_shape),
        "num_classes": int(output.shape[-1]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    for folder in (os.path.dirname(path), staging):
        _fsync(folder)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dims(shape, batch="N") -> str:
    """[N, 28, 28, 1] for the expected image shape; [4, ?, 28] for a received one."""
    dims = [batch] if batch else []
    return "[" + ", ".join(str(d) for d in dims + ["?" if d is None else d for d in shape]) + "]"


def _checked(images, image_shape, expects: str, unit_range: bool = False):
    """`images`, after in-graph checks of the shape (and of the range [0, 1]).

    The endpoints' TensorSpecs alone do not protect the signatures: with TF 2.21
    a restored `signatures[...]` function (the path TF Serving takes) rejects a
    wrong dtype but runs any shape, so an [N, H, W] batch went through `Flatten`
    unnoticed, and a wrong size failed deep in the model.
    """
    rank = len(image_shape) + 1
    shape = tf.shape(images)  # run-time shape: the static one is the spec's
    # The rank is counted from the run-time shape's values: `tf.size(shape)` and
    # `tf.rank(images)` become constants of the spec's static rank when traced
    # (`optimize=True` in size_internal/rank_internal,
    # https://github.com/tensorflow/tensorflow/blob/master/tensorflow/python/ops/array_ops.py),
    # and a signature runs any shape, so an [N, H, W, C, 1] batch passed the check.
    actual_rank = tf.reduce_sum(tf.cast(shape >= 0, tf.int32))
    # Padded with -1 so that the comparison is defined for inputs of any rank.
    dims = tf.concat([shape, tf.fill([rank], -1)], 0)[1:rank]
    shape_ok = tf.logical_and(
        tf.equal(actual_rank, rank), tf.reduce_all(tf.equal(dims, list(image_shape)))
    )
    got = tf.strings.reduce_join(tf.strings.as_string(shape), separator=", ")
    got = tf.strings.join([expects, "; got ", images.dtype.name, " [", got, "]"])
    checks = [tf.debugging.Assert(shape_ok, [got])]
    if unit_range:
        # After the shape check, so that a bad shape is reported as such.
        with tf.control_dependencies(checks):
            in_range = tf.reduce_all((images >= 0.0) & (images <= 1.0))  # False for NaN
            low, high = tf.reduce_min(images), tf.reduce_max(images)
            hint = tf.where(high > 1.0, " (0-255 pixels? divide by 255)", "")
            low, high = (tf.strings.as_string(v, shortest=True) for v in (low, high))
            got = tf.strings.join(["values in [", low, ", ", high, "]", hint])
            got = tf.where(tf.reduce_any(tf.math.is_nan(images)), "NaN values", got)
            got = tf.strings.join([expects, "; got ", got])
            checks.append(tf.debugging.Assert(in_range, [got]))
    # Without the control dependency, the model's ops could fail first with a less
    # clear error (https://www.tensorflow.org/api_docs/python/tf/control_dependencies).
    with tf.control_dependencies(checks):
        return tf.identity(images)  # the identity's gradient is 1: `serve` stays differentiable


def check_saved_model(saved_model_dir: str) -> None:
    """Checks that `saved_model_dir` holds a readable SavedModel, before TF loads it.

    Raises:
      ExportError: with a one-line message: no such folder, not a SavedModel
        (e.g. a checkpoint or run folder), or a truncated/corrupt saved_model.pb.
    """
    path = saved_model_dir
    if not os.path.exists(path):
        raise ExportError(f"no SavedModel at {path}: it does not exist")
    if not os.path.isdir(path):
        raise ExportError(f"{path} is a file, not a SavedModel folder")
    pb = os.path.join(path, tf.saved_model.SAVED_MODEL_FILENAME_PB)
    if not os.path.isfile(pb):
        if os.path.isfile(os.path.join(path, tf.saved_model.SAVED_MODEL_FILENAME_PBTXT)):
            return  # a text SavedModel: TF reads it
        names = os.listdir(path)
        run = os.path.dirname(os.path.abspath(path))
        if "config.json" in names:
            raise ExportError(
                f"{path} is a training run folder, not a SavedModel (no saved_model.pb): "
                f"evaluate the run with --model_dir={path}"
            )
        if "checkpoint" in names or any(n.endswith(".index") for n in names):
            if os.path.isfile(os.path.join(run, "config.json")):
                advice = f"evaluate its run with --model_dir={run}"
            else:
                advice = "evaluate a training run with --model_dir=<the run's folder>"
            raise ExportError(
                f"{path} is a checkpoint folder, not a SavedModel (no saved_model.pb): {advice}"
            )
        raise ExportError(
            f"{path} is not a SavedModel (no saved_model.pb): give a tf_free export, "
            "or evaluate a training run with --model_dir=<the run's folder>"
        )
    problem = None
    try:
        with open(pb, "rb") as f:
            proto = saved_model_pb2.SavedModel.FromString(f.read())
        if not proto.meta_graphs:
            problem = f"no MetaGraph in {os.path.getsize(pb)} bytes"
    except DecodeError as e:
        problem = str(e).rstrip(".")
    if problem:
        raise ExportError(
            f"cannot read the SavedModel at {path}: saved_model.pb is truncated or corrupt "
            f"({problem}); export it again"
        )


def load_logits_fn(saved_model_dir: str):
    """The exported float endpoint as a callable: images in [0, 1] -> logits.

    Takes float images of any float dtype (cast to float32); rejects other
    dtypes and wrong shapes with a ValueError naming the expected and the
    received dtype and shape. Values outside [0, 1] fail in the graph.

    An export that a kill left in its staging or old folder is first put
    back (`recover_export(..., missing_only=True)`: leftovers beside an
    export in place are left to the next export, which may be running now).

    Raises:
      ExportError: (a ValueError) with a one-line message if `saved_model_dir`
        is not a readable SavedModel with a `serve` endpoint.
    """
    recover_export(saved_model_dir, missing_only=True)
    check_saved_model(saved_model_dir)
    try:
        loaded = tf.saved_model.load(saved_model_dir)
    except Exception as e:  # e.g. IndexError "Read less bytes than requested": truncated variables
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"cannot read the SavedModel at {saved_model_dir}: a file is missing, truncated or "
            f"corrupt ({detail}); export it again"
        ) from e
    if not hasattr(loaded, "serve"):
        raise ExportError(f"{saved_model_dir} has no `serve` endpoint (not a tf_free export?)")
    # The endpoint's input signature fixes dtype and shape
    # (https://www.tensorflow.org/api_docs/python/tf/saved_model/save#signatures);
    # calling `serve` with anything else raises a TypeError that dumps the whole array.
    spec = loaded.serve.input_signature[0]
    expects = f"serve expects float images of shape {_dims(spec.shape[1:])} in [0, 1]"

    def logits_fn(images):
        images = tf.convert_to_tensor(images)
        if images.shape.rank is None:  # symbolic, in a tf.function: the graph checks it
            got = f"got {images.dtype.name} of unknown rank"
        else:
            got = f"got {images.dtype.name} {_dims(images.shape, batch=None)}"
        if not images.dtype.is_floating:
            hint = " (0-255 pixels? divide by 255)" if images.dtype.is_integer else ""
            raise ValueError(f"{expects}; {got}{hint}")
        if not spec.shape.is_compatible_with(images.shape):
            raise ValueError(f"{expects}; {got}")
        return loaded.serve(tf.cast(images, tf.float32))

    logits_fn.loaded = loaded  # keeps the SavedModel's variables alive
    return logits_fn
