"""Input pipelines: preprocessing numbers, mocked CIFAR/ImageNet, real offline Fashion-MNIST."""

import dataclasses
import io
import logging
import os
import shutil
import socket
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader as tfds_downloader
from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

from tf_free import data
from tf_free.data import catalogue, fashion_mnist

SEEDS = [[0, s] for s in range(40)]


def _collect(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def _gradient_image(h, w):
    y, x = np.mgrid[0:h, 0:w]
    img = [255 * x / (w - 1), 255 * y / (h - 1), 127 + 100 * np.sin(x / 9) * np.cos(y / 13)]
    return np.round(np.stack(img, -1)).astype(np.uint8)


def _in_tf_data(fn, *args):
    """fn(*args[i]) for each i, run inside a parallel tf.data map."""
    ds = tf.data.Dataset.from_tensor_slices(args).map(fn, num_parallel_calls=4)
    return [x.numpy() for x in ds]


# ---------------------------------------------------------------- descriptions


def test_dataset_info_first_class_and_from_tfds_builder():
    cifar = data.dataset_info("cifar10")
    assert (cifar.image_shape, cifar.num_classes, cifar.num_train_examples) == (
        (32, 32, 3),
        10,
        50_000,
    )
    assert cifar.mean == (0.4914, 0.4822, 0.4465) and cifar.std == (0.2470, 0.2435, 0.2616)
    assert (cifar.train_split, cifar.eval_split, cifar.augmentation) == ("train", "test", "cifar")
    assert data.dataset_info("cifar100").num_classes == 100
    imagenet = data.dataset_info("imagenet2012")
    assert imagenet.image_shape == (224, 224, 3) and imagenet.num_classes == 1000
    assert imagenet.eval_split == "validation" and imagenet.num_train_examples == 1_281_167
    assert imagenet.mean == (0.485, 0.456, 0.406) and imagenet.std == (0.229, 0.224, 0.225)
    for name in ("mnist", "fashion_mnist"):
        spec = data.dataset_info(name)
        assert (spec.image_shape, spec.num_classes, spec.mean, spec.std) == (
            (28, 28, 1),
            10,
            None,
            None,
        )
        assert spec.num_train_examples == 60_000 and spec.augmentation == "none"
    svhn = data.dataset_info("svhn_cropped")  # any other TFDS image classifier
    assert (svhn.image_shape, svhn.num_classes, svhn.augmentation) == ((32, 32, 3), 10, "none")
    pets = data.dataset_info("oxford_iiit_pet")  # variable size, extra features
    assert (pets.image_shape, pets.num_classes) == ((None, None, 3), 37)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cifar.num_classes = 3


def test_unknown_or_non_image_classification_names_raise_value_error():
    with pytest.raises(
        ValueError, match="unknown dataset 'no_such_dataset'.*cifar10.*imagenet2012"
    ):
        data.dataset_info("no_such_dataset")
    with pytest.raises(ValueError, match="not an image-classification dataset.*fashion_mnist"):
        data.dataset_info("glue/cola")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build_dataset("no_such_dataset", "train", batch_size=8, training=True)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.check_available("no_such_dataset")


def test_missing_imagenet_tar_names_the_exact_path(tmp_path):
    manual = tmp_path / "downloads" / "manual"
    train, val = (str(manual / f) for f in data.IMAGENET_MANUAL_FILES)
    with pytest.raises(data.DataNotFoundError) as err:
        data.check_available("imagenet2012", str(tmp_path))
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    assert "\n" not in message and train in message and val in message
    manual.mkdir(parents=True)
    (manual / "ILSVRC2012_img_train.tar").write_bytes(b"\0" * 512)
    with pytest.raises(data.DataNotFoundError) as err:
        # build_dataset runs the same check before any other work.
        data.build_dataset(
            "imagenet2012", "train", batch_size=8, training=True, data_dir=str(tmp_path)
        )
    assert val in str(err.value) and train not in str(err.value)
    (manual / "ILSVRC2012_img_val.tar").write_bytes(b"")  # an empty file is not a download
    with pytest.raises(data.DataNotFoundError, match="ILSVRC2012_img_val.tar"):
        data.check_available("imagenet2012", str(tmp_path))
    (manual / "ILSVRC2012_img_val.tar").write_bytes(b"\0" * 512)
    assert data.check_available("imagenet2012", str(tmp_path)) == "local files"


def test_variable_size_dataset_needs_image_size(tmp_path):
    with pytest.raises(ValueError, match="variable size.*image_size"):
        data.build_dataset(
            "oxford_iiit_pet", "train", batch_size=4, training=False, data_dir=str(tmp_path)
        )


# -------------------------------------------------------------- preprocessing


def test_pad_and_random_crop_is_a_window_of_the_zero_padded_image():
    image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    eager = [data.pad_and_random_crop(image, s).numpy() for s in SEEDS]
    in_data = _in_tf_data(lambda s: data.pad_and_random_crop(image, s), SEEDS)
    offsets = set()
    for out, other in zip(eager, in_data, strict=True):
        np.testing.assert_array_equal(out, other)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        matches = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if np.array_equal(out, padded[dy : dy + 32, dx : dx + 32])
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) >= 20  # 81 possible offsets, 40 draws


