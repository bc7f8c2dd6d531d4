"""Mean distance to the k nearest training samples."""
from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

from core.detectors._base import BaseDetector
from core.params import Interval


class KNNDistance(BaseDetector):
    """Mean distance to the ``k`` nearest training samples; far = anomalous.

    ``score_samples(x) = -mean(d(x, x_(1)), ..., d(x, x_(k)))`` over the ``k``
    nearest training samples. A training sample scored again is its own nearest
    neighbour (distance 0), so in-sample scores are higher than scores of unseen
    samples from the same distribution.

    Parameters
    ----------
    n_neighbors : int >= 1, default=20
        How many nearest training samples are averaged: 1 reacts to any close
        training point (including an anomaly's near-duplicate), larger values
        need a whole neighbourhood to be close, so a small cluster of similar
        anomalies left in the training data cannot vouch for itself. Clipped to
        the number of training samples: ``n_neighbors_ = min(n_neighbors, N)``.
        The default was chosen on the ADBench tables with refinement (the figures:
        docs/benchmarks.md, "How the defaults were chosen", Table detector).
    metric : str or callable, default="euclidean"
        Distance used, any metric :class:`sklearn.neighbors.NearestNeighbors`
        accepts ("euclidean", "manhattan", "cosine", ...).
    contamination : float in (0, 0.5], default=0.1
        Expected share of anomalies in the training data. Sets ``offset_`` only.

    Attributes
    ----------
    n_neighbors_ : int
        The number of neighbours used, ``min(n_neighbors, N)``.
    nn_ : sklearn.neighbors.NearestNeighbors
        The neighbour index on the training samples.
    offset_ : float
        ``contamination`` quantile of the training ``score_samples``.
    n_features_in_ : int
        D, the number of features seen in ``fit``.
    """

    _param_constraints = {**BaseDetector._param_constraints, "n_neighbors": [Interval(int, 1, None)]}

    def __init__(self, n_neighbors=20, metric="euclidean", contamination=0.1):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.contamination = contamination

    def _fit(self, X: np.ndarray) -> None:
        self.n_neighbors_ = int(min(self.n_neighbors, X.shape[0]))
        self.nn_ = NearestNeighbors(n_neighbors=self.n_neighbors_, metric=self.metric).fit(X)

    def _score_samples(self, X: np.ndarray) -> np.ndarray:
        distances, _ = self.nn_.kneighbors(X)
        return -distances.mean(axis=1)
