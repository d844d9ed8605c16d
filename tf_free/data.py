"""Input pipelines: TFDS datasets as batched (images, labels), images float32 in [0, 1].

Normalisation (mean/std) happens inside the models; `dataset_info(name).mean`
and `.std` give the values to use there.

Public API:
  DatasetSpec, dataset_info(name, data_dir=None)
  build_dataset(name, split, *, batch_size, training, ...)
  check_available(name, data_dir=None)     cheap pre-flight, raises DataNotFoundError
  prepare_fashion_mnist(data_dir=None, source_dir=None)
  preprocessing: pad_and_random_crop, random_flip, cifar_train_preprocess,
    random_resized_crop_window, imagenet_train_preprocess,
    resize_shorter_and_center_crop, imagenet_eval_preprocess
  load_fashion_mnist, make_dataset (numpy route, kept for the existing tests)

Fashion-MNIST offline. Debian's `dataset-fashion-mnist` installs the original
IDX files. Debian recompressed the .gz files, so their bytes differ from the
upstream downloads whose SHA-256 TFDS registered; we verify the decompressed
IDX payloads instead, against the MD5 sums that upstream loaders publish for
them. `prepare_fashion_mnist` then prepares TFDS's own `fashion_mnist` from
those files: TFDS's registered checksums are replaced (explicitly, with one
logged warning line) by the size and SHA-256 of the exact Debian .gz bytes
that passed our MD5 check, so TFDS's own checksum check still runs and fails
if a file changes between our check and TFDS reading it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import urllib.parse

import numpy as np
import requests
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums as tfds_checksums
from tensorflow_datasets.core.download import downloader as tfds_downloader

logger = logging.getLogger(__name__)

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

IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")

# Shuffle buffer of undecoded JPEGs (~110 kB each, so ~1.1 GB of RAM).
IMAGENET_SHUFFLE_BUFFER = 10_000

# Before TFDS downloads a file, a TCP connection to its host (or to the proxy
# that requests would use) must open within this many seconds.
CONNECT_TIMEOUT = 5.0
# Retries per URL while TFDS downloads. TFDS's own 10 retries with backoff
# 0.2 s sleep about 3.4 minutes when a host fails (urllib3's Retry in
# `_open_with_requests`, https://github.com/tensorflow/datasets/blob/master/tensorflow_datasets/core/download/downloader.py);
# 5 sleep 6 s.
DOWNLOAD_RETRIES = 5


class DataError(RuntimeError):
    """Data cannot be provided (not prepared, cannot be prepared, ...)."""


class DataIntegrityError(DataError):
    """A data file is missing, truncated or not the expected content."""


class DataNotFoundError(DataError, FileNotFoundError):
    """Files the user must provide (e.g. the ImageNet tars) are missing."""


# --------------------------------------------------------------------------
# Dataset descriptions
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a model and a training loop need to know about a dataset.

    Attributes:
      name: TFDS name.
      image_shape: (H, W, C) that `build_dataset` yields by default (None for a
        variable size: pass `image_size`).
      num_classes: number of labels.
      mean, std: per-channel statistics of [0, 1] images, for the model's
        normalisation layer; None where the convention is no normalisation.
      train_split, eval_split: TFDS split names.
      num_train_examples: size of `train_split` (None if unknown offline).
      augmentation: "cifar" (zero-pad, 4 by default, + random crop + flip), "imagenet"
        (random-resized crop + flip) or "none" (shuffling only).
    """

    name: str
    image_shape: tuple[int | None, int | None, int]
    num_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    train_split: str
    eval_split: str
    num_train_examples: int | None
    augmentation: str = "none"


# CIFAR statistics: per-channel mean/std over the training images, the values
# used by e.g. locuslab/fast_adversarial and most CIFAR code. ImageNet: the
# torchvision values, used by the official free-training ImageNet code.
_FIRST_CLASS = {
    "mnist": DatasetSpec("mnist", (28, 28, 1), 10, None, None, "train", "test", 60_000),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", (28, 28, 1), 10, None, None, "train", "test", 60_000
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        (32, 32, 3),
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        "train",
        "test",
        50_000,
        "cifar",
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        (32, 32, 3),
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "train",
        "test",
        50_000,
        "cifar",
    ),
    "imagenet2012": DatasetSpec(
        "imagenet2012",
        (224, 224, 3),
        1000,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        "train",
        "validation",
        1_281_167,
        "imagenet",
    ),
}
FIRST_CLASS_DATASETS = tuple(_FIRST_CLASS)
# Small, fixed-size datasets: cache the decoded uint8 images after the first epoch.
_CACHED = {"mnist", "fashion_mnist", "cifar10", "cifar100"}


