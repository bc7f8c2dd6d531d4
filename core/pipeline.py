"""A fit from a data set to a saved run: encode, refine, fit the detector and the localizer, save.

:func:`fit` stages the run directory (:mod:`core.run_dir`), registers the run and hands the work
to a :class:`FitInProgress`, which holds everything the steps share (staging folder, run id,
registry, compute, monitor). :func:`fit_work` wraps a fit as a studio background job.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from core.compute import Compute, LocalCompute, check_finite
from core.config import FitConfig
from core.data import IMAGES, Dataset
from core.data.images import largest_image_side
from core.decision import refine_and_fit
from core.errors import CANCELS, Cancelled, DataError, RefineryError
from core.explain.cutpaste_patch import CutPastePatchLocalizer
from core.explain.patch import PatchLocalizer
from core.files import disk_errors, write_npy
from core.image_score import score_training_images
from core.jobs import JobContext
from core.layouts import run_layouts
from core.models.encoder import Encoder, make_encoder
from core.models.image_encoder import embedding_memmap
from core.progress import QUIET, Monitor
from core.refine import MIN_SAMPLES_PER_DETECTOR, RefinementRound, pinned_from_verdicts
from core.registry import Registry
from core.run_dir import FitResult, Scores, write_run
from core.staging import (
    EMBEDDINGS_CACHE, RESUME_DIR, TRAINING_DIR, check_destination, interrupted_run, staged_directory, write_attempt,
)

log = logging.getLogger(__name__)


def fit(
    dataset: Dataset,
    config: FitConfig,
    out_dir: Path | str,
    *,
    verdicts: Mapping[str, str] | None = None,
    registry: Registry | None = None,
    resume: bool = False,
    on_round: Callable[[RefinementRound], None] | None = None,
    monitor: Monitor = QUIET,
    compute: Compute | None = None,
    session: str | None = None,
) -> FitResult:
    """Fit a run on ``dataset`` and save it to ``out_dir`` (which must not hold anything yet).

    ``verdicts`` maps sample ids to an expert's ``normal`` / ``anomaly`` / ``unsure``: confirmed
    normals are always kept, confirmed anomalies always removed (see :mod:`core.refine`).
    ``on_round`` receives each refinement round as soon as it is done. ``session`` is the id of
    the studio session that starts the fit (None from the command line): the registry keeps the
    run private to it until it is shared (see :class:`core.registry.Registry`).

    The run is built in a partial folder beside ``out_dir`` (:func:`core.staging.staged_directory`):
    an error removes it, a killed process leaves it. ``resume=True`` continues such a fit (same
    data, config and verdicts, else RunError) under the same run id: it reuses the frozen
    encoder's cached embeddings and the training loop's checkpoints, recomputes the refinement
    rounds (cheap, and deterministic under the seed), and saves the same run an uninterrupted fit
    would have. Without a partial folder, ``resume=True`` starts afresh; without ``resume``, an
    existing partial folder is refused.

    ``compute`` runs the embedding of a frozen encoder and the detector fits and scoring (default:
    this process; :class:`core.distributed.ray_compute.RayCompute` for a Ray cluster). It changes
    where the work runs, not the run: it is not part of the config.
    """
    config = config.validate().for_data(dataset.kind, largest_image_side(dataset))
    _check_trainable(dataset, config)
    pinned = pinned_from_verdicts(dataset.ids, verdicts)
    registry = registry or Registry()
    out_dir = Path(out_dir)
    attempt = {"fingerprint": dataset.fingerprint, "config": asdict(config),
               "verdicts": hashlib.blake2b(pinned.tobytes(), digest_size=16).hexdigest()}
    check_destination(out_dir, resume=resume)
    run_id = registry.start_run(
        out_dir, kind=dataset.kind, data_source=str(dataset.source), fingerprint=dataset.fingerprint,
        n_samples=len(dataset), config=asdict(config), run_id=interrupted_run(out_dir, attempt) if resume else None,
        session=session,
    )
    try:
        with staged_directory(out_dir, resume=resume) as staging:
            write_attempt(staging, attempt, run_id)
            fitting = FitInProgress(dataset, config, out_dir, staging, run_id, registry, compute or LocalCompute(),
                                    monitor, on_round)
            result = fitting.run(pinned)
    except BaseException as error:
        try:
            registry.fail_run(run_id, str(error) or type(error).__name__, cancelled=isinstance(error, CANCELS))
        except RefineryError as registry_error:  # e.g. the registry is on the disk that just filled up
            log.warning("could not mark run %s failed: %s", run_id, registry_error)
        raise
    registry.finish_run(run_id, result.metrics.as_dict() if result.metrics else {})
    return result


@dataclass
class FitInProgress:
    """One fit's steps and what they share: the staging folder the run is built in, its run id and
    registry, where the heavy work runs (``compute``) and who hears of progress (``monitor``)."""

    dataset: Dataset
    config: FitConfig
    out_dir: Path
    staging: Path
    run_id: str
    registry: Registry
    compute: Compute
    monitor: Monitor = QUIET
    on_round: Callable[[RefinementRound], None] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, pinned: np.ndarray) -> FitResult:
        """Encode, refine, fit the final detector and the localizer, and write the run into the staging folder."""
        dataset, config = self.dataset, self.config
        started = time.perf_counter()
        encoder = make_encoder(config, dataset, checkpoint_dir=self.staging / RESUME_DIR / TRAINING_DIR)
        embeddings = self._encode(encoder)
        self.timings["embed_s"] = time.perf_counter() - started
        retrain = self._self_training(encoder)

        started = time.perf_counter()
        model = refine_and_fit(
            embeddings, config, labels=dataset.labels, pinned=pinned, retrain=retrain, on_round=self._record_round,
            monitor=self.monitor, compute=self.compute,
        )
        self.timings["refine_and_detector_s"] = time.perf_counter() - started
        localizer = None
        if dataset.kind == IMAGES and config.localization != "none":
            started = time.perf_counter()
            localizer = self._fit_localizer(model.kept)
            localizer.save(self.staging)
            self.timings["localization_s"] = time.perf_counter() - started

        started = time.perf_counter()
        if config.image_score != "pooled":
            self.monitor.report("image_score", 0, 1, "choosing the image score")
        trained = score_training_images(localizer, dataset.paths, model, config, pinned, self.monitor)
        self.timings["image_score_s"] = time.perf_counter() - started
        scores = Scores(dataset.ids, trained.anomaly_score, trained.anomaly_score > trained.threshold,
                        trained.threshold, dataset.labels)
        self.monitor.report("score", len(dataset), len(dataset), f"threshold {trained.threshold:.4g}")
        result = FitResult(
            run_dir=self.out_dir, run_id=self.run_id, config=config, rounds=model.rounds, kept=model.kept,
            contamination=trained.contamination, contamination_interval=trained.contamination_interval,
            scores=scores, image_score=trained.choice, timings=self.timings,
        )
        write_run(self.staging, result, dataset, encoder, model.embeddings, pinned,
                  model.round_embeddings if retrain is not None else [], detector_score=model.train_score)
        return result

    def _encode(self, encoder: Encoder) -> np.ndarray:
        """The training embeddings: a frozen encoder's (cached for a resume) or a trained one's."""
        unlabeled = self.dataset.without_labels()
        if self.config.objective == "none":
            encoder.fit(unlabeled)
            return self._cached_embeddings(encoder, unlabeled)
        encoder.fit(unlabeled, monitor=self.monitor)
        return check_finite(encoder.embed_training_data(self.monitor))

    def _cached_embeddings(self, encoder: Encoder, dataset: Dataset) -> np.ndarray:
        """The embeddings an interrupted attempt of this fit saved in ``resume/``, or new ones.

        Images are embedded straight into a memory-mapped file, so extraction holds one batch in memory
        whatever the number of images; the file only gets its final name once complete.
        """
        path = self.staging / RESUME_DIR / EMBEDDINGS_CACHE
        if path.is_file():
            log.info("reusing the embeddings extracted before the interruption (%s)", path)
            return check_finite(np.load(path, mmap_mode="r"))
        if dataset.kind != IMAGES:
            embeddings = check_finite(self.compute.embed(encoder, dataset, monitor=self.monitor))
            write_npy(path, embeddings)
            return embeddings
        partial = path.with_name(f".{path.name}.partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        rows = embedding_memmap(partial, len(dataset), encoder.embedding_dim)
        self.compute.embed(encoder, dataset, out=rows, monitor=self.monitor)
        rows.flush()
        with disk_errors(path):
            os.replace(partial, path)
        return check_finite(rows)

    def _self_training(self, encoder: Encoder) -> Callable[[np.ndarray], np.ndarray] | None:
        """STOC's retrain step for refinement: fine-tune on the kept samples, save the round's weights,
        re-embed everything. None when the representation is frozen or self-training is off."""
        config = self.config
        if config.objective == "none" or not config.refine or config.retrain_epochs == 0:
            return None

        def retrain(kept: np.ndarray) -> np.ndarray:
            encoder.retrain(kept, monitor=self.monitor)
            encoder.save(self.staging, suffix=f"_round_{encoder.rounds_trained}")
            return check_finite(encoder.embed_training_data(self.monitor))

        return retrain

    def _record_round(self, record: RefinementRound) -> None:
        self.registry.add_round(
            self.run_id, round=record.round, n_active=int(np.sum(record.votes >= 0)), n_removed=len(record.removed),
            gamma=record.gamma, precision=record.precision, recall=record.recall, seconds=record.seconds,
            note=record.note,
        )
        if self.on_round is not None:
            self.on_round(record)

    def _fit_localizer(self, kept: np.ndarray):
        """The patch model for anomaly maps (:func:`make_localizer`), fitted on the kept training images only."""
        kept_paths = [path for path, keep in zip(self.dataset.paths, kept) if keep]
        return make_localizer(self.config).fit(kept_paths, monitor=self.monitor)


def make_localizer(config: FitConfig):
    """The unfitted localizer of ``config.localization`` (not ``none``) with the run's settings; its
    parameters also make the out-of-fold models of the map score (:func:`core.image_score.out_of_fold_map_scores`)."""
    if config.localization == "cutpaste":
        return CutPastePatchLocalizer(device=config.device, seed=config.seed)
    return PatchLocalizer(config.localization, image_size=config.image_size, backbone=config.backbone,
                          weights=config.weights, device=config.device, seed=config.seed)


def _check_trainable(dataset: Dataset, config: FitConfig) -> None:
    needed = max(2 * MIN_SAMPLES_PER_DETECTOR, config.ensemble * MIN_SAMPLES_PER_DETECTOR if config.refine else 0)
    if len(dataset) < needed:
        unit = "rows" if dataset.kind == "table" else "images"
        raise DataError(
            f"{len(dataset)} {unit} is too few: this fit needs at least {needed} "
            f"({MIN_SAMPLES_PER_DETECTOR} per detector with K={config.ensemble})"
        )


def fit_plan(dataset: Dataset, config: FitConfig) -> list[tuple[str, float]]:
    """The stages of a fit job in order, with a rough relative cost each (in embedding passes over
    the data), so that the studio can show one ETA for the whole job (:meth:`JobContext.plan`), which never
    rises: a stage weighed too light holds it at 0. The localizer's weights are measured by
    ``bench/localizer_speed.py`` (docs/benchmarks.md, "Issue 18: localizer fit speed")."""
    images = dataset.kind == IMAGES
    trains = config.objective != "none"
    retrain = (2.0 * config.retrain_epochs + 1.0) if trains and config.refine else 0.0
    plan = [("train", 2.0 * config.epochs)] if trains else []
    plan += [("embed", 1.0 if images else 0.1), ("refine", config.rounds * (0.1 + retrain) if config.refine else 0.0),
             ("score", 0.1)]
    if images and config.localization != "none":
        if config.localization == "cutpaste":
            plan += [("patch_read", 0.2), ("patch_train", 3.0)]
        plan += [("patch_fit", 0.6)] + ([("coreset", 0.1)] if config.localization == "memory" else [])
        plan += [("display_scale", 0.1)]
        if config.image_score != "pooled":  # 'auto' may settle on pooled: then this stage is short
            plan += [("image_score", 2.0)]
    return plan + [("project", 1.0)]


def fit_work(
    dataset: Dataset, config: FitConfig, out_dir: Path, *, verdicts: Mapping[str, str] | None = None,
    registry: Registry | None = None, session: str | None = None,
) -> Callable[[JobContext], FitResult]:
    """A background-job body (:class:`core.jobs.JobRunner`) that fits ``dataset`` into ``out_dir``.

    ``session`` is passed on to :func:`fit`.

    It publishes ``dataset`` at the start, ``rounds`` (the finished :class:`RefinementRound` list)
    after every round and ``run_dir`` when the run is saved. It then lays out the run's map
    (:func:`core.layouts.run_layouts`, cached in the run), so the Embeddings page opens at once; a
    layout that fails or is cancelled is left to that page, the run stays saved.
    """

    def work(context: JobContext) -> FitResult:
        context.plan(fit_plan(dataset, config))
        context.publish("dataset", dataset)
        rounds: list[RefinementRound] = []

        def publish_round(record: RefinementRound) -> None:
            rounds.append(record)
            context.publish("rounds", tuple(rounds))

        result = fit(dataset, config, out_dir, verdicts=verdicts, registry=registry, on_round=publish_round,
                     monitor=context.monitor, session=session)
        context.publish("run_dir", result.run_dir)
        try:
            run_layouts(result.run_dir, monitor=context.monitor)
        except (Cancelled, RefineryError) as error:
            log.warning("the map of %s is left to the Embeddings page: %s", result.run_dir.name, error)
        return result

    return work
