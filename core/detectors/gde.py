"""Gaussian density estimator (GDE), the one-class head of DROC and CutPaste.

A GDE needs only sums over its training samples (:class:`GaussianMoments`): the count, the mean,
the scatter matrix about the mean and the sum of fourth powers of the distances to it (for
Ledoit-Wolf shrinkage). Sums over disjoint partitions of the data add up exactly, so a GDE can be
fitted over data spread across chunks of a memory-mapped file or the nodes of a cluster while only
``D x D`` matrices travel, never the samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Callable

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from core.detectors._base import BaseDetector, DetectorParamError, check_contamination, contamination_offset

SHRINKAGE_METHODS = ("ledoit-wolf", "oas")

# Ridge added to the shrunk covariance, relative to its mean variance. It bounds the
# condition number by about D / _RIDGE, so the precision stays finite when N <= D or
# when columns are constant, and leaves a well-conditioned covariance unchanged.
_RIDGE = 1e-6


@dataclass(frozen=True)
class GaussianMoments:
    """Sums over training samples about a fixed centre: everything a GDE fit reads from the data.

    The sums over disjoint partitions of the samples add up exactly (``a + b``) when every part
    was summed about the same centre. The fit needs that centre to be the mean of all the samples,
    so fitting from partitions takes two passes: the partitions' ``(count, sum)`` give the mean
    (:func:`sample_mean`), then each partition sums about it (:meth:`of`).

    Attributes
    ----------
    count : int
        N, the number of samples summed.
    centre : (D,) float64
        The point the sums are taken about.
    scatter : (D, D) float64
        ``sum_n (x_n - centre)(x_n - centre)^T``.
    fourth : float
        ``sum_n ||x_n - centre||^4``, which Ledoit-Wolf shrinkage needs.
    """

    count: int
    centre: np.ndarray
    scatter: np.ndarray
    fourth: float

    @classmethod
    def of(cls, X: np.ndarray, centre: np.ndarray) -> "GaussianMoments":
        """The sums over the rows of ``X (N, D)`` (any float dtype; summed in float64) about ``centre``."""
        diff = np.asarray(X, dtype=np.float64) - centre
        squared_norms = np.einsum("ij,ij->i", diff, diff)
        return cls(len(diff), centre, diff.T @ diff, float(squared_norms @ squared_norms))

    def __add__(self, other: "GaussianMoments") -> "GaussianMoments":
        if not np.array_equal(self.centre, other.centre):
            raise ValueError("moments summed about different centres do not add up")
        return GaussianMoments(self.count + other.count, self.centre, self.scatter + other.scatter,
                               self.fourth + other.fourth)


def sample_mean(parts) -> np.ndarray:
    """The mean of all samples from each part's ``(count, (D,) sum)``: the first pass of a fit from partitions."""
    parts = list(parts)
    count = sum(n for n, _ in parts)
    return np.sum([np.asarray(total, dtype=np.float64) for _, total in parts], axis=0) / count


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
        contamination = check_contamination(self.contamination)
        self._fit_moments(moments)
        self.offset_ = contamination_offset(np.asarray(training_scores(self)), contamination)
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
        n, p = moments.count, len(moments.centre)
        covariance = moments.scatter / n
        mu = float(np.trace(covariance)) / p
        shrinkage = self.shrinkage
        if isinstance(shrinkage, str) and shrinkage == "ledoit-wolf":
            amount = _ledoit_wolf_amount(covariance, moments.fourth, n, mu)
        elif isinstance(shrinkage, str) and shrinkage == "oas":
            amount = _oas_amount(covariance, n, mu) if p > 1 else 0.0
        elif isinstance(shrinkage, Real) and not isinstance(shrinkage, bool) and 0 <= shrinkage <= 1:
            amount = float(shrinkage)
        else:
            raise DetectorParamError(
                f"shrinkage must be one of {SHRINKAGE_METHODS} or a number in [0, 1], got {shrinkage!r}"
            )
        shrunk = (1.0 - amount) * covariance
        shrunk.flat[:: p + 1] += amount * mu
        return shrunk, amount

    def _score_samples(self, X: np.ndarray) -> np.ndarray:
        return -self._contributions(X).sum(axis=1)

    def _contributions(self, X: np.ndarray) -> np.ndarray:
        diff = X - self.location_
        return diff * (diff @ self.precision_)

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
        return self._contributions(self._validate_fitted(X))


def _ledoit_wolf_amount(covariance: np.ndarray, fourth: float, n: int, mu: float) -> float:
    """Ledoit-Wolf shrinkage from the empirical covariance and ``sum_n ||x_n - mean||^4``."""
    p = len(covariance)
    delta_ = float(np.sum((covariance * n) ** 2)) / n**2
    beta = (fourth / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * float(np.trace(covariance)) + p * mu**2) / p
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def _oas_amount(covariance: np.ndarray, n: int, mu: float) -> float:
    """Oracle Approximating Shrinkage from the empirical covariance."""
    alpha = float(np.mean(covariance**2))
    denominator = (n + 1) * (alpha - mu**2 / len(covariance))
    return 1.0 if denominator == 0 else min((alpha + mu**2) / denominator, 1.0)