def _coordinate_image(size=32):
    """Red = row + 1, green = column + 1, blue = 200: every pixel non-zero and unique."""
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([y + 1, x + 1, np.full_like(y, 200)], -1).astype(np.uint8)


def _crop_offset(out, image, padding):
    """(dy, dx) such that out == zero_pad(image, padding)[dy:dy+32, dx:dx+32]; asserts it."""
    dy = int(out[16, 16, 0]) - 1 - 16 + padding
    dx = int(out[16, 16, 1]) - 1 - 16 + padding
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    np.testing.assert_array_equal(out, padded[dy : dy + 32, dx : dx + 32])
    return dy, dx


@pytest.mark.parametrize("padding", [0, 1, 2, 4])
def test_pad_and_random_crop_offsets_range_exactly_over_0_to_2p(padding):
    image = _coordinate_image()
    seeds = [[5, s] for s in range(1500)]  # 81 offsets for p=4: all drawn
    outs = _in_tf_data(lambda s: data.pad_and_random_crop(image, s, padding), seeds)
    offsets = {_crop_offset(out, image, padding) for out in outs}
    assert offsets == {(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)}


def test_cifar_train_preprocess_crop_padding_sets_the_offset_range():
    image = _coordinate_image()
    seeds = [[6, s] for s in range(600)]
    outs = _in_tf_data(lambda s: data.cifar_train_preprocess(image, s, crop_padding=2), seeds)
    offsets, flips = set(), 0
    for out in outs:
        out = np.round(out * 255).astype(np.uint8)
        flipped = out[16, 16, 1] > out[16, 17, 1]  # green (column) falls left to right
        flips += flipped
        offsets.add(_crop_offset(out[:, ::-1] if flipped else out, image, 2))
    assert offsets == {(dy, dx) for dy in range(5) for dx in range(5)}
    assert 250 <= flips <= 350
    default = _in_tf_data(lambda s: data.cifar_train_preprocess(image, s), seeds[:10])
    again = _in_tf_data(lambda s: data.cifar_train_preprocess(image, s, crop_padding=4), seeds[:10])
    np.testing.assert_array_equal(default, again)  # the default is 4


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2", None])
def test_negative_or_non_integer_crop_padding_is_a_value_error(bad, tmp_path):
    message = f"crop_padding must be an integer >= 0 (pixels per side), got {bad!r}"
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError) as err:
        data.pad_and_random_crop(image, [0, 0], bad)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        data.cifar_train_preprocess(image, [0, 0], crop_padding=bad)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:  # before any TFDS work: nothing is created
        data.build_dataset(
            "cifar10",
            "train",
            batch_size=4,
            training=True,
            data_dir=str(tmp_path),
            crop_padding=bad,
        )
    assert str(err.value) == message
    assert os.listdir(tmp_path) == []


def test_random_flip_is_a_true_mirror():
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mirror = image[:, ::-1]
    eager = [data.random_flip(image, s).numpy() for s in SEEDS]
    in_data = _in_tf_data(lambda s: data.random_flip(image, s), SEEDS)
    flipped = []
    for out, other in zip(eager, in_data, strict=True):
        np.testing.assert_array_equal(out, other)
        assert np.array_equal(out, image) != np.array_equal(out, mirror)
        flipped.append(np.array_equal(out, mirror))
    assert 10 <= sum(flipped) <= 30  # about half


def test_cifar_train_preprocess_eager_equals_tf_data():
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    eager = [data.cifar_train_preprocess(image, s).numpy() for s in SEEDS[:10]]
    in_data = _in_tf_data(lambda s: data.cifar_train_preprocess(image, s), SEEDS[:10])
    for out, other in zip(eager, in_data, strict=True):
        np.testing.assert_array_equal(out, other)
        assert out.dtype == np.float32 and out.shape == (32, 32, 3)
        assert 0.0 <= out.min() and out.max() <= 1.0
    assert not np.array_equal(eager[0], eager[1])


