"""Detection metrics on image/sample level; labels 1 = anomaly, 0 = normal, -1 = unknown."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score


@dataclass(frozen=True)
class DetectionMetrics:
    """AUROC, average precision and F1 at the run's threshold, over samples with a known label."""

    auroc: float
    ap: float
    f1: float
    n_normal: int
    n_anomalous: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def detection_metrics(labels: np.ndarray | None, anomaly_score: np.ndarray, is_anomaly: np.ndarray) -> DetectionMetrics | None:
    """Metrics over labelled samples, or None when both classes are not present."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    known = labels >= 0
    y = labels[known]
    if len(np.unique(y)) < 2:
        return None
    score = np.asarray(anomaly_score, dtype=np.float64)[known]
    return DetectionMetrics(
        auroc=float(roc_auc_score(y, score)),
        ap=float(average_precision_score(y, score)),
        f1=float(f1_score(y, np.asarray(is_anomaly)[known].astype(int), zero_division=0)),
        n_normal=int(np.sum(y == 0)),
        n_anomalous=int(np.sum(y == 1)),
    )
