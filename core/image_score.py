"""Which score an image's ``anomaly_score`` is: the detector on its pooled embedding, or its localization map.

``FitConfig.image_score`` asks for ``pooled``, ``map`` or ``auto``; this module decides, computes the
training images' map scores and says why, and :class:`core.run_model.RunModel` scores new images the
same way.

- **The map score** of an image is the mean of the top :data:`MAP_TOP_SHARE` of its localization map
  at the localizer's working size (:func:`map_scores`; the reduction and share were chosen on the dev
  half of ``bench/image_score.py``, docs/benchmarks.md "Issue 18").
- **Out of fold.** A training image kept by refinement is in the final localizer's normal patches,
  so the final map of it is too low. Its score instead comes from a localizer fitted, with the same
  parameters, on the kept images of the *other* :data:`MAP_FOLDS` folds (:func:`out_of_fold_map_scores`,
  the map counterpart of :func:`core.refine.cross_fitted_anomaly_scores`). Every training image,
  kept or removed, is scored by such a fold model, so all training scores share one scale.
- **Consistency.** With the map score, the contamination estimate (``gamma="auto"``), the threshold
  (:func:`core.decision.threshold_at`, the same rule as the pooled score's) and ``is_anomaly`` are all
  computed from these out-of-fold map scores (:func:`score_training_images`); the refinement rounds
  still vote on pooled embeddings (they decide which images the localizer learns from).
- **The ``auto`` rule** (:func:`choose_image_score`) asks how much of the variation of the images'
  patch features is explained by *where* a patch is (:func:`location_share`): near 1 for aligned objects
  (a bottle, a centred garment), lower for textures, where every location looks alike. A map score
  fits textures (a defect is a local patch unlike any normal patch, and pooling averages it away);
  objects keep the pooled score, whose global view also catches anomalies of shape or kind. Below
  :data:`TEXTURE_CUTOFF` the images count as texture-like and get the map score. Measured on the dev
  half of ``bench/image_score.py`` (docs/benchmarks.md).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.base import clone

from core.config import FitConfig
from core.data.decode import read_rgb
from core.decision import RefinedDetector, threshold_at
from core.explain.localizer import MapLocalizer, image_scores_from_maps
from core.explain.patch import patch_features
from core.models.pretrained import load_backbone
from core.models.device import resolve_device
from core.progress import QUIET, Monitor
from core.refine import assign_folds, contamination_interval, estimate_contamination

log = logging.getLogger(__name__)

MAP_REDUCTION = "topk_mean"
MAP_TOP_SHARE = 0.01
"""The map score averages this share of an image's highest map values (:data:`MAP_REDUCTION`)."""
MAP_FOLDS = 2
"""Folds of the out-of-fold map scores: each fold model learns from the kept images of the other folds."""
TEXTURE_SAMPLE = 32
"""Training images (seeded draw among the kept ones) whose patch features :func:`location_share` reads."""
TEXTURE_CUTOFF = 0.6
"""``auto`` takes the map score when :func:`location_share` is below this (texture-like images)."""


