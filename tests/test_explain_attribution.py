"""Per-row table attributions: Mahalanobis terms for GDE, robust z-scores for other detectors."""
from __future__ import annotations

from dataclasses import astuple
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.data.dataset import TABLE, Dataset
from core.detectors import GaussianDensity, make_detector
from core.explain.attribution import (
    FeatureAttribution,
    RowExplanation,
    column_shares,
    decode_table_values,
    explain_table_rows,
    feature_contributions,
    percentile_ranges,
    robust_z_scores,
    top_deviating_features,
)
from core.models.tabular import TableEncoder

NAMES = [f"f{i}" for i in range(6)]
PLANTED = 3


@pytest.fixture(scope="module")
def data():
    """Correlated Gaussian training rows and test rows with feature 3 pushed far out."""
    rng = np.random.default_rng(0)
    mixing = np.eye(6) + 0.4 * rng.normal(size=(6, 6))
    train = rng.normal(size=(400, 6)) @ mixing
    test = rng.normal(size=(5, 6)) @ mixing
    test[:, PLANTED] += 12.0 * train[:, PLANTED].std()
    return train, test


def _explain(detector, train, rows, k=6):
    return explain_table_rows(rows, train, NAMES, detector, medians=[0.0] * 6, scales=[1.0] * 6, k=k)


def test_gde_contributions_sum_to_the_squared_mahalanobis_distance(data):
    train, test = data
    gde = GaussianDensity().fit(train)
    for explanation, row in zip(_explain(gde, train, test), test):
        diff = row - gde.location_
        assert explanation.method == "mahalanobis"
        total = sum(f.contribution for f in explanation.features)
        assert total == pytest.approx(diff @ gde.precision_ @ diff, rel=1e-9)
        assert total == pytest.approx(explanation.anomaly_score, rel=1e-9)
        assert sum(f.share for f in explanation.features) == pytest.approx(1.0)


@pytest.mark.parametrize("detector_name", ["gde", "knn", "iforest"])
def test_the_planted_deviating_feature_ranks_first(detector_name, data):
    train, test = data
    detector = make_detector(detector_name).fit(train)
    for explanation in _explain(detector, train, test, k=3):
        assert [f.feature for f in explanation.features][0] == NAMES[PLANTED]
        assert len(explanation.features) == 3
        contributions = [f.contribution for f in explanation.features]
        assert contributions == sorted(contributions, reverse=True)
    expected = "mahalanobis" if detector_name == "gde" else "robust_z"
    assert explanation.method == expected


def test_normal_rows_spread_their_score_over_features(data):
    """Not a tautology of the planted test: on a typical row no single feature dominates."""
    train, _ = data
    gde = GaussianDensity().fit(train)
    shares = [e.features[0].share for e in _explain(gde, train, train[:50])]
    assert np.median(shares) < 0.8


def test_robust_z_uses_the_kept_rows_median_and_iqr():
    reference = np.array([[0.0, 5.0, 1.0], [1.0, 5.0, 1.0], [2.0, 5.0, 1.0], [3.0, 5.0, 1.0], [4.0, 6.0, 1.0]])
    z = robust_z_scores(np.array([[6.0, 7.0, 3.0]]), reference)
    # column 0: median 2, IQR 2; column 1: IQR 0 -> std 0.4; column 2: constant -> scale 1
    assert z == pytest.approx(np.array([[2.0, 2.0 / 0.4, 2.0]]))


def test_robust_z_contributions_are_squared_z_scores(data):
    train, test = data
    knn = make_detector("knn").fit(train)
    terms, method = feature_contributions(knn, test, train)
    assert method == "robust_z"
    assert terms == pytest.approx(robust_z_scores(test, train) ** 2)


def test_top_features_report_values_typical_ranges_and_shares():
    values = np.array([1.0, 50.0, 3.0])
    contributions = np.array([0.5, 8.0, 1.5])
    ranges = np.array([[0.0, 2.0], [10.0, 20.0], [2.0, 4.0]])
    top = top_deviating_features(values, contributions, ["a", "b", "c"], ranges, k=2)
    assert [astuple(f)[:6] for f in top] == [("b", 50.0, 10.0, 20.0, 8.0, 0.8), ("c", 3.0, 2.0, 4.0, 1.5, 0.15)]
    assert len(top_deviating_features(values, contributions, ["a", "b", "c"], ranges, k=10)) == 3


