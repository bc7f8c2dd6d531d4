"""Contamination protocols: exact ratios, disjoint splits, determinism under the seed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from core.data.idx import materialize_images
from core.data.images import load_image_folder
from core.data.protocol import anomaly_count, softpatch_protocol, srr_protocol
from core.errors import ConfigError, DataError


def pool(n_normal=1000, n_per_other=100, n_other=9):
    """A 2-D table pool: class 0 plus ``n_other`` other classes, rows tagged by position."""
    classes = np.concatenate([np.zeros(n_normal, int)] + [np.full(n_per_other, c) for c in range(1, n_other + 1)])
    features = np.column_stack([np.arange(len(classes)), classes]).astype(float)
    return features, classes


def test_srr_exact_ratio_disjoint_and_labelled():
    features, classes = pool()
    split = srr_protocol(features, classes, normal_classes=0, anomaly_ratio=0.1, n_train_normal=900, seed=3)
    train, test = split.train, split.test
    assert len(train) == 1000 and int(train.labels.sum()) == 100  # exactly 10 %
    assert set(split.train_indices).isdisjoint(split.test_indices)
    assert len(split.train_indices) + len(split.test_indices) == len(classes)
    assert np.array_equal(train.labels, (classes[split.train_indices] != 0).astype(np.int8))
    assert np.array_equal(test.labels, (classes[split.test_indices] != 0).astype(np.int8))
    # the rows really are the sampled ones (column 0 holds the source position)
    assert np.array_equal(train.table["x0"].to_numpy(), split.train_indices)
    assert int((test.labels == 0).sum()) == 100 and int(test.labels.sum()) == 800
    assert "seed 3" in split.description and "10.00%" in split.description


def test_srr_is_deterministic_under_the_seed():
    features, classes = pool()
    first = srr_protocol(features, classes, [0], 0.05, seed=7)
    again = srr_protocol(features, classes, [0], 0.05, seed=7)
    other = srr_protocol(features, classes, [0], 0.05, seed=8)
    assert np.array_equal(first.train_indices, again.train_indices)
    assert first.train.fingerprint == again.train.fingerprint
    assert not np.array_equal(first.train_indices, other.train_indices)
    assert first.train.fingerprint != other.train.fingerprint


def test_srr_defaults_and_several_normal_classes():
    features, classes = pool(n_normal=50, n_per_other=50, n_other=3)
    split = srr_protocol(features, classes, normal_classes=[0, 1], anomaly_ratio=0.0)
    assert len(split.train) == 80 and split.train.labels.sum() == 0  # 80 % of the 100 normals
    assert split.test.labels.tolist().count(0) == 20


def test_srr_not_enough_data_or_bad_ratio():
    features, classes = pool(n_normal=100, n_per_other=5, n_other=2)
    with pytest.raises(DataError, match="only 10 exist"):
        srr_protocol(features, classes, 0, 0.2, n_train_normal=90, seed=0)
    with pytest.raises(DataError, match="at most one less"):
        srr_protocol(features, classes, 0, 0.0, n_train_normal=100)
    with pytest.raises(DataError, match="need at least 2"):
        srr_protocol(features, classes, 99, 0.1)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        srr_protocol(features, classes, 0, 1.0)
    with pytest.raises(DataError, match="expected \\(110,\\)"):
        srr_protocol(features, classes[:5], 0, 0.1)
    with pytest.raises(DataError, match="materialize_images"):
        srr_protocol(np.zeros((4, 2, 2)), np.zeros(4), 0, 0.1)


def test_srr_on_images_with_class_mapping(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (30, 6, 6), dtype=np.uint8)
    classes = np.repeat([0, 1, 2], 10)
    data = materialize_images(images, None, tmp_path / "pool")
    by_id = dict(zip(data.ids, classes.tolist()))
    split = srr_protocol(data, by_id, 0, 0.2, n_train_normal=8, seed=0)
    assert len(split.train) == 10 and int(split.train.labels.sum()) == 2
    assert all(by_id[i] != 0 for i, label in zip(split.train.ids, split.train.labels) if label == 1)
    assert split.train.paths == [data.paths[i] for i in split.train_indices]


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 5000), ratio=st.floats(0, 0.95))
def test_anomaly_count_is_the_closest_share(n, ratio):
    count = anomaly_count(n, ratio)
    if n == 0:
        assert count == 0
        return

    def error(a):
        return abs(a / (n + a) - ratio)

    assert error(count) <= error(count + 1) and (count == 0 or error(count) <= error(count - 1))


def _write(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def mvtec(tmp_path) -> Path:
    root = tmp_path / "widget"
    for i in range(9):
        _write(root / "train" / "good" / f"{i:03d}.png", i)
    for i in range(3):
        _write(root / "test" / "good" / f"{i:03d}.png", 100 + i)
    for defect in ("crack", "hole"):
        for i in range(3):
            _write(root / "test" / defect / f"{i:03d}.png", 200 + i)
            mask = np.zeros((8, 8), np.uint8)
            mask[2:4, 2:4] = 255
            (root / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "ground_truth" / defect / f"{i:03d}_mask.png")
    return tmp_path


def test_softpatch_moves_test_anomalies_into_training(mvtec):
    data = load_image_folder(mvtec)
    split = softpatch_protocol(data, 0.25, seed=1)
    train, test = split.train, split.test
    assert len(train) == 12 and int(train.labels.sum()) == 3  # 3 / 12 = 25 % exactly
    assert sum("/train/good/" in i for i in train.ids) == 9
    assert set(train.ids).isdisjoint(test.ids)
    assert len(test) == 3 + 3 and int(test.labels.sum()) == 3
    assert set(train.ids) | set(test.ids) == set(data.ids)
    moved = [i for i in train.ids if "/test/" in i]
    assert all(i in train.masks for i in moved)  # masks follow the moved images
    assert softpatch_protocol(data, 0.25, seed=1).train.ids == train.ids
    other_draws = {tuple(softpatch_protocol(data, 0.25, seed=s).train.ids) for s in range(2, 8)}
    assert len(other_draws) > 1


def test_softpatch_errors(mvtec, tmp_path):
    data = load_image_folder(mvtec)
    with pytest.raises(DataError, match="only 6 exist"):
        softpatch_protocol(data, 0.5, seed=0)
    with pytest.raises(DataError, match="needs a labelled image data set"):
        softpatch_protocol(data.without_labels(), 0.1)
    plain = tmp_path / "plain"
    _write(plain / "good" / "a.png", 0)
    _write(plain / "bad" / "b.png", 1)
    with pytest.raises(DataError, match="does not have the MVTec layout"):
        softpatch_protocol(load_image_folder(plain), 0.1)
