"""Pixel-level localization metrics: pixel AUROC and AUPRO, streamed over images.

Definitions (MVTec AD, Bergmann et al. 2021; anomalib's ``AUPRO``):

- **Pixel AUROC**: ROC AUC over every pixel of every image, ground-truth anomalous pixels positive.
- **PRO** at a threshold ``t``: each connected ground-truth region (8-connectivity, per image) counts
  the share of its pixels with ``score >= t``; PRO is the mean of that share over all regions of all
  images, so a small defect weighs as much as a large one. **FPR** at ``t``: the share of all normal
  pixels (of every image) with ``score >= t``. **AUPRO**: the area under PRO as a function of FPR
  from 0 to ``fpr_limit`` (0.3), the curve linearly interpolated at ``fpr_limit``, divided by
  ``fpr_limit`` (so 1.0 is perfect; a random map gives about ``fpr_limit / 2`` = 0.15).

Streaming. :class:`PixelMetricAccumulator` never holds the pixels: each image adds to three
histograms over one shared set of bins: normal-pixel counts, anomalous-pixel counts and, for
AUPRO, anomalous pixels weighted by ``1 / size of their region`` (the PRO at a threshold is then the
weight at or above it divided by the number of regions). The bins are equal-width over a range that
starts at the first map's range and doubles (merging neighbouring bins, which stays exact) whenever
a value falls outside, so no first pass is needed and the resolution is always at least
``range / (n_bins / 2)``. Thresholds are bin edges; pixels in one bin count as tied. With the
default 65,536 bins the result agrees with :func:`pixel_metrics_exact` (one bin per distinct score)
to about 1e-4.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
from scipy import ndimage

DEFAULT_FPR_LIMIT = 0.3
DEFAULT_BINS = 65536
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class PixelMetrics:
    """Pixel AUROC and AUPRO over a set of images (NaN when a class or a region is missing)."""

    auroc: float
    aupro: float
    fpr_limit: float
    n_images: int
    n_pixels: int
    n_anomalous_pixels: int
    n_regions: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def defect_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected regions (8-connectivity) of a ``(H, W)`` mask: ``(labels (H, W) int32, count)``; 0 = normal."""
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=_CONNECTIVITY)
    return labels, int(count)