def test_random_resized_crop_window_respects_scale_and_ratio():
    h, w = 300, 400
    windows = np.array(
        [data.random_resized_crop_window([h, w, 3], [7, i]).numpy() for i in range(200)]
    )
    y, x, ch, cw = windows.T
    assert (y >= 0).all() and (x >= 0).all() and (y + ch <= h).all() and (x + cw <= w).all()
    area = ch * cw / (h * w)
    ratio = cw / ch
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    assert ratio.min() >= 0.75 - 0.02 and ratio.max() <= 4 / 3 + 0.02
    assert area.min() < 0.2 and area.max() > 0.8  # the whole range is used
    assert len({tuple(v) for v in windows}) > 190


def test_imagenet_train_preprocess_crops_resizes_flips():
    image = _gradient_image(300, 400)
    # No chroma subsampling, so that decoding a crop equals cropping the decoded image.
    jpeg = tf.io.encode_jpeg(image, quality=100, chroma_downsampling=False)
    full = tf.io.decode_jpeg(jpeg, channels=3, dct_method="INTEGER_ACCURATE").numpy()
    eager = [data.imagenet_train_preprocess(jpeg, s).numpy() for s in SEEDS[:12]]
    in_data = _in_tf_data(lambda s: data.imagenet_train_preprocess(jpeg, s), SEEDS[:12])
    flips = 0
    for seed, out, other in zip(SEEDS[:12], eager, in_data, strict=True):
        np.testing.assert_array_equal(out, other)
        assert out.shape == (224, 224, 3) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        # Independent path: decode everything, slice the window, resize, flip.
        crop_seed, flip_seed = tf.random.experimental.stateless_split(
            tf.constant(seed, tf.int64), 2
        )
        y, x, h, w = data.random_resized_crop_window([300, 400, 3], crop_seed).numpy()
        ref = tf.image.resize(full[y : y + h, x : x + w], [224, 224], antialias=True).numpy() / 255
        # Red rises left to right: a flipped crop has it falling.
        flipped = out[:, 0, 0].mean() > out[:, -1, 0].mean()
        flips += flipped
        ref = ref[:, ::-1] if flipped else ref
        assert np.abs(out - ref).max() <= 1e-5
    assert 0 < flips < 12


