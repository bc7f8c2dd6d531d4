"""The review queue (core.review): its order, its progress and the precision of the model's calls."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.refine import RefinementRound
from core.review import (
    NEAR_THRESHOLD,
    TIERS,
    call_precision,
    review_order,
    review_progress,
    review_tiers,
    wilson_interval,
)

K = 5
THRESHOLD = 10.0


def a_round(number: int, kept: list[bool], votes: list[int]) -> RefinementRound:
    n = len(kept)
    return RefinementRound(
        round=number, kept=np.array(kept), removed=np.zeros(0, np.int64), returned=np.zeros(0, np.int64),
        thresholds=np.zeros(K), votes=np.array(votes, np.int16), anomaly_score=np.zeros(n, np.float32),
        gamma=0.1, gamma_interval=None, seconds=0.0, capped=False, precision=None, recall=None, note="")


def hand_made() -> tuple[pd.DataFrame, list[RefinementRound]]:
    """Ten samples; robust spread of the scores is 1.4826 x MAD.

    s0 far above (votes 5 of 5), s1 just above the threshold, s2 just below it, s3 far below with
    split votes 2/5 in the last round (unanimous 0 in the first), s4 far below with votes 1/5,
    s5 far above, removed in round 1 and back in round 2 (unanimous votes), s6-s9 far below, s9
    with a split in round 1 only (the last round judged it unanimous).
    """
    score = np.array([30.0, 10.1, 9.8, 0.0, 1.0, 25.0, 2.0, 3.0, 4.0, 5.0])
    samples = pd.DataFrame({"id": [f"s{i}" for i in range(10)], "anomaly_score": score,
                            "is_anomaly": score > THRESHOLD})
    first = a_round(1, [False, True, True, True, True, False, True, True, True, True],
                    [5, 0, 0, 0, 0, 5, 0, 0, 0, 3])
    second = a_round(2, [False, True, True, True, True, True, True, True, True, True],
                     [5, 0, 0, 2, 1, 0, 0, 0, 0, 0])
    return samples, [first, second]


def test_hand_made_samples_fall_in_the_documented_tiers():
    samples, rounds = hand_made()
    spread = 1.4826 * np.median(np.abs(samples["anomaly_score"] - np.median(samples["anomaly_score"])))
    assert abs(10.1 - THRESHOLD) / spread <= NEAR_THRESHOLD < abs(5.0 - THRESHOLD) / spread  # the data mean it
    tiers = review_tiers(samples, rounds, THRESHOLD)
    named = dict(zip(samples["id"], (TIERS[t] for t in tiers)))
    assert named["s1"] == named["s2"] == "near the threshold"
    assert named["s3"] == named["s4"] == "split ensemble votes"
    assert named["s5"] == "came back after removal"
    assert named["s9"] == "the rest", "only the last round that judged a sample counts"
    assert {named[i] for i in ("s0", "s6", "s7", "s8")} == {"the rest"}


def test_order_is_near_threshold_then_split_votes_then_came_back_then_the_rest():
    samples, rounds = hand_made()
    ids = samples["id"].to_numpy()[review_order(samples, rounds, THRESHOLD, [])]
    # s1 (0.1 above) is nearer than s2 (0.2 below); s3 (2 of 5) is a more even split than s4 (1 of 5);
    # the rest by distance to the threshold: s9 (5), s8 (6), s7 (7), s6 (8), s0 (20)
    assert list(ids) == ["s1", "s2", "s3", "s4", "s5", "s9", "s8", "s7", "s6", "s0"]


def test_ties_go_to_the_higher_score_then_the_earlier_sample():
    samples = pd.DataFrame({"id": ["a", "b", "c", "d"], "anomaly_score": [9.0, 11.0, 11.0, 0.0],
                            "is_anomaly": [False, True, True, False]})
    ids = samples["id"].to_numpy()[review_order(samples, [], THRESHOLD, [])]
    assert list(ids) == ["b", "c", "a", "d"]


def test_judged_samples_leave_the_order_and_count_as_progress():
    samples, rounds = hand_made()
    judged = {"s1", "s3", "s0"}  # two from the queue, one from the rest
    order = review_order(samples, rounds, THRESHOLD, judged)
    assert not judged & set(samples["id"].to_numpy()[order])
    assert list(samples["id"].to_numpy()[order][:3]) == ["s2", "s4", "s5"], "the next unjudged one comes up"
    progress = review_progress(samples, rounds, THRESHOLD, judged)
    assert (progress.judged, progress.queued) == (2, 5)
    assert progress.text == "judged 2 of 5 in the queue"
    done = review_progress(samples, rounds, THRESHOLD, {"s1", "s2", "s3", "s4", "s5"})
    assert done.judged == done.queued == 5 and "the queue is done" in done.text
    assert review_progress(samples, rounds, THRESHOLD, []).judged == 0


def test_a_run_without_rounds_queues_only_the_samples_near_the_threshold():
    samples, _ = hand_made()
    assert set(np.flatnonzero(review_tiers(samples, [], THRESHOLD) == 0)) == {1, 2}
    assert review_progress(samples, [], THRESHOLD, []).queued == 2
    assert len(review_order(samples, [], THRESHOLD, [])) == len(samples)


def test_wilson_interval_matches_the_known_value():
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # Wilson (1927); e.g. statsmodels' proportion_confint
    assert wilson_interval(0, 5)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(5, 5)[1] == pytest.approx(1.0)
    narrow = wilson_interval(80, 100)
    assert low < narrow[0] < 0.8 < narrow[1] < high, "more judged samples, a narrower interval"


def test_call_precision_counts_judged_anomaly_calls_only():
    samples, _ = hand_made()  # s0, s1, s5 are called anomalous
    assert call_precision(samples, {}) is None
    assert call_precision(samples, {"s2": ("anomaly", ""), "s3": ("normal", "")}) is None, "no judged anomaly call"
    verdicts = {"s0": ("anomaly", ""), "s1": ("normal", "a shadow"), "s5": ("unsure", ""), "s2": ("anomaly", "")}
    result = call_precision(samples, verdicts)
    assert (result.right, result.n) == (1, 2) and result.precision == 0.5  # s5 unsure, s2 not called: left out
    assert (result.low, result.high) == pytest.approx(wilson_interval(1, 2))
    assert result.text.startswith("the model's anomaly calls were right for 50% of the judged ones (95% interval ")
    assert result.text.endswith(", n=2)")