def dataset_info(name: str, data_dir: str | None = None) -> DatasetSpec:
    """The `DatasetSpec` of a first-class dataset or of any TFDS image classifier.

    Raises:
      ValueError: unknown TFDS name, or a dataset without an "image" Image
        feature and a "label" ClassLabel feature.
    """
    if name in _FIRST_CLASS:
        return _FIRST_CLASS[name]
    hint = f"first-class datasets: {', '.join(FIRST_CLASS_DATASETS)}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"unknown dataset {name!r} (not a TFDS name); {hint}") from e
    features = builder.info.features
    image = features["image"] if "image" in features else None
    label = features["label"] if "label" in features else None
    if not isinstance(image, tfds.features.Image) or not isinstance(
        label, tfds.features.ClassLabel
    ):
        raise ValueError(
            f"{name!r} is not an image-classification dataset (needs an 'image' Image feature "
            f"and a 'label' ClassLabel feature; it has {sorted(features.keys())}); {hint}"
        )
    splits = builder.info.splits  # empty when not prepared (offline: unknown)
    eval_split = "validation" if "validation" in splits and "test" not in splits else "test"
    train = splits["train"].num_examples if "train" in splits else None
    return DatasetSpec(
        name=name,
        image_shape=tuple(image.shape),
        num_classes=label.num_classes,
        mean=None,
        std=None,
        train_split="train",
        eval_split=eval_split,
        num_train_examples=train,
    )


# --------------------------------------------------------------------------
# Availability and preparation
# --------------------------------------------------------------------------


def _data_root(builder, data_dir: str | None) -> str:
    # The root TFDS uses: <root>/<name>/<version>, downloads in <root>/downloads.
    return os.fspath(data_dir) if data_dir else os.fspath(builder.data_dir_root)


def imagenet_manual_dir(data_dir: str | None = None) -> str:
    """Where the ImageNet tars must be: `<data_dir>/downloads/manual/`."""
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    return os.path.join(_data_root(builder, data_dir), "downloads", "manual")


def check_available(name: str, data_dir: str | None = None) -> str:
    """Cheap pre-flight: can `build_dataset(name, ...)` get its data? Run it first.

    Only looks at files; reads no data and prepares nothing.

    Returns:
      How the data will be obtained: "prepared", "local files" (ImageNet tars or
      Debian's Fashion-MNIST files, prepared on first use) or "download" (TFDS
      will download; needs internet).

    Raises:
      ValueError: unknown dataset name.
      DataNotFoundError: ImageNet is not prepared and a tar is missing; the
        message names the exact path where to put which file.
      DataIntegrityError: Fashion-MNIST is not prepared and the local folder
        ($FASHION_MNIST_DIR) is incomplete (content is checked when preparing).
    """
    dataset_info(name, data_dir)  # ValueError for unknown names
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return "prepared"
    if name == "imagenet2012":
        manual = imagenet_manual_dir(data_dir)
        missing = [
            os.path.join(manual, f)
            for f in IMAGENET_MANUAL_FILES
            if not (
                os.path.isfile(os.path.join(manual, f)) and os.path.getsize(os.path.join(manual, f))
            )
        ]
        if missing:
            # Both tars are required: TFDS would otherwise prepare (for good) a
            # dataset without the missing split.
            raise DataNotFoundError(
                f"imagenet2012 is not prepared in {builder.data_dir} and TFDS needs the "
                f"manually downloaded ILSVRC2012 tars (from https://image-net.org): put "
                f"{' and '.join(missing)}, then rerun"
            )
        return "local files"
    if (
        name == "fashion_mnist"
        and os.path.isdir(FASHION_MNIST_DIR)
        and os.listdir(FASHION_MNIST_DIR)
    ):
        # The same rule as prepare_fashion_mnist: a non-empty folder must be complete.
        missing = [
            os.path.join(FASHION_MNIST_DIR, f"{f}.gz")
            for pair in FASHION_MNIST_FILES.values()
            for f, _ in pair
            if not os.path.isfile(os.path.join(FASHION_MNIST_DIR, f"{f}.gz"))
        ]
        if missing:
            raise DataIntegrityError(
                f"fashion_mnist is not prepared in {builder.data_dir} and local files are "
                f"missing: {', '.join(missing)}"
            )
        return "local files"
    return "download"


