"""IDX files (MNIST, Fashion-MNIST) and turning image arrays into an image :class:`Dataset`.

The engine consumes image data sets as files (``Dataset.paths``), so arrays are written as PNG files
into a workspace folder by :func:`materialize_images`; the returned Dataset keeps the array order,
which keeps class labels aligned.

Examples
--------
>>> images, classes = load_fashion_mnist("test")                          # doctest: +SKIP
>>> data = materialize_images(images, None, workspace / "fmnist-test")     # doctest: +SKIP
>>> split = srr_protocol(data, classes, normal_classes=[0], anomaly_ratio=0.1, seed=0)  # doctest: +SKIP
"""
from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from core.data.dataset import Dataset
from core.data.images import image_dataset
from core.errors import DataError
from core.progress import QUIET, Monitor

logger = logging.getLogger(__name__)

MAX_IDX_BYTES = 2 * 1024**3
"""Largest IDX payload read (2 GiB, uncompressed)."""

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where ``apt-get install dataset-fashion-mnist`` puts the Fashion-MNIST IDX files."""

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
"""Fashion-MNIST class names, indexed by class label."""

_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_IDX_DIMS = 8


def read_idx(path: Path | str, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read one IDX file, raw or gzip-compressed.

    Parameters
    ----------
    path : Path or str
        IDX file (``*-idx3-ubyte``, ``*-idx1-ubyte``, optionally ``.gz``).
    max_bytes : int
        Cap on the payload size, checked from the header before reading (default 2 GiB).

    Returns
    -------
    numpy.ndarray
        Shape from the header, native byte order (e.g. (N, 28, 28) uint8 or (N,) uint8).

    Raises
    ------
    DataError
        If the file is missing, not IDX (bad magic number), truncated, longer than its header says,
        or too large.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        with open(path, "rb") as probe:
            compressed = probe.read(2) == _GZIP_MAGIC
        opener = gzip.open if compressed else open
        with opener(path, "rb") as handle:
            magic = handle.read(4)
            if len(magic) != 4 or magic[:2] != b"\x00\x00" or magic[2] not in _IDX_DTYPES \
                    or not 1 <= magic[3] <= _MAX_IDX_DIMS:
                raise DataError(f"{path.name} is not an IDX file (bad magic number {magic.hex() or 'empty'}); "
                                "expected MNIST-style idx data")
            dtype = _IDX_DTYPES[magic[2]]
            header = handle.read(4 * magic[3])
            if len(header) != 4 * magic[3]:
                raise DataError(f"{path.name} is truncated inside its header; download it again")
            shape = tuple(int(d) for d in np.frombuffer(header, dtype=">u4"))
            n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if n_bytes > max_bytes:
                raise DataError(f"{path.name} declares {n_bytes} bytes of data, over the limit of {max_bytes}")
            payload = handle.read(n_bytes + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path.name} ({exc}); download it again") from exc
    if len(payload) < n_bytes:
        raise DataError(f"{path.name} is truncated ({len(payload)} of {n_bytes} data bytes); download it again")
    if len(payload) > n_bytes:
        raise DataError(f"{path.name} has data beyond the shape {shape} its header declares; "
                        "it is not a valid IDX file")
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def load_idx_images(
    images_path: Path | str, labels_path: Path | str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an IDX image file and, optionally, its IDX class-label file.

    Parameters
    ----------
    images_path : Path or str
        ``*-images-idx3-ubyte[.gz]``.
    labels_path : Path or str, optional
        ``*-labels-idx1-ubyte[.gz]``.

    Returns
    -------
    images : (N, H, W) uint8 array
    labels : (N,) int64 array of class labels, or None without ``labels_path``

    Raises
    ------
    DataError
        If a file is invalid or the two files disagree on N.
    """
    images = read_idx(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{Path(images_path).name} holds {images.dtype} data of shape {images.shape}; "
                        "expected (N, H, W) unsigned bytes")
    if labels_path is None:
        return images, None
    labels = read_idx(labels_path)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{Path(labels_path).name} has shape {labels.shape} but there are "
                        f"{images.shape[0]} images; pass the matching label file")
    return images, labels.astype(np.int64)


def load_fashion_mnist(split: str = "train", root: Path | str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images and class labels from the Debian package's IDX files.

    Parameters
    ----------
    split : {"train", "test"}
        60,000 training or 10,000 test images.
    root : Path or str
        Folder with the four ``.gz`` files (default :data:`FASHION_MNIST_DIR`).

    Returns
    -------
    images : (N, 28, 28) uint8 array
    labels : (N,) int64 array in 0..9 (see :data:`FASHION_MNIST_CLASSES`)
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.is_file():
        raise DataError(f"Fashion-MNIST is not installed ({images_path} missing); "
                        "run: apt-get install -y dataset-fashion-mnist")
    images, labels = load_idx_images(images_path, root / f"{prefix}-labels-idx1-ubyte.gz")
    assert labels is not None
    return images, labels


def _check_relative_png(sample_id: str) -> None:
    path = PurePosixPath(sample_id)
    if path.is_absolute() or ".." in path.parts or "\\" in sample_id or path.suffix.lower() != ".png":
        raise DataError(f"image id {sample_id!r} must be a relative POSIX path ending in .png without '..'")


def materialize_images(
    images: np.ndarray,
    ids: Sequence[str] | None,
    out_dir: Path | str,
    *,
    labels: np.ndarray | None = None,
    monitor: Monitor = QUIET,
) -> Dataset:
    """Write image arrays as PNG files and return them as an image :class:`Dataset`.

    Parameters
    ----------
    images : (N, H, W) or (N, H, W, 3) uint8 array
    ids : sequence of N str, optional
        Relative POSIX paths ending in ``.png``; default ``"00000.png"``, ``"00001.png"``, ...
        (zero-padded so the sorted order is the array order).
    out_dir : Path or str
        Folder to write into (created if missing); existing files with the same ids are replaced.
    labels : (N,) int8 array, optional
        Anomaly labels (1 anomaly, 0 normal, -1 unknown) to attach, for metrics only.
    monitor : Monitor
        Receives ``("materialize", written, N)`` and is checked every 1,000 images.

    Returns
    -------
    Dataset
        ``kind="images"``, samples in array order, ``source=out_dir``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(f"images must be (N, H, W) or (N, H, W, 3) uint8, got {images.dtype} {images.shape}")
    n = images.shape[0]
    if n == 0:
        raise DataError("no image to write")
    if ids is None:
        width = max(5, len(str(n - 1)))
        ids = [f"{i:0{width}d}.png" for i in range(n)]
    ids = list(ids)
    if len(ids) != n:
        raise DataError(f"{len(ids)} ids for {n} images")
    if len(set(ids)) != n:
        raise DataError("image ids must be unique")
    for sample_id in ids:
        _check_relative_png(sample_id)
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int8)
        if labels.shape != (n,):
            raise DataError(f"labels have shape {labels.shape}, expected ({n},)")
    out_dir = Path(out_dir)
    paths = [out_dir / sample_id for sample_id in ids]
    try:
        for index, (array, path) in enumerate(zip(images, paths)):
            if index % 1000 == 0:
                monitor.check()
                monitor.report("materialize", index, n, "writing images")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array).save(
                path, format="PNG")
    except OSError as exc:
        raise DataError(f"cannot write images into {out_dir} ({exc}); check it is writable") from exc
    monitor.report("materialize", n, n, "images written")
    logger.info("wrote %d PNG images into %s", n, out_dir)
    return image_dataset(out_dir, ids, labels=labels)