def _bilinear_numpy(image, new_h, new_w):
    """Half-pixel-centre bilinear resize (upscaling: no antialias filter)."""
    h, w = image.shape[:2]
    ys = np.clip((np.arange(new_h) + 0.5) * h / new_h - 0.5, 0, h - 1)
    xs = np.clip((np.arange(new_w) + 0.5) * w / new_w - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


@pytest.mark.parametrize("shape", [(150, 200), (200, 150), (100, 100)])
def test_resize_shorter_and_center_crop_exact_geometry(shape):
    image = np.random.default_rng(3).uniform(0, 255, (*shape, 3)).astype(np.float32)
    h, w = shape
    new_h, new_w = (256, 256 * w // h) if h <= w else (256 * h // w, 256)
    top, left = round((new_h - 224) / 2), round((new_w - 224) / 2)  # 150x200: 256x341, left 58
    expected = _bilinear_numpy(image.astype(np.float64), new_h, new_w)[
        top : top + 224, left : left + 224
    ]
    ours = data.resize_shorter_and_center_crop(image).numpy()
    in_data = _in_tf_data(data.resize_shorter_and_center_crop, image[None])[0]
    np.testing.assert_array_equal(ours, in_data)
    np.testing.assert_allclose(ours, expected, atol=1e-2)  # float32 kernel weights


@pytest.mark.parametrize("shape", [(300, 400), (517, 600), (256, 256)])
def test_imagenet_eval_matches_pil_resize_256_center_crop_224(shape):
    pil = pytest.importorskip("PIL.Image")
    jpeg = tf.io.encode_jpeg(_gradient_image(*shape), quality=100).numpy()
    ours = data.imagenet_eval_preprocess(jpeg).numpy()
    again = _in_tf_data(data.imagenet_eval_preprocess, [jpeg])[0]
    np.testing.assert_array_equal(ours, again)
    # The reference code's torchvision Resize(256) + CenterCrop(224) on PIL.
    im = pil.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = im.size
    size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    ref = np.asarray(im.resize(size, pil.BILINEAR), np.float32) / 255
    top, left = int(round((size[1] - 224) / 2.0)), int(round((size[0] - 224) / 2.0))
    ref = ref[top : top + 224, left : left + 224]
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1.5 / 255  # PIL rounds to uint8
    assert np.abs(ours - ref).mean() <= 0.4 / 255


# ----------------------------------------------------- mocked TFDS pipelines


def _is_augmented_version(out, originals, padding=4):
    """out == flip?(crop(zero_pad(o, padding))) for some original o."""
    for o in originals:
        padded = np.pad(o, ((padding, padding), (padding, padding), (0, 0)))
        for dy in range(2 * padding + 1):
            for dx in range(2 * padding + 1):
                window = padded[dy : dy + 32, dx : dx + 32]
                if np.array_equal(out, window) or np.array_equal(out, window[:, ::-1]):
                    return True
    return False


def test_cifar10_pipeline_on_mock_data(tmp_path):
    kw = dict(batch_size=4, data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=12):
        train = data.build_dataset("cifar10", "train", training=True, **kw)
        x1, y1 = _collect(train)
        x2, y2 = _collect(train)  # second epoch
        x_again, y_again = _collect(data.build_dataset("cifar10", "train", training=True, **kw))
        x_other, _ = _collect(data.build_dataset("cifar10", "train", training=True, seed=1, **kw))
        evaluation = data.build_dataset("cifar10", "test", training=False, **kw)
        e1, ey1 = _collect(evaluation)
        e2, ey2 = _collect(evaluation)
        sizes = [int(x.shape[0]) for x, _ in train]
        short = data.build_dataset("cifar10", "train", training=True, num_examples=6, **kw)
        dropped = data.build_dataset(
            "cifar10", "train", training=True, num_examples=6, drop_remainder=True, **kw
        )
        assert [int(x.shape[0]) for x, _ in short] == [4, 2]
        assert [int(x.shape[0]) for x, _ in dropped] == [4]
    assert sizes == [4, 4, 4]
    assert x1.shape == (12, 32, 32, 3) and x1.dtype == np.float32 and y1.dtype == np.int64
    assert x1.min() >= 0.0 and x1.max() <= 1.0 and ((0 <= y1) & (y1 < 10)).all()
    # Seeded: a fresh pipeline repeats epoch 1 exactly; another seed does not.
    np.testing.assert_array_equal(x1, x_again)
    np.testing.assert_array_equal(y1, y_again)
    assert not np.array_equal(x1, x_other)
    # Evaluation: deterministic, the raw images / 255, nothing augmented.
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(ey1, ey2)
    assert np.all(np.round(e1 * 255) == e1 * np.float32(255))
    raw = np.round(e1 * 255).astype(np.uint8)
    # Training images are pad-crop-flips of the raw ones, with new draws each epoch.
    assert sorted(y1.tolist()) == sorted(ey1.tolist()) == sorted(y2.tolist())
    for out in np.concatenate([x1, x2]):
        assert _is_augmented_version(np.round(out * 255).astype(np.uint8), raw)
    unchanged = sum(any(np.array_equal(a, b) for b in x1) for a in x2)
    assert unchanged <= 3


def test_cifar10_pipeline_honours_crop_padding_on_mock_data(tmp_path):
    kw = dict(batch_size=4, data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=12):
        raw, _ = _collect(data.build_dataset("cifar10", "train", training=False, **kw))
        raw = np.round(raw * 255).astype(np.uint8)
        train = data.build_dataset("cifar10", "train", training=True, crop_padding=2, **kw)
        pad2 = np.concatenate([_collect(train)[0], _collect(train)[0]])  # two epochs
        pad0, _ = _collect(
            data.build_dataset("cifar10", "train", training=True, crop_padding=0, **kw)
        )
        one, _ = _collect(
            data.build_dataset("cifar10", "train", training=True, num_examples=1, **kw)
        )
    pad2 = np.round(pad2 * 255).astype(np.uint8)
    pad0 = np.round(pad0 * 255).astype(np.uint8)
    # 24 crops with padding 4 would almost never all be windows of the 2-padded images.
    assert all(_is_augmented_version(out, raw, padding=2) for out in pad2)
    assert not all(_is_augmented_version(out, raw, padding=0) for out in pad2)
    # No padding: the images themselves, some mirrored.
    assert all(
        any(np.array_equal(out, r) or np.array_equal(out, r[:, ::-1]) for r in raw) for out in pad0
    )
    assert one.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "10"])