def _connect_address(url: str) -> tuple[str, int] | None:
    """The (host, port) a download of `url` connects to first; None if not a network URL.

    The proxy's address where requests would use one (HTTPS_PROXY, NO_PROXY, ...).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https", "ftp") or not parts.hostname:
        return None
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    if proxy:
        parts = urllib.parse.urlsplit(requests.utils.prepend_scheme_if_needed(proxy, "http"))
    default_port = {"https": 443, "ftp": 21, "socks5": 1080, "socks5h": 1080}
    return parts.hostname, parts.port or default_port.get(parts.scheme, 80)


def _checked_open_url(open_url):
    """TFDS's `_open_url`, after a TCP connection to the URL's host opened within CONNECT_TIMEOUT."""

    def checked(url, **kwargs):
        address = _connect_address(url)
        if address:
            try:
                socket.create_connection(address, timeout=CONNECT_TIMEOUT).close()
            except OSError as e:
                host, port = address
                raise ConnectionError(
                    f"cannot connect to {host}:{port}: {str(e) or type(e).__name__}"
                ) from e
        return open_url(url, **kwargs)

    return checked


_fail_fast_lock = threading.Lock()
_fail_fast_users = 0
_fail_fast_saved = None


@contextlib.contextmanager
def _fail_fast_downloads():
    """While active, a TFDS download fails in seconds where its host is unreachable.

    TFDS has no setting for this, so two module globals of its downloader,
    read at each download, are swapped (and restored when the last user,
    thread or nested, leaves): `_open_url` first checks that a TCP
    connection to the URL's host (or proxy) opens within CONNECT_TIMEOUT, so
    an offline machine fails at once, only for files TFDS really downloads
    (not cached or manual ones); `MAX_RETRIES` is capped at DOWNLOAD_RETRIES
    for hosts that accept connections and then fail. Both in
    https://github.com/tensorflow/datasets/blob/master/tensorflow_datasets/core/download/downloader.py
    """
    global _fail_fast_users, _fail_fast_saved
    with _fail_fast_lock:
        if _fail_fast_users == 0:
            # Another TFDS version may lack either global: then TFDS's behaviour stays.
            _fail_fast_saved = {
                k: getattr(tfds_downloader, k)
                for k in ("_open_url", "MAX_RETRIES")
                if hasattr(tfds_downloader, k)
            }
            if "_open_url" in _fail_fast_saved:
                tfds_downloader._open_url = _checked_open_url(_fail_fast_saved["_open_url"])
            if "MAX_RETRIES" in _fail_fast_saved:
                tfds_downloader.MAX_RETRIES = min(_fail_fast_saved["MAX_RETRIES"], DOWNLOAD_RETRIES)
        _fail_fast_users += 1
    try:
        yield
    finally:
        with _fail_fast_lock:
            _fail_fast_users -= 1
            if _fail_fast_users == 0:
                for k, v in _fail_fast_saved.items():
                    setattr(tfds_downloader, k, v)


def _entries(folder: str) -> set[str]:
    """The paths directly inside `folder`; empty if it is not a folder."""
    with contextlib.suppress(OSError):
        return {os.path.join(folder, n) for n in os.listdir(folder)}
    return set()


def _tree(path: str) -> set[str]:
    """`path` and everything below it; empty if it does not exist."""
    if not os.path.lexists(path):
        return set()
    found = {path}
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            found.update(os.path.join(root, n) for n in dirs + files)
    return found


@contextlib.contextmanager
def _removing_new_paths_on_failure(data_root: str, name: str):
    """If the body raises, deletes what it created for dataset `name`; keeps all that existed.

    Deleted: new entries under `<data_root>/<name>` and
    `<data_root>/downloads/<name>`, the new extractions of those downloads,
    then `downloads/extracted`, `downloads` and `data_root` (and its missing
    parents) if they are new and left empty. Other datasets' folders are
    never touched, even new ones (another process may be preparing them).
    """
    data_root = os.path.abspath(data_root)
    downloads = os.path.join(data_root, "downloads")
    extracted = os.path.join(downloads, "extracted")
    own = (os.path.join(data_root, name), os.path.join(downloads, name))
    shared = [extracted, downloads, data_root]
    parent = os.path.dirname(data_root)
    while parent != os.path.dirname(parent) and not os.path.lexists(parent):
        shared.append(parent)  # created by TFDS's mkdir(parents=True)
        parent = os.path.dirname(parent)
    before = set().union(*(_tree(d) for d in own), _entries(extracted))
    before.update(p for p in shared if os.path.lexists(p))
    try:
        yield
    except BaseException:
        created = set().union(*(_tree(d) for d in own)) - before
        # TFDS extracts <downloads>/<name>/<file> into extracted/<METHOD>.<file>.
        new_files = {os.path.basename(p) for p in created}
        created.update(
            p
            for p in _entries(extracted) - before
            if os.path.basename(p).partition(".")[2] in new_files
        )
        for path in sorted(created):  # parents sort before their children
            with contextlib.suppress(OSError):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.remove(path)
        for path in shared:  # innermost first
            if path not in before:
                with contextlib.suppress(OSError):
                    os.rmdir(path)  # only if empty
        raise


def _prepare(builder, name: str) -> None:
    """`download_and_prepare`, failing fast offline, with a one-line error.

    Downloads fail in seconds where a host is unreachable (see
    `_fail_fast_downloads`), not after TFDS's 3.4 minutes of retries; on any
    failure the folders and files created for the dataset are removed again
    (see `_removing_new_paths_on_failure`).

    Raises:
      DataError: TFDS could not download or prepare; one line that says what
        to do.
    """
    if builder.is_prepared():
        return
    data_root = os.path.expanduser(os.fspath(builder.data_dir_root))
    try:
        with _removing_new_paths_on_failure(data_root, builder.name), _fail_fast_downloads():
            builder.download_and_prepare()
    except Exception as e:  # re-raised below, with the cause chained
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(
            f"TFDS could not download/prepare {name!r} into {builder.data_dir} "
            f"({type(e).__name__}: {first_line[:300]}); without internet, prepare it on "
            "another machine and copy that folder here"
        ) from e


def _verified_fashion_url_infos(source_dir: str) -> dict:
    """Checks Debian's Fashion-MNIST files; returns TFDS UrlInfos of the checked bytes.

    Each .gz is read once: its decompressed payload must have the published
    MD5, and the returned size/SHA-256 are those of the very bytes checked.
    """
    expected = {name: md5 for pair in FASHION_MNIST_FILES.values() for name, md5 in pair}
    builder_cls = tfds.builder_cls("fashion_mnist")
    infos = {}
    for url, registered in builder_cls.url_infos.items():
        filename = registered.filename  # e.g. "t10k-images-idx3-ubyte.gz"
        path = os.path.join(source_dir, filename)
        idx_name = filename.removesuffix(".gz")
        if not os.path.exists(path):
            raise DataIntegrityError(
                f"{path} not found. Install Debian's Fashion-MNIST "
                "(apt-get install dataset-fashion-mnist) or set FASHION_MNIST_DIR."
            )
        with open(path, "rb") as f:
            raw = f.read()
        try:
            payload = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataIntegrityError(f"{path} is unreadable or truncated: {e}") from e
        md5 = hashlib.md5(payload).hexdigest()
        if md5 != expected[idx_name]:
            raise DataIntegrityError(
                f"{path}: decompressed MD5 is {md5}, expected {expected[idx_name]} "
                "(corrupt or not the original Fashion-MNIST file)"
            )
        infos[url] = tfds_checksums.UrlInfo(
            size=len(raw), checksum=hashlib.sha256(raw).hexdigest(), filename=filename
        )
    return infos


def _tfds_prepare_fashion_mnist(data_dir: str | None, source_dir: str, url_infos: dict) -> None:
    """Prepares TFDS's `fashion_mnist` from `source_dir` with `url_infos` as checksums."""
    base = tfds.builder_cls("fashion_mnist")
    # A builder class's `url_infos` (a classproperty read from TFDS's
    # url_checksums/ files) is what its DownloadManager validates downloads and
    # manual_dir files against; a subclass attribute overrides it. Same `name`,
    # so the prepared data lands in <data_dir>/fashion_mnist/<version> and the
    # standard builder reads it. skip_registration: don't clash with TFDS's own.
    # (`_make_download_manager` in https://github.com/tensorflow/datasets/blob/
    # master/tensorflow_datasets/core/dataset_builder.py; TFDS 4.9.10.)
    # `tfds.download.add_checksums_dir` cannot do this: the builder's own
    # url_infos take precedence, and a second checksum for a registered URL
    # raises "registered with 2+ distinct size/checksum tuples".
    local_cls = type(
        "DebianFashionMNIST",
        (base,),
        {"name": "fashion_mnist", "url_infos": url_infos, "__module__": __name__},
        skip_registration=True,
    )
    builder = local_cls(data_dir=data_dir)
    # The DownloadManager takes a file from manual_dir when it is named as the
    # url_info's `filename`, then checks its size and SHA-256 against url_infos
    # (core/download/download_manager.py, `_download_or_get_cache`).
    config = tfds.download.DownloadConfig(manual_dir=source_dir, try_download_gcs=False)
    # Extracted copies go to a temporary download dir, deleted afterwards.
    data_root = os.path.expanduser(os.fspath(builder.data_dir_root))
    with (
        tempfile.TemporaryDirectory(prefix="tf_free_fashion_mnist_") as tmp,
        _removing_new_paths_on_failure(data_root, "fashion_mnist"),
    ):
        builder.download_and_prepare(download_dir=tmp, download_config=config)


