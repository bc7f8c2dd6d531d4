"""What a run decides on embeddings: which samples to keep, the final detector, the contamination, the threshold.

:func:`refine_and_fit` is the whole fit after encoding. :mod:`core.pipeline` calls it on a data set's
embeddings; the benchmarks call it directly, so that they measure exactly what ``refinery fit`` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from core.compute import Compute, LocalCompute
from core.config import FitConfig
from core.detectors import make_detector
from core.errors import ConfigError
from core.progress import QUIET, Monitor
from core.refine import (
    RefinementRound,
    check_pinned,
    contamination_from_data,
    cross_fitted_anomaly_scores,
    iter_refine,
)


@dataclass(frozen=True)
class RefinedDetector:
    """The outcome of refinement plus the final detector, on embeddings."""

    rounds: list[RefinementRound]
    kept: np.ndarray
    contamination: float
    contamination_interval: tuple[float, float] | None
    detector: object
    train_score: np.ndarray
    threshold: float
    """``is_anomaly`` above it; set to flag ``config.false_alarm_rate`` of normal data (out-of-sample scores)."""
    embeddings: np.ndarray
    """(N, D) embeddings the final detector scores: the last representation when it was retrained."""
    round_embeddings: list[np.ndarray]
    """The embeddings each refinement round worked on (round 1 first)."""


def refine_and_fit(
    embeddings: np.ndarray,
    config: FitConfig,
    *,
    labels: np.ndarray | None = None,
    pinned: np.ndarray | None = None,
    retrain: Callable[[np.ndarray], np.ndarray] | None = None,
    on_round: Callable[[RefinementRound], None] | None = None,
    monitor: Monitor = QUIET,
    compute: Compute | None = None,
) -> RefinedDetector:
    """STOC refinement (when configured), the final detector on the kept samples, and the threshold.

    ``labels`` only feed the rounds' precision/recall fields; ``pinned`` carries an expert's verdicts
    (:func:`core.refine.pinned_from_verdicts`). ``retrain`` (STOC self-training) receives the kept
    mask after every round, returns new embeddings of all samples, and runs once more after the
    last round so that the final detector sees the last representation. ``compute`` fits and scores
    the detectors (default: this process, streaming chunks of rows, so ``embeddings`` may be a
    memory-mapped file). ``config.detector`` fits the final detector and sets the threshold;
    ``config.refine_detector`` makes up the refinement ensemble and estimates the contamination.
    Both must be concrete: resolve ``auto`` with :meth:`FitConfig.for_data` first.
    """
    if "auto" in (config.detector, config.refine_detector):
        raise ConfigError("refine_and_fit needs concrete detectors; call config.for_data(kind) first")
    factory = partial(make_detector, config.detector, random_state=config.seed)
    refine_factory = partial(make_detector, config.refine_detector, random_state=config.seed)
    compute = compute or LocalCompute()
    rounds: list[RefinementRound] = []
    pinned = check_pinned(pinned, len(embeddings))
    kept = pinned != 1
    round_embeddings = [embeddings]
    if config.refine and config.rounds > 0:

        def retrain_and_record(kept_now: np.ndarray) -> np.ndarray:
            round_embeddings.append(retrain(kept_now))
            return round_embeddings[-1]

        refinement = iter_refine(
            embeddings, refine_factory, ensemble=config.ensemble, gamma=config.gamma, rounds=config.rounds,
            threshold_source=config.threshold_source, min_keep_fraction=config.min_keep_fraction,
            seed=config.seed, labels=labels, pinned=pinned, retrain=retrain and retrain_and_record,
            monitor=monitor, compute=compute,
        )
        for record in refinement:
            rounds.append(record)
            kept = record.kept
            if on_round is not None:
                on_round(record)
    worked_on = round_embeddings[: len(rounds)] if rounds else []
    final = retrain(kept) if retrain is not None and rounds else round_embeddings[-1]
    contamination, interval = _contamination(config, final, refine_factory, rounds, compute)
    detector = compute.fit_detectors(factory, final, [np.flatnonzero(kept)])[0]
    train_score = -compute.score([detector], final)[0]
    threshold = _threshold(final, kept, pinned, contamination, config, factory, compute)
    return RefinedDetector(rounds, kept, contamination, interval, detector, train_score, threshold, final, worked_on)


def _threshold(embeddings, kept, pinned, contamination, config, factory, compute) -> float:
    """The ``is_anomaly`` threshold: meant to flag ``config.false_alarm_rate`` of normal data.

    Every training sample the detectors judge (not a confirmed anomaly) gets an out-of-sample score
    from a detector fitted on the kept samples of the other folds. Of these, the ``contamination``
    share is taken to be anomalous and to lie above the threshold; the threshold flags
    ``false_alarm_rate`` of the rest. (A quantile of the kept samples alone would miss the normal
    samples refinement removed, and flag more new normal data than stated.)
    """
    judged = np.flatnonzero(pinned != 1)
    scores = cross_fitted_anomaly_scores(embeddings, judged, kept[judged], factory, folds=max(config.ensemble, 2),
                                         seed=config.seed, compute=compute)
    return threshold_at(scores, contamination, config.false_alarm_rate)


def threshold_at(scores: np.ndarray, contamination: float, false_alarm_rate: float) -> float:
    """The threshold above which ``contamination`` of ``scores`` (out-of-sample anomaly scores of the judged
    training samples) and ``false_alarm_rate`` of the rest lie: the rule of every run's threshold, whichever
    score it is on (:func:`_threshold`, :func:`core.image_score.score_training_images`)."""
    flagged_share = contamination + false_alarm_rate * (1.0 - contamination)
    return float(np.quantile(scores, float(np.clip(1.0 - flagged_share, 0.0, 1.0))))


def _contamination(config, embeddings, factory, rounds, compute) -> tuple[float, tuple[float, float] | None]:
    """Share of the training data expected to be anomalous, and its interval (None for a given gamma).

    A numeric gamma is taken as the user's statement of the contamination; ``auto`` uses the last
    round's estimate (of the whole training set, by detectors trained on the refined data, which a
    cluster of anomalies masks less than the first round's) or, without refinement, the same estimate.
    """
    if config.gamma != "auto":
        return float(config.gamma), None
    if rounds:
        return rounds[-1].gamma, rounds[-1].gamma_interval
    return contamination_from_data(embeddings, factory, ensemble=config.ensemble, seed=config.seed, compute=compute)
