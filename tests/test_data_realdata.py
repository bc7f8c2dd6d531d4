"""Real data from ../shared/data (skipped with a reason when it is not there)."""
from __future__ import annotations

import numpy as np
import pytest

from core.data import load_dataset, load_table, read_rgb, softpatch_protocol

pytestmark = pytest.mark.realdata


def test_mvtec_bottle(shared_data, tmp_path):
    root = shared_data("mvtec_ad_bottle_256", "bottle")
    data = load_dataset(root, workspace=tmp_path)
    assert len(data) == 209 + 20 + 63 and not data.skipped
    assert int((data.labels == 0).sum()) == 229 and int(data.labels.sum()) == 63
    assert sum(i.startswith("train/good/") for i in data.ids) == 209
    assert data.masks == {}  # this copy has no ground_truth folder
    assert read_rgb(data.paths[0], 224).shape == (224, 224, 3)
    split = softpatch_protocol(data, 0.1, seed=0)
    assert len(split.train) == 209 + 23 and int(split.train.labels.sum()) == 23
    assert len(split.test) == 20 + 40


def test_magnetic_tile_defects_masks_beside_images(shared_data, tmp_path):
    root = shared_data("magnetic_tile_defects")
    data = load_dataset(root, workspace=tmp_path)
    tiles = [i for i in data.ids if i.startswith("MT_")]
    assert len(tiles) == 1344 and all(i.endswith(".jpg") for i in tiles)
    assert set(data.masks) == set(tiles)
    assert all(data.masks[i] == root / i.replace(".jpg", ".png") for i in tiles)
    assert set(data.ids) - set(tiles) == {"dataset.jpg", "dataset.png"}  # the README's overview figures
    assert data.labels is None  # no folder is named good/normal/ok


def test_adbench_npz_files_load_without_pickle(shared_data):
    folder = shared_data("adbench_classical")
    files = sorted(folder.glob("*.npz"))
    assert len(files) == 26
    for path in files:
        data = load_table(path)
        assert data.labels is not None and set(np.unique(data.labels)) == {0, 1}, path.name
        assert data.table.shape[1] >= 3


@pytest.mark.slow
def test_cifar10_zip(shared_data, tmp_path):
    archive = shared_data("cifar10_jpeg", "cifar10_test_10000.zip")
    data = load_dataset(archive, workspace=tmp_path)
    assert len(data) == 10_000 and data.labels is None
    assert data.ids[0] == "test/airplane/0000.jpg"