def prepare_fashion_mnist(data_dir: str | None = None, source_dir: str | None = None) -> str:
    """Prepares TFDS's `fashion_mnist` in `data_dir` from local IDX files, offline.

    No-op if it is already prepared there. Otherwise the files in `source_dir`
    (default: Debian's /usr/share/datasets/fashion-mnist or $FASHION_MNIST_DIR)
    are MD5-checked (decompressed payloads), and TFDS prepares the dataset from
    them with its registered checksums replaced by the SHA-256 of those exact
    checked files (logged as a warning). If `source_dir` has no files at all,
    TFDS downloads as usual (needs internet).

    Returns:
      The prepared dataset's folder.

    Raises:
      DataIntegrityError: a local file is corrupt, truncated or missing.
      DataError: no local files and TFDS could not download.
    """
    builder = tfds.builder("fashion_mnist", data_dir=data_dir)
    if builder.is_prepared():
        return os.fspath(builder.data_dir)
    source_dir = os.fspath(source_dir or FASHION_MNIST_DIR)
    if not os.path.isdir(source_dir) or not os.listdir(source_dir):
        _prepare(builder, "fashion_mnist")
        return os.fspath(builder.data_dir)
    url_infos = _verified_fashion_url_infos(source_dir)
    logger.warning(
        "fashion_mnist: TFDS's registered checksums (upstream .gz bytes) replaced by the "
        "SHA-256 of the local .gz files in %s, whose decompressed IDX payloads passed the "
        "published MD5 check",
        source_dir,
    )
    _tfds_prepare_fashion_mnist(data_dir, source_dir, url_infos)
    return os.fspath(tfds.builder("fashion_mnist", data_dir=data_dir).data_dir)


# --------------------------------------------------------------------------
# Preprocessing (each works eagerly and inside tf.data; seeds are stateless [2])
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------


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
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------
# Fashion-MNIST as numpy arrays (no TFDS)
# --------------------------------------------------------------------------


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
      (images, labels): uint8 [N, 28, 28, 1] and int64 [N], in file order.

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
