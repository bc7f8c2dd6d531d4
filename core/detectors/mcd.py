"""Robust Gaussian on the leading principal components: a detector a cluster of anomalies cannot hide in."""
from __future__ import annotations

import numpy as np
from sklearn.covariance import MinCovDet
from sklearn.decomposition import PCA

from core.detectors._base import BaseDetector, sample_of_rows
from core.params import Interval


class RobustGaussian(BaseDetector):
    """Distance to the densest half of the training data, in its ``n_components`` leading directions.

    ``fit`` projects the training samples on their ``n_components`` leading principal components and
    fits a minimum covariance determinant (MCD) estimate there: the mean and covariance of the
    ``support_fraction`` share of samples whose covariance has the smallest determinant.
    ``score_samples(x) = -sqrt((z - mu)^T S^-1 (z - mu))`` with ``z`` the projection of ``x``.

    Why: a recurring defect makes a dense cluster in the training data. A plain Gaussian takes the
    cluster into its mean and covariance, and kNN lets its members vouch for each other, so both
    score it as normal (masking). The cluster does pull a principal direction towards itself, and the
    MCD fit leaves it out of the support as long as the normal samples are the larger group, so its
    members land far from the robust centre. The final scores of a run still come from
    ``FitConfig.detector``; this detector is the refinement ensemble's default for images.

    Parameters
    ----------
    n_components : int >= 1, default=5
        Leading principal components kept; clipped to ``min(n_components, D, N // 3)`` so that the
        MCD support has several samples per dimension. The default was chosen on the dev half of
        bench/refinement.py (``bench/explore_refinement.py``: 5 and 10 compared).
    support_fraction : float in (0.5, 1] or None, default=None
        Share of samples in the MCD support; None uses scikit-learn's ``(N + d + 1) / 2N``, about half:
        the most robust choice, which still needs the normal samples to be the majority. Where no robust
        estimate exists (a handful of samples, or a support of duplicates), all samples are used.
    contamination : float in (0, 0.5], default=0.1
        Expected share of anomalies in the training data. Sets ``offset_`` only.
    max_samples : int >= 10, default=5000
        At most this many training samples are used (a seeded sample; :func:`core.compute.fit_rows`
        draws it before reading the rows, so fitting on a memory-mapped file of any size reads only
        them). Five components need far fewer, and the MCD's cost grows with the count.
    random_state : int or None, default=None
        Seed of the MCD's random starts and of that sample.

    Attributes
    ----------
    pca_ : sklearn.decomposition.PCA
        The projection on the leading components.
    mcd_ : sklearn.covariance.MinCovDet
        The robust location and covariance in that projection.
    offset_ : float
        ``contamination`` quantile of the training ``score_samples``.
    n_features_in_ : int
        D, the number of features seen in ``fit``.
    """

    _param_constraints = {
        **BaseDetector._param_constraints,
        "n_components": [Interval(int, 1, None)],
        "support_fraction": [Interval(float, 0.5, 1.0, closed="right"), None],
        "max_samples": [Interval(int, 10, None)],
    }

    def __init__(self, n_components=5, support_fraction=None, max_samples=5000, contamination=0.1, random_state=None):
        self.n_components = n_components
        self.support_fraction = support_fraction
        self.max_samples = max_samples
        self.contamination = contamination
        self.random_state = random_state

    def _fit(self, X: np.ndarray) -> None:
        X = X[sample_of_rows(np.arange(len(X)), self.max_samples, self.random_state)]
        components = max(1, min(self.n_components, X.shape[1], X.shape[0] // 3))
        self.pca_ = PCA(components, random_state=self.random_state).fit(X)
        projected = self.pca_.transform(X)
        try:
            self.mcd_ = MinCovDet(support_fraction=self.support_fraction, random_state=self.random_state).fit(projected)
        except ValueError:  # a degenerate support (a handful of samples, duplicates): no robust estimate exists
            self.mcd_ = MinCovDet(support_fraction=1.0, random_state=self.random_state).fit(projected)

    def _score_samples(self, X: np.ndarray) -> np.ndarray:
        return -np.sqrt(np.maximum(self.mcd_.mahalanobis(self.pca_.transform(X)), 0.0))
