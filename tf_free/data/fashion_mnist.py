"""Fashion-MNIST offline, from the IDX files of Debian's `dataset-fashion-mnist`.

Debian recompressed the .gz files, so their bytes differ from the upstream
downloads whose SHA-256 TFDS registered; we verify the decompressed IDX
payloads instead, against the MD5 sums that upstream loaders publish for them
(`FASHION_MNIST_FILES`), with one streaming check (`_check_md5`) for both
routes. `prepare_fashion_mnist` prepares TFDS's own `fashion_mnist` from those
files: TFDS's registered checksums are replaced (explicitly, with one logged
warning line) by the size and SHA-256 of the exact Debian .gz bytes that
passed our MD5 check, so TFDS's own checksum check still runs and fails if a
file changes between our check and TFDS reading it. `load_fashion_mnist`
reads the same files as numpy arrays, without TFDS.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
import typing
import zlib

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums as tfds_checksums

from tf_free.data import catalogue
from tf_free.data.catalogue import (
    FASHION_MNIST_FILES,
    DataIntegrityError,
    _prepare,
    _removing_new_paths_on_failure,
)

logger = logging.getLogger(__name__)

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


# Bytes per read when hashing a file.
_CHUNK = 1 << 20


class _CheckedFile(typing.NamedTuple):
    size: int  # bytes of the file as stored (compressed, for a .gz)
    sha256: str  # of the file as stored
    content: bytes | None  # the (decompressed) content, if asked for


class _HashingReader:
    """A binary file's `read` that counts and SHA-256-hashes every byte it returns."""

    def __init__(self, f):
        self._f = f
        self.size = 0
        self.sha256 = hashlib.sha256()

    def read(self, n=-1):
        chunk = self._f.read(n)
        self.size += len(chunk)
        self.sha256.update(chunk)
        return chunk


def _check_md5(path: str, expected_md5: str, *, keep_content: bool = False) -> _CheckedFile:
    """Checks that the content of `path` (decompressed, for a .gz) has MD5 `expected_md5`.

    The one integrity check of the local files, for TFDS's preparation and for
    the numpy loader. The file is read once, in chunks: the same pass hashes
    the stored bytes (size and SHA-256, returned) and the content (MD5,
    checked), so what is returned describes the very bytes that were checked;
    `keep_content` also returns the content.

    Raises:
      DataIntegrityError: `path` is missing, unreadable or truncated, or its
        content has another MD5.
    """
    if not os.path.exists(path):
        raise DataIntegrityError(
            f"{path} not found. Install Debian's Fashion-MNIST "
            "(apt-get install dataset-fashion-mnist) or set FASHION_MNIST_DIR."
        )
    compressed = path.endswith(".gz")
    md5 = hashlib.md5()
    chunks = []
    try:
        with open(path, "rb") as f:
            stored = _HashingReader(f)
            reader = gzip.GzipFile(fileobj=stored, mode="rb") if compressed else stored
            while chunk := reader.read(_CHUNK):
                md5.update(chunk)
                if keep_content:
                    chunks.append(chunk)
            while stored.read(_CHUNK):  # size and SHA-256 of the whole file (gzip read it all)
                pass
    except (OSError, EOFError, zlib.error) as e:
        raise DataIntegrityError(f"{path} is unreadable or truncated: {e}") from e
    if (actual := md5.hexdigest()) != expected_md5:
        raise DataIntegrityError(
            f"{path}: {'decompressed ' if compressed else ''}MD5 is {actual}, "
            f"expected {expected_md5} (corrupt or not the original Fashion-MNIST file)"
        )
    content = b"".join(chunks) if keep_content else None
    return _CheckedFile(stored.size, stored.sha256.hexdigest(), content)


# --------------------------------------------------------------------------
# Through TFDS
# --------------------------------------------------------------------------


def _verified_fashion_url_infos(source_dir: str) -> dict:
    """Checks Debian's Fashion-MNIST files; returns TFDS UrlInfos of the checked bytes.

    Each .gz is read once (`_check_md5`): its decompressed payload must have
    the published MD5, and the returned size/SHA-256 are those of the very
    bytes checked.
    """
    expected = {name: md5 for pair in FASHION_MNIST_FILES.values() for name, md5 in pair}
    infos = {}
    for url, registered in tfds.builder_cls("fashion_mnist").url_infos.items():
        filename = registered.filename  # e.g. "t10k-images-idx3-ubyte.gz"
        checked = _check_md5(
            os.path.join(source_dir, filename), expected[filename.removesuffix(".gz")]
        )
        infos[url] = tfds_checksums.UrlInfo(
            size=checked.size, checksum=checked.sha256, filename=filename
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
        # The package's name: TFDS records it as `module_name` in dataset_info.json.
        {"name": "fashion_mnist", "url_infos": url_infos, "__module__": "tf_free.data"},
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
    source_dir = os.fspath(source_dir or catalogue.FASHION_MNIST_DIR)
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
# As numpy arrays (no TFDS)
# --------------------------------------------------------------------------


def _read_idx(path: str, expected_md5: str) -> np.ndarray:
    """Reads an IDX file (`path`, else `path`.gz) after checking its content's MD5."""
    found = path if os.path.exists(path) else path + ".gz"
    payload = _check_md5(found, expected_md5, keep_content=True).content
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
    data_dir = data_dir or catalogue.FASHION_MNIST_DIR
    (images_name, images_md5), (labels_name, labels_md5) = FASHION_MNIST_FILES[split]
    images = _read_idx(os.path.join(data_dir, images_name), images_md5)
    labels = _read_idx(os.path.join(data_dir, labels_name), labels_md5)
    return images[..., None], labels.astype(np.int64)
