"""The review queue: which unjudged sample's verdict can change a run's outcome most, and how far review has got.

An expert's verdicts pin samples in the next fit (:func:`core.refine.pinned_from_verdicts`): an
``anomaly`` verdict keeps a sample out of every detector's training data, a ``normal`` one keeps it
in. A verdict changes the most where the run was least sure of its call, so :func:`review_order`
puts the unjudged samples in four tiers, in this order:

0. **near the threshold**: ``|anomaly_score - threshold|`` at most :data:`NEAR_THRESHOLD` robust
   units, a unit being the robust spread of the run's anomaly scores (1.4826 x their median absolute
   deviation); a small step of the score would change the call.
1. **split ensemble votes**: in the last refinement round that judged the sample (``votes >= 0``),
   some but not all of the K detectors called it anomalous (``0 < votes < K``).
2. **came back**: removed by one round and kept again by a later one.
3. **the rest**.

A sample goes to the first tier it qualifies for. Within a tier: tier 1 puts the most even split
first (``|2 votes - K|`` ascending); then, in every tier, the nearest to the threshold (in robust
units) first, then the higher ``anomaly_score``, then the earlier position in ``samples``.
Tiers 0-2 make up *the queue* (:func:`review_progress` counts it); the rest follow in the order
so that browsing never runs dry. Any verdict, ``unsure`` included, counts as judged: the expert
has looked at the sample.

:data:`NEAR_THRESHOLD` was set before any measurement and not tuned (bench/review.py measures
the queue; docs/benchmarks.md has the figures).

Examples
--------
>>> order = review_order(run.samples, run.rounds, run.threshold, verdicts.keys())   # doctest: +SKIP
>>> review_progress(run.samples, run.rounds, run.threshold, verdicts.keys()).text   # doctest: +SKIP
'judged 4 of 37 in the queue'
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from core.refine import RefinementRound

NEAR_THRESHOLD = 0.5
"""Samples at most this many robust units of the score spread from the threshold are 'near' it."""

TIERS = ("near the threshold", "split ensemble votes", "came back after removal", "the rest")
"""The tiers of :func:`review_order`, in queue order; the first three make up the queue."""

QUEUED_TIERS = 3


def robust_distance(anomaly_score: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) float64 ``|anomaly_score - threshold|`` in robust units of the scores' spread (inf where NaN).

    The unit is 1.4826 x the median absolute deviation of the finite scores (their standard
    deviation when that is 0, else 1): a handful of extreme anomalies does not stretch it.
    """
    score = np.asarray(anomaly_score, dtype=np.float64)
    finite = score[np.isfinite(score)]
    spread = 1.4826 * float(np.median(np.abs(finite - np.median(finite)))) if len(finite) else 0.0
    if spread <= 0:
        spread = float(np.std(finite)) if len(finite) else 0.0
    spread = spread or 1.0
    distance = np.abs(score - threshold) / spread
    return np.where(np.isfinite(distance), distance, np.inf)


