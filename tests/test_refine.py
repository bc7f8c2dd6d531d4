"""STOC refinement: planted outliers are removed, nothing collapses, results are seeded."""
from functools import partial

import numpy as np
import pytest

from core.detectors import make_detector
from core.errors import ConfigError, DataError
from core.refine import check_pinned, contamination_from_data, estimate_contamination, iter_refine


def planted(n_normal=450, n_outlier=50, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=(n_normal, dim))
    outliers = rng.normal(loc=4.0, scale=1.0, size=(n_outlier, dim))
    labels = np.r_[np.zeros(n_normal, int), np.ones(n_outlier, int)]
    order = rng.permutation(len(labels))
    return np.vstack([normal, outliers])[order], labels[order]


GDE = partial(make_detector, "gde")


class DistanceToMean:
    """A detector simple enough to follow by hand: ``score_samples`` is minus the distance to the
    mean of its training rows (first column). Remembers the rows it was fitted on."""

    fitted: list = []

    def fit(self, X):
        DistanceToMean.fitted.append(np.asarray(X)[:, 0].copy())
        self.mean_ = float(np.mean(np.asarray(X)[:, 0]))
        return self

    def score_samples(self, X):
        return -np.abs(np.asarray(X)[:, 0] - self.mean_)


@pytest.mark.parametrize("subsets_from", ["all", "kept"])
def test_the_stoc_rule_by_hand(subsets_from):
    """Disjoint subsets of every judged sample (SRR) or of the kept ones, each detector's held-out
    gamma-quantile threshold (the held-out samples of the split set standing for all of it), any vote
    removes, the whole training set is judged every round, and a sample removed earlier comes back
    once no detector flags it."""
    x = np.array([-1.2, -1.0, -0.8, -0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 7.0, 7.5, 8.0, 8.5])
    gamma, k = 0.3, 2
    DistanceToMean.fitted = []
    rounds = list(iter_refine(x[:, None], DistanceToMean, ensemble=k, gamma=gamma, rounds=3, seed=0,
                              min_keep_fraction=0.1, subsets_from=subsets_from))
    kept = np.ones(len(x), bool)
    for number, record in enumerate(rounds, start=1):
        split = kept if subsets_from == "kept" else np.ones(len(x), bool)
        subsets = DistanceToMean.fitted[(number - 1) * k: number * k]
        rows = [np.flatnonzero(np.isin(x, subset)) for subset in subsets]
        assert sorted(np.concatenate(rows).tolist()) == np.flatnonzero(split).tolist(), "disjoint, covering the split set"
        scores = np.array([-np.abs(x - subset.mean()) for subset in subsets])
        votes = np.zeros(len(x), int)
        for j, own in enumerate(rows):
            held_out = np.setdiff1d(np.arange(len(x)), own)
            weight = np.where(split[held_out], split.sum() / (split.sum() - len(own)), 1.0)
            order = np.argsort(scores[j, held_out], kind="stable")
            at = np.searchsorted(np.cumsum(weight[order]), gamma * weight.sum())
            threshold = scores[j, held_out][order][at]
            assert record.thresholds[j] == pytest.approx(threshold)
            votes += scores[j] < threshold
        np.testing.assert_array_equal(record.votes, votes, err_msg="every sample judged by every detector")
        np.testing.assert_array_equal(record.kept, votes == 0, err_msg="one vote removes a sample")
        np.testing.assert_array_equal(record.returned, np.flatnonzero(~kept & (votes == 0)))
        kept = votes == 0
    assert sum(len(r.returned) for r in rounds[1:]) > 0, "a normal removed in an earlier round came back"
    assert not rounds[-1].kept[12:].any(), "the anomalies at 7-8.5 end removed"


def test_subsets_from_all_trains_every_round_on_the_whole_judged_set():
    """SRR's variant: the subsets cover every judged sample, removed ones included."""
    x = np.r_[np.linspace(-1.0, 1.0, 12), [7.0, 7.5, 8.0, 8.5]][:, None]
    DistanceToMean.fitted = []
    rounds = list(iter_refine(x, DistanceToMean, ensemble=2, gamma=0.3, rounds=2, subsets_from="all",
                              min_keep_fraction=0.1))
    assert len(rounds) == 2 and len(rounds[0].removed)
    for number in range(2):
        trained_on = np.concatenate(DistanceToMean.fitted[number * 2: number * 2 + 2])
        assert sorted(trained_on.tolist()) == sorted(x[:, 0].tolist())
    with pytest.raises(ConfigError, match="subsets_from"):
        next(iter_refine(x, DistanceToMean, subsets_from="removed"))


def test_retrain_hook_receives_kept_mask_each_round():
    features, _ = planted()
    seen = []

    def retrain(kept):
        seen.append(kept.copy())
        return features * 2.0

    rounds = list(iter_refine(features, GDE, gamma=0.1, rounds=3, retrain=retrain))
    assert len(rounds) == 3 and len(rounds[0].removed)
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
        estimate, (low, high) = contamination_from_data(features, GDE, seed=0)
        assert share * 0.6 <= estimate <= share * 1.6, (share, estimate)
        assert low <= estimate <= high and high - low < 0.5 * share, "a bootstrap interval around the estimate"


def test_estimate_is_small_on_clean_data():
    features = np.random.default_rng(5).normal(size=(1000, 8))
    assert contamination_from_data(features, GDE, seed=0)[0] <= 0.04


