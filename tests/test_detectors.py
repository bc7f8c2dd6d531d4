"""Detectors: one outlier contract for all, scikit-learn's checks, and each model's maths."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.spatial.distance import cdist, pdist
from scipy.special import logsumexp
from sklearn.ensemble import IsolationForest
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KernelDensity as SklearnKernelDensity
from sklearn.neighbors import LocalOutlierFactor
from sklearn.utils.estimator_checks import parametrize_with_checks

from core.detectors import (
    DETECTORS,
    GaussianDensity,
    KernelDensity,
    KNNDistance,
    OneClassSVM,
    PyODAdapter,
    RobustGaussian,
    SklearnAdapter,
    make_detector,
)
from core.errors import ConfigError

HAS_PYOD = importlib.util.find_spec("pyod") is not None


def _detector(name, **kwargs):
    if name == "ecod" and not HAS_PYOD:
        pytest.skip("pyod (test extra) is not installed")
    return make_detector(name, **kwargs)


@pytest.fixture(scope="module")
def data():
    """Training inliers, held-out inliers and one far outlier, all 4-D."""
    rng = np.random.default_rng(0)
    return {
        "train": rng.normal(size=(200, 4)),
        "test": rng.normal(size=(40, 4)),
        "outlier": np.full((1, 4), 8.0),
    }


# --- the contract every detector obeys -------------------------------------------------


@pytest.mark.parametrize("name", DETECTORS)
def test_fit_returns_self_and_outputs_have_one_value_per_sample(name, data):
    detector = _detector(name)
    assert detector.fit(data["train"]) is detector
    X = data["test"]
    for method, kind in [("score_samples", "f"), ("decision_function", "f"), ("predict", "i")]:
        out = getattr(detector, method)(X)
        assert out.shape == (len(X),)
        assert out.dtype.kind == kind
    assert detector.n_features_in_ == 4


@pytest.mark.parametrize("name", DETECTORS)
def test_far_outlier_scores_below_every_inlier(name, data):
    detector = _detector(name).fit(data["train"])
    # Scored in one batch, so transductive detectors (ECOD) see the same context.
    scores = detector.score_samples(np.vstack([data["test"], data["outlier"]]))
    assert scores[-1] < scores[:-1].min()
    assert detector.predict(data["outlier"])[0] == -1


@pytest.mark.parametrize("name", DETECTORS)
def test_decision_function_is_score_samples_minus_offset(name, data):
    detector = _detector(name).fit(data["train"])
    X = data["test"]
    assert_allclose(detector.decision_function(X), detector.score_samples(X) - detector.offset_)
    assert_array_equal(detector.predict(X), np.where(detector.decision_function(X) < 0, -1, 1))


@pytest.mark.parametrize("name", DETECTORS)
@pytest.mark.parametrize("contamination", [0.05, 0.2])
def test_contamination_sets_the_flagged_share_and_nothing_else(name, contamination, data):
    X = data["train"]
    detector = _detector(name, contamination=contamination).fit(X)
    labels = detector.predict(X)
    assert set(np.unique(labels)) == {-1, 1}
    assert abs(np.mean(labels == -1) - contamination) <= 1.0 / len(X)
    reference = _detector(name, contamination=0.1).fit(X)
    assert_array_equal(detector.score_samples(X), reference.score_samples(X))
    assert detector.offset_ != reference.offset_


@pytest.mark.parametrize("name", DETECTORS)
def test_same_seed_same_scores(name, data):
    first = _detector(name, random_state=3).fit(data["train"]).score_samples(data["test"])
    second = _detector(name, random_state=3).fit(data["train"]).score_samples(data["test"])
    assert_array_equal(first, second)


@pytest.mark.parametrize("name", DETECTORS)
def test_labels_do_not_change_the_fit(name, data):
    X = data["train"]
    y = (np.arange(len(X)) % 7 == 0).astype(int)
    with_labels = _detector(name).fit(X, y).score_samples(data["test"])
    without = _detector(name).fit(X).score_samples(data["test"])
    assert_array_equal(with_labels, without)


@pytest.mark.parametrize("name", DETECTORS)
def test_float32_input_gives_the_float64_result(name, data):
    X32, T32 = data["train"].astype(np.float32), data["test"].astype(np.float32)
    scores32 = _detector(name).fit(X32).score_samples(T32)
    scores64 = _detector(name).fit(X32.astype(np.float64)).score_samples(T32.astype(np.float64))
    assert scores32.dtype == np.float64
    assert_allclose(scores32, scores64, rtol=1e-12)


@pytest.mark.parametrize("name", DETECTORS)
def test_unfitted_detector_raises_not_fitted(name, data):
    detector = _detector(name)
    for method in ("score_samples", "decision_function", "predict"):
        with pytest.raises(NotFittedError):
            getattr(detector, method)(data["test"])


@pytest.mark.parametrize("name", DETECTORS)
def test_nan_input_raises_value_error(name, data):
    X = data["train"].copy()
    X[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _detector(name).fit(X)
    detector = _detector(name).fit(data["train"])
    with pytest.raises(ValueError, match="NaN"):
        detector.score_samples(X)


@pytest.mark.parametrize("name", DETECTORS)
@pytest.mark.parametrize("contamination", [0.0, 0.6, "auto", True])
def test_contamination_outside_range_is_a_config_error(name, contamination, data):
    detector = _detector(name, contamination=contamination)
    with pytest.raises(ConfigError, match=r"\(0, 0.5\]"):
        detector.fit(data["train"])
    with pytest.raises(ValueError):  # what scikit-learn tools expect
        detector.fit(data["train"])


# --- scikit-learn's own estimator checks ----------------------------------------------

_CHECKED = [
    GaussianDensity(),
    GaussianDensity(shrinkage="oas"),
    KernelDensity(),
    OneClassSVM(),
    KNNDistance(),
    RobustGaussian(),
    SklearnAdapter(IsolationForest(n_estimators=20)),
]
if HAS_PYOD:
    from pyod.models.ecod import ECOD

    _CHECKED.append(PyODAdapter(ECOD()))


def _expected_failed_checks(estimator):
    if isinstance(estimator, PyODAdapter):
        return {
            "check_methods_subset_invariance": (
                "ECOD is transductive: it ranks a batch against the training data and the "
                "batch's other rows, so a row's score depends on the batch it is scored in"
            )
        }
    return {}


@parametrize_with_checks(_CHECKED, expected_failed_checks=_expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# --- GaussianDensity --------------------------------------------------------------------


@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", "oas", 0.0, 0.5])
def test_gde_is_stable_with_more_features_than_samples(shrinkage):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(92, 112))
    X[:, :3] = 2.5  # constant columns
    train, held_out = X[:46], X[46:]
    gde = GaussianDensity(shrinkage=shrinkage).fit(train)
    in_sample, unseen = -gde.score_samples(train), -gde.score_samples(held_out)
    assert np.all(np.isfinite(in_sample)) and np.all(np.isfinite(unseen))
    assert np.all(in_sample >= 0) and np.all(unseen >= 0)
    # The model has seen its training samples: unseen ones from the same distribution
    # are farther from it.
    assert np.median(unseen) > np.median(in_sample)
    assert np.all(np.isfinite(gde.precision_))
    assert_allclose(gde.precision_, gde.precision_.T)
    assert_allclose(gde.precision_ @ gde.covariance_, np.eye(112), atol=1e-6)


def test_gde_on_all_constant_data_falls_back_to_euclidean():
    gde = GaussianDensity().fit(np.ones((10, 3)))
    assert_allclose(gde.score_samples([[1.0, 1.0, 1.0], [1.0, 3.0, 1.0]]), [0.0, -4.0])


def test_gde_feature_contributions_sum_to_squared_mahalanobis(data):
    gde = GaussianDensity().fit(data["train"])
    X = np.vstack([data["test"], data["outlier"]])
    contributions = gde.feature_contributions(X)
    assert contributions.shape == X.shape
    diff = X - data["train"].mean(axis=0)
    squared = np.einsum("nd,de,ne->n", diff, np.linalg.inv(gde.covariance_), diff)
    assert_allclose(contributions.sum(axis=1), squared, rtol=1e-10)
    assert_allclose(gde.score_samples(X), -squared, rtol=1e-10)


def test_gde_contribution_lands_on_the_shifted_feature(data):
    gde = GaussianDensity().fit(data["train"])
    x = np.zeros((1, 4))
    x[0, 2] = 6.0
    assert np.argmax(gde.feature_contributions(x)[0]) == 2


def test_gde_shrinkage_float_sets_the_covariance(data):
    X = data["train"]
    sample = np.cov(X, rowvar=False, bias=True)
    assert_allclose(GaussianDensity(shrinkage=0.0).fit(X).covariance_, sample, rtol=1e-5)
    identity_like = GaussianDensity(shrinkage=1.0).fit(X).covariance_
    assert_allclose(identity_like, np.eye(4) * np.trace(sample) / 4, rtol=1e-5)


@pytest.mark.parametrize("shrinkage", ["ledoit", -0.1, 1.5, None])
def test_gde_rejects_unknown_shrinkage(shrinkage, data):
    with pytest.raises(ConfigError, match="ledoit-wolf"):
        GaussianDensity(shrinkage=shrinkage).fit(data["train"])


# --- KernelDensity --------------------------------------------------------------------


def test_kde_is_the_log_mean_gaussian_kernel():
    rng = np.random.default_rng(2)
    X, Q = rng.normal(size=(30, 3)), rng.normal(size=(7, 3)) + 100.0 * (rng.random((7, 1)) > 0.8)
    kde = KernelDensity(bandwidth=0.7).fit(X)
    expected = logsumexp(-cdist(Q, X, "sqeuclidean") / (2 * 0.7**2), axis=1) - np.log(len(X))
    assert_allclose(kde.score_samples(Q), expected, rtol=1e-10)
    # The same density as scikit-learn's, up to the normalising constant.
    sklearn_log_density = SklearnKernelDensity(bandwidth=0.7).fit(X).score_samples(Q)
    assert_allclose(kde.score_samples(Q) - 1.5 * np.log(2 * np.pi * 0.7**2), sklearn_log_density)


def test_kde_median_bandwidth_is_the_median_pairwise_distance(data):
    kde = KernelDensity().fit(data["train"])
    assert kde.bandwidth_ == pytest.approx(np.median(pdist(data["train"])))


def test_kde_median_bandwidth_subsample_is_seeded():
    X = np.random.default_rng(3).normal(size=(1500, 2))
    bandwidths = [KernelDensity(random_state=s).fit(X).bandwidth_ for s in (0, 0, 1)]
    assert bandwidths[0] == bandwidths[1] != bandwidths[2]


def test_kde_scores_in_blocks_like_all_at_once(monkeypatch, data):
    kde = KernelDensity().fit(data["train"])
    whole = kde.score_samples(data["test"])
    monkeypatch.setattr("core.detectors.kde._BLOCK_ENTRIES", 3 * len(data["train"]))
    assert_allclose(kde.score_samples(data["test"]), whole, rtol=1e-12)


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, "scott", None])
def test_kde_rejects_bad_bandwidth(bandwidth, data):
    with pytest.raises(ConfigError, match="median"):
        KernelDensity(bandwidth=bandwidth).fit(data["train"])


# --- KNNDistance ------------------------------------------------------------------------


def test_knn_equals_brute_force():
    X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, -1.0], [2.0, 0.5]])
    Q = np.array([[0.5, 0.5], [10.0, -4.0]])
    knn = KNNDistance(n_neighbors=3).fit(X)
    distances = np.sqrt(((Q[:, None, :] - X[None, :, :]) ** 2).sum(axis=2))
    assert_allclose(knn.score_samples(Q), -np.sort(distances, axis=1)[:, :3].mean(axis=1))
    manhattan = KNNDistance(n_neighbors=2, metric="manhattan").fit(X)
    l1 = np.abs(Q[:, None, :] - X[None, :, :]).sum(axis=2)
    assert_allclose(manhattan.score_samples(Q), -np.sort(l1, axis=1)[:, :2].mean(axis=1))


def test_knn_clips_neighbors_to_the_training_size():
    X = np.random.default_rng(4).normal(size=(6, 2))
    knn = KNNDistance(n_neighbors=50).fit(X)
    assert knn.n_neighbors_ == 6
    Q = np.array([[5.0, 5.0]])
    assert_allclose(knn.score_samples(Q), -cdist(Q, X).mean(axis=1))


@pytest.mark.parametrize("n_neighbors", [0, 2.5, True])
def test_knn_rejects_bad_n_neighbors(n_neighbors, data):
    with pytest.raises(ConfigError, match="n_neighbors"):
        KNNDistance(n_neighbors=n_neighbors).fit(data["train"])


# --- RobustGaussian ---------------------------------------------------------------------


def test_a_recurring_defect_masks_itself_from_gde_and_knn_but_not_from_the_robust_gaussian():
    """10% of the training data is one tight cluster away from the normals: a recurring defect."""
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(450, 20))
    cluster = rng.normal(size=(50, 20)) * 0.5 + np.r_[5.0, np.zeros(19)]
    X, y = np.vstack([normal, cluster]), np.r_[np.zeros(450), np.ones(50)]

    def auroc(name):
        return roc_auc_score(y, -make_detector(name).fit(X).score_samples(X))

    assert auroc("gde") < 0.2 and auroc("knn") < 0.2  # the cluster looks more normal than the normals
    assert auroc("mcd") > 0.99


def test_robust_gaussian_clips_components_to_the_data():
    X = np.random.default_rng(1).normal(size=(12, 3))
    detector = RobustGaussian(n_components=10).fit(X)
    assert detector.pca_.n_components_ == 3  # min(10, D=3, N // 3 = 4)
    assert np.all(np.isfinite(detector.score_samples(X)))


def test_robust_gaussian_fits_where_no_robust_support_exists():
    """Five samples whose MCD support is degenerate (scikit-learn's reweighting keeps none): all samples are used."""
    X = np.array([[12.0, 23.8], [9.9, -0.1], [7.66, -12.9], [-37.5, 2.2], [7.91, -13.0]])
    detector = RobustGaussian().fit(X)
    assert np.all(np.isfinite(detector.score_samples(X)))
    constant = RobustGaussian().fit(np.ones((10, 4)))
    assert np.all(np.isfinite(constant.score_samples(np.ones((2, 4)))))


@pytest.mark.parametrize("params", [{"n_components": 0}, {"n_components": 2.5}, {"support_fraction": 0.4},
                                    {"support_fraction": True}])
def test_robust_gaussian_rejects_bad_parameters(params, data):
    with pytest.raises(ConfigError, match=next(iter(params))):
        RobustGaussian(**params).fit(data["train"])


# --- OneClassSVM ------------------------------------------------------------------------


def test_ocsvm_offset_comes_from_contamination_not_nu(data):
    X = data["train"]
    for nu in (0.05, 0.3):
        labels = OneClassSVM(nu=nu, contamination=0.1).fit(X).predict(X)
        assert np.mean(labels == -1) == pytest.approx(0.1, abs=1.0 / len(X))


@pytest.mark.parametrize("params", [{"nu": 0.0}, {"nu": 1.5}, {"gamma": "wide"}, {"gamma": 0.0}])
def test_ocsvm_rejects_bad_parameters(params, data):
    with pytest.raises(ConfigError, match=next(iter(params))):
        OneClassSVM(**params).fit(data["train"])


@pytest.mark.parametrize("detector", [GaussianDensity(), KernelDensity(), KNNDistance(), OneClassSVM(),
                                      RobustGaussian(), SklearnAdapter(IsolationForest())],
                         ids=lambda detector: type(detector).__name__)
def test_each_detector_declares_its_parameters_constraints(detector):
    """Declared under a name of its own: scikit-learn's ``_parameter_constraints`` would switch on its private checks."""
    from core.params import accepts

    assert not hasattr(detector, "_parameter_constraints")
    defaults = detector.get_params(deep=False)
    assert "contamination" in detector._param_constraints
    for name, allowed in detector._param_constraints.items():
        assert name in defaults, f"{type(detector).__name__} declares {name}, which is not a parameter"
        assert any(accepts(constraint, defaults[name]) for constraint in allowed), name


# --- adapters ---------------------------------------------------------------------------


def test_sklearn_adapter_keeps_isolation_forest_scores_and_seeds_it(data):
    template = IsolationForest(n_estimators=30)
    adapter = SklearnAdapter(template, random_state=5).fit(data["train"])
    assert adapter.estimator_.random_state == 5
    assert not hasattr(template, "estimators_")  # the template itself is never fitted
    reference = IsolationForest(n_estimators=30, random_state=5).fit(data["train"])
    assert_array_equal(adapter.score_samples(data["test"]), reference.score_samples(data["test"]))


def test_pyod_adapter_negates_pyod_scores(data):
    pytest.importorskip("pyod", reason="pyod (test extra) is not installed")
    from pyod.models.ecod import ECOD

    adapter = PyODAdapter(ECOD()).fit(data["train"])
    reference = ECOD().fit(data["train"])
    assert_allclose(adapter.score_samples(data["test"]), -reference.decision_function(data["test"]))


def test_adapter_needs_a_detector_that_scores_new_data(data):
    with pytest.raises(ConfigError, match="novelty=True"):
        SklearnAdapter(LocalOutlierFactor()).fit(data["train"])
    lof = SklearnAdapter(LocalOutlierFactor(novelty=True)).fit(data["train"])
    assert lof.score_samples(data["outlier"])[0] < lof.score_samples(data["test"]).min()


# --- registry ---------------------------------------------------------------------------


def test_make_detector_builds_fresh_unfitted_detectors():
    first, second = make_detector("knn", n_neighbors=7), make_detector("knn", n_neighbors=7)
    assert first is not second
    assert first.get_params()["n_neighbors"] == 7
    assert not hasattr(first, "offset_")
    assert make_detector("kde", random_state=9).random_state == 9
    assert make_detector("iforest", n_estimators=11).estimator.n_estimators == 11


def test_make_detector_names_the_allowed_values():
    with pytest.raises(ConfigError, match="gde, kde, ocsvm, knn, mcd, iforest, ecod"):
        make_detector("lof")
    with pytest.raises(ConfigError, match="n_neighbors"):
        make_detector("knn", k=3)


def test_ecod_without_pyod_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyod.models.ecod", None)  # import now fails
    with pytest.raises(ConfigError, match="pip install pyod"):
        make_detector("ecod")
