"""Single-image preprocessing: conversion to [0, 1], CIFAR and ImageNet augmentation, resizing.

Each function works eagerly and inside tf.data. The random ones take a
stateless seed (a shape-[2] integer tensor), so an image's augmentation is a
function of its seed alone, whatever the thread order: CIFAR-style zero-pad,
random crop and flip (`cifar_train_preprocess`), ImageNet's random-resized
crop and flip (`imagenet_train_preprocess`, as torchvision's
RandomResizedCrop), and the evaluation geometry resize + centre crop
(`imagenet_eval_preprocess`, as torchvision's Resize(256) + CenterCrop(224)).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def to_float(image):
    """uint8 [0, 255] (or float in that range) to float32 [0, 1]."""
    return tf.cast(image, tf.float32) / 255.0


def _split_seed(seed):
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    return seeds[0], seeds[1]


def _check_padding(padding) -> None:
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise ValueError(f"crop_padding must be an integer >= 0 (pixels per side), got {padding!r}")


def pad_and_random_crop(image, seed, padding: int = 4):
    """Zero-pads `padding` pixels on each side, then crops back to the input size.

    The crop's offset is uniform over 0..2*padding in each axis. The paper's
    CIFAR code pads 2 (ashafahi/free_adv_train, cifar10_input.py, lines
    107-108: `tf.image.resize_image_with_crop_or_pad(img, self.image_size + 4,
    self.image_size + 4)`, 32 -> 36, as in Madry et al.'s cifar10_challenge);
    locuslab/fast_adversarial (CIFAR10/utils.py, line 24:
    `transforms.RandomCrop(32, padding=4)`) and most PyTorch CIFAR code pad 4.

    Raises:
      ValueError: `padding` is not an integer >= 0.
    """
    _check_padding(padding)
    image = tf.convert_to_tensor(image)
    size = image.shape if image.shape.is_fully_defined() else tf.shape(image)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    return tf.image.stateless_random_crop(padded, size, seed=seed)


def random_flip(image, seed):
    """Mirrors left-right with probability 1/2."""
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def cifar_train_preprocess(image, seed, crop_padding: int = 4):
    """uint8 [32, 32, C] -> float32 [0, 1]: zero-pad `crop_padding`, random crop 32, random flip.

    `crop_padding=2` is the paper's CIFAR code, 4 the PyTorch convention
    (see `pad_and_random_crop`).

    Raises:
      ValueError: `crop_padding` is not an integer >= 0.
    """
    crop_seed, flip_seed = _split_seed(seed)
    cropped = pad_and_random_crop(image, crop_seed, crop_padding)
    return to_float(random_flip(cropped, flip_seed))


def random_resized_crop_window(
    image_shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), max_attempts: int = 10
):
    """A random [offset_y, offset_x, height, width] window, as RandomResizedCrop.

    Area a fraction `scale` of the image, aspect ratio width/height in `ratio`;
    10 attempts as torchvision. If none fits, TF returns the whole image
    (torchvision would take a centre crop with a clamped ratio).
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        # The default min_object_covered=0.1 would forbid crops of 8-10% area
        # (https://www.tensorflow.org/api_docs/python/tf/image/stateless_sample_distorted_bounding_box).
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def imagenet_train_preprocess(image_bytes, seed, image_size: int = 224):
    """JPEG bytes -> float32 [image_size, image_size, 3] in [0, 1].

    Random-resized crop (scale (0.08, 1), ratio (3/4, 4/3)), decoding only the
    crop (`decode_and_crop_jpeg`), bilinear resize with antialiasing (as PIL),
    random horizontal flip. TFDS's imagenet2012 re-encodes its few PNG/CMYK
    images as RGB JPEG when preparing, so every stored image is a JPEG.
    """
    crop_seed, flip_seed = _split_seed(seed)
    window = random_resized_crop_window(tf.io.extract_jpeg_shape(image_bytes), crop_seed)
    image = tf.image.decode_and_crop_jpeg(
        image_bytes, window, channels=3, dct_method="INTEGER_ACCURATE"
    )
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    image = random_flip(image, flip_seed)
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)


def resize_shorter_and_center_crop(image, image_size: int = 224, resize_size: int = 256):
    """Resizes the shorter side to `resize_size`, then centre-crops `image_size`.

    Same geometry as torchvision's Resize(256) + CenterCrop(224): the longer
    side becomes int(resize_size * long / short) (truncated) and the crop
    offset is round((size - crop) / 2) with round-half-to-even (Python's
    `round`, and `tf.round`); see torchvision/transforms/functional.py
    (`_compute_resized_output_size`, `center_crop`) at
    https://github.com/pytorch/vision. Bilinear with antialiasing (as PIL).
    Returns float32 in the input's value range (not rounded to integers).
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    new_long = (resize_size * long) // short
    new_h = tf.where(h <= w, resize_size, new_long)
    new_w = tf.where(h <= w, new_long, resize_size)
    image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
    top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2.0), tf.int32)
    image = image[top : top + image_size, left : left + image_size]
    return tf.ensure_shape(image, [image_size, image_size, image.shape[-1]])


def imagenet_eval_preprocess(image_bytes, image_size: int = 224):
    """JPEG bytes -> float32 [image_size, image_size, 3] in [0, 1]: resize 256, centre crop 224.

    For another `image_size` the resize keeps the 256/224 ratio.
    """
    image = tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE")
    resize_size = int(round(image_size * 256 / 224))
    image = resize_shorter_and_center_crop(image, image_size, resize_size)
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)


def _resize(image, image_size: int | None):
    if image_size is None:
        return image
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return tf.clip_by_value(image, 0.0, 1.0)