@dataclass(frozen=True)
class ImageScoreChoice:
    """Which image score a run uses and why (saved in ``run.json``, shown by the CLI and Results).

    Attributes
    ----------
    used : {"pooled", "map"}
    requested : {"auto", "pooled", "map"}
        What the config asked for.
    reason : str
        Why, in words.
    location_share : float or None
        The ``auto`` rule's statistic (:func:`location_share`), when it was measured.
    """

    used: str
    requested: str
    reason: str
    location_share: float | None = None

    def describe(self) -> str:
        """``map (auto: ...)`` or ``pooled (asked for)``."""
        return f"{self.used} ({self.requested}: {self.reason})" if self.requested == "auto" else f"{self.used} ({self.reason})"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict | None) -> "ImageScoreChoice":
        """The choice saved in ``run.json``; a run saved before image scores could be chosen used pooled."""
        if not saved:
            return cls("pooled", "pooled", "saved before image scores could be chosen")
        return cls(**saved)


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
    localizer's working size (so the score does not depend on the file's own size)."""
    size = localizer.image_size
    return image_scores_from_maps(list(localizer.iter_anomaly_maps(paths, output_size=size, monitor=monitor)),
                                  MAP_REDUCTION, MAP_TOP_SHARE)


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


@torch.inference_mode()
def location_share(paths: Sequence[Path | str], config: FitConfig, *, sample: int = TEXTURE_SAMPLE) -> float:
    """Share of the variance of patch features that the patch's location explains, on a sample of images.

    Patch features are the localizer's (:func:`core.explain.patch.patch_features` of the pretrained
    ``config.backbone`` at ``config.image_size``) on a seeded draw of ``sample`` of ``paths``. With
    ``f[i, l]`` the feature of image ``i`` at grid cell ``l`` and ``m`` their mean, the share is
    ``mean_l |mean_i f[i, l] - m|^2 / mean_{i,l} |f[i, l] - m|^2``: 1 when every image looks the same at a
    given place but places differ (aligned objects), near ``1 / n_images`` when every place looks alike
    (stationary textures). Labels play no part.
    """
    paths = [Path(p) for p in paths]
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.choice(len(paths), min(sample, len(paths)), replace=False))
    device = resolve_device(config.device)
    model = load_backbone(config.backbone, config.image_size, device.type, config.weights)
    total, squares, n = 0.0, 0.0, 0
    for start in range(0, len(chosen), config.batch_size):
        pixels = np.stack([read_rgb(paths[i], config.image_size) for i in chosen[start:start + config.batch_size]])
        features = patch_features(model, model.normalize(torch.from_numpy(pixels)).to(device))
        features = features.flatten(2).transpose(1, 2).double().cpu()   # (B, L, D)
        total = total + features.sum(dim=0)
        squares = squares + float((features ** 2).sum())
        n += len(features)
    per_location = total / n                                            # (L, D)
    grand = per_location.mean(dim=0)
    overall = float(squares / (n * per_location.shape[0]) - (grand ** 2).sum())
    between = float(((per_location - grand) ** 2).sum(dim=1).mean())
    return between / overall if overall > 0 else 1.0


def choose_image_score(requested: str, share: float | None) -> ImageScoreChoice:
    """The image score for ``requested`` (``auto``, ``pooled`` or ``map``; resolve a table's or a map-less
    run's ``auto`` with :meth:`FitConfig.for_data` first) given the training images' :func:`location_share`
    (needed for ``auto`` only)."""
    if requested != "auto":
        return ImageScoreChoice(requested, requested, "asked for")
    texture = share < TEXTURE_CUTOFF
    reason = (f"patch location explains {share:.0%} of the patch features' variance, "
              f"{'below' if texture else 'at or above'} {TEXTURE_CUTOFF:.0%}: "
              f"{'texture-like images' if texture else 'aligned objects'}")
    return ImageScoreChoice("map" if texture else "pooled", "auto", reason, share)


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
    share = None
    if config.image_score == "auto":
        share = location_share([p for p, keep in zip(paths, model.kept) if keep], config)
    choice = choose_image_score(config.image_score, share)
    log.info("image score: %s", choice.describe())
    if choice.used == "pooled":
        return TrainingScores(choice, model.train_score, model.threshold, model.contamination,
                              model.contamination_interval)
    scores = out_of_fold_map_scores(localizer, paths, model.kept, seed=config.seed, monitor=monitor)
    judged = scores[np.asarray(pinned) != 1]
    contamination, interval = model.contamination, model.contamination_interval
    if config.gamma == "auto":
        contamination = estimate_contamination(judged)
        interval = contamination_interval(judged, np.random.default_rng(config.seed))
    threshold = threshold_at(judged, contamination, config.false_alarm_rate)
    return TrainingScores(choice, scores, threshold, contamination, interval)
