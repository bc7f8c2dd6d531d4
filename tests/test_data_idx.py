"""IDX reading (MNIST format) and writing arrays as an image Dataset."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from available import require_path
from core.data.idx import (
    FASHION_MNIST_DIR,
    load_fashion_mnist,
    load_idx_images,
    materialize_images,
    read_idx,
)
from core.data.images import load_image_folder
from core.errors import DataError

_TYPE_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B,
               np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx(path: Path, array: np.ndarray, big_endian_dtype: str | None = None) -> Path:
    """Write ``array`` in the IDX format (gzip when ``path`` ends in .gz)."""
    dtype = np.dtype(big_endian_dtype or array.dtype)
    header = bytes([0, 0, _TYPE_CODES[dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx(tmp_path / name, images)
    write_idx(tmp_path / "labels-idx1-ubyte", labels)
    read_images, read_labels = load_idx_images(tmp_path / name, tmp_path / "labels-idx1-ubyte")
    assert read_images.dtype == np.uint8 and np.array_equal(read_images, images)
    assert read_labels.dtype == np.int64 and read_labels.tolist() == [3, 1, 4, 1, 5]
    assert load_idx_images(tmp_path / name)[1] is None


@pytest.mark.parametrize("dtype", [">i2", ">i4", ">f4", ">f8", "i1"])
def test_idx_other_types_come_back_in_native_order(tmp_path, dtype):
    array = np.arange(-3, 9).reshape(3, 4)
    result = read_idx(write_idx(tmp_path / "x.idx", array, dtype))
    assert result.dtype.isnative and np.array_equal(result, array)


def test_idx_errors(tmp_path):
    good = write_idx(tmp_path / "good-idx3-ubyte", np.zeros((2, 3, 3), np.uint8)).read_bytes()
    cases = {"magic": b"\x08\x03" + good[2:], "type": good[:2] + b"\x07" + good[3:],
             "short": good[:-1], "long": good + b"\x00", "header": good[:6], "empty": b""}
    messages = {"magic": "bad magic number", "type": "bad magic number", "short": "truncated",
                "long": "beyond the shape", "header": "truncated inside its header", "empty": "bad magic number"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=messages[name]):
            read_idx(tmp_path / name)
    (tmp_path / "broken.gz").write_bytes(gzip.compress(good)[:-12])
    with pytest.raises(DataError):
        read_idx(tmp_path / "broken.gz")
    with pytest.raises(DataError, match="over the limit"):
        read_idx(tmp_path / "good-idx3-ubyte", max_bytes=10)
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "missing")
    write_idx(tmp_path / "labels", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="there are 2 images"):
        load_idx_images(tmp_path / "good-idx3-ubyte", tmp_path / "labels")
    with pytest.raises(DataError, match=r"expected \(N, H, W\)"):
        load_idx_images(tmp_path / "labels")


def test_materialize_images_keeps_array_order(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (12, 8, 8), dtype=np.uint8)
    data = materialize_images(images, None, tmp_path / "out", labels=np.array([0] * 10 + [1, 1]))
    assert data.ids[:2] == ["00000.png", "00001.png"] and len(data) == 12
    for index in (0, 11):
        assert np.array_equal(np.asarray(Image.open(data.paths[index])), images[index])
    assert data.labels.tolist() == [0] * 10 + [1, 1]
    reloaded = load_image_folder(tmp_path / "out")
    assert reloaded.ids == data.ids and reloaded.fingerprint == data.fingerprint
    colour = np.zeros((2, 4, 4, 3), np.uint8)
    named = materialize_images(colour, ["a/x.png", "b/y.png"], tmp_path / "named")
    assert Image.open(named.paths[1]).mode == "RGB" and named.labels is None


@pytest.mark.parametrize("ids", [["../x.png", "y.png"], ["/x.png", "y.png"], ["x.jpg", "y.png"],
                                 ["x.png", "x.png"], ["x.png"]])
def test_materialize_images_refuses_bad_ids(tmp_path, ids):
    with pytest.raises(DataError):
        materialize_images(np.zeros((2, 4, 4), np.uint8), ids, tmp_path / "out")
    assert not (tmp_path / "x.png").exists()


def test_materialize_images_refuses_bad_arrays(tmp_path):
    with pytest.raises(DataError, match="uint8"):
        materialize_images(np.zeros((2, 4, 4), np.float32), None, tmp_path)


def test_fashion_mnist_test_split():
    require_path(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz", "apt-get install -y dataset-fashion-mnist")
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
