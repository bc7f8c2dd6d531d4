"""Detectors by name: what a config, the CLI's ``--detector`` and the app choose from."""
from __future__ import annotations

from core.detectors.adapters import PyODAdapter, SklearnAdapter
from core.detectors.gde import GaussianDensity
from core.detectors.kde import KernelDensity
from core.detectors.knn import KNNDistance
from core.detectors.mcd import RobustGaussian
from core.detectors.ocsvm import OneClassSVM
from core.errors import ConfigError

DETECTORS = ("gde", "kde", "ocsvm", "knn", "mcd", "iforest", "ecod")

_OWN = {"gde": GaussianDensity, "kde": KernelDensity, "ocsvm": OneClassSVM, "knn": KNNDistance, "mcd": RobustGaussian}
# Set by make_detector's own arguments, so not accepted in **params.
_RESERVED = ("contamination", "random_state")


def make_detector(name: str, *, contamination=0.1, random_state=0, **params):
    """A fresh, unfitted detector with Refinery's outlier contract.

    Parameters
    ----------
    name : {"gde", "kde", "ocsvm", "knn", "mcd", "iforest", "ecod"}
        "gde" :class:`GaussianDensity`, "kde" :class:`KernelDensity`, "ocsvm"
        :class:`OneClassSVM`, "knn" :class:`KNNDistance`, "mcd" :class:`RobustGaussian`, "iforest" scikit-learn's
        IsolationForest through :class:`SklearnAdapter`, "ecod" PyOD's ECOD through
        :class:`PyODAdapter` (needs the optional package ``pyod``).
    contamination : float in (0, 0.5], default=0.1
        Expected share of anomalies in the training data; sets ``offset_`` only.
    random_state : int or None, default=0
        Seed of the detector's random steps, where it has any (kde subsample,
        iforest trees); ignored by the deterministic ones.
    **params
        The detector's other parameters, e.g. ``n_neighbors=10`` for "knn" or
        ``n_estimators=200`` for "iforest" (passed to IsolationForest).

    Returns
    -------
    detector : unfitted estimator with ``fit``, ``score_samples``,
        ``decision_function`` and ``predict``.

    Raises
    ------
    ConfigError
        Unknown name or parameter (the message lists the allowed ones), or "ecod"
        without pyod installed.
    """
    if name not in DETECTORS:
        raise ConfigError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    if name in _OWN:
        cls = _OWN[name]
        template = cls()
        _check_params(name, template, params)
        if "random_state" in template.get_params():
            params["random_state"] = random_state
        return cls(contamination=contamination, **params)
    if name == "iforest":
        from sklearn.ensemble import IsolationForest

        _check_params(name, IsolationForest(), params)
        return SklearnAdapter(
            IsolationForest(**params), contamination=contamination, random_state=random_state
        )
    try:
        from pyod.models.ecod import ECOD
    except ImportError as exc:
        raise ConfigError(
            'detector "ecod" needs the optional package pyod (pip install pyod); '
            f"or choose one of {', '.join(d for d in DETECTORS if d != 'ecod')}"
        ) from exc
    _check_params(name, ECOD(), params)
    return PyODAdapter(ECOD(**params), contamination=contamination, random_state=random_state)


def _check_params(name: str, template, params: dict) -> None:
    allowed = sorted(set(template.get_params()) - set(_RESERVED))
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"detector {name!r} has no parameter {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed) or 'none besides contamination and random_state'}"
        )
