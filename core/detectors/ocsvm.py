"""One-class SVM with an RBF kernel, thresholded by contamination."""
from __future__ import annotations

import numpy as np
from sklearn.svm import OneClassSVM as _SklearnOneClassSVM

from core.detectors._base import BaseDetector
from core.params import Interval, Options


class OneClassSVM(BaseDetector):
    """RBF one-class SVM (:class:`sklearn.svm.OneClassSVM`) with Refinery's threshold.

    ``score_samples`` is the SVM's raw score ``sum_i alpha_i K(x_i, x)``: higher = more
    normal. Unlike scikit-learn's class, ``offset_`` comes from ``contamination`` (the
    quantile of training scores), not from ``nu``.

    Parameters
    ----------
    nu : float in (0, 1], default=0.1
        Upper bound on the share of training samples left outside the learned
        support and lower bound on the share of support vectors: larger values give
        a tighter, more detailed boundary.
    gamma : "scale", "auto" or float > 0, default="scale"
        RBF kernel width ``K(x, y) = exp(-gamma ||x - y||^2)``: larger values make the
        support hug individual samples. "scale" uses ``1 / (D * X.var())``, "auto"
        uses ``1 / D``.
    contamination : float in (0, 0.5], default=0.1
        Expected share of anomalies in the training data. Sets ``offset_`` only.

    Attributes
    ----------
    svm_ : sklearn.svm.OneClassSVM
        The fitted SVM.
    offset_ : float
        ``contamination`` quantile of the training ``score_samples``.
    n_features_in_ : int
        D, the number of features seen in ``fit``.
    """

    _param_constraints = {
        **BaseDetector._param_constraints,
        "nu": [Interval(float, 0.0, 1.0, closed="right")],
        "gamma": [Options("scale", "auto"), Interval(float, 0.0, None, closed="neither")],
    }

    def __init__(self, nu=0.1, gamma="scale", contamination=0.1):
        self.nu = nu
        self.gamma = gamma
        self.contamination = contamination

    def _fit(self, X: np.ndarray) -> None:
        self.svm_ = _SklearnOneClassSVM(kernel="rbf", nu=self.nu, gamma=self.gamma).fit(X)

    def _score_samples(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.svm_.score_samples(X), dtype=np.float64)