def test_a_dominant_feature_does_not_hide_another_far_outside_its_range():
    # "amount" takes nearly the whole score; "blackpix" is far above its range with a tiny term
    names = ["amount", "blackpix", "width", "site=east"]
    values, ranges = np.array([9e6, 4955.0, 3.0, 1.0]), np.array([[10.0, 90.0], [17.0, 493.0], [2.0, 4.0], [0.0, 1.0]])
    terms, z = np.array([1e9, 0.5, 0.2, 0.1]), np.array([1e5, 40.0, 0.1, np.nan])
    shares = np.array([np.nan, np.nan, np.nan, 0.02])
    top = top_deviating_features(values, terms, names, ranges, k=1, robust_z=z, kept_shares=shares)
    assert [f.feature for f in top] == ["amount", "blackpix"], "listed for its distance, whatever its share"
    assert top[1].share == pytest.approx(0.0, abs=1e-8)
    assert top[1].describe() == "4955: 10.1x the typical high; above the typical 17-493 (40 IQRs from the median)"
    [width, east] = top_deviating_features(values, terms, names, ranges, k=4, robust_z=z, kept_shares=shares)[2:]
    assert width.describe() == "3: within the typical 2-4"
    assert east.describe() == "has 'east', as 2% of the kept rows do"


def test_top_features_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="feature names"):
        top_deviating_features(np.zeros(3), np.zeros(2), ["a", "b", "c"], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="k must be"):
        top_deviating_features(np.zeros(1), np.zeros(1), ["a"], np.zeros((1, 2)), k=0)


def test_values_and_ranges_are_in_the_tables_units_with_the_real_encoder():
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({
        "temperature": rng.normal(300.0, 5.0, size=200),
        "pressure": rng.normal(2.0, 0.1, size=200),
        "line": rng.choice(["a", "b"], size=200),
    })
    dataset = Dataset(kind=TABLE, ids=[str(i) for i in range(200)], source=Path("t.csv"), fingerprint="x", table=frame)
    encoder = TableEncoder().fit(dataset)
    encoded = encoder.embed(dataset)
    state = encoder.state_

    decoded = decode_table_values(encoded, state.medians, state.scales)
    assert decoded[:, :2] == pytest.approx(frame[["temperature", "pressure"]].to_numpy(), rel=1e-5)
    assert np.array_equal(decoded[:, 2:], encoded[:, 2:] != 0), "one-hot columns decode to 1 / 0 whatever their weight"

    kept = np.arange(200) >= 20  # pretend the first 20 rows were removed by refinement
    detector = GaussianDensity().fit(encoded[kept])
    [explanation] = explain_table_rows(
        encoded[:1], encoded[kept], encoder.feature_names, detector,
        medians=state.medians, scales=state.scales, ids=["row0"], k=4,
    )
    by_name = {f.feature: f for f in explanation.features}
    assert explanation.id == "row0" and set(by_name) == {"temperature", "pressure", "line=a", "line=b"}
    low, high = np.percentile(frame["temperature"][kept], [5, 95])
    assert (by_name["temperature"].typical_low, by_name["temperature"].typical_high) == pytest.approx((low, high))
    assert by_name["temperature"].value == pytest.approx(frame["temperature"][0])


def test_percentile_ranges_are_the_5th_and_95th_percentiles():
    values = np.arange(101, dtype=float)[:, None] * np.array([1.0, -1.0])
    assert percentile_ranges(values) == pytest.approx(np.array([[5.0, 95.0], [-95.0, -5.0]]))


def test_column_shares_add_a_categorys_features_to_its_column():
    def row(**shares):
        return RowExplanation("r", 1.0, "robust_z", [FeatureAttribution(name.replace("_is_", "="), 0.0, 0.0, 0.0, share, share)
                                                      for name, share in shares.items()])

    shares = column_shares([row(amount=0.6, site_is_east=0.3, width=0.1), row(amount=0.2, site_is_north=0.7, width=0.1)])
    assert list(shares) == ["site", "amount", "width"]
    assert shares == pytest.approx({"site": 0.5, "amount": 0.4, "width": 0.1})