def test_num_examples_below_one_is_a_value_error_not_all(bad, tmp_path):
    with pytest.raises(ValueError) as err:
        data.build_dataset(
            "cifar10",
            "test",
            batch_size=4,
            training=False,
            data_dir=str(tmp_path),
            num_examples=bad,
        )
    assert str(err.value) == (
        f"num_examples must be an integer >= 1 (None for the whole split), got {bad!r}"
    )
    with pytest.raises(ValueError) as err:
        data.build_dataset(
            "cifar10", "train", batch_size=4, training=True, data_dir=str(tmp_path), skip=-1
        )
    assert str(err.value) == "skip must be an integer >= 0, got -1"
    assert os.listdir(tmp_path) == []


def test_imagenet_pipeline_on_mock_data(tmp_path):
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    for name in data.IMAGENET_MANUAL_FILES:
        (manual / name).write_bytes(b"\0" * 512)  # presence is all the pre-flight checks
    kw = dict(batch_size=4, data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=8):  # random-size random JPEGs
        train = data.build_dataset("imagenet2012", "train", training=True, **kw)
        x1, y1 = _collect(train)
        x2, _ = _collect(train)
        x_again, y_again = _collect(
            data.build_dataset("imagenet2012", "train", training=True, **kw)
        )
        evaluation = data.build_dataset("imagenet2012", "validation", training=False, **kw)
        e1, ey1 = _collect(evaluation)
        e2, _ = _collect(evaluation)
        small = data.build_dataset(
            "imagenet2012", "validation", training=False, image_size=128, num_examples=5, **kw
        )
        s, _ = _collect(small)
        assert [int(x.shape[0]) for x, _ in small] == [4, 1]
    assert x1.shape == (8, 224, 224, 3) and x1.dtype == np.float32 and y1.dtype == np.int64
    assert x1.min() >= 0.0 and x1.max() <= 1.0 and ((0 <= y1) & (y1 < 1000)).all()
    assert e1.shape == (8, 224, 224, 3) and e1.min() >= 0.0 and e1.max() <= 1.0
    assert s.shape == (5, 128, 128, 3)
    np.testing.assert_array_equal(x1, x_again)
    np.testing.assert_array_equal(y1, y_again)
    np.testing.assert_array_equal(e1, e2)
    assert not any(np.array_equal(a, b) for a in x2 for b in x1)  # new crops every epoch
    # The decoding keeps tf.data's autotuning (the loop turns it off for the other datasets).
    assert train.options().autotune.enabled is True
    assert evaluation.options().autotune.enabled is True
    assert sorted(y1.tolist()) == sorted(ey1.tolist())


def test_other_tfds_dataset_on_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        x, y = _collect(
            data.build_dataset(
                "svhn_cropped", "train", batch_size=4, training=True, data_dir=str(tmp_path)
            )
        )
        pets, _ = _collect(
            data.build_dataset(
                "oxford_iiit_pet",
                "train",
                batch_size=3,
                training=False,
                image_size=64,
                data_dir=str(tmp_path),
            )
        )
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert y.dtype == np.int64 and ((0 <= y) & (y < 10)).all()
    assert pets.shape == (6, 64, 64, 3) and pets.min() >= 0 and pets.max() <= 1


