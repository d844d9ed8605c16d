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

    def serve_uint8(images):
        logits = model(tf.cast(images, tf.float32) / 255.0, training=False)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    # The first endpoint becomes `serving_default` (TF Serving's default).
    archive.add_endpoint(
        "serving_default",
        serve_uint8,
        input_signature=[tf.TensorSpec((None, *image_shape), tf.uint8, name="images")],
    )
    archive.add_endpoint(
        "serve",
        lambda images: model(images, training=False),
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


def load_logits_fn(saved_model_dir: str):
    """The exported float endpoint as a callable: images in [0, 1] -> logits."""
    loaded = tf.saved_model.load(saved_model_dir)
    if not hasattr(loaded, "serve"):
        raise ValueError(f"{saved_model_dir} has no `serve` endpoint (not a tf_free export?)")

    def logits_fn(images):
        return loaded.serve(tf.cast(images, tf.float32))

    logits_fn.loaded = loaded  # keeps the SavedModel's variables alive
    return logits_fn
