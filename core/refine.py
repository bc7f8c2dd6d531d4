"""STOC data refinement as in SRR: an ensemble of one-class detectors on disjoint subsets votes out suspects.

One round:

1. shuffle every judged sample (seeded; as in SRR, default) or only the samples kept so far
   (``subsets_from``) and split them into K disjoint subsets;
2. fit one detector per subset;
3. score the **whole** training set with every detector and give detector k a threshold at the
   gamma-quantile (the smallest score with at least a gamma share at or below it) of its
   ``score_samples`` (higher = more normal) over a reference set: the samples it did **not** train
   on (``held_out``, default; the kept ones among them weighted to stand for all kept samples, so
   that the reference mirrors the whole training set) or its own subset (``in_sample``, the original
   recipe, which collapses when the subset is small next to the dimension: every detector then
   flags everything it did not see); a score below the threshold is a vote;
4. the next kept set is every sample that all K detectors call normal. A sample removed in an
   earlier round comes back when no detector flags it any more (after retraining, or because the
   detectors now train on cleaner data); the round records who came back.

Rounds repeat until ``rounds`` is reached or the kept set stops changing. If the kept share would
drop below ``min_keep_fraction``, the round is capped (only the most suspicious samples are removed,
the record says so) and refinement stops. ``gamma="auto"`` estimates the contamination of the whole
training set in every round from the ensemble's cross-fitted scores (:func:`estimate_contamination`);
later rounds estimate it with detectors trained on refined data, which a cluster of anomalies masks less.

Detectors are fitted and scored through a :class:`~core.compute.Compute` (``compute``; default:
this process, streaming chunks of rows), so the embeddings may be a memory-mapped file, and the K
detectors of a round may run on a Ray cluster.

A ``retrain`` callback, when given, receives the kept mask between rounds and returns new
embeddings for all samples: this is where self-supervised retraining plugs in.

An expert's verdicts enter as ``pinned``: confirmed anomalies are removed before round 1 (no
detector ever trains on them, none judges them; round 1 lists them first among its removals) and
confirmed normals are never removed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import numpy as np

from core.compute import Compute, DetectorFactory, LocalCompute
from core.errors import ConfigError, DataError
from core.progress import QUIET, Monitor

log = logging.getLogger(__name__)

MIN_SAMPLES_PER_DETECTOR = 3
AUTO_GAMMA_BOUNDS = (0.01, 0.4)
AUTO_GAMMA_CUTOFF = 3.0
SUBSETS_FROM = ("kept", "all")


@dataclass(frozen=True)
class RefinementRound:
    """What one refinement round did.

    Attributes
    ----------
    round : int
        1-based round number.
    kept : (N,) bool array
        Samples kept after this round (over the whole training set).
    removed : (R,) int64 array
        Indices (into the training set) kept before this round and removed by it, most suspicious first.
    returned : (B,) int64 array
        Indices removed in an earlier round that this round keeps again (they came back).
    thresholds : (K,) float64 array
        Each detector's threshold on its ``score_samples`` scale.
    votes : (N,) int16 array
        How many detectors called each sample anomalous; -1 for samples no detector judges
        (confirmed anomalies).
    anomaly_score : (N,) float32 array
        Cross-fitted consensus score of this round (higher = more anomalous; NaN for samples
        no detector judges): the mean, over detectors that did not train on the sample, of its
        score relative to that detector's threshold, in units of the detector's score spread.
        0 is the threshold.
    gamma : float
        Share each detector flagged in this round (estimated when the config says ``auto``).
    gamma_interval : (float, float) or None
        With ``auto``: a 90% bootstrap interval of the estimate (the spread from which samples
        happened to be drawn; not the estimator's bias). None for a given gamma.
    seconds : float
        Wall time of the round.
    capped : bool
        True when the collapse guard limited the removals.
    precision, recall : float or None
        Removal precision of this round and cumulative removal recall, when labels exist.
    note : str
        Human-readable summary, including why refinement stopped.
    """

    round: int
    kept: np.ndarray
    removed: np.ndarray
    returned: np.ndarray
    thresholds: np.ndarray
    votes: np.ndarray
    anomaly_score: np.ndarray
    gamma: float
    gamma_interval: tuple[float, float] | None
    seconds: float
    capped: bool
    precision: float | None
    recall: float | None
    note: str


def iter_refine(
    embeddings: np.ndarray,
    detector_factory: DetectorFactory,
    *,
    ensemble: int = 5,
    gamma: float | str = "auto",
    rounds: int = 3,
    threshold_source: str = "held_out",
    min_keep_fraction: float = 0.5,
    subsets_from: str = "all",
    seed: int = 0,
    labels: np.ndarray | None = None,
    pinned: np.ndarray | None = None,
    retrain: Callable[[np.ndarray], np.ndarray] | None = None,
    monitor: Monitor = QUIET,
    compute: Compute | None = None,
) -> Iterator[RefinementRound]:
    """Yield one :class:`RefinementRound` per round (see the module docstring).

    Parameters
    ----------
    embeddings : (N, D) array
        Training embeddings.
    detector_factory : callable
        Returns a fresh unfitted detector with the scikit-learn outlier API.
    labels : (N,) int array, optional
        1 = anomaly, 0 = normal, -1 = unknown; used only for the precision/recall fields.
    pinned : (N,) int array, optional
        An expert's verdicts, same coding as ``labels``: 1 = always removed, 0 = never removed,
        -1 = left to the detectors (see :func:`pinned_from_verdicts`).
    subsets_from : {"all", "kept"}
        What each round splits into the K training subsets: every judged sample, as SRR does (default),
        or only the samples kept so far (later detectors train on cleaner data, but a sample removed
        early is judged by detectors that never saw anything like it). ``all`` was chosen on the dev
        half of bench/refinement.py (bench/explore_refinement.py, study ``subsets``; docs/benchmarks.md).
    compute : Compute, optional
        Fits and scores the detectors (default: :class:`~core.compute.LocalCompute`).
    """
    if subsets_from not in SUBSETS_FROM:
        raise ConfigError(f"subsets_from must be one of {', '.join(SUBSETS_FROM)}; got {subsets_from!r}")
    features = np.asarray(embeddings)
    n = len(features)
    pinned = check_pinned(pinned, n)
    if threshold_source == "held_out" and ensemble < 2:
        raise ConfigError("held-out thresholds need an ensemble of K >= 2 detectors; raise --ensemble")
    if n < ensemble * MIN_SAMPLES_PER_DETECTOR:
        raise DataError(
            f"refinement with K={ensemble} needs at least {ensemble * MIN_SAMPLES_PER_DETECTOR} "
            f"training samples, got {n}; lower --ensemble or turn refinement off"
        )
    judged = np.flatnonzero(pinned != 1)
    kept = pinned != 1
    min_kept = int(np.ceil(min_keep_fraction * n))
    rng = np.random.default_rng(seed)
    compute = compute or LocalCompute()
    for round_number in range(1, rounds + 1):
        monitor.check()
        if round_number == 1:  # the stage starts now, not when its first round ends
            monitor.report("refine", 0, rounds, "judging the samples")
        started = time.perf_counter()
        fit_on = np.flatnonzero(kept) if subsets_from == "kept" else judged
        if len(fit_on) < ensemble * MIN_SAMPLES_PER_DETECTOR:
            log.info("refinement stopped: too few samples left for K=%d", ensemble)
            return
        vote = _ensemble_vote(features, fit_on, judged, detector_factory, ensemble, gamma, threshold_source, rng,
                              compute)
        flagged = judged[vote.votes > 0]
        flagged = flagged[np.argsort(-vote.consensus[vote.votes > 0], kind="stable")]
        flagged = flagged[pinned[flagged] != 0]
        budget = max(len(judged) - min_kept, 0)
        capped = len(flagged) > budget
        now_kept = pinned != 1
        now_kept[flagged[:budget]] = False
        round_record = _record(round_number, kept, now_kept, pinned, flagged[:budget], vote, judged, started, capped,
                               labels, len(flagged))
        monitor.report("refine", round_number, rounds, round_record.note)
        log.info(round_record.note)
        yield round_record
        if capped or np.array_equal(now_kept, kept):
            return
        kept = now_kept
        if retrain is not None and round_number < rounds:
            features = np.asarray(retrain(kept))


def estimate_contamination(anomaly_scores: np.ndarray, cutoff: float = AUTO_GAMMA_CUTOFF) -> float:
    """Label-free estimate of the anomalous share from cross-fitted anomaly scores.

    The share of scores more than ``cutoff`` robust standard deviations (1.4826 x the median
    absolute deviation) above the median, clipped to ``AUTO_GAMMA_BOUNDS``. Median and MAD are
    barely moved by the anomalies themselves. On the 26 ADBench classical tables this rule
    correlated best with the true contamination among the rules we compared (a plain MAD rule at
    2 and 3, the same on log scores, the medcouple-adjusted boxplot) and errs on the side of
    overestimating (median ratio ~1.5), which refinement tolerates far better than
    underestimating (docs/benchmarks.md).
    """
    scores = np.asarray(anomaly_scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    centre = np.median(scores)
    spread = 1.4826 * np.median(np.abs(scores - centre))
    if spread <= 0:
        return AUTO_GAMMA_BOUNDS[0]
    share = float(np.mean(scores > centre + cutoff * spread))
    return float(np.clip(share, *AUTO_GAMMA_BOUNDS))


def contamination_interval(anomaly_scores: np.ndarray, rng: np.random.Generator, resamples: int = 200,
                           level: float = 0.9) -> tuple[float, float]:
    """A bootstrap interval of :func:`estimate_contamination` on ``anomaly_scores``.

    The ``level`` central interval of the estimate over ``resamples`` resamples (with replacement)
    of the scores. It shows how much the estimate depends on which samples were drawn; a bias of the
    rule itself (a masked cluster of anomalies) is not in it.
    """
    scores = np.asarray(anomaly_scores, dtype=np.float64)
    estimates = [estimate_contamination(scores[rng.integers(0, len(scores), len(scores))]) for _ in range(resamples)]
    low, high = np.quantile(estimates, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def describe_contamination(contamination: float, interval: tuple[float, float] | None) -> str:
    """``estimated contamination 8.1% (90% interval 6.5%-9.7%)``, or ``contamination 10.0% (given)``: in
    percent, as the refinement rounds show their shares."""
    if interval is None:
        return f"contamination {contamination:.1%} (given)"
    return f"estimated contamination {contamination:.1%} (90% interval {interval[0]:.1%}-{interval[1]:.1%})"


def cross_fitted_anomaly_scores(
    embeddings: np.ndarray, rows: np.ndarray, trainable: np.ndarray, detector_factory: DetectorFactory, *,
    folds: int = 5, seed: int = 0, compute: Compute | None = None,
) -> np.ndarray:
    """Anomaly scores of ``rows``, each from a detector that did not train on it.

    ``rows`` are split (seeded) into ``folds`` disjoint folds; for each fold, a detector fitted on the
    ``trainable`` rows (e.g. the kept ones) of the other folds scores every row of the fold. These
    out-of-sample scores set a threshold with a known false-alarm rate: a detector's in-sample scores
    are too normal (kNN counts a row as its own neighbour).

    Parameters
    ----------
    rows : (M,) int array
        Indices into ``embeddings``.
    trainable : (M,) bool array
        Which of ``rows`` a detector may train on.

    Returns
    -------
    (M,) float64 array, higher = more anomalous.
    """
    compute = compute or LocalCompute()
    rows, trainable = np.asarray(rows), np.asarray(trainable, dtype=bool)
    fold = assign_folds(len(rows), folds, seed)
    trained_on = [rows[trainable & (fold != k)] for k in range(folds)]
    detectors = compute.fit_detectors(detector_factory, embeddings, trained_on)
    scores = np.empty(len(rows), dtype=np.float64)
    for k, detector in enumerate(detectors):
        scores[fold == k] = -compute.score([detector], embeddings, rows[fold == k])[0]
    return scores


def assign_folds(n: int, folds: int, seed: int) -> np.ndarray:
    """``(n,) int64`` fold of each of ``n`` samples: a seeded shuffle dealt round-robin into ``folds`` folds
    whose sizes differ by at most one (the folds of every cross-fitted score)."""
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return fold


@dataclass(frozen=True)
class _Vote:
    votes: np.ndarray       # (J,) detectors flagging each judged sample
    consensus: np.ndarray   # (J,) cross-fitted consensus anomaly score
    thresholds: np.ndarray  # (K,)
    gamma: float
    gamma_interval: tuple[float, float] | None


def _ensemble_vote(features, fit_on, judged, factory, ensemble, gamma, threshold_source, rng, compute) -> _Vote:
    """Fit K detectors on disjoint subsets of ``fit_on`` and let each vote on every sample of ``judged``.

    ``fit_on`` and ``judged`` are sorted indices, ``fit_on`` a subset of ``judged``.
    """
    parts = [np.sort(fit_on[part]) for part in np.array_split(rng.permutation(len(fit_on)), ensemble)]
    detectors = compute.fit_detectors(factory, features, parts)
    scores = compute.score(detectors, features, judged)
    member = np.zeros((ensemble, len(judged)), dtype=bool)
    for k, part in enumerate(parts):
        member[k, np.searchsorted(judged, part)] = True
    # Cross-fitting: each detector is judged on the samples it did not see. A single detector
    # (K = 1, in-sample thresholds only) has no such samples and is judged on all of them.
    unseen = ~member if ensemble > 1 else np.ones_like(member)
    centre = np.array([np.median(scores[k, unseen[k]]) for k in range(ensemble)])
    spread = np.array([_mad(scores[k, unseen[k]]) for k in range(ensemble)])
    consensus_raw = _mean_over(unseen, (centre[:, None] - scores) / spread[:, None])
    chosen_gamma = estimate_contamination(consensus_raw) if gamma == "auto" else float(gamma)
    interval = contamination_interval(consensus_raw, rng.spawn(1)[0]) if gamma == "auto" else None
    if threshold_source == "held_out":
        # Detector k's held-out samples stand for the whole judged set: the kept ones it did not train
        # on stand for all kept samples (weight K / (K - 1)), the removed ones for themselves.
        held_out_share = np.array([(len(fit_on) - len(part)) / len(fit_on) for part in parts])
        weights = np.where(np.isin(judged, fit_on)[None, :], 1.0 / np.maximum(held_out_share, 1e-12)[:, None], 1.0)
        thresholds = np.array([np.quantile(scores[k, unseen[k]], chosen_gamma, weights=weights[k, unseen[k]],
                                           method="inverted_cdf") for k in range(ensemble)])
    else:
        thresholds = np.array([np.quantile(scores[k, member[k]], chosen_gamma, method="inverted_cdf")
                               for k in range(ensemble)])
    votes = (scores < thresholds[:, None]).sum(axis=0).astype(np.int16)
    consensus = _mean_over(unseen, (thresholds[:, None] - scores) / spread[:, None])
    return _Vote(votes=votes, consensus=consensus, thresholds=thresholds, gamma=chosen_gamma, gamma_interval=interval)


def _mean_over(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Column means of ``values (K, A)`` over the rows where ``mask`` is True."""
    return (values * mask).sum(axis=0) / mask.sum(axis=0)


def _mad(values: np.ndarray) -> float:
    spread = 1.4826 * np.median(np.abs(values - np.median(values)))
    return float(spread) if spread > 0 else float(np.std(values)) or 1.0


def check_pinned(pinned: np.ndarray | None, n: int) -> np.ndarray:
    """``pinned`` as an (N,) int8 array in {-1, 0, 1} (all -1 when None); a clear error otherwise."""
    if pinned is None:
        return np.full(n, -1, dtype=np.int8)
    pinned = np.asarray(pinned)
    if pinned.shape != (n,) or not np.isin(pinned, (-1, 0, 1)).all():
        raise DataError(f"pinned verdicts must be an ({n},) array of -1, 0 and 1, got shape {pinned.shape}")
    return pinned.astype(np.int8)


VERDICT_CODES = {"anomaly": 1, "normal": 0, "unsure": -1}
"""How an expert's verdict pins a sample: 1 always removed, 0 never removed, -1 left to the detectors."""


def pinned_from_verdicts(ids: list[str], verdicts: Mapping[str, str] | None) -> np.ndarray:
    """(N,) int8: 1 for ids an expert confirmed anomalous, 0 for confirmed normal, -1 otherwise.

    Verdicts for ids that are not in ``ids`` are ignored (an expert may have judged other data).
    """
    pinned = np.full(len(ids), -1, dtype=np.int8)
    if verdicts:
        unknown = set(verdicts.values()) - set(VERDICT_CODES)
        if unknown:
            raise DataError(f"unknown verdict {sorted(unknown)[0]!r}; use one of {', '.join(VERDICT_CODES)}")
        for index, sample_id in enumerate(ids):
            if sample_id in verdicts:
                pinned[index] = VERDICT_CODES[verdicts[sample_id]]
    return pinned


def _record(round_number, kept_before, kept, pinned, removed_by_vote, vote, judged, started, capped, labels, n_flagged):
    """The :class:`RefinementRound` that took ``kept_before`` to ``kept``."""
    n = len(kept)
    confirmed = np.flatnonzero(pinned == 1) if round_number == 1 else np.zeros(0, dtype=np.int64)
    newly = removed_by_vote[kept_before[removed_by_vote]]
    removed = np.concatenate([confirmed, newly]).astype(np.int64)
    returned = np.flatnonzero(kept & ~kept_before).astype(np.int64)
    votes = np.full(n, -1, dtype=np.int16)
    votes[judged] = vote.votes
    score = np.full(n, np.nan, dtype=np.float32)
    score[judged] = vote.consensus
    precision = recall = None
    if labels is not None and np.any(labels == 1):
        precision = float(np.mean(labels[removed] == 1)) if len(removed) else None
        recall = float(np.mean(~kept[labels == 1]))
    note = (f"round {round_number}: removed {len(newly)} of {len(judged)} judged, {len(returned)} came back, "
            f"{int(kept.sum())} kept (gamma {vote.gamma:.3f})")
    if len(confirmed):
        note += f"; {len(confirmed)} confirmed {'anomaly' if len(confirmed) == 1 else 'anomalies'} removed first"
    if capped:
        note += f"; capped: {n_flagged} were flagged but the kept share may not fall below the guard"
    elif np.array_equal(kept, kept_before) and not len(confirmed):
        note += "; the kept set did not change: refinement stops here"
    if precision is not None:
        note += f"; removal precision {precision:.2f}, recall {recall:.2f}"
    return RefinementRound(
        round=round_number,
        kept=kept,
        removed=removed,
        returned=returned,
        thresholds=vote.thresholds,
        votes=votes,
        anomaly_score=score,
        gamma=vote.gamma,
        gamma_interval=vote.gamma_interval,
        seconds=time.perf_counter() - started,
        capped=capped,
        precision=precision,
        recall=recall,
        note=note,
    )


def contamination_from_data(
    embeddings: np.ndarray, detector_factory: DetectorFactory, *, ensemble: int = 5, seed: int = 0,
    compute: Compute | None = None,
) -> tuple[float, tuple[float, float]]:
    """Label-free contamination estimate of a whole training set (no samples removed), and its interval.

    The same statistic ``gamma="auto"`` uses in a refinement round: one ensemble of K detectors
    on disjoint subsets, cross-fitted consensus scores, :func:`estimate_contamination`.
    """
    features = np.asarray(embeddings)
    ensemble = max(1, min(ensemble, len(features) // MIN_SAMPLES_PER_DETECTOR))
    if ensemble < 2:
        raise DataError(f"estimating the contamination needs at least {2 * MIN_SAMPLES_PER_DETECTOR} samples")
    everyone = np.arange(len(features))
    vote = _ensemble_vote(
        features, everyone, everyone, detector_factory, ensemble, "auto", "held_out", np.random.default_rng(seed),
        compute or LocalCompute(),
    )
    return vote.gamma, vote.gamma_interval
