"""Per-row feature attributions for tables: which features make a row anomalous.

Two methods, chosen by what the detector offers:

- ``mahalanobis`` (GDE, or any detector with ``feature_contributions``): feature ``d``'s term of
  the squared Mahalanobis distance, ``diff_d * (precision @ diff)_d``. A row's terms sum exactly to
  its anomaly score; a term can be negative when correlated features partly cancel.
- ``robust_z`` (every other detector): the squared robust z-score of each encoded feature against
  the kept training rows, ``((x - median) / IQR)^2`` (the standard deviation when the IQR is 0, 1
  for a constant feature). It says how unusual each value is on its own; the terms do not sum to
  the detector's score.

Typical ranges are the 5th-95th percentiles of the kept training rows, in the table's units. Each
numeric feature also gets its robust z-score in those units (IQRs from the kept rows' median), and
each one-hot category the share of kept rows that have it. The listed features are the ``k`` with
the largest terms *and* any other feature at least ``FAR_Z`` IQRs from the median: one dominant
feature cannot hide another far outside its range. :meth:`FeatureAttribution.describe` says it
in words ("4955: 10x the typical high; typical 17-493").
Everything here is numpy; the engine supplies the encoded rows, the kept training rows and the
table encoder's medians and scales.

Examples
--------
>>> explanations = explain_table_rows(
...     encoded, kept_encoded, encoder.feature_names, detector,
...     medians=encoder.state_.medians, scales=encoder.state_.scales, ids=ids, k=5)  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from core.data.columns import cell_text

ATTRIBUTION_METHODS = ("mahalanobis", "robust_z")
DRIVES_SHARE = 0.5
"""A column whose features make this much of the flagged rows' scores on average drives them."""
TYPICAL_PERCENTILES = (5.0, 95.0)
FAR_Z = 3.0
"""A value this many interquartile ranges from the kept rows' median is listed whatever its term."""


@dataclass(frozen=True)
class FeatureAttribution:
    """One feature's part in a row's anomaly score.

    Attributes
    ----------
    feature : str
        Encoded feature name (a column, or ``column=category`` for a one-hot category).
    value : float
        The row's value in the table's units (1.0 / 0.0 for a one-hot category).
    typical_low, typical_high : float
        5th and 95th percentile of the feature over the kept training rows.
    contribution : float
        The feature's term (see the module docstring for each method).
    share : float
        ``contribution`` divided by the sum of the row's terms over all features.
    robust_z : float
        ``(value - median) / IQR`` over the kept training rows, in the table's units; NaN for a
        one-hot category.
    kept_share : float
        For a one-hot category, the share of kept training rows in that category; NaN otherwise.
    """

    feature: str
    value: float
    typical_low: float
    typical_high: float
    contribution: float
    share: float
    robust_z: float = float("nan")
    kept_share: float = float("nan")

    def describe(self) -> str:
        """The deviation in plain words, e.g. ``"4955: 10x the typical high (typical 17-493)"``."""
        if not np.isnan(self.kept_share):
            has = "has" if self.value else "lacks"
            return f"{has} {self.feature.split('=', 1)[1]!r}, as {self.kept_share:.0%} of the kept rows do"
        typical = f"typical {cell_text(self.typical_low)}-{cell_text(self.typical_high)}"
        value = cell_text(self.value)
        if self.typical_low <= self.value <= self.typical_high:
            return f"{value}: within the {typical}"
        side, edge = ("above", self.typical_high) if self.value > self.typical_high else ("below", self.typical_low)
        ratio = self.value / edge if edge and np.sign(edge) == np.sign(self.value) else 0.0
        times = f"{ratio:.3g}x the typical high; " if side == "above" and ratio >= 2 else ""
        return f"{value}: {times}{side} the {typical} ({abs(self.robust_z):.3g} IQRs from the median)"


@dataclass(frozen=True)
class RowExplanation:
    """Why one table row got its anomaly score.

    Attributes
    ----------
    id : str
        The row's id (the table's id column, or its 0-based row number).
    anomaly_score : float
        ``-detector.score_samples(row)`` under the run (higher = more anomalous).
    method : str
        One of ``ATTRIBUTION_METHODS`` (see the module docstring).
    features : list of FeatureAttribution
        The most deviating features, largest contribution first.
    """

    id: str
    anomaly_score: float
    method: str
    features: list[FeatureAttribution]


