"""Gaussian density estimator (GDE), the one-class head of DROC and CutPaste."""
from __future__ import annotations

from numbers import Real

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from sklearn.covariance import empirical_covariance, ledoit_wolf, oas, shrunk_covariance

from core.detectors._base import BaseDetector, DetectorParamError

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

    def __init__(self, shrinkage="ledoit-wolf", contamination=0.1):
        self.shrinkage = shrinkage
        self.contamination = contamination

    def _fit(self, X: np.ndarray) -> None:
        covariance, self.shrinkage_ = self._shrunk_covariance(X)
        mean_variance = float(np.trace(covariance)) / covariance.shape[0]
        ridge = _RIDGE * mean_variance if mean_variance > 0 else 1.0
        covariance.flat[:: covariance.shape[0] + 1] += ridge
        # The ridge makes the covariance positive definite, so Cholesky succeeds.
        factor = cho_factor(covariance, lower=True)
        precision = cho_solve(factor, np.eye(covariance.shape[0]))
        self.location_ = X.mean(axis=0)
        self.covariance_ = covariance
        self.precision_ = 0.5 * (precision + precision.T)

    def _shrunk_covariance(self, X: np.ndarray) -> tuple[np.ndarray, float]:
        shrinkage = self.shrinkage
        if isinstance(shrinkage, str) and shrinkage in SHRINKAGE_METHODS:
            covariance, amount = (ledoit_wolf if shrinkage == "ledoit-wolf" else oas)(X)
            return covariance, float(amount)
        if isinstance(shrinkage, Real) and not isinstance(shrinkage, bool) and 0 <= shrinkage <= 1:
            return shrunk_covariance(empirical_covariance(X), float(shrinkage)), float(shrinkage)
        raise DetectorParamError(
            f"shrinkage must be one of {SHRINKAGE_METHODS} or a number in [0, 1], "
            f"got {shrinkage!r}"
        )

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
