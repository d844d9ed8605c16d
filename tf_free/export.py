"""SavedModel export for serving (TF Serving, `tf.saved_model.load`, other attack tools)."""

from __future__ import annotations

import os
import shutil
import tempfile

import keras
import tensorflow as tf


def export_saved_model(model: keras.Model, export_dir: str, *, verbose: bool = False) -> str:
    """Writes `model` as a SavedModel with two endpoints, atomically.

    - `serving_default`: uint8 images [N, H, W, C] (0-255) -> {"logits",
      "probabilities"}, for TF Serving.
    - `serve`: float images [N, H, W, C] in [0, 1] -> logits, as
      `model.export` makes it; differentiable, so other tools can attack the
      exported model.

    Both endpoints check their input in the graph and fail with an
    InvalidArgumentError that names the expected and the received shape (and,
    for `serve`, the received value range, e.g. 0-255 floats), instead of
    an opaque error deep in the model or, worse, a silent wrong answer.

    The SavedModel is written next to `export_dir` and renamed into place, so
    a crash never leaves a half-written SavedModel where a good one was.

    Args:
      model: a Keras model mapping float images in [0, 1] to logits (for a
        `FreeAdversarialModel`, pass its `base_model`: δ is training state).
      export_dir: target folder; replaced if it exists.
      verbose: print the endpoints Keras exports.

    Returns:
      `export_dir`.
    """
    image_shape = tuple(model.input_shape[1:])
    if None in image_shape:
        raise ValueError(f"the model needs a fixed image shape to export, got {image_shape}")
    archive = keras.export.ExportArchive()
    archive.track(model)
    uint8_expects = f"serving_default expects uint8 images of shape {_dims(image_shape)} (0-255)"
    float_expects = f"serve expects float32 images of shape {_dims(image_shape)} in [0, 1]"

    def serve_uint8(images):
        images = _checked(images, image_shape, uint8_expects)
        logits = model(tf.cast(images, tf.float32) / 255.0, training=False)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    def serve_float(images):
        images = _checked(images, image_shape, float_expects, unit_range=True)
        return model(images, training=False)

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
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        archive.write_out(staging, verbose=verbose)
        if os.path.exists(export_dir):
            retired = tempfile.mkdtemp(prefix=".export-old-", dir=parent)
            os.rename(export_dir, os.path.join(retired, "old"))
            os.rename(staging, export_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, export_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return export_dir


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
    # Padded with -1 so that the comparison is defined for inputs of any rank.
    dims = tf.concat([shape, tf.fill([rank], -1)], 0)[1:rank]
    shape_ok = tf.logical_and(
        tf.equal(tf.size(shape), rank), tf.reduce_all(tf.equal(dims, list(image_shape)))
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


def load_logits_fn(saved_model_dir: str):
    """The exported float endpoint as a callable: images in [0, 1] -> logits.

    Takes float images of any float dtype (cast to float32); rejects other
    dtypes and wrong shapes with a ValueError naming the expected and the
    received dtype and shape. Values outside [0, 1] fail in the graph.
    """
    loaded = tf.saved_model.load(saved_model_dir)
    if not hasattr(loaded, "serve"):
        raise ValueError(f"{saved_model_dir} has no `serve` endpoint (not a tf_free export?)")
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
