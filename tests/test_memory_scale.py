"""Embedding at scale: rows stream into a caller's array or memory-mapped file, never a second full copy."""
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from core.config import FitConfig
from core.data.images import load_image_folder
from core.models.image_encoder import ImageEncoder, embedding_memmap
from sample_data import write_digits_images

CONFIG = FitConfig(image_size=32, batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return load_image_folder(write_digits_images(tmp_path_factory.mktemp("img"), n_normal=20, n_anomalous=4))


@pytest.fixture(scope="module")
def encoder():
    return ImageEncoder(CONFIG)


@pytest.fixture(scope="module")
def many(images):
    """1,200 images: the same 24 files repeated, enough for the output to dwarf one batch."""
    return images.subset(np.resize(np.arange(len(images)), 1_200))


def test_memmap_output_is_written_where_asked_with_the_in_memory_rows(images, encoder, tmp_path):
    expected = encoder.embed(images)
    path = tmp_path / "staging" / "embeddings.npy"
    path.parent.mkdir()
    rows = embedding_memmap(path, len(images), encoder.embedding_dim)
    assert encoder.embed(images, out=rows) is rows
    np.testing.assert_array_equal(rows, expected)
    rows.flush()
    del rows
    assert sorted(p.name for p in path.parent.iterdir()) == ["embeddings.npy"]
    on_disk = np.load(path, mmap_mode="r")
    assert on_disk.dtype == np.float32 and on_disk.shape == expected.shape
    np.testing.assert_array_equal(on_disk, expected)


def test_rows_written_into_a_slice_of_a_larger_memmap_leave_the_rest_alone(images, encoder, tmp_path):
    rows = embedding_memmap(tmp_path / "all.npy", 3 * len(images), encoder.embedding_dim)
    rows[:] = -1.0
    encoder.embed(images, out=rows[len(images): 2 * len(images)])
    np.testing.assert_array_equal(rows[len(images): 2 * len(images)], encoder.embed(images))
    assert np.all(rows[: len(images)] == -1.0) and np.all(rows[2 * len(images):] == -1.0)


def test_out_of_the_wrong_shape_or_dtype_is_refused(images, encoder):
    with pytest.raises(ValueError, match="float32"):
        encoder.embed(images, out=np.empty((len(images), encoder.embedding_dim), np.float64))
    with pytest.raises(ValueError, match=f"\\({len(images)}, {encoder.embedding_dim}\\)"):
        encoder.embed(images, out=np.empty((len(images) + 1, encoder.embedding_dim), np.float32))


def traced_peak(function) -> int:
    """Peak bytes numpy and Python allocate while ``function`` runs, above what was live before."""
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        function()
        return tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()


def test_embed_allocates_the_output_once_and_no_second_copy(many, encoder, tmp_path):
    encoder.embed(many.subset(np.arange(CONFIG.batch_size)))  # warm-up outside the measurement
    output_bytes = len(many) * encoder.embedding_dim * 4
    batch_bytes = CONFIG.batch_size * (CONFIG.image_size**2 * 3 + encoder.embedding_dim * 4)
    in_memory = []
    # Rows gathered in a list and concatenated at the end would peak at twice the output.
    assert traced_peak(lambda: in_memory.append(encoder.embed(many))) < output_bytes + 8 * batch_bytes + 256 * 1024
    rows = embedding_memmap(tmp_path / "e.npy", len(many), encoder.embedding_dim)
    # Into a memory-mapped file, nothing of the size of the output is allocated at all.
    assert traced_peak(lambda: encoder.embed(many, out=rows)) < output_bytes / 4
    np.testing.assert_array_equal(rows, in_memory[0])


def resident_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line: address perms offset dev inode [path]
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are only handed back on Linux")
def test_written_rows_of_a_memmap_do_not_stay_resident(many, encoder, tmp_path):
    path = tmp_path / "e.npy"
    rows = embedding_memmap(path, len(many), encoder.embedding_dim)
    encoder.embed(many, out=rows)
    assert resident_kib(path) <= 8  # at most the last, partly written page (and the header's)
    rows[:] = 0.0  # what embed hands back, a plain write keeps resident: the check above can fail
    assert resident_kib(path) >= rows.nbytes // 1024
    del rows
    np.testing.assert_array_equal(np.load(path), 0.0)