# ------------------------------------------------- real Fashion-MNIST, offline


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def fashion_tfds(tmp_path_factory):
    """TFDS's fashion_mnist prepared from Debian's files into a fresh data dir."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    records = _Records()
    logging.getLogger("tf_free.data").addHandler(records)
    try:
        start = time.perf_counter()
        path = data.prepare_fashion_mnist(data_dir)
        seconds = time.perf_counter() - start
    finally:
        logging.getLogger("tf_free.data").removeHandler(records)
    return data_dir, path, records.messages, seconds


def test_fashion_mnist_is_prepared_through_tfds_with_an_explicit_checksum_swap(fashion_tfds):
    data_dir, path, messages, seconds = fashion_tfds
    builder = tfds.builder("fashion_mnist", data_dir=data_dir)
    assert builder.is_prepared() and os.fspath(builder.data_dir) == path
    assert builder.info.splits["train"].num_examples == 60_000
    assert builder.info.splits["test"].num_examples == 10_000
    [line] = messages  # exactly one line says what replaced TFDS's check
    assert "\n" not in line and "checksums" in line and "replaced" in line and "MD5" in line
    assert data.check_available("fashion_mnist", data_dir) == "prepared"
    print(f"prepared fashion_mnist in {seconds:.1f} s")
    assert not os.path.exists(os.path.join(data_dir, "downloads"))  # no leftover copies


def test_fashion_mnist_test_split_is_the_verified_data(fashion_tfds):
    data_dir = fashion_tfds[0]
    ds = data.build_dataset(
        "fashion_mnist", "test", batch_size=1000, training=False, data_dir=data_dir
    )
    x, y = _collect(ds)
    assert x.shape == (10_000, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(y), [1000] * 10)
    images, labels = data.load_fashion_mnist("test")
    expected = images.astype(np.float32) / np.float32(255)

    # TFDS stores examples in its own (hashed) order: compare as multisets.
    def keys(a, b):
        return sorted(ai.tobytes() + bytes([int(bi)]) for ai, bi in zip(a, b, strict=True))

    assert keys(x, y) == keys(expected, labels)


def test_fashion_mnist_training_pipeline_is_seeded(fashion_tfds):
    data_dir = fashion_tfds[0]
    kw = dict(batch_size=64, training=True, data_dir=data_dir, num_examples=256)
    train = data.build_dataset("fashion_mnist", "train", **kw)
    x1, y1 = _collect(train)
    x2, y2 = _collect(train)
    x_again, _ = _collect(data.build_dataset("fashion_mnist", "train", **kw))
    plain, plain_y = _collect(
        data.build_dataset(
            "fashion_mnist",
            "train",
            batch_size=64,
            training=False,
            data_dir=data_dir,
            num_examples=256,
        )
    )
    assert x1.shape == (256, 28, 28, 1) and 0 <= x1.min() and x1.max() <= 1
    np.testing.assert_array_equal(x1, x_again)
    assert not np.array_equal(y1, y2)  # reshuffled each epoch
    # Same 256 examples, not augmented (MNIST-like): a permutation of the plain ones.
    order1, order_plain = np.lexsort(x1.reshape(256, -1).T), np.lexsort(plain.reshape(256, -1).T)
    np.testing.assert_array_equal(x1[order1], plain[order_plain])
    np.testing.assert_array_equal(y1[order1], plain_y[order_plain])


def test_corrupt_local_fashion_files_stop_before_tfds(tmp_path):
    source = tmp_path / "debian"
    shutil.copytree(data.FASHION_MNIST_DIR, source)
    labels = source / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-20])  # truncated
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(data.DataIntegrityError, match="truncated|MD5"):
        data.prepare_fashion_mnist(data_dir, source_dir=str(source))
    assert not tfds.builder("fashion_mnist", data_dir=data_dir).is_prepared()
    assert not os.path.exists(data_dir)


def test_tfds_still_checks_the_files_against_the_verified_checksums(tmp_path):
    infos = fashion_mnist._verified_fashion_url_infos(data.FASHION_MNIST_DIR)
    url = next(u for u in infos if "t10k-labels" in u)
    infos[url] = dataclasses.replace(infos[url], checksum="0" * 64)  # as if the file changed
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(NonMatchingChecksumError, match="wrong checksum"):
        fashion_mnist._tfds_prepare_fashion_mnist(data_dir, data.FASHION_MNIST_DIR, infos)
    assert not tfds.builder("fashion_mnist", data_dir=data_dir).is_prepared()
    assert not os.path.exists(data_dir)  # nor an empty fashion_mnist/ folder in it


def test_fashion_preflight_reports_local_files_or_an_incomplete_folder(tmp_path, monkeypatch):
    source = tmp_path / "debian"
    shutil.copytree(data.FASHION_MNIST_DIR, source)
    monkeypatch.setattr(catalogue, "FASHION_MNIST_DIR", str(source))
    data_dir = str(tmp_path / "tfds")
    assert data.check_available("fashion_mnist", data_dir) == "local files"
    (source / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataIntegrityError, match="train-labels-idx1-ubyte.gz"):
        data.check_available("fashion_mnist", data_dir)


# ------------------------------------------------ downloads that cannot happen


def _snapshot(root):
    """Every path under root (relative), with file contents: the whole tree to compare."""
    tree = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            tree[os.path.relpath(os.path.join(folder, name), root) + "/"] = None
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                tree[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return tree


def _existing_tfds_tree(root):
    """A data dir with content of its own: it must come out of a failure unchanged."""
    (root / "downloads" / "mnist").mkdir(parents=True)  # empty, but it existed
    (root / "downloads" / "extracted" / "TAR_GZ.other").mkdir(parents=True)
    (root / "downloads" / "old.gz").write_bytes(b"keep")
    (root / "cifar10").mkdir()
    return _snapshot(root)


def _offline_message(name, data_dir, cause):
    return (
        f"TFDS could not download/prepare {name!r} into {data_dir} ({cause}); without "
        "internet, prepare it on another machine and copy that folder here"
    )


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


@pytest.fixture
def no_proxy_env(monkeypatch):
    for key in ("HTTPS_PROXY", "HTTP_PROXY", "FTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(key, raising=False)
        monkeypatch.delenv(key.lower(), raising=False)
    return monkeypatch


def test_unreachable_download_host_fails_at_once_and_creates_nothing(tmp_path, no_proxy_env):
    before = _existing_tfds_tree(tmp_path)
    calls = []

    def refuse(address, timeout):
        calls.append((address, timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    no_proxy_env.setattr(socket, "create_connection", refuse)
    start = time.perf_counter()
    with pytest.raises(data.DataError) as err:
        data.build_dataset("cifar10", "train", batch_size=4, training=True, data_dir=str(tmp_path))
    seconds = time.perf_counter() - start
    assert str(err.value) == _offline_message(
        "cifar10",
        tmp_path / "cifar10" / "3.0.2",
        "ConnectionError: cannot connect to www.cs.toronto.edu:443: [Errno 111] Connection refused",
    )
    assert calls == [(("www.cs.toronto.edu", 443), data.CONNECT_TIMEOUT)]  # no retries
    assert seconds < 5
    assert _snapshot(tmp_path) == before  # TFDS's new folders are gone, the old ones kept
    assert tfds_downloader._open_url.__name__ == "_open_url"  # TFDS's own again


def test_the_connection_check_targets_the_host_or_the_proxy_requests_would_use(no_proxy_env):
    address = catalogue._connect_address
    assert address("https://storage.googleapis.com/cvdf-datasets/mnist/x.gz") == (
        "storage.googleapis.com",
        443,
    )
    assert address("http://ufldl.stanford.edu/housenumbers/test_32x32.mat") == (
        "ufldl.stanford.edu",
        80,
    )
    assert address("https://example.org:8443/a") == ("example.org", 8443)
    assert address("ftp://ftp.example.org/a") == ("ftp.example.org", 21)
    assert address("gs://tfds-data/x") is None and address("/local/file") is None
    no_proxy_env.setenv("HTTPS_PROXY", "proxy.internal:3128")
    assert address("https://storage.googleapis.com/x") == ("proxy.internal", 3128)
    assert address("http://ufldl.stanford.edu/x") == ("ufldl.stanford.edu", 80)
    no_proxy_env.setenv("NO_PROXY", "storage.googleapis.com")
    assert address("https://storage.googleapis.com/x") == ("storage.googleapis.com", 443)


def test_an_unreachable_proxy_fails_at_once(tmp_path, no_proxy_env):
    port = _closed_port()
    no_proxy_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    with pytest.raises(data.DataError) as err:
        data.build_dataset("mnist", "train", batch_size=4, training=True, data_dir=str(tmp_path))
    assert f"(ConnectionError: cannot connect to 127.0.0.1:{port}: " in str(err.value)
    assert os.listdir(tmp_path) == []


def test_offline_mnist_fails_in_seconds_and_leaves_the_data_dir_as_it_was(tmp_path):
    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=3).close()
        pytest.skip("this machine can reach storage.googleapis.com: nothing offline to test")
    except OSError:
        pass
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    before = _existing_tfds_tree(data_dir)
    start = time.perf_counter()
    with pytest.raises(data.DataError) as err:
        data.build_dataset("mnist", "train", batch_size=4, training=True, data_dir=str(data_dir))
    seconds = time.perf_counter() - start
    print(f"offline mnist failed in {seconds:.2f} s")
    message = str(err.value)
    assert message.startswith(
        f"TFDS could not download/prepare 'mnist' into {data_dir}/mnist/3.0.1 "
        "(ConnectionError: cannot connect to storage.googleapis.com:443: "
    )
    assert message.endswith(
        "without internet, prepare it on another machine and copy that folder here"
    )
    assert "\n" not in message and seconds < 30
    assert _snapshot(data_dir) == before


def test_failed_tfds_download_retries_briefly_and_removes_only_what_it_created(
    tmp_path, monkeypatch
):
    # A host that accepts connections and then fails: the check passes, TFDS
    # itself downloads (and fails, offline), with its retries capped.
    monkeypatch.setattr(catalogue, "_connect_address", lambda url: None)
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    before = _existing_tfds_tree(data_dir)
    start = time.perf_counter()
    with pytest.raises(data.DataError) as err:
        data.build_dataset("mnist", "train", batch_size=4, training=True, data_dir=str(data_dir))
    seconds = time.perf_counter() - start
    print(f"TFDS's own download failed in {seconds:.2f} s")
    message = str(err.value)
    assert message.startswith(
        f"TFDS could not download/prepare 'mnist' into {data_dir}/mnist/3.0.1 (ConnectionError: "
    )
    assert "\n" not in message and "Max retries exceeded" in message
    assert seconds < 30  # TFDS's 10 retries: 3.4 minutes
    assert tfds_downloader.MAX_RETRIES == 10  # TFDS's value is back
    assert _snapshot(data_dir) == before
    # A data dir that did not exist (nor its parent) is gone again.
    missing = tmp_path / "new" / "tfds"
    monkeypatch.setattr(catalogue, "DOWNLOAD_RETRIES", 0)  # quicker, same folders
    with pytest.raises(data.DataError):
        data.build_dataset("mnist", "train", batch_size=4, training=True, data_dir=str(missing))
    assert sorted(os.listdir(tmp_path)) == ["tfds"]


def test_fail_fast_downloads_nests_and_restores_tfds_globals():
    original = tfds_downloader._open_url
    assert tfds_downloader.MAX_RETRIES == 10
    with catalogue._fail_fast_downloads():
        assert tfds_downloader.MAX_RETRIES == data.DOWNLOAD_RETRIES == 5
        checked = tfds_downloader._open_url
        assert checked is not original
        with catalogue._fail_fast_downloads():
            assert tfds_downloader._open_url is checked and tfds_downloader.MAX_RETRIES == 5
        assert tfds_downloader._open_url is checked and tfds_downloader.MAX_RETRIES == 5
    assert tfds_downloader._open_url is original and tfds_downloader.MAX_RETRIES == 10


def test_cleanup_removes_the_datasets_new_paths_and_nothing_else(tmp_path):
    root = tmp_path / "tfds"
    root.mkdir()
    _existing_tfds_tree(root)
    (root / "mnist").mkdir()  # existed before: stays
    (root / "mnist" / "old").write_text("keep")
    before = _snapshot(root)
    ours = "cvdf_mnist_t10kXYZ.gz"
    with pytest.raises(KeyError):
        with catalogue._removing_new_paths_on_failure(str(root), "mnist"):
            (root / "mnist" / "incomplete.AB12CD_3.0.1" / "x").mkdir(parents=True)
            (root / "downloads" / "mnist" / ours).write_bytes(b"1")
            (root / "downloads" / "mnist" / "a.tmp.123").mkdir()
            (root / "downloads" / "extracted" / f"GZIP.{ours}").write_bytes(b"1")
            (root / "downloads" / "extracted" / "TAR.another_dataset.tar").write_bytes(b"2")
            (root / "cifar10" / "3.0.2").mkdir()  # another process's new folder
            raise KeyError("failed")
    after = _snapshot(root)
    assert after == {
        **before,
        "downloads/extracted/TAR.another_dataset.tar": b"2",
        "cifar10/3.0.2/": None,
    }
    # Success: nothing is removed.
    with catalogue._removing_new_paths_on_failure(str(root), "mnist"):
        (root / "mnist" / "3.0.1").mkdir()
    assert (root / "mnist" / "3.0.1").is_dir()


def test_failed_tfds_download_is_one_clear_line(tmp_path):
    class OfflineBuilder:  # what an offline builder does: create folders, then fail
        name = "mnist"
        data_dir = "/data/mnist/3.0.1"
        data_dir_root = str(tmp_path)

        def is_prepared(self):
            return False

        def download_and_prepare(self):
            (tmp_path / "mnist" / "incomplete.X_3.0.1").mkdir(parents=True)
            raise ConnectionError("HTTPSConnectionPool(host='storage.googleapis.com')\nmore")

    with pytest.raises(data.DataError) as err:
        catalogue._prepare(OfflineBuilder(), "mnist")
    assert str(err.value) == _offline_message(
        "mnist",
        "/data/mnist/3.0.1",
        "ConnectionError: HTTPSConnectionPool(host='storage.googleapis.com')",
    )
    assert isinstance(err.value.__cause__, ConnectionError)
    assert os.listdir(tmp_path) == []
