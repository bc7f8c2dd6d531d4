"""Pixel AUROC / AUPRO: a hand-checked case, an independent brute-force PRO, streaming vs exact."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from core.pixel_metrics import (
    PixelMetricAccumulator,
    defect_regions,
    pixel_metrics,
    pixel_metrics_exact,
)


def hand_case():
    """Two 1x4 images, two defect regions (r1: 2 pixels in A, r2: 1 pixel in B), 5 normal pixels.

    A: mask [1, 1, 0, 0], scores [0.9, 0.5, 0.5, 0.1]
    B: mask [0, 0, 0, 1], scores [0.2, 0.3, 0.6, 0.8]
    Normal scores {0.5, 0.1, 0.2, 0.3, 0.6}; r1 = {0.9, 0.5}; r2 = {0.8}.

    Thresholds from the top (score >= t):
      t > 0.9 : FPR 0,   PRO 0
      t = 0.9 : FPR 0,   r1 1/2, r2 0 -> PRO 0.25
      t = 0.8 : FPR 0,   r1 1/2, r2 1 -> PRO 0.75
      t = 0.6 : FPR 1/5 (0.6),         PRO 0.75
      t = 0.5 : FPR 2/5 (0.6, 0.5), r1 1 -> PRO 1.0   (the 0.5 tie: a sloped segment)
    At FPR 0.3 the segment (0.2, 0.75)-(0.4, 1.0) gives PRO 0.875.
    Area up to 0.3: 0.2 * 0.75 + 0.1 * (0.75 + 0.875) / 2 = 0.15 + 0.08125 = 0.23125
    AUPRO = 0.23125 / 0.3 = 0.7708333...

    Pixel AUROC: 15 (positive, negative) pairs; 0.9 and 0.8 beat all 5 negatives (10);
    0.5 beats 0.1, 0.2, 0.3, ties 0.5 (half), loses to 0.6 (3.5). (10 + 3.5) / 15 = 0.9.
    """
    maps = [np.array([[0.9, 0.5, 0.5, 0.1]]), np.array([[0.2, 0.3, 0.6, 0.8]])]
    masks = [np.array([[1, 1, 0, 0]]), np.array([[0, 0, 0, 1]])]
    return maps, masks


@pytest.mark.parametrize("compute", [pixel_metrics_exact, pixel_metrics], ids=["exact", "streaming"])
def test_hand_checked_aupro_and_auroc(compute):
    maps, masks = hand_case()
    result = compute(maps, masks)
    assert result.aupro == pytest.approx(0.23125 / 0.3, abs=1e-9)
    assert result.auroc == pytest.approx(0.9, abs=1e-9)
    assert (result.n_regions, result.n_anomalous_pixels, result.n_pixels, result.n_images) == (2, 3, 8, 2)


def brute_force_aupro(maps, masks, fpr_limit=0.3):
    """PRO and FPR recomputed region by region at every distinct score (no histogram trick)."""
    regions = []
    for anomaly_map, mask in zip(maps, masks):
        labels, count = defect_regions(mask)
        regions += [anomaly_map[labels == r] for r in range(1, count + 1)]
    normal = np.concatenate([m[np.asarray(k) == 0] for m, k in zip(maps, masks)])
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    fpr = [0.0] + [float(np.mean(normal >= t)) for t in thresholds]
    pro = [0.0] + [float(np.mean([np.mean(r >= t) for r in regions])) for t in thresholds]
    fpr, pro = np.array(fpr), np.array(pro)
    keep = fpr <= fpr_limit
    first_beyond = np.argmax(fpr > fpr_limit)
    x0, x1, y0, y1 = fpr[first_beyond - 1], fpr[first_beyond], pro[first_beyond - 1], pro[first_beyond]
    y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    return np.trapezoid(np.append(pro[keep], y_limit), np.append(fpr[keep], fpr_limit)) / fpr_limit


def random_maps(seed, n=12, shape=(24, 30), quantize=None):
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n):
        mask = np.zeros(shape, dtype=np.uint8)
        if i % 2:
            y, x = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
            mask[y:y + rng.integers(1, 6), x:x + rng.integers(1, 6)] = 255
            if i % 3 == 0:
                mask[0:2, 0:3] = 255
        scores = rng.gamma(2.0, 1.0, shape) * (1 + i / 5) + (mask > 0) * rng.normal(2.0, 1.5, shape)
        if quantize:
            scores = np.round(scores * quantize) / quantize
        maps.append(scores.astype(np.float32))
        masks.append(mask)
    return maps, masks


@pytest.mark.parametrize("seed,quantize", [(0, None), (1, 4)])
def test_exact_matches_independent_brute_force_and_sklearn(seed, quantize):
    maps, masks = random_maps(seed, quantize=quantize)
    exact = pixel_metrics_exact(maps, masks)
    assert exact.aupro == pytest.approx(brute_force_aupro(maps, masks), abs=1e-9)
    truth = np.concatenate([(m > 0).ravel() for m in masks])
    assert exact.auroc == pytest.approx(roc_auc_score(truth, np.concatenate([m.ravel() for m in maps])), abs=1e-9)


@pytest.mark.parametrize("seed", [2, 3])
def test_streaming_agrees_with_exact_even_when_the_range_grows(seed):
    maps, masks = random_maps(seed, n=40)
    # the first map spans a tiny range; later ones force the bins to grow up and down many times
    maps[0] = maps[0] * 1e-3
    maps[-1] = maps[-1] * 50.0 - 80.0
    exact = pixel_metrics_exact(maps, masks)
    streamed = pixel_metrics(iter(maps), iter(masks))
    assert streamed.auroc == pytest.approx(exact.auroc, abs=1e-3)
    assert streamed.aupro == pytest.approx(exact.aupro, abs=1e-3)
    assert (streamed.n_pixels, streamed.n_regions) == (exact.n_pixels, exact.n_regions)


def test_bounded_memory_does_not_depend_on_image_count():
    accumulator = PixelMetricAccumulator(n_bins=1024)
    maps, masks = random_maps(4, n=30)
    for anomaly_map, mask in zip(maps, masks):
        accumulator.update(anomaly_map, mask)
    sizes = [array.size for array in (accumulator._normal, accumulator._anomalous, accumulator._region_weight)]
    assert sizes == [1024] * 3


def test_perfect_and_inverted_maps():
    masks = [np.pad(np.ones((3, 3)), 3)]
    perfect = [masks[0].astype(np.float32)]
    assert pixel_metrics(perfect, masks).aupro == pytest.approx(1.0)
    assert pixel_metrics(perfect, masks).auroc == pytest.approx(1.0)
    inverted = pixel_metrics([1.0 - perfect[0]], masks)
    assert inverted.auroc == pytest.approx(0.0) and inverted.aupro == pytest.approx(0.0)


def test_regions_are_eight_connected_and_each_weighs_the_same():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True      # diagonal neighbours: one region
    mask[4:6, 2:6] = True               # a second, larger region
    assert defect_regions(mask)[1] == 2
    # only the small region scores high: PRO is 1/2 at FPR 0 whatever the region sizes (pixel-weighted
    # it would be 2/10), then linear to (FPR 1, PRO 1): 0.65 at FPR 0.3; area 0.3 * (0.5 + 0.65) / 2
    scores = np.where(mask & (np.arange(6)[:, None] < 2), 1.0, 0.0)
    result = pixel_metrics_exact([scores], [mask])
    assert result.aupro == pytest.approx((0.5 + 0.65) / 2)


def test_missing_class_gives_nan_and_bad_input_is_refused():
    normal_only = pixel_metrics([np.random.default_rng(0).random((4, 4))], [None])
    assert np.isnan(normal_only.auroc) and np.isnan(normal_only.aupro) and normal_only.n_regions == 0
    with pytest.raises(ValueError, match="shape"):
        pixel_metrics([np.zeros((4, 4))], [np.zeros((4, 5))])
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics([np.full((2, 2), np.nan)], [None])
    with pytest.raises(ValueError, match="even"):
        PixelMetricAccumulator(n_bins=7)
