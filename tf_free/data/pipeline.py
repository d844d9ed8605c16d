"""The tf.data pipelines: batched (images, labels), images float32 in [0, 1].

`build_dataset` reads any dataset of the catalogue through TFDS (preparing it
first: Fashion-MNIST from the local files, others with TFDS's fail-fast
download) and shuffles, augments and batches it, seeded so that a resumed run
sees the batches an uninterrupted one would; `make_dataset` batches numpy
arrays (the route of `load_fashion_mnist`). Normalisation (mean/std) happens
inside the models; `dataset_info(name).mean` and `.std` give the values to
use there.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tf_free.data.catalogue import _prepare, check_available, dataset_info
from tf_free.data.fashion_mnist import prepare_fashion_mnist
from tf_free.data.preprocessing import (
    _check_padding,
    _resize,
    cifar_train_preprocess,
    imagenet_eval_preprocess,
    imagenet_train_preprocess,
    to_float,
)

# Shuffle buffer of undecoded JPEGs (~110 kB each, so ~1.1 GB of RAM).
IMAGENET_SHUFFLE_BUFFER = 10_000
# Small, fixed-size datasets: cache the decoded uint8 images after the first epoch.
_CACHED = {"mnist", "fashion_mnist", "cifar10", "cifar100"}


def _epoch_seed(seed: int, epoch: int) -> int:
    """A per-epoch seed; distinct for every (seed, epoch) with epoch < 1,000,003."""
    return seed * 1_000_003 + epoch


def build_dataset(
    name: str,
    split: str,
    *,
    batch_size: int,
    training: bool,
    data_dir: str | None = None,
    seed: int | None = 0,
    num_examples: int | None = None,
    drop_remainder: bool = False,
    image_size: int | None = None,
    epoch: int | None = None,
    skip: int = 0,
    crop_padding: int = 4,
) -> tf.data.Dataset:
    """A batched, prefetched tf.data.Dataset of (float32 images in [0, 1], int64 labels).

    Args:
      name: a first-class name (mnist, fashion_mnist, cifar10, cifar100,
        imagenet2012) or any TFDS image-classification dataset.
      split: TFDS split, e.g. "train", "test", "validation" (see `dataset_info`).
      batch_size: the GLOBAL batch size (a tf.distribute strategy splits it).
      training: shuffle (seeded) and augment: CIFAR zero-pad `crop_padding`,
        random crop + flip; ImageNet random-resized crop 224 + flip. Without it ImageNet is
        resize-256 + centre-crop 224; other datasets are only converted.
        MNIST-like and other datasets get no augmentation.
      data_dir: TFDS data dir (default: TFDS's, ~/tensorflow_datasets).
      seed: shuffling and augmentation seed; with a seed the pipeline is
        deterministic (same batches in the same order for a fresh dataset,
        different augmentation and order from one epoch to the next). Workers
        must share it. None: unseeded and non-deterministic (faster).
      num_examples: only the first N >= 1 examples of the split (in TFDS's
        stored order); None: all of them.
      drop_remainder: drop a last partial batch.
      image_size: output side; ImageNet: crop size (default 224); others: a
        bilinear resize (required for datasets of variable image size).
      epoch: training only: the dataset of this one epoch, its order and
        augmentation a function of (seed, epoch) alone, so a resumed run sees
        what an uninterrupted one would. None: every iteration reshuffles.
      skip: training only: leave out the first `skip` examples of that order
        (before decoding and augmentation), to resume within an epoch.
      crop_padding: pixels of zero padding per side before the random crop
        of CIFAR-style training augmentation (the crop offset is uniform
        over 0..2*crop_padding): 4 as locuslab/fast_adversarial, 2 as the
        paper's CIFAR code (see `pad_and_random_crop`). Unused otherwise.

    Raises:
      ValueError: unknown dataset, variable-size images without image_size,
        num_examples < 1, skip < 0 or crop_padding < 0.
      DataNotFoundError: ImageNet tars missing (see `check_available`).
      DataIntegrityError: corrupt local Fashion-MNIST files.
      DataError: TFDS could not download/prepare the dataset.
    """
    if num_examples is not None and (
        isinstance(num_examples, bool)
        or not isinstance(num_examples, (int, np.integer))
        or num_examples < 1
    ):
        raise ValueError(
            f"num_examples must be an integer >= 1 (None for the whole split), got {num_examples!r}"
        )
    if isinstance(skip, bool) or not isinstance(skip, (int, np.integer)) or skip < 0:
        raise ValueError(f"skip must be an integer >= 0, got {skip!r}")
    _check_padding(crop_padding)
    spec = dataset_info(name, data_dir)
    if spec.augmentation != "imagenet" and image_size is None and None in spec.image_shape:
        raise ValueError(
            f"{name!r} has images of variable size {spec.image_shape}: pass image_size"
        )
    check_available(name, data_dir)
    if name == "fashion_mnist":
        prepare_fashion_mnist(data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    _prepare(builder, name)

    deterministic = seed is not None
    reshuffle = epoch is None
    if epoch is not None and seed is not None:
        seed = _epoch_seed(seed, epoch)
    options = tf.data.Options()
    options.deterministic = deterministic
    if name in _CACHED:
        # Small single-file datasets: FILE auto-sharding fails with fewer files
        # than workers (tensorflow/tensorflow#36846); DATA sharding with the
        # same seeded shuffle on every worker gives disjoint shards.
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
    read_config = tfds.ReadConfig(
        shuffle_seed=seed,
        shuffle_reshuffle_each_iteration=reshuffle,
        try_autocache=False,  # we cache (decoded) ourselves where it pays
        options=options,
    )
    imagenet = spec.augmentation == "imagenet"
    ds = builder.as_dataset(
        split=split if num_examples is None else f"{split}[:{num_examples}]",
        shuffle_files=training,
        read_config=read_config,
        # Undecoded JPEG bytes: training decodes only the random crop
        # (https://www.tensorflow.org/datasets/decode#skipping_the_image_decoding).
        decoders={"image": tfds.decode.SkipDecoding()} if imagenet else None,
    )
    ds = ds.map(lambda ex: (ex["image"], ex["label"]), num_parallel_calls=tf.data.AUTOTUNE)
    if num_examples is not None:
        # tfds.testing.mock_data ignores split slicing ("train[:6]" gives all
        # mocked examples; seen with TFDS 4.9.10), so bound it here too.
        ds = ds.take(num_examples)
    if name in _CACHED:
        ds = ds.cache()

    if training:
        if imagenet:
            buffer = IMAGENET_SHUFFLE_BUFFER
        else:
            buffer = spec.num_train_examples if num_examples is None else num_examples
        ds = ds.shuffle(
            min(buffer or 10_000, 100_000), seed=seed, reshuffle_each_iteration=reshuffle
        )

    size = image_size or (224 if imagenet else None)
    if imagenet and training:
        fn = lambda image, seed_: imagenet_train_preprocess(image, seed_, size)  # noqa: E731
    elif imagenet:
        fn = lambda image, seed_: imagenet_eval_preprocess(image, size)  # noqa: E731
    elif spec.augmentation == "cifar" and training:
        fn = lambda image, seed_: _resize(  # noqa: E731
            cifar_train_preprocess(image, seed_, crop_padding), size
        )
    else:
        fn = lambda image, seed_: _resize(to_float(image), size)  # noqa: E731

    if training:
        # One stateless seed per example, fresh every epoch, reproducible: a
        # stateful random op inside a parallel map would hand out its random
        # numbers in thread order. `Dataset.random(rerandomize_each_iteration=True)`
        # draws new numbers each epoch from the same seed
        # (https://www.tensorflow.org/api_docs/python/tf/data/Dataset#random).
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=reshuffle).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).skip(skip)
        ds = ds.map(
            lambda example, s: (fn(example[0], s), example[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=deterministic,
        )
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    elif imagenet or image_size is not None or None in spec.image_shape:
        ds = ds.map(
            lambda image, label: (fn(image, None), label),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=deterministic,
        )
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    else:  # fixed-size, no augmentation: convert whole batches at once
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        ds = ds.map(
            lambda images, labels: (to_float(images), labels),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=deterministic,
        )
    ds = ds.prefetch(tf.data.AUTOTUNE)
    if imagenet:
        # JPEG decoding needs tf.data's autotuning on many-core hosts, which tf_free's loop
        # and evaluation otherwise turn off (evaluation.without_autotune): kept on here, it
        # may hold up the end of a pass by up to 60 s (scripts/fit_stall.py), a small part
        # of an ImageNet pass.
        tuned = tf.data.Options()
        tuned.autotune.enabled = True
        ds = ds.with_options(tuned)
    return ds


# --------------------------------------------------------------------------
# From numpy arrays
# --------------------------------------------------------------------------


def to_float_images(images, labels):
    """uint8 [0, 255] images to float32 [0, 1]; the model normalises inside."""
    return to_float(images), labels


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """A batched, prefetched tf.data pipeline of float images in [0, 1], from arrays."""
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(to_float_images, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