def decode_table_values(encoded: np.ndarray, medians: Sequence[float], scales: Sequence[float]) -> np.ndarray:
    """Undo the table encoder's robust scaling: ``(N, D)`` encoded -> ``(N, D) float64`` table units.

    The first ``len(medians)`` columns are the numeric ones (``value * scale + median``); the
    one-hot columns after them come back as 1.0 (the row has that category) or 0.0, whatever
    weight the encoder gave them. A value imputed at encoding time comes back as the training median.
    """
    values = np.array(encoded, dtype=np.float64, ndmin=2)
    n_numeric = len(medians)
    if n_numeric != len(scales) or n_numeric > values.shape[1]:
        raise ValueError(f"{len(medians)} medians and {len(scales)} scales for {values.shape[1]} features")
    values[:, :n_numeric] = values[:, :n_numeric] * np.asarray(scales) + np.asarray(medians)
    values[:, n_numeric:] = values[:, n_numeric:] != 0
    return values


def percentile_ranges(values: np.ndarray, percentiles: tuple[float, float] = TYPICAL_PERCENTILES) -> np.ndarray:
    """Per-feature ``(low, high)`` percentiles over rows: ``(N, D)`` -> ``(D, 2) float64``."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or len(values) == 0:
        raise ValueError(f"values must be a non-empty (N, D) array; got shape {values.shape}")
    return np.percentile(values, percentiles, axis=0).T


def robust_z_scores(X: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(X - median) / IQR`` per feature, with median and IQR of ``reference`` (``(M, D)``).

    The IQR falls back to the standard deviation when it is 0, and to 1 for a constant feature.
    Returns ``(N, D) float64``.
    """
    X = np.asarray(X, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim != 2 or len(reference) == 0 or X.shape[-1] != reference.shape[1]:
        raise ValueError(f"reference must be a non-empty (M, D) array matching X; got {reference.shape} and {X.shape}")
    q25, median, q75 = np.percentile(reference, [25, 50, 75], axis=0)
    scale = q75 - q25
    scale = np.where(scale > 0, scale, reference.std(axis=0))
    scale = np.where(scale > 0, scale, 1.0)
    return (X - median) / scale


def feature_contributions(detector, X: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, str]:
    """Each feature's term of each row's score, and the method used (see the module docstring).

    Parameters
    ----------
    detector : fitted detector
        Its ``feature_contributions(X)`` is used when it has one (GDE).
    X : (N, D) array
        Encoded rows to explain.
    reference : (M, D) array
        Encoded kept training rows (for ``robust_z``).

    Returns
    -------
    contributions : (N, D) float64
    method : {"mahalanobis", "robust_z"}
    """
    if hasattr(detector, "feature_contributions"):
        return np.asarray(detector.feature_contributions(X), dtype=np.float64), "mahalanobis"
    return robust_z_scores(X, reference) ** 2, "robust_z"


def top_deviating_features(
    row_values_raw: np.ndarray,
    contributions: np.ndarray,
    feature_names: Sequence[str],
    typical_ranges: np.ndarray,
    k: int = 5,
    robust_z: np.ndarray | None = None,
    kept_shares: np.ndarray | None = None,
) -> list[FeatureAttribution]:
    """The ``k`` features with the largest contributions of one row, largest first, then every other
    feature at least ``FAR_Z`` IQRs from the median, farthest first.

    Parameters
    ----------
    row_values_raw : (D,) array
        The row in the table's units (:func:`decode_table_values`).
    contributions : (D,) array
        The row's terms (:func:`feature_contributions`).
    feature_names : sequence of D str
    typical_ranges : (D, 2) array
        :func:`percentile_ranges` of the kept training rows, in the table's units.
    k : int >= 1
        How many features by contribution (all of them when D is smaller).
    robust_z : (D,) array, optional
        The row's robust z-scores in the table's units (NaN for one-hot columns).
    kept_shares : (D,) array, optional
        Share of kept rows with each one-hot category (NaN for numeric columns).

    Returns
    -------
    list of FeatureAttribution
        Ties keep the feature order.
    """
    values = np.asarray(row_values_raw, dtype=np.float64)
    contributions = np.asarray(contributions, dtype=np.float64)
    ranges = np.asarray(typical_ranges, dtype=np.float64)
    n = len(feature_names)
    z = np.full(n, np.nan) if robust_z is None else np.asarray(robust_z, dtype=np.float64)
    shares = np.full(n, np.nan) if kept_shares is None else np.asarray(kept_shares, dtype=np.float64)
    if any(array.shape != (n,) for array in (values, contributions, z, shares)) or ranges.shape != (n, 2):
        raise ValueError(
            f"expected ({n},) values, contributions, z-scores and shares and ({n}, 2) ranges for {n} feature "
            f"names; got {values.shape}, {contributions.shape}, {z.shape}, {shares.shape} and {ranges.shape}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    total = contributions.sum()
    order = list(np.argsort(-contributions, kind="stable")[:k])
    far = [d for d in np.argsort(-np.nan_to_num(np.abs(z)), kind="stable") if abs(z[d]) >= FAR_Z and d not in order]
    return [
        FeatureAttribution(
            feature=str(feature_names[d]),
            value=float(values[d]),
            typical_low=float(ranges[d, 0]),
            typical_high=float(ranges[d, 1]),
            contribution=float(contributions[d]),
            share=float(contributions[d] / total) if total != 0 else 0.0,
            robust_z=float(z[d]),
            kept_share=float(shares[d]),
        )
        for d in order + far
    ]


def explain_table_rows(
    encoded: np.ndarray,
    kept_encoded: np.ndarray,
    feature_names: Sequence[str],
    detector,
    *,
    medians: Sequence[float],
    scales: Sequence[float],
    ids: Sequence[str] | None = None,
    k: int = 5,
) -> list[RowExplanation]:
    """Explain rows of a table under a fitted run.

    Parameters
    ----------
    encoded : (N, D) array
        The rows to explain, encoded by the run's table encoder.
    kept_encoded : (M, D) array
        The run's kept training rows, encoded (typical ranges and robust z-scores come from them).
    feature_names : sequence of D str
        ``TableEncoder.feature_names``.
    detector : fitted detector
        The run's final detector; ``anomaly_score = -detector.score_samples(encoded)``.
    medians, scales : sequences of float
        The table encoder's numeric medians and scales (``TableEncoderState``).
    ids : sequence of N str, optional
        Row ids (default: ``"0"``, ``"1"``, ...).
    k : int
        Features per row.

    Returns
    -------
    list of N RowExplanation
    """
    encoded = np.array(encoded, dtype=np.float64, ndmin=2)
    kept_encoded = np.asarray(kept_encoded, dtype=np.float64)
    ids = [str(i) for i in range(len(encoded))] if ids is None else [str(i) for i in ids]
    if len(ids) != len(encoded):
        raise ValueError(f"{len(ids)} ids for {len(encoded)} rows")
    contributions, method = feature_contributions(detector, encoded, kept_encoded)
    scores = -np.asarray(detector.score_samples(encoded), dtype=np.float64)
    values = decode_table_values(encoded, medians, scales)
    kept_values = decode_table_values(kept_encoded, medians, scales)
    ranges = percentile_ranges(kept_values)
    numeric = np.arange(values.shape[1]) < len(medians)
    z = np.where(numeric, robust_z_scores(values, kept_values), np.nan)
    shares = np.where(numeric, np.nan, kept_values.mean(axis=0))
    return [
        RowExplanation(row_id, float(score), method,
                       top_deviating_features(row, terms, feature_names, ranges, k, row_z, shares))
        for row_id, score, row, terms, row_z in zip(ids, scores, values, contributions, z)
    ]


def column_shares(explanations: Sequence[RowExplanation]) -> dict[str, float]:
    """Each table column's mean share of the rows' scores, largest first: a category's one-hot features
    (``site=east``) count for their column. The rows' explanations must list every feature (``k`` = D)."""
    totals: dict[str, float] = {}
    for explanation in explanations:
        for feature in explanation.features:
            column = feature.feature.split("=", 1)[0]
            totals[column] = totals.get(column, 0.0) + feature.share
    count = max(len(explanations), 1)
    return dict(sorted(((column, total / count) for column, total in totals.items()), key=lambda item: -item[1]))
