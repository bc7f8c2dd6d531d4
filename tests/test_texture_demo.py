"""The built-in granite set (core.data.textures): deterministic tiles, masks where the defects are, and
maps that find them."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from core import engine
from core.config import FitConfig
from core.data import load_dataset
from core.data.builtin import GRANITE_NORMALS, prepare_builtin
from core.data.textures import DEFECT_KINDS, TILE_SIZE, render_tile, write_texture_set
from core.pixel_metrics import PixelMetricAccumulator

QUICK_IMAGE_SIZE = 224
"""The quick fit's image size, the default for 128 px tiles: at 64 or 128 px the patch grid (one cell per 8 px)
is too coarse for a 2 px scratch (docs/benchmarks.md, "Issue 18: the localization demo")."""


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    """``(path, dataset)`` of the built-in set prepared with seed 0, once for the module."""
    workspace = tmp_path_factory.mktemp("workspace")
    path = prepare_builtin("granite", workspace)
    return path, load_dataset(path, workspace=workspace)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def _mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)) > 127


# ------------------------------------------------------------------------------------ rendering

def test_same_seed_same_files_other_seed_other_files(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        (tmp_path / name).mkdir()
        write_texture_set(tmp_path / name, 3, len(DEFECT_KINDS), seed=seed)
    first, again, other = (_files(tmp_path / name) for name in "abc")
    assert len(first) == 3 + 2 * len(DEFECT_KINDS)
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if not name.endswith("_mask.png"))


def test_tile_shapes_and_unknown_defect():
    image, mask = render_tile(np.random.default_rng(0))
    assert image.shape == (TILE_SIZE, TILE_SIZE, 3) and image.dtype == np.uint8
    assert mask.shape == (TILE_SIZE, TILE_SIZE) and not mask.any()
    assert image.std() > 10  # a textured surface, not a flat colour
    with pytest.raises(ValueError, match="scratch"):
        render_tile(np.random.default_rng(0), "dent")


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_mask_covers_what_the_defect_changed(kind):
    """The same generator state without the defect gives the same surface, so the difference is the defect:
    nearly all of it lies in the mask (grown by 2 px for soft edges), and the mask's pixels did change."""
    for seed in range(8):
        clean, no_mask = render_tile(np.random.default_rng([seed, 1]), None)
        defective, mask = render_tile(np.random.default_rng([seed, 1]), kind)
        change = np.abs(defective.astype(int) - clean.astype(int)).sum(axis=-1)
        assert not no_mask.any() and 40 <= mask.sum() <= 0.1 * mask.size
        assert change[ndimage.binary_dilation(mask, iterations=2)].sum() >= 0.9 * change.sum()
        assert change[mask].mean() >= 30


# ----------------------------------------------------------------------------------- the built-in

def test_builtin_loads_with_labels_and_a_mask_for_each_defective_tile(granite):
    path, data = granite
    n_defective = len(data) - GRANITE_NORMALS
    assert data.kind == "images" and not data.skipped and n_defective > 0
    assert data.labels.mean() == pytest.approx(0.1, abs=0.005)
    kinds = [sample_id.split("/")[1].split("-")[0] for sample_id, label in zip(data.ids, data.labels) if label == 1]
    assert sorted(set(kinds)) == sorted(DEFECT_KINDS)
    assert max(map(kinds.count, DEFECT_KINDS)) - min(map(kinds.count, DEFECT_KINDS)) <= 1
    assert set(data.masks) == {i for i, label in zip(data.ids, data.labels) if label == 1}
    for sample_id, mask_path in data.masks.items():
        mask = _mask(mask_path)
        assert mask.any() and mask.shape == Image.open(path / sample_id).size[::-1]
        assert set(np.unique(np.asarray(Image.open(mask_path)))) <= {0, 255}


@pytest.mark.slow
def test_a_quick_fit_localizes_the_defects(granite, tmp_path, one_torch_thread):
    """A fit on part of the set (36 normal tiles, 2 defective ones of each kind): its
    maps rank the defects' pixels above the rest of their tiles (a random or misaligned map gives 0.5)."""
    _, data = granite
    normal = np.flatnonzero(data.labels == 0)[:36]
    defective = np.concatenate([[i for i, sample_id in enumerate(data.ids) if f"/{kind}-" in sample_id][:2]
                                for kind in DEFECT_KINDS])
    part = data.subset(np.concatenate([normal, defective]))
    config = replace(FitConfig(image_size=QUICK_IMAGE_SIZE), rounds=1).validate()
    engine.fit(part, config, tmp_path / "run")
    metrics = PixelMetricAccumulator()
    for sample_id, anomaly_map in engine.open_run(tmp_path / "run").iter_anomaly_maps(data.subset(defective)):
        metrics.update(anomaly_map, _mask(data.masks[sample_id]))
    assert metrics.result().n_regions >= len(defective)
    assert metrics.result().auroc >= 0.75
