"""One-class detectors with scikit-learn's outlier API (``score_samples``: higher = more normal).

Refinery's user-facing ``anomaly_score`` is ``-score_samples``. Every detector sets
``offset_`` from ``contamination`` so that ``predict`` flags that share of the
training data; :func:`make_detector` builds one by name.
"""
from core.detectors.adapters import PyODAdapter, SklearnAdapter
from core.detectors.gde import GaussianDensity
from core.detectors.kde import KernelDensity
from core.detectors.knn import KNNDistance
from core.detectors.mcd import RobustGaussian
from core.detectors.ocsvm import OneClassSVM
from core.detectors.registry import DETECTORS, make_detector

__all__ = [
    "DETECTORS",
    "GaussianDensity",
    "KNNDistance",
    "KernelDensity",
    "OneClassSVM",
    "PyODAdapter",
    "RobustGaussian",
    "SklearnAdapter",
    "make_detector",
]
