"""What every Refinery detector shares: the contamination threshold and the outlier API.

A detector subclass implements two methods on validated float64 arrays:
``_fit(X)`` learns the model, ``_score_samples(X)`` returns ``(N,)`` float64 scores,
higher = more normal. This base turns them into scikit-learn's outlier-detector API
(``fit``, ``score_samples``, ``decision_function``, ``predict``, ``fit_predict``).

Each detector declares what its parameters may be in ``_param_constraints`` (:mod:`core.params`), checked at
the start of ``fit``. The name is not scikit-learn's ``_parameter_constraints``, which would switch on its
private validation machinery.
"""
from __future__ import annotations

from numbers import Integral

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from core.errors import ConfigError
from core.params import Interval, check_params


class DetectorParamError(ConfigError, ValueError):
    """A detector parameter is not allowed; the message names the allowed values.

    It is a :class:`~core.errors.ConfigError` for Refinery and a ``ValueError`` for
    scikit-learn tools (search, cross-validation) that expect one.
    """


def contamination_offset(scores: np.ndarray, contamination: float) -> float:
    """The ``contamination`` quantile of training scores, used as ``offset_``.

    Same rule as :class:`sklearn.ensemble.IsolationForest`: about a ``contamination``
    share of the training samples gets a ``score_samples`` below it (ties aside).
    """
    return float(np.percentile(scores, 100.0 * contamination))


def sample_of_rows(rows: np.ndarray, max_samples: int | None, seed) -> np.ndarray:
    """``rows``, or a seeded sample of ``max_samples`` of them (sorted) when there are more.

    Detectors whose fit needs only a bounded sample declare ``max_samples``; the same sample is
    drawn whether the detector subsamples its input or :func:`core.compute.fit_rows` does it before
    reading the rows from a memory-mapped file.
    """
    if max_samples is None or len(rows) <= max_samples:
        return rows
    seed = seed if isinstance(seed, Integral) else 0
    return np.sort(np.random.default_rng(seed).choice(rows, max_samples, replace=False))


class BaseDetector(OutlierMixin, BaseEstimator):
    """One-class detector with scikit-learn's outlier API; subclasses add the model.

    Subclasses define ``__init__`` (storing parameters only, one of them
    ``contamination``), ``_fit(X)`` and ``_score_samples(X)``, and extend
    ``_param_constraints`` with their own parameters.
    """

    _param_constraints: dict = {"contamination": [Interval(float, 0.0, 0.5, closed="right")]}
    """What each parameter may be (:mod:`core.params`); ``fit`` checks them before anything else."""

    def fit(self, X, y=None):
        """Learn the model from training samples, then set ``offset_``.

        Parameters
        ----------
        X : (N, D) array-like of float
            Training samples, N >= 2. float32 input is accepted; math runs in float64.
        y : ignored
            Present for API compatibility; labels never train a detector.

        Returns
        -------
        self : the fitted detector.
        """
        self._check_params()
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        self._fit(X)
        self.offset_ = contamination_offset(self._score_samples(X), float(self.contamination))
        return self

    def _check_params(self) -> None:
        """Raise :class:`DetectorParamError` naming the first parameter outside ``_param_constraints``."""
        check_params(type(self).__name__, self.get_params(deep=False), self._param_constraints,
                     error=DetectorParamError)

    def score_samples(self, X) -> np.ndarray:
        """Normality score of each sample: higher = more normal.

        ``anomaly_score = -score_samples(X)``.

        Parameters
        ----------
        X : (N, D) array-like of float

        Returns
        -------
        scores : (N,) float64
        """
        return self._score_samples(self._validate_fitted(X))

    def decision_function(self, X) -> np.ndarray:
        """``score_samples(X) - offset_``: negative for predicted outliers.

        Parameters
        ----------
        X : (N, D) array-like of float

        Returns
        -------
        decision : (N,) float64
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X) -> np.ndarray:
        """-1 for outliers (``decision_function < 0``), +1 for inliers.

        Parameters
        ----------
        X : (N, D) array-like of float

        Returns
        -------
        labels : (N,) int64 in {-1, +1}
        """
        return np.where(self.decision_function(X) < 0, -1, 1)

    def _validate_fitted(self, X) -> np.ndarray:
        """Check the detector is fitted and ``X`` is finite with ``n_features_in_`` columns."""
        check_is_fitted(self)
        return validate_data(self, X, dtype=np.float64, reset=False)

    def _fit(self, X: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _score_samples(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError
