"""Give third-party outlier detectors Refinery's exact contract.

Both adapters clone the wrapped estimator in ``fit`` (the one passed in is never
fitted), pass ``random_state`` to it when it has that parameter, and set ``offset_``
from ``contamination``. The wrapped estimator's own ``contamination`` or threshold is
ignored: only the adapter's ``offset_`` decides ``predict``.
"""
from __future__ import annotations

import numpy as np
from sklearn.base import clone

from core.detectors._base import BaseDetector, DetectorParamError


class _Adapter(BaseDetector):
    """Fit a clone of ``estimator``; subclasses say how to read a normality score."""

    _score_methods: tuple[str, ...] = ()
    _hint = ""

    def __init__(self, estimator, *, contamination=0.1, random_state=None):
        self.estimator = estimator
        self.contamination = contamination
        self.random_state = random_state

    def _fit(self, X: np.ndarray) -> None:
        estimator = clone(self.estimator)
        if not any(hasattr(estimator, method) for method in self._score_methods):
            raise DetectorParamError(
                f"{type(self).__name__} needs an estimator with one of "
                f"{self._score_methods} on new data; {type(estimator).__name__} has none"
                f"{self._hint}"
            )
        if self.random_state is not None and "random_state" in estimator.get_params():
            estimator.set_params(random_state=self.random_state)
        self.estimator_ = estimator.fit(X)


class SklearnAdapter(_Adapter):
    """Any scikit-learn outlier detector, e.g. :class:`sklearn.ensemble.IsolationForest`.

    ``score_samples`` is the estimator's ``score_samples`` (or its
    ``decision_function`` when it has none); both are higher = more normal in
    scikit-learn, so no sign changes.

    Parameters
    ----------
    estimator : scikit-learn outlier detector
        Unfitted template; a clone is fitted. It must score new data
        (``LocalOutlierFactor`` needs ``novelty=True``).
    contamination : float in (0, 0.5], default=0.1
        Expected share of anomalies in the training data. Sets ``offset_`` only;
        the estimator's own ``contamination`` is ignored.
    random_state : int, RandomState or None, default=None
        Set on the clone when it has a ``random_state`` parameter; None leaves the
        estimator's own value.

    Attributes
    ----------
    estimator_ : the fitted clone of ``estimator``.
    offset_ : float
        ``contamination`` quantile of the training ``score_samples``.
    n_features_in_ : int
        D, the number of features seen in ``fit``.

    Examples
    --------
    >>> from sklearn.ensemble import IsolationForest
    >>> detector = SklearnAdapter(IsolationForest(n_estimators=50), random_state=0)
    """

    _score_methods = ("score_samples", "decision_function")
    _hint = " (LocalOutlierFactor has them with novelty=True)"

    def _score_samples(self, X: np.ndarray) -> np.ndarray:
        if hasattr(self.estimator_, "score_samples"):
            scores = self.estimator_.score_samples(X)
        else:
            scores = self.estimator_.decision_function(X)
        return np.asarray(scores, dtype=np.float64).ravel()


class PyODAdapter(_Adapter):
    """Any PyOD detector, e.g. ``pyod.models.ecod.ECOD``.

    PyOD's ``decision_function`` is higher = more anomalous, so
    ``score_samples = -estimator_.decision_function(X)``. Some PyOD detectors are
    transductive: ECOD ranks ``X`` against the training data *and* the other rows of
    ``X``, so a sample's score depends on the batch it is scored with.

    Parameters
    ----------
    estimator : PyOD detector
        Unfitted template; a clone is fitted.
    contamination : float in (0, 0.5], default=0.1
        Expected share of anomalies in the training data. Sets ``offset_`` only;
        the detector's own ``contamination`` and ``threshold_`` are ignored.
    random_state : int, RandomState or None, default=None
        Set on the clone when it has a ``random_state`` parameter; None leaves the
        detector's own value.

    Attributes
    ----------
    estimator_ : the fitted clone of ``estimator``.
    offset_ : float
        ``contamination`` quantile of the training ``score_samples``.
    n_features_in_ : int
        D, the number of features seen in ``fit``.
    """

    _score_methods = ("decision_function",)
    transductive = True
    """Rows are scored in one batch, never in chunks (:func:`core.compute.score_rows`)."""

    def _score_samples(self, X: np.ndarray) -> np.ndarray:
        return -np.asarray(self.estimator_.decision_function(X), dtype=np.float64).ravel()
