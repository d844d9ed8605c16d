"""The dataset catalogue: what a dataset is, whether its data can be had, TFDS preparing it.

`DatasetSpec` and `dataset_info` describe the first-class datasets (MNIST,
Fashion-MNIST, CIFAR-10/100, ImageNet) and any TFDS image classifier: image
shape, classes, the per-channel mean/std for the models' normalisation,
splits and augmentation. `check_available` is the cheap pre-flight (prepared,
local files, or a download); the local files belong in
`imagenet_manual_dir()` and `FASHION_MNIST_DIR`. `_prepare` runs TFDS's
`download_and_prepare` so that an offline machine fails in seconds
(`_fail_fast_downloads`) and a failure leaves no new folders or files behind
(`_removing_new_paths_on_failure`). The errors of the whole package are here:
`DataError`, `DataIntegrityError`, `DataNotFoundError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import threading
import urllib.parse

import requests
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader as tfds_downloader

# Debian's Fashion-MNIST files. The `fashion_mnist` module reads it from here at
# each call, so this is the one place to change it.
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

IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")

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


# CIFAR-10's classes (batches.meta.txt), for when TFDS has not prepared it yet
# and its ClassLabel only has numbers.
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def split_size(name: str, split: str, data_dir: str | None = None) -> int | None:
    """The number of examples in a prepared TFDS split, from its metadata (None: unknown)."""
    try:
        size = tfds.builder(name, data_dir=data_dir).info.splits[split].num_examples
    except Exception:  # noqa: BLE001 - any TFDS failure: unknown
        return None
    return int(size) or None


def class_names(name: str, data_dir: str | None = None) -> list[str] | None:
    """The label names of a TFDS dataset (ImageNet: WordNet ids), or None if unknown."""
    try:
        names = list(tfds.builder(name, data_dir=data_dir).info.features["label"].names)
    except Exception:  # noqa: BLE001 - any TFDS failure: the labels stay numbers
        return None
    if name == "cifar10" and names == [str(i) for i in range(10)]:
        return list(CIFAR10_CLASSES)
    return names


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
