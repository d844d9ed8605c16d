"""What several test files share: the repository, subprocess runs, tree digests, tiny models.

Imported as `from helpers import ...` (pytest puts tests/ on sys.path).
"""

import glob
import hashlib
import os
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf

# --- Subprocess runs of the command lines --------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tf_free is installed (editable) by scripts/setup.sh: no PYTHONPATH.
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
TINY = dict(
    dataset="fashion_mnist",
    method="free",
    m=2,
    epochs=2,
    batch_size=64,
    train_examples=512,
    eval_examples=128,
    eval_pgd_steps=3,
    eval_pgd_step_size=10.0,
    verbose=0,
)


def run_module(module, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tree_digest(folder):
    """Hash of every file's path and bytes under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        digest.update(path.encode())
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


# --- A tiny model and random batches, for in-process training tests ------------------

EPSILON = 0.1
LR, MOMENTUM = 0.05, 0.9
IMAGE_SHAPE = (8, 8, 1)


def make_base(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


def make_batches(sizes, seed=1):
    rng = np.random.default_rng(seed)
    return [
        (rng.uniform(size=(n, *IMAGE_SHAPE)).astype("float32"), rng.integers(0, 3, n))
        for n in sizes
    ]


def as_dataset(batches):
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    sizes = [len(b[1]) for b in batches]
    assert len(set(sizes[:-1])) <= 1, "only the last batch may be short"
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(sizes[0])


def compile_model(model, jit_compile=False):
    model.compile(
        optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def read_tensors(log_dir):
    """{tag: [(step, value)]} over the event files of one TensorBoard run folder, read
    with TensorBoard's own reader (TF2 writes scalars as tensors), file by file, so a
    point written twice shows twice."""
    from tensorboard.backend.event_processing import event_accumulator

    found = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        events = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
        events.Reload()
        for tag in events.Tags()["tensors"]:
            found.setdefault(tag, []).extend(
                (e.step, tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)
            )
    return found