def _check_pair(anomaly_map: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(anomaly_map, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"an anomaly map must be (H, W); got shape {values.shape}")
    truth = np.zeros(values.shape, dtype=bool) if mask is None else np.asarray(mask) != 0
    if truth.shape != values.shape:
        raise ValueError(f"mask shape {truth.shape} differs from anomaly map shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("the anomaly map has NaN or infinite values")
    return values, truth


def _region_weights(truth: np.ndarray) -> tuple[np.ndarray, int]:
    """``1 / region size`` for each anomalous pixel (in ``truth[truth]`` order) and the region count."""
    labels, count = defect_regions(truth)
    if count == 0:
        return np.zeros(0), 0
    sizes = np.bincount(labels.ravel())
    return 1.0 / sizes[labels[truth]], count


class PixelMetricAccumulator:
    """Pixel AUROC / AUPRO accumulated one image at a time in bounded memory.

    Parameters
    ----------
    n_bins : int
        Even number of histogram bins (memory: ``3 * 8 * n_bins`` bytes). More bins, closer to
        the exact value.
    fpr_limit : float in (0, 1]
        Upper FPR bound of the AUPRO integral.

    Example
    -------
    >>> accumulator = PixelMetricAccumulator()
    >>> for anomaly_map, mask in zip(maps, masks):      # doctest: +SKIP
    ...     accumulator.update(anomaly_map, mask)
    >>> accumulator.result().aupro                      # doctest: +SKIP
    """

    def __init__(self, n_bins: int = DEFAULT_BINS, fpr_limit: float = DEFAULT_FPR_LIMIT) -> None:
        if n_bins < 2 or n_bins % 2:
            raise ValueError(f"n_bins must be an even number >= 2, got {n_bins}")
        _check_fpr_limit(fpr_limit)
        self.n_bins = int(n_bins)
        self.fpr_limit = float(fpr_limit)
        self._lo: float | None = None
        self._width = 0.0
        self._normal = np.zeros(self.n_bins, dtype=np.int64)
        self._anomalous = np.zeros(self.n_bins, dtype=np.int64)
        self._region_weight = np.zeros(self.n_bins, dtype=np.float64)
        self._n_images = 0
        self._n_regions = 0

    def update(self, anomaly_map: np.ndarray, mask: np.ndarray | None) -> None:
        """Add one image: ``(H, W)`` scores (higher = more anomalous) and its ``(H, W)`` mask
        (non-zero = anomalous; None = all normal)."""
        values, truth = _check_pair(anomaly_map, mask)
        self._n_images += 1
        if values.size == 0:
            return
        index = self._bin_index(values)
        weights, count = _region_weights(truth)
        self._n_regions += count
        n = self.n_bins
        self._normal += np.bincount(index[~truth], minlength=n)
        self._anomalous += np.bincount(index[truth], minlength=n)
        self._region_weight += np.bincount(index[truth], weights=weights, minlength=n)

    def result(self) -> PixelMetrics:
        """The metrics over every image added so far."""
        return _metrics_from_histograms(self._normal, self._anomalous, self._region_weight,
                                        self._n_regions, self._n_images, self.fpr_limit)

    def _bin_index(self, values: np.ndarray) -> np.ndarray:
        low, high = float(values.min()), float(values.max())
        if self._lo is None:
            span = high - low
            span = span * (1.0 + 1e-6) if span > 0 else max(abs(low), 1.0) * 1e-6
            self._lo, self._width = low, span / self.n_bins
        while low < self._lo:
            self._grow(upward=False)
        while np.floor((high - self._lo) / self._width) >= self.n_bins:
            self._grow(upward=True)
        index = np.floor((values - self._lo) / self._width).astype(np.int64)
        return np.clip(index, 0, self.n_bins - 1)

    def _grow(self, upward: bool) -> None:
        """Double the bin width: merge neighbouring bins and extend the range up or down (exact)."""
        half = self.n_bins // 2
        for name in ("_normal", "_anomalous", "_region_weight"):
            old = getattr(self, name)
            merged = old.reshape(half, 2).sum(axis=1)
            pad = np.zeros(half, dtype=old.dtype)
            setattr(self, name, np.concatenate([merged, pad] if upward else [pad, merged]))
        if not upward:
            self._lo -= self.n_bins * self._width
        self._width *= 2.0


def pixel_metrics(
    maps: Iterable[np.ndarray],
    masks: Iterable[np.ndarray | None],
    *,
    n_bins: int = DEFAULT_BINS,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
) -> PixelMetrics:
    """Streaming pixel AUROC and AUPRO over paired iterables of ``(H, W)`` maps and masks.

    Maps may come from a generator (e.g. ``PatchLocalizer.iter_anomaly_maps``); only one is held at a
    time. Masks: non-zero = anomalous, None = all normal.
    """
    accumulator = PixelMetricAccumulator(n_bins, fpr_limit)
    for anomaly_map, mask in zip(maps, masks, strict=True):
        accumulator.update(anomaly_map, mask)
    return accumulator.result()


def pixel_metrics_exact(
    maps: Iterable[np.ndarray], masks: Iterable[np.ndarray | None], *, fpr_limit: float = DEFAULT_FPR_LIMIT
) -> PixelMetrics:
    """Reference for :func:`pixel_metrics`: holds every pixel and uses every distinct score as a threshold.

    For small data and tests only (memory grows with the number of pixels).
    """
    _check_fpr_limit(fpr_limit)
    scores, anomalous, weights = [], [], []
    n_images = n_regions = 0
    for anomaly_map, mask in zip(maps, masks, strict=True):
        values, truth = _check_pair(anomaly_map, mask)
        pixel_weight = np.zeros(values.shape)
        pixel_weight[truth], count = _region_weights(truth)
        scores.append(values.ravel())
        anomalous.append(truth.ravel())
        weights.append(pixel_weight.ravel())
        n_images += 1
        n_regions += count
    if not scores:
        return _metrics_from_histograms(np.zeros(0), np.zeros(0), np.zeros(0), 0, 0, fpr_limit)
    score, truth, weight = np.concatenate(scores), np.concatenate(anomalous), np.concatenate(weights)
    distinct, index = np.unique(score, return_inverse=True)
    n = len(distinct)
    return _metrics_from_histograms(
        np.bincount(index[~truth], minlength=n), np.bincount(index[truth], minlength=n),
        np.bincount(index, weights=weight, minlength=n), n_regions, n_images, fpr_limit,
    )


def _metrics_from_histograms(normal, anomalous, region_weight, n_regions, n_images, fpr_limit) -> PixelMetrics:
    """AUROC and AUPRO from per-bin counts over ascending bins; each bin edge is a threshold."""
    n_normal, n_anomalous = int(np.sum(normal)), int(np.sum(anomalous))

    def from_top(counts) -> np.ndarray:
        # value at or above each threshold, thresholds descending; a leading 0 for "above everything"
        return np.concatenate([[0.0], np.cumsum(np.asarray(counts, dtype=np.float64)[::-1])])

    auroc = aupro = float("nan")
    if n_normal and n_anomalous:
        fpr = from_top(normal) / n_normal
        auroc = float(np.trapezoid(from_top(anomalous) / n_anomalous, fpr))
        if n_regions:
            aupro = _area_up_to(fpr, from_top(region_weight) / n_regions, fpr_limit) / fpr_limit
    return PixelMetrics(auroc=auroc, aupro=aupro, fpr_limit=fpr_limit, n_images=n_images,
                        n_pixels=n_normal + n_anomalous, n_anomalous_pixels=n_anomalous, n_regions=n_regions)


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under ``y(x)`` (x non-decreasing) from ``x[0]`` to ``limit``, interpolating at ``limit``."""
    beyond = int(np.searchsorted(x, limit, side="right"))
    if beyond >= len(x):
        return float(np.trapezoid(y, x))
    x0, x1, y0, y1 = x[beyond - 1], x[beyond], y[beyond - 1], y[beyond]
    y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
    return float(np.trapezoid(np.append(y[:beyond], y_limit), np.append(x[:beyond], limit)))


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
