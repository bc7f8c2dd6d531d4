"""Which score an image's ``anomaly_score`` is: the pooled embedding's, its localization map's, or both.

``FitConfig.image_score`` asks for ``pooled``, ``map``, ``both`` or ``auto``; this module resolves it,
computes the training images' scores and says why, and :class:`core.run_model.RunModel` scores new
images the same way (:meth:`ImageScoreChoice.combine`).

- **The map score** of an image is the mean of the top :data:`MAP_TOP_SHARE` of its localization map
  at the localizer's working size, its border rings weighed down where normal maps run hot there
  (:meth:`core.explain.localizer.MapLocalizer.score_weights`; :func:`map_scores`; the reduction and share
  were chosen on the dev half of ``bench/image_score.py``, docs/benchmarks.md "Issue 18").
- **Out of fold.** A training image kept by refinement is in the final localizer's normal patches,
  so the final map of it is too low. Its score instead comes from a localizer fitted, with the same
  parameters, on the kept images of the *other* :data:`MAP_FOLDS` folds (:func:`out_of_fold_map_scores`,
  the map counterpart of :func:`core.refine.cross_fitted_anomaly_scores`). Every training image,
  kept or removed, is scored by such a fold model, so all training scores share one scale.
- **Both.** The mean of the two scores, each standardized by the median and interquartile range of
  the kept training images' out-of-sample scores (:func:`score_scale`): an image counts as anomalous
  when either view, or both a little, says so. The scales are saved with the choice.
- **Consistency.** With the map score or both, the contamination estimate (``gamma="auto"``), the
  threshold (:func:`core.decision.threshold_at`, the same rule as the pooled score's) and
  ``is_anomaly`` are all computed from the training images' out-of-sample scores
  (:func:`score_training_images`); the refinement rounds still vote on pooled embeddings (they decide
  which images the localizer learns from).
- **The ``auto`` rule** (:func:`choose_image_score`) takes the map score wherever a map exists. Of the
  label-free rules compared on the dev half of ``bench/image_score_rules.py`` (the share of the patch
  features' variance that location explains, the rank agreement of the two scores' cross-fitted
  training scores, how far each lifts the images refinement removed, always pooled, map or both), the
  map was never below the better single score there (14 of 14 cases), ahead of the location share
  (worst -0.004) and both (worst -0.015); docs/benchmarks.md "Issue 18: image scores from maps" has the
  report half. Tables and runs without maps use the pooled score.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from sklearn.base import clone

from core.config import FitConfig
from core.decision import RefinedDetector, threshold_at
from core.detectors import make_detector
from core.explain.localizer import MapLocalizer, image_scores_from_maps
from core.progress import QUIET, Monitor
from core.refine import assign_folds, contamination_interval, cross_fitted_anomaly_scores, estimate_contamination

log = logging.getLogger(__name__)

MAP_REDUCTION = "topk_mean"
MAP_TOP_SHARE = 0.01
"""The map score averages this share of an image's highest map values (:data:`MAP_REDUCTION`)."""
MAP_FOLDS = 2
"""Folds of the out-of-fold map scores: each fold model learns from the kept images of the other folds."""


@dataclass(frozen=True)
class ImageScoreChoice:
    """Which image score a run uses and why (saved in ``run.json``, shown by the CLI and Results).

    Attributes
    ----------
    used : {"pooled", "map", "both"}
    requested : {"auto", "pooled", "map", "both"}
        What the config asked for.
    reason : str
        Why, in words.
    scales : dict or None
        With ``both``: ``{"pooled": (median, iqr), "map": (median, iqr)}`` of the kept training images'
        out-of-sample scores (:func:`score_scale`), which put the two scores on one scale.
    """

    used: str
    requested: str
    reason: str
    scales: dict[str, tuple[float, float]] | None = None

    def describe(self) -> str:
        """``map (auto: ...)`` or ``pooled (asked for)``."""
        return f"{self.used} ({self.requested}: {self.reason})" if self.requested == "auto" else f"{self.used} ({self.reason})"

    def combine(self, pooled: np.ndarray, map_score: np.ndarray | None) -> np.ndarray:
        """The run's ``anomaly_score`` from an image's pooled and map scores (``map_score`` unused, may be
        None, for ``pooled``)."""
        if self.used == "pooled":
            return pooled
        if self.used == "map":
            return map_score
        return 0.5 * (standardized(pooled, self.scales["pooled"]) + standardized(map_score, self.scales["map"]))

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict | None) -> "ImageScoreChoice":
        """The choice saved in ``run.json``; a run saved before image scores could be chosen used pooled."""
        if not saved:
            return cls("pooled", "pooled", "saved before image scores could be chosen")
        scales = saved.get("scales")
        return cls(saved["used"], saved["requested"], saved["reason"],
                   {name: tuple(scale) for name, scale in scales.items()} if scales else None)


@dataclass(frozen=True)
class TrainingScores:
    """The training images' scores under the chosen image score, and what follows from them."""

    choice: ImageScoreChoice
    anomaly_score: np.ndarray
    """(N,) float64, higher = more anomalous: out-of-fold map scores, or the final detector's scores."""
    threshold: float
    contamination: float
    contamination_interval: tuple[float, float] | None


