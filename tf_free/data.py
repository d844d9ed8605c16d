"""Input pipelines.

Fashion-MNIST works offline from Debian's `dataset-fashion-mnist`, which
installs the original IDX files. Debian recompressed the .gz files, so their
bytes (and TFDS's registered checksums) differ from the upstream downloads;
we verify the decompressed IDX payloads instead, against the MD5 sums that
upstream loaders publish for them.
"""

from __future__ import annotations

import gzip
import hashlib
import os

import numpy as np
import tensorflow as tf

FASHION_MNIST_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")

# MD5 of the decompressed IDX files (as published by torchvision-style loaders
# for Zalando's Fashion-MNIST).
FASHION_MNIST_FILES = {
    "train": (
        ("train-images-idx3-ubyte", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        ("train-labels-idx1-ubyte", "9018921c3c673c538a1fc5bad174d6f9"),
    ),
    "test": (
        ("t10k-images-idx3-ubyte", "8181f5470baa50b63fa0f6fddb340f0a"),
        ("t10k-labels-idx1-ubyte", "15d484375f8d13e6eb1aabb0c3f46965"),
    ),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DataIntegrityError(RuntimeError):
    """A data file is missing, truncated or not the expected content."""


def _read_idx(path: str, expected_md5: str) -> np.ndarray:
    """Reads an IDX file (optionally .gz) after checking its decompressed MD5."""
    candidates = [path, path + ".gz"]
    found = next((p for p in candidates if os.path.exists(p)), None)
    if found is None:
        raise DataIntegrityError(
            f"{path}[.gz] not found. Install Debian's Fashion-MNIST "
            "(apt-get install dataset-fashion-mnist) or set FASHION_MNIST_DIR."
        )
    opener = gzip.open if found.endswith(".gz") else open
    try:
        with opener(found, "rb") as f:
            payload = f.read()
    except (OSError, EOFError) as e:
        raise DataIntegrityError(f"{found} is unreadable or truncated: {e}") from e
    md5 = hashlib.md5(payload).hexdigest()
    if md5 != expected_md5:
        raise DataIntegrityError(
            f"{found}: decompressed MD5 is {md5}, expected {expected_md5} "
            "(corrupt or not the original Fashion-MNIST file)"
        )
    # IDX header: two zero bytes, dtype code 0x08 (uint8), rank, then sizes.
    rank = payload[3]
    shape = np.frombuffer(payload, ">u4", count=rank, offset=4).astype(int)
    return np.frombuffer(payload, np.uint8, offset=4 + 4 * rank).reshape(shape)


def load_fashion_mnist(split: str, data_dir: str | None = None):
    """Fashion-MNIST from the local IDX files, integrity-checked.

    Args:
      split: "train" (60,000 images) or "test" (10,000 images).
      data_dir: folder with the IDX files (default: Debian's location, or
        $FASHION_MNIST_DIR).

    Returns:
      (images, labels): uint8 [N, 28, 28, 1] and int64 [N].

    Raises:
      DataIntegrityError: a file is missing or its content is not the original.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    data_dir = data_dir or FASHION_MNIST_DIR
    (images_name, images_md5), (labels_name, labels_md5) = FASHION_MNIST_FILES[split]
    images = _read_idx(os.path.join(data_dir, images_name), images_md5)
    labels = _read_idx(os.path.join(data_dir, labels_name), labels_md5)
    return images[..., None], labels.astype(np.int64)


def to_float_images(images, labels):
    """uint8 [0, 255] images to float32 [0, 1]; the model normalises inside."""
    return tf.cast(images, tf.float32) / 255.0, labels


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """A batched, prefetched tf.data pipeline of float images in [0, 1]."""
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(to_float_images, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