def last_votes(rounds: Sequence[RefinementRound], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's votes in the last round that judged it and that round's ensemble size K.

    Returns ``(votes, k)``, both (N,) int64; ``votes`` is -1 and ``k`` 0 for a sample no round judged
    (a confirmed anomaly, or a run without refinement).
    """
    votes = np.full(n, -1, dtype=np.int64)
    k = np.zeros(n, dtype=np.int64)
    for record in rounds:  # later rounds overwrite earlier ones
        judged = np.asarray(record.votes) >= 0
        votes[judged] = np.asarray(record.votes)[judged]
        k[judged] = len(record.thresholds)
    return votes, k


def came_back(rounds: Sequence[RefinementRound], n: int) -> np.ndarray:
    """(N,) bool: removed by one round and kept again by a later one."""
    removed_before = np.zeros(n, dtype=bool)
    back = np.zeros(n, dtype=bool)
    for record in rounds:
        kept = np.asarray(record.kept, dtype=bool)
        back |= kept & removed_before
        removed_before |= ~kept
    return back


def review_tiers(samples: pd.DataFrame, rounds: Sequence[RefinementRound], threshold: float) -> np.ndarray:
    """(N,) int8: each sample's tier (an index into :data:`TIERS`; see the module docstring)."""
    n = len(samples)
    near = robust_distance(samples["anomaly_score"].to_numpy(), threshold) <= NEAR_THRESHOLD
    votes, k = last_votes(rounds, n)
    split = (votes > 0) & (votes < k)
    tiers = np.full(n, len(TIERS) - 1, dtype=np.int8)
    for tier, member in reversed(list(enumerate((near, split, came_back(rounds, n))))):
        tiers[member] = tier
    return tiers


def review_order(samples: pd.DataFrame, rounds: Sequence[RefinementRound], threshold: float,
                 judged_ids: Iterable[str]) -> np.ndarray:
    """The unjudged samples, the one whose verdict can change the outcome most first.

    Parameters
    ----------
    samples : DataFrame
        A run's samples (:attr:`core.results.RunResults.samples`): ``id`` and ``anomaly_score``.
    rounds : sequence of RefinementRound
        The run's refinement rounds (their ``votes``, ``thresholds`` and ``kept``); empty without refinement.
    threshold : float
        The run's ``is_anomaly`` threshold on ``anomaly_score``.
    judged_ids : iterable of str
        Ids with a verdict (any, ``unsure`` included); they are left out.

    Returns
    -------
    (M,) int64 array
        Positions in ``samples`` of the unjudged samples, by tier, then within a tier as the module
        docstring says.
    """
    n = len(samples)
    score = samples["anomaly_score"].to_numpy(dtype=np.float64)
    distance = robust_distance(score, threshold)
    tiers = review_tiers(samples, rounds, threshold)
    votes, k = last_votes(rounds, n)
    evenness = np.where(tiers == 1, np.abs(2 * votes - k), 0)
    order = np.lexsort((np.arange(n), -np.nan_to_num(score, nan=-np.inf), distance, evenness, tiers))
    judged = samples["id"].isin(set(judged_ids)).to_numpy()
    return order[~judged[order]].astype(np.int64)


@dataclass(frozen=True)
class ReviewProgress:
    """How far the review has got: ``judged`` of the ``queued`` samples in the queue (tiers 0-2) have a verdict."""

    judged: int
    queued: int

    @property
    def text(self) -> str:
        if self.queued == 0:
            return "the queue is empty: no sample is near the threshold, split or back after removal"
        done = "; the queue is done, the rest follow by distance to the threshold" if self.judged == self.queued else ""
        return f"judged {self.judged} of {self.queued} in the queue{done}"


def review_progress(samples: pd.DataFrame, rounds: Sequence[RefinementRound], threshold: float,
                    judged_ids: Iterable[str]) -> ReviewProgress:
    """Judged samples among the queue (tiers 0-2 of :func:`review_tiers`, judged or not) and the queue's size."""
    queued = review_tiers(samples, rounds, threshold) < QUEUED_TIERS
    judged = samples["id"].isin(set(judged_ids)).to_numpy()
    return ReviewProgress(judged=int(np.sum(queued & judged)), queued=int(np.sum(queued)))


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n`` (``n > 0``) at ``level``."""
    if n <= 0:
        raise ValueError("a proportion needs n > 0 trials")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


@dataclass(frozen=True)
class CallPrecision:
    """Share of the model's anomaly calls that the expert confirmed, among the judged ones.

    ``n`` judged samples called anomalous with a verdict ``normal`` or ``anomaly`` (``unsure`` ones
    are left out); ``right`` of them judged ``anomaly``; ``low``-``high`` the 95% Wilson interval.
    """

    right: int
    n: int
    low: float
    high: float

    @property
    def precision(self) -> float:
        return self.right / self.n

    @property
    def text(self) -> str:
        return (f"the model's anomaly calls were right for {self.precision:.0%} of the judged ones "
                f"(95% interval {self.low:.0%}-{self.high:.0%}, n={self.n})")


def call_precision(samples: pd.DataFrame, verdicts: Mapping[str, tuple[str, str]]) -> CallPrecision | None:
    """Precision of the model's anomaly calls (``is_anomaly``) among the samples judged normal or anomaly.

    ``verdicts`` is :meth:`core.registry.Registry.verdicts`: id -> (verdict, note). None when no such
    judged sample was called anomalous.
    """
    verdict = samples["id"].map(lambda i: verdicts.get(i, ("", ""))[0]).to_numpy()
    counted = samples["is_anomaly"].to_numpy().astype(bool) & np.isin(verdict, ("normal", "anomaly"))
    n = int(np.sum(counted))
    if n == 0:
        return None
    right = int(np.sum(verdict[counted] == "anomaly"))
    return CallPrecision(right, n, *wilson_interval(right, n))
