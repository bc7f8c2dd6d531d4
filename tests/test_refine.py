"""STOC refinement: planted outliers are removed, nothing collapses, results are seeded."""
from functools import partial

import numpy as np
import pytest

from core.detectors import make_detector
from core.errors import DataError
from core.refine import contamination_from_data, estimate_contamination, iter_refine


def planted(n_normal=450, n_outlier=50, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=(n_normal, dim))
    outliers = rng.normal(loc=4.0, scale=1.0, size=(n_outlier, dim))
    labels = np.r_[np.zeros(n_normal, int), np.ones(n_outlier, int)]
    order = rng.permutation(len(labels))
    return np.vstack([normal, outliers])[order], labels[order]


GDE = partial(make_detector, "gde")


def test_planted_outliers_are_removed_without_collapse():
    features, labels = planted()
    rounds = list(iter_refine(features, GDE, ensemble=5, gamma="auto", rounds=3, labels=labels, seed=0))
    kept = rounds[-1].kept
    assert np.mean(~kept[labels == 1]) >= 0.95, "removal recall of planted outliers"
    assert np.mean(kept[labels == 0]) >= 0.8, "most normals survive"
    assert rounds[-1].recall == pytest.approx(np.mean(~kept[labels == 1]))
    assert all(r.precision is not None for r in rounds if len(r.removed))


def test_round_records_are_consistent():
    features, labels = planted()
    previous = np.ones(len(features), bool)
    for record in iter_refine(features, GDE, ensemble=4, gamma=0.1, rounds=3, seed=1):
        assert record.thresholds.shape == (4,)
        assert set(record.removed) == set(np.flatnonzero(previous & ~record.kept))
        assert np.all(record.votes[record.removed] >= 1), "a removed sample had at least one vote"
        assert np.all(record.votes[~previous] == -1), "samples out of the round carry no vote"
        assert np.all(np.isnan(record.anomaly_score[~previous]))
        assert record.gamma == 0.1 and record.seconds >= 0
        previous = record.kept


def test_refinement_is_deterministic_under_a_seed_and_varies_with_it():
    features, _ = planted()
    run = lambda seed: [r.kept for r in iter_refine(features, GDE, gamma=0.15, rounds=2, seed=seed)]
    first, again, other = run(3), run(3), run(4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))


def test_collapse_guard_caps_removals_and_says_so():
    # In-sample thresholds with tiny subsets in many dimensions flag nearly everything.
    rng = np.random.default_rng(0)
    features = rng.normal(size=(230, 112))
    rounds = list(iter_refine(features, GDE, ensemble=5, gamma=0.1, rounds=3,
                              threshold_source="in_sample", min_keep_fraction=0.6))
    assert rounds[-1].kept.sum() >= np.ceil(0.6 * 230)
    assert rounds[0].capped and "capped" in rounds[0].note
    assert len(rounds) == 1, "a capped round ends refinement"


def test_held_out_thresholds_do_not_collapse_in_high_dimensions():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(230, 112))
    first = next(iter_refine(features, GDE, ensemble=5, gamma=0.1, rounds=1))
    assert not first.capped
    assert 0 < len(first.removed) < 0.5 * 230


def test_round_that_removes_nothing_stops_and_reports():
    features = np.ones((100, 3))  # every sample scores the same: nothing falls below a threshold
    rounds = list(iter_refine(features, GDE, ensemble=2, gamma=0.1, rounds=5))
    assert len(rounds) == 1 and len(rounds[0].removed) == 0
    assert "stops" in rounds[0].note


def test_retrain_hook_receives_kept_mask_each_round():
    features, _ = planted()
    seen = []

    def retrain(kept):
        seen.append(kept.copy())
        return features * 2.0

    rounds = list(iter_refine(features, GDE, gamma=0.1, rounds=3, retrain=retrain))
    assert len(rounds) == 3 and all(len(r.removed) for r in rounds)
    assert len(seen) == 2, "called between rounds, not after the last"
    for mask, record in zip(seen, rounds):
        assert np.array_equal(mask, record.kept)


def test_held_out_thresholds_need_two_detectors():
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="K >= 2"):
        next(iter_refine(np.zeros((30, 2)), GDE, ensemble=1))
    record = next(iter_refine(planted()[0], GDE, ensemble=1, gamma=0.1, threshold_source="in_sample"))
    assert 0 < len(record.removed) < 100, "K=1 in-sample: fit on all, flag its own top gamma"


def test_too_few_samples_is_a_clear_error():
    with pytest.raises(DataError, match="at least 15"):
        next(iter_refine(np.zeros((10, 2)), GDE, ensemble=5))


def test_contamination_estimate_tracks_the_planted_share():
    rng = np.random.default_rng(2)
    for share in (0.05, 0.2):
        n_out = int(1000 * share)
        scattered = rng.uniform(-8, 8, size=(n_out, 8))
        features = np.vstack([rng.normal(size=(1000 - n_out, 8)), scattered])
        estimate = contamination_from_data(features, GDE, seed=0)
        assert share * 0.6 <= estimate <= share * 1.6, (share, estimate)


def test_estimate_is_small_on_clean_data():
    features = np.random.default_rng(5).normal(size=(1000, 8))
    assert contamination_from_data(features, GDE, seed=0) <= 0.04


def test_estimate_ignores_a_long_clean_tail_less_than_planted_outliers():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=2000)
    contaminated = np.r_[clean[:1800], rng.normal(loc=8.0, size=200)]
    assert estimate_contamination(clean) <= 0.02
    assert 0.08 <= estimate_contamination(contaminated) <= 0.14
    assert estimate_contamination(np.ones(50)) == 0.01, "no spread: the lower bound"
