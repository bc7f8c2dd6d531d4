"""Gaussian kernel density estimator with a median-heuristic bandwidth."""
from __future__ import annotations

import numpy as np
from scipy.spatial.distance import pdist
from scipy.special import logsumexp
from sklearn.utils import check_random_state

from core.detectors._base import BaseDetector
from core.params import Interval, Options

# Training samples drawn (without replacement, seeded) for the median heuristic.
MEDIAN_SUBSAMPLE = 1000
# Upper bound on the query x train squared-distance block held at once (float64
# entries: 2**22 is 32 MiB).
_BLOCK_ENTRIES = 2**22


class KernelDensity(BaseDetector):
    """Gaussian kernel density on the training samples; low density = anomalous.

    ``score_samples(x) = log(mean_i exp(-||x - x_i||^2 / (2 h^2)))`` over the training
    samples ``x_i``, with ``h = bandwidth_``. This is the log of the kernel density
    without its normalising constant ``(2 pi h^2)^(-D/2)``, which is the same for
    every sample and so does not change the ranking. A training sample scored again
    counts its own kernel (``exp(0) = 1``), so in-sample scores are higher than
    scores of unseen samples from the same distribution.

    Queries are scored in blocks so that at most ``2**22`` query-train distances
    (32 MiB) are held at once.

    Parameters
    ----------
    bandwidth : "median" or float > 0, default="median"
        Kernel width ``h`` in feature units: larger values smooth the density, so
        isolated anomalies stand out less; smaller values make every unseen sample
        look unusual. "median" uses the median pairwise Euclidean distance among at
        most 1000 training samples drawn with ``random_state`` (the median of the
        non-zero distances when more than half are zero, 1.0 when all are zero).
    contamination : float in (0, 0.5], default=0.1
        Expected share of anomalies in the training data. Sets ``offset_`` only.
    random_state : int, RandomState or None, default=0
        Seed of the subsample drawn for the "median" bandwidth; unused when the
        training set has at most 1000 samples or the bandwidth is a number.

    Attributes
    ----------
    bandwidth_ : float
        The kernel width used.
    X_fit_ : (N, D) float64
        The training samples (the density's kernel centres).
    offset_ : float
        ``contamination`` quantile of the training ``score_samples``.
    n_features_in_ : int
        D, the number of features seen in ``fit``.
    """

    _param_constraints = {**BaseDetector._param_constraints,
                          "bandwidth": [Options("median"), Interval(float, 0.0, None, closed="neither")]}

    def __init__(self, bandwidth="median", contamination=0.1, random_state=0):
        self.bandwidth = bandwidth
        self.contamination = contamination
        self.random_state = random_state

    def _fit(self, X: np.ndarray) -> None:
        self.bandwidth_ = self._resolve_bandwidth(X)
        self.X_fit_ = X

    def _resolve_bandwidth(self, X: np.ndarray) -> float:
        if isinstance(self.bandwidth, str):  # "median", the only word _param_constraints allows
            return median_pairwise_distance(X, random_state=self.random_state)
        return float(self.bandwidth)

    def _score_samples(self, X: np.ndarray) -> np.ndarray:
        # Centring on the training mean keeps ||a||^2 + ||b||^2 - 2 a.b accurate when
        # the data sit far from the origin.
        center = self.X_fit_.mean(axis=0)
        train = self.X_fit_ - center
        train_sq = np.einsum("ij,ij->i", train, train)
        n_train = train.shape[0]
        block = max(1, _BLOCK_ENTRIES // n_train)
        scale = -0.5 / self.bandwidth_**2
        scores = np.empty(X.shape[0], dtype=np.float64)
        for start in range(0, X.shape[0], block):
            queries = X[start : start + block] - center
            sq_dist = (
                np.einsum("ij,ij->i", queries, queries)[:, None]
                + train_sq[None, :]
                - 2.0 * queries @ train.T
            )
            np.maximum(sq_dist, 0.0, out=sq_dist)
            scores[start : start + block] = logsumexp(scale * sq_dist, axis=1)
        return scores - np.log(n_train)


def median_pairwise_distance(X: np.ndarray, *, random_state=0) -> float:
    """Median Euclidean distance between samples of ``X`` (the median heuristic).

    Parameters
    ----------
    X : (N, D) float64
        Samples; at most ``MEDIAN_SUBSAMPLE`` of them, drawn with ``random_state``,
        enter the median.
    random_state : int, RandomState or None, default=0

    Returns
    -------
    h : float
        The median distance; the median of the non-zero distances when it is 0
        (many duplicates); 1.0 when every distance is 0.
    """
    if X.shape[0] > MEDIAN_SUBSAMPLE:
        rng = check_random_state(random_state)
        X = X[rng.choice(X.shape[0], MEDIAN_SUBSAMPLE, replace=False)]
    distances = pdist(X)
    h = float(np.median(distances))
    if h > 0:
        return h
    positive = distances[distances > 0]
    return float(np.median(positive)) if positive.size else 1.0