def map_scores(localizer: MapLocalizer, paths: Sequence[Path | str], monitor: Monitor = QUIET) -> np.ndarray:
    """``(N,) float64`` map score of each image: the top-:data:`MAP_TOP_SHARE` mean of its map at the
    localizer's working size (so the score does not depend on the file's own size), weighed by the
    localizer's :meth:`~core.explain.localizer.MapLocalizer.score_weights`."""
    scored = iter_scored_maps(localizer, paths, output_size=localizer.image_size, monitor=monitor)
    return np.array([score for score, _ in scored], dtype=np.float64)


def iter_scored_maps(
    localizer: MapLocalizer, paths: Sequence[Path | str], output_size: int | tuple[int, int] | None = None,
    monitor: Monitor = QUIET,
) -> Iterator[tuple[float, np.ndarray]]:
    """``(map score, (H, W) float32 map)`` per image, lazily, both from one computation of its map.

    The score is :func:`map_scores`'s, taken at the working size; the map is at ``output_size`` (as
    in :meth:`MapLocalizer.iter_anomaly_maps`; None: the image's own size), for saving or showing.
    """
    sizes, weights = (localizer.image_size, output_size), localizer.score_weights()
    for working, anomaly_map in localizer.iter_anomaly_maps_at(paths, sizes, monitor=monitor):
        yield float(image_scores_from_maps([working * weights], MAP_REDUCTION, MAP_TOP_SHARE)[0]), anomaly_map


def out_of_fold_map_scores(
    localizer: MapLocalizer, paths: Sequence[Path | str], trainable: np.ndarray, *, folds: int = MAP_FOLDS,
    seed: int = 0, monitor: Monitor = QUIET,
) -> np.ndarray:
    """Map scores of ``paths``, each from a localizer that did not learn from that image.

    ``paths`` are split (seeded) into ``folds`` folds; for each fold, a clone of ``localizer`` (same
    parameters, unfitted) is fitted on the ``trainable`` images (the kept ones) of the other folds and
    scores every image of the fold (:func:`map_scores`).

    Returns
    -------
    (N,) float64 array, higher = more anomalous.
    """
    paths, trainable = [Path(p) for p in paths], np.asarray(trainable, dtype=bool)
    fold = assign_folds(len(paths), folds, seed)
    scores = np.empty(len(paths), dtype=np.float64)
    for k in range(folds):
        monitor.check()
        learn = [path for path, f, ok in zip(paths, fold, trainable) if f != k and ok]
        model = clone(localizer).fit(learn, monitor=monitor)
        rows = np.flatnonzero(fold == k)
        scores[rows] = map_scores(model, [paths[i] for i in rows], monitor=monitor)
    return scores


def score_scale(reference: np.ndarray) -> tuple[float, float]:
    """``(median, interquartile range)`` of ``reference`` scores; the range is floored at a tiny positive
    value so that constant scores still give a finite scale."""
    low, median, high = np.quantile(np.asarray(reference, dtype=np.float64), [0.25, 0.5, 0.75])
    return float(median), float(max(high - low, 1e-12))


def standardized(scores: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """``scores`` minus the scale's median, over its interquartile range (:func:`score_scale`)."""
    median, spread = scale
    return (np.asarray(scores, dtype=np.float64) - median) / spread


def choose_image_score(requested: str) -> ImageScoreChoice:
    """The image score for ``requested`` (``auto``, ``pooled``, ``map`` or ``both``) of a run with maps;
    resolve a table's or a map-less run's ``auto`` with :meth:`FitConfig.for_data` first."""
    if requested != "auto":
        return ImageScoreChoice(requested, requested, "asked for")
    return ImageScoreChoice("map", "auto", "the localization map's score wherever maps exist: it ranked best on "
                            "the benchmarks' dev half")


def score_training_images(
    localizer: MapLocalizer | None, paths: Sequence[Path | str], model: RefinedDetector, config: FitConfig,
    pinned: np.ndarray, monitor: Monitor = QUIET,
) -> TrainingScores:
    """The training images' ``anomaly_score``, threshold and contamination under the chosen image score.

    ``localizer`` is the run's fitted localizer (None without maps), ``model`` the outcome of
    :func:`core.decision.refine_and_fit`, ``pinned`` the expert's verdicts (confirmed anomalies are
    left out of the threshold, as for the pooled score). ``config.image_score`` must be resolved for
    the data (:meth:`FitConfig.for_data`). With the pooled score, ``model``'s values are returned as they are.
    """
    choice = choose_image_score(config.image_score)
    log.info("image score: %s", choice.describe())
    if choice.used == "pooled":
        return TrainingScores(choice, model.train_score, model.threshold, model.contamination,
                              model.contamination_interval)
    scores = out_of_fold_map_scores(localizer, paths, model.kept, seed=config.seed, monitor=monitor)
    if choice.used == "both":
        factory = partial(make_detector, config.detector, random_state=config.seed)
        pooled = cross_fitted_anomaly_scores(model.embeddings, np.arange(len(paths)), model.kept, factory,
                                             folds=max(config.ensemble, 2), seed=config.seed)
        choice = replace(choice, scales={"pooled": score_scale(pooled[model.kept]), "map": score_scale(scores[model.kept])})
        scores = choice.combine(pooled, scores)
    judged = scores[np.asarray(pinned) != 1]
    contamination, interval = model.contamination, model.contamination_interval
    if config.gamma == "auto":
        contamination = estimate_contamination(judged)
        interval = contamination_interval(judged, np.random.default_rng(config.seed))
    threshold = threshold_at(judged, contamination, config.false_alarm_rate)
    return TrainingScores(choice, scores, threshold, contamination, interval)
