"""Gaussian density estimator (GDE), the one-class head of DROC and CutPaste.

A GDE needs only sums over its training samples (:class:`core.stats.GaussianMoments`): the count, the mean,
the scatter matrix about the mean and the sum of fourth powers of the distances to it (for
Ledoit-Wolf shrinkage). Sums over disjoint partitions of the data add up exactly, so a GDE can be
fitted over data spread across chunks of a memory-mapped file or the nodes of a cluster while only
``D x D`` matrices travel, never the samples.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from core.detectors._base import BaseDetector, DetectorParamError, contamination_offset
from core.params import Interval, Options
from core.stats import (
    GaussianMoments,
    ledoit_wolf_amount,
    mahalanobis_terms,
    oas_amount,
    shrink_covariance,
    squared_mahalanobis,
)

SHRINKAGE_METHODS = ("ledoit-wolf", "oas")

# Ridge added to the shrunk covariance, relative to its mean variance. It bounds the
# condition number by about D / _RIDGE, so the precision stays finite when N <= D or
# when columns are constant, and leaves a well-conditioned covariance unchanged.
_RIDGE = 1e-6


class GaussianDensity(BaseDetector):
    """One Gaussian fitted to the training samples; far from it = anomalous.

    ``score_samples(x) = -(x - location_)^T precision_ (x - location_)``, the negative
    squared Mahalanobis distance. The Gaussian log-likelihood is ``-0.5`` times it plus
    a constant, so the ranking is the log-likelihood's.

    Parameters
    ----------
    shrinkage : {"ledoit-wolf", "oas"} or float in [0, 1], default="ledoit-wolf"
        How far the sample covariance is pulled toward a scaled identity before
        inverting. "ledoit-wolf" and "oas" choose the amount from the data (both stay
        usable with fewer samples than features); a float sets it: 0 keeps the sample
        covariance, 1 keeps only the identity scaled to the mean variance, so scores
        become squared Euclidean distances up to a factor.
    contamination : float in (0, 0.5], default=0.1
        Expected share of anomalies in the training data. Sets ``offset_`` only, so
        ``predict`` flags that share of the training samples; scores do not change.

    Attributes
    ----------
    location_ : (D,) float64
        Mean of the training samples.
    covariance_ : (D, D) float64
        Shrunk covariance plus a tiny ridge (1e-6 times the mean variance; 1 when
        every column is constant).
    precision_ : (D, D) float64
        Inverse of ``covariance_``, solved through its Cholesky factor.
    shrinkage_ : float
        The shrinkage amount used (chosen from the data or given).
    offset_ : float
        ``contamination`` quantile of the training ``score_samples``.
    n_features_in_ : int
        D, the number of features seen in ``fit``.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(100, 3))
    >>> gde = GaussianDensity().fit(X)
    >>> bool(gde.score_samples([[10.0, 10.0, 10.0]])[0] < gde.offset_)
    True
    """

    _param_constraints = {**BaseDetector._param_constraints,
                          "shrinkage": [Options(*SHRINKAGE_METHODS), Interval(float, 0.0, 1.0)]}

    def __init__(self, shrinkage="ledoit-wolf", contamination=0.1):
        self.shrinkage = shrinkage
        self.contamination = contamination

    def _fit(self, X: np.ndarray) -> None:
        self._fit_moments(GaussianMoments.of(X, X.mean(axis=0)))

    def fit_moments(
        self, moments: GaussianMoments, training_scores: Callable[["GaussianDensity"], np.ndarray]
    ) -> "GaussianDensity":
        """Fit from sums over the training samples instead of the samples (the same model as :meth:`fit`).

        Parameters
        ----------
        moments : GaussianMoments
            Sums over the training samples about their mean, N >= 2.
        training_scores : callable
            ``training_scores(fitted) -> (N,)``: the ``score_samples`` of the training samples
            under the fitted model, which places ``offset_``. Called once, after the model is set.

        Returns
        -------
        self : the fitted detector.
        """
        self._check_params()
        self._fit_moments(moments)
        self.offset_ = contamination_offset(np.asarray(training_scores(self)), float(self.contamination))
        return self

    def _fit_moments(self, moments: GaussianMoments) -> None:
        if moments.count < 2:
            raise DetectorParamError(f"a Gaussian needs at least 2 training samples, got {moments.count}")
        covariance, self.shrinkage_ = self._shrunk_covariance(moments)
        mean_variance = float(np.trace(covariance)) / covariance.shape[0]
        ridge = _RIDGE * mean_variance if mean_variance > 0 else 1.0
        covariance.flat[:: covariance.shape[0] + 1] += ridge
        # The ridge makes the covariance positive definite, so Cholesky succeeds.
        factor = cho_factor(covariance, lower=True)
        precision = cho_solve(factor, np.eye(covariance.shape[0]))
        self.location_ = moments.centre
        self.covariance_ = covariance
        self.precision_ = 0.5 * (precision + precision.T)
        self.n_features_in_ = len(moments.centre)

    def _shrunk_covariance(self, moments: GaussianMoments) -> tuple[np.ndarray, float]:
        """The covariance pulled toward ``mu * I`` (``mu`` the mean variance), and the amount pulled.

        The Ledoit-Wolf and OAS amounts are scikit-learn's (``sklearn.covariance.ledoit_wolf`` and
        ``oas``), computed from the sums instead of the samples.
        """
        n = moments.count
        covariance = moments.scatter / n
        shrinkage = self.shrinkage
        if isinstance(shrinkage, str) and shrinkage == "ledoit-wolf":
            amount = ledoit_wolf_amount(covariance, moments.fourth, n)
        elif isinstance(shrinkage, str) and shrinkage == "oas":
            amount = float(oas_amount(covariance, n))
        else:  # a number in [0, 1], as _param_constraints allows
            amount = float(shrinkage)
        return shrink_covariance(covariance, amount), amount

    def _score_samples(self, X: np.ndarray) -> np.ndarray:
        return -squared_mahalanobis(X, self.location_, self.precision_)

    def feature_contributions(self, X) -> np.ndarray:
        """Each feature's share of the squared Mahalanobis distance.

        ``C[n, d] = diff[n, d] * (precision_ @ diff[n])[d]`` with
        ``diff = X - location_``; a row sums to the squared distance, i.e. to
        ``-score_samples(X)``. A share can be negative when correlated features
        partly cancel.

        Parameters
        ----------
        X : (N, D) array-like of float

        Returns
        -------
        contributions : (N, D) float64
        """
        return mahalanobis_terms(self._validate_fitted(X), self.location_, self.precision_)