def test_estimate_ignores_a_long_clean_tail_less_than_planted_outliers():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=2000)
    contaminated = np.r_[clean[:1800], rng.normal(loc=8.0, size=200)]
    assert estimate_contamination(clean) <= 0.02
    assert 0.08 <= estimate_contamination(contaminated) <= 0.14
    assert estimate_contamination(np.ones(50)) == 0.01, "no spread: the lower bound"


# ---------------------------------------------------------------------------- an expert's pinned verdicts


class RecordingDetector:
    """GDE that remembers every training set it was fitted on."""

    fitted: list = []

    def __init__(self):
        self._inner = make_detector("gde")

    def fit(self, X):
        RecordingDetector.fitted.append(np.array(X))
        self._inner.fit(X)
        return self

    def score_samples(self, X):
        return self._inner.score_samples(X)


def most_obvious_outlier(features, labels):
    outliers = np.flatnonzero(labels == 1)
    return int(outliers[np.argmax(np.linalg.norm(features[outliers], axis=1))])


def most_typical_normals(features, labels, k):
    normals = np.flatnonzero(labels == 0)
    return normals[np.argsort(np.linalg.norm(features[normals], axis=1))[:k]]


def test_an_outlier_pinned_normal_is_kept_in_every_round():
    features, labels = planted()
    outlier = most_obvious_outlier(features, labels)
    free = list(iter_refine(features, GDE, gamma=0.1, rounds=3, seed=0))
    assert not free[-1].kept[outlier], "without the pin refinement removes it"
    pinned = np.full(len(features), -1)
    pinned[outlier] = 0
    rounds = list(iter_refine(features, GDE, gamma=0.1, rounds=3, seed=0, pinned=pinned))
    assert len(rounds) >= 2
    for record in rounds:
        assert record.kept[outlier] and outlier not in record.removed
        assert record.votes[outlier] >= 0, "a confirmed normal still takes part in every round"
    assert all(record.votes[outlier] > 0 for record in rounds), "flagged in every round, removed in none"
    others = (labels == 1) & (np.arange(len(labels)) != outlier)
    assert np.mean(~rounds[-1].kept[others]) >= min(0.8, np.mean(~free[-1].kept[others])), "the other outliers are still removed"


def test_normals_pinned_anomalous_are_removed_first_and_never_seen_by_detectors():
    features, labels = planted()
    confirmed = most_typical_normals(features, labels, 3)
    pinned = np.full(len(features), -1, dtype=np.int8)
    pinned[confirmed] = 1
    RecordingDetector.fitted = []
    rounds = list(iter_refine(features, RecordingDetector, gamma=0.1, rounds=3, seed=0, labels=labels, pinned=pinned))
    first = rounds[0]
    assert sorted(first.removed[: len(confirmed)]) == sorted(confirmed), "listed first among round 1's removals"
    assert len(first.removed) > len(confirmed), "the detectors still removed suspects of their own"
    assert "3 confirmed anomalies" in first.note
    for record in rounds:
        assert not record.kept[confirmed].any()
        assert np.all(record.votes[confirmed] == -1) and np.all(np.isnan(record.anomaly_score[confirmed]))
    for record in rounds[1:]:
        assert not set(confirmed) & set(record.removed), "removed once, in round 1"
    seen = np.vstack(RecordingDetector.fitted)
    for index in confirmed:
        assert not np.any(np.all(seen == features[index], axis=1)), "no detector trained on a confirmed anomaly"
    precision_of_own = np.mean(labels[first.removed] == 1)
    assert first.precision == pytest.approx(precision_of_own), "precision counts every removal of the round"


def test_all_free_pins_equal_no_pins():
    features, labels = planted()
    plain = list(iter_refine(features, GDE, gamma="auto", rounds=3, seed=2, labels=labels))
    free = list(iter_refine(features, GDE, gamma="auto", rounds=3, seed=2, labels=labels,
                            pinned=np.full(len(features), -1)))
    assert len(plain) == len(free)
    for a, b in zip(plain, free):
        np.testing.assert_array_equal(a.kept, b.kept)
        np.testing.assert_array_equal(a.removed, b.removed)
        np.testing.assert_array_equal(a.votes, b.votes)
        np.testing.assert_array_equal(a.anomaly_score, b.anomaly_score)
        assert (a.gamma, a.precision, a.recall, a.note) == (b.gamma, b.precision, b.recall, b.note)


@pytest.mark.parametrize("bad", [
    np.full(10, -1),                 # wrong length
    np.full((20, 1), -1),            # wrong shape
    np.r_[np.full(19, -1), 2],       # value outside -1, 0, 1
    np.r_[np.full(19, -1.0), np.nan],
])
def test_bad_pins_are_a_clear_error(bad):
    with pytest.raises(DataError, match="pinned verdicts"):
        next(iter_refine(np.random.default_rng(0).normal(size=(20, 2)), GDE, ensemble=2, pinned=bad))
    with pytest.raises(DataError, match="pinned verdicts"):
        check_pinned(bad, 20)


def test_check_pinned_defaults_to_all_free():
    pins = check_pinned(None, 4)
    assert pins.dtype == np.int8 and list(pins) == [-1, -1, -1, -1]
    assert list(check_pinned([1, 0, -1, 0], 4)) == [1, 0, -1, 0]
