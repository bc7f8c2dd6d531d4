"""The facade the app and the CLI call: load data, fit a run, open a run, score data.

A fit: encode the training data -> STOC refinement rounds -> final detector on the kept samples
-> anomaly scores, threshold and metrics -> run directory + registry entry. Labels, when present,
are used only for metrics; the fit itself never reads them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import pandas as pd

from core.compute import Compute, LocalCompute, check_finite, fit_rows, score_rows
from core.config import FitConfig
from core.data import IMAGES, Dataset, load_dataset
from core.data.columns import ColumnChoice, ColumnProfile, chosen_roles
from core.data.images import image_shape
from core.detectors import make_detector
from core.errors import Cancelled, ConfigError, DataError, RefineryError, RunError
from core.explain.attribution import RowExplanation, explain_table_rows
from core.explain.gradcam import ScoreExplainer
from core.explain.cutpaste_patch import CutPastePatchLocalizer
from core.explain.patch import PatchLocalizer
from core.jobs import JobContext
from core.metrics import DetectionMetrics, detection_metrics
from core.models.image_encoder import embedding_memmap
from core.models.encoder import Encoder, load_encoder, make_encoder, save_encoder
from core.progress import CancelToken, ProgressCallback, ProgressEvent, ignore_progress
from core.project import run_layouts
from core.refine import (
    MIN_SAMPLES_PER_DETECTOR,
    RefinementRound,
    check_pinned,
    contamination_from_data,
    cross_fitted_anomaly_scores,
    iter_refine,
)
from core.store import (
    CANCELS,
    RESUME_DIR,
    Registry,
    artifact_manifest,
    atomic_write_text,
    check_artifacts,
    check_destination,
    disk_errors,
    partial_dir,
    map_arrays,
    read_json,
    refinery_home,
    staged_directory,
    write_arrays,
    write_json,
    write_npy,
)

log = logging.getLogger(__name__)

RUN_FORMAT = 1
SCORE_TOLERANCE = 1e-4
ATTEMPT_FILE = "fit.json"
"""In a partial run folder's ``resume/``: what the fit was started with (data, config, verdicts) and its run id."""
EMBEDDINGS_CACHE = "embeddings.npy"
"""In ``resume/``: the frozen encoder's embeddings, written as soon as they are extracted."""
TRAINING_DIR = "training"
"""In ``resume/``: the self-supervised training loop's checkpoints, one folder per training stage."""


@dataclass(frozen=True)
class Scores:
    """Anomaly scores of a data set under a run (higher = more anomalous)."""

    ids: list[str]
    anomaly_score: np.ndarray
    is_anomaly: np.ndarray
    threshold: float
    labels: np.ndarray | None = None

    def to_frame(self) -> pd.DataFrame:
        """The SCORES.csv table: ``id, anomaly_score, is_anomaly[, label]``."""
        frame = pd.DataFrame(
            {"id": self.ids, "anomaly_score": self.anomaly_score, "is_anomaly": self.is_anomaly.astype(int)}
        )
        if self.labels is not None:
            frame["label"] = self.labels.astype(int)
        return frame

    def metrics(self) -> DetectionMetrics | None:
        return detection_metrics(self.labels, self.anomaly_score, self.is_anomaly)


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` produced; everything here is also saved in ``run_dir``."""

    run_dir: Path
    run_id: str
    config: FitConfig
    rounds: list[RefinementRound]
    kept: np.ndarray
    contamination: float
    contamination_interval: tuple[float, float] | None
    scores: Scores
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def metrics(self) -> DetectionMetrics | None:
        """Training-set metrics (labels used for evaluation only), or None without labels."""
        return self.scores.metrics()


def load_data(
    path: Path | str,
    *,
    label_column: str | None = None,
    id_column: str = "auto",
    ignore_columns: tuple[str, ...] = (),
    label_required: bool = True,
    workspace: Path | None = None,
    on_progress: ProgressCallback = ignore_progress,
    cancel: CancelToken | None = None,
) -> Dataset:
    """Load a folder, zip or table; archives are extracted under ``workspace`` (default: the Refinery home).

    ``label_column``, ``id_column`` and ``ignore_columns`` give a table's column roles (see
    :mod:`core.data.columns`; ``FittedRun.column_choice()`` holds a run's). ``label_required=False``
    lets a table lack those columns (scoring new data with the run's roles).
    """
    workspace = Path(workspace) if workspace else refinery_home() / "workspace"
    return load_dataset(
        Path(path), workspace=workspace, label_column=label_column, id_column=id_column,
        ignore_columns=ignore_columns, label_required=label_required, on_progress=on_progress, cancel=cancel,
    )


VERDICT_CODES = {"anomaly": 1, "normal": 0, "unsure": -1}


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


SMALL_IMAGE_SIDE = 64


def suggested_config(dataset: Dataset, base: FitConfig | None = None) -> FitConfig:
    """A config for ``dataset``: ``base`` (default: the defaults) with ``detector`` resolved and, for
    small images (longest side at most ``SMALL_IMAGE_SIDE`` px in a sample of 16), ``image_size``
    64: upsampling tiny images to 224 px costs 10x the compute and adds nothing they do not hold.
    """
    config = (base or FitConfig()).for_data(dataset.kind)
    if dataset.kind == IMAGES and dataset.paths:
        step = max(1, len(dataset.paths) // 16)
        if max(max(image_shape(path)) for path in dataset.paths[::step]) <= SMALL_IMAGE_SIDE:
            config = config.with_changes(image_size=SMALL_IMAGE_SIDE)
    return config


def new_run_dir(name: str, root: Path | None = None) -> Path:
    """A fresh run folder path under ``root`` (default: the Refinery home's ``runs``), named by time and ``name``.

    A random tag ends the name: two fits of the same data queued in the same second (two sessions)
    get different folders, although neither exists until its job runs.
    """
    root = Path(root) if root else refinery_home() / "runs"
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40].strip("-") or "run"
    while True:
        candidate = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}-{secrets.token_hex(3)}"
        if not candidate.exists() and not partial_dir(candidate).exists():
            return candidate


def _fit_plan(dataset: Dataset, config: FitConfig) -> list[tuple[str, float]]:
    """The stages of a fit job in order, with a rough relative cost each (in embedding passes over
    the data), so that the studio can show one ETA for the whole job (:meth:`JobContext.plan`)."""
    images = dataset.kind == IMAGES
    trains = config.objective != "none"
    retrain = (2.0 * config.retrain_epochs + 1.0) if trains and config.refine else 0.0
    plan = [("train", 2.0 * config.epochs)] if trains else []
    plan += [("embed", 1.0 if images else 0.1), ("refine", config.rounds * (0.1 + retrain) if config.refine else 0.0),
             ("score", 0.1)]
    if images and config.localization != "none":
        if config.localization == "cutpaste":
            plan += [("patch_read", 0.2), ("patch_train", 3.0)]
        plan += [("patch_fit", 0.5)] + ([("coreset", 0.1)] if config.localization == "memory" else [])
        plan += [("display_scale", 0.3)]
    return plan + [("project", 1.0)]


def fit_work(
    dataset: Dataset, config: FitConfig, out_dir: Path, *, verdicts: Mapping[str, str] | None = None,
    registry: Registry | None = None, session: str | None = None,
) -> Callable[[JobContext], FitResult]:
    """A background-job body (:class:`core.jobs.JobRunner`) that fits ``dataset`` into ``out_dir``.

    ``session`` is passed on to :func:`fit`.

    It publishes ``dataset`` at the start, ``rounds`` (the finished :class:`RefinementRound` list)
    after every round and ``run_dir`` when the run is saved. It then lays out the run's map
    (:func:`core.project.run_layouts`, cached in the run), so the Embeddings page opens at once; a
    layout that fails or is cancelled is left to that page, the run stays saved.
    """

    def work(context: JobContext) -> FitResult:
        context.plan(_fit_plan(dataset, config))
        context.publish("dataset", dataset)
        rounds: list[RefinementRound] = []

        def publish_round(record: RefinementRound) -> None:
            rounds.append(record)
            context.publish("rounds", tuple(rounds))

        result = fit(
            dataset, config, out_dir, verdicts=verdicts, registry=registry, on_round=publish_round,
            on_progress=context.on_progress, cancel=context.cancel, session=session,
        )
        context.publish("run_dir", result.run_dir)
        try:
            run_layouts(result.run_dir, on_progress=context.on_progress, cancel=context.cancel)
        except (Cancelled, RefineryError) as error:
            log.warning("the map of %s is left to the Embeddings page: %s", result.run_dir.name, error)
        return result

    return work


def run_dataset(run_dir: Path | str, *, workspace: Path | None = None) -> Dataset:
    """The training data of a saved run, in the run's sample order, with its labels and masks.

    Reloads the run's data source and keeps the run's samples (a run may have used a subset, e.g.
    a contamination protocol); fails clearly when the data moved or changed.
    """
    saved = read_json(Path(run_dir) / "run.json")
    frame = pd.read_csv(Path(run_dir) / "scores.csv", dtype={"id": str}, keep_default_na=False)
    dataset = load_data(saved["data_source"], label_required=False, workspace=workspace,
                        **saved_column_choice(saved, FitConfig.load(Path(run_dir) / "config.json")).load_kwargs())
    position = {sample_id: index for index, sample_id in enumerate(dataset.ids)}
    missing = [i for i in frame["id"] if i not in position]
    if missing:
        raise RunError(f"{len(missing)} of the run's samples (e.g. {missing[0]}) are no longer in "
                       f"{saved['data_source']}; the data was moved or changed")
    indices = np.array([position[i] for i in frame["id"]], dtype=np.int64)
    # A run on the whole data set keeps its fingerprint, so a re-run on it compares with this run.
    subset = dataset if np.array_equal(indices, np.arange(len(dataset))) else dataset.subset(indices)
    if "label" in frame:
        subset = replace(subset, labels=frame["label"].to_numpy().astype(np.int8))
    return subset


def fit(
    dataset: Dataset,
    config: FitConfig,
    out_dir: Path | str,
    *,
    verdicts: Mapping[str, str] | None = None,
    registry: Registry | None = None,
    resume: bool = False,
    on_round: Callable[[RefinementRound], None] | None = None,
    on_progress: ProgressCallback = ignore_progress,
    cancel: CancelToken | None = None,
    compute: Compute | None = None,
    session: str | None = None,
) -> FitResult:
    """Fit a run on ``dataset`` and save it to ``out_dir`` (which must not hold anything yet).

    ``verdicts`` maps sample ids to an expert's ``normal`` / ``anomaly`` / ``unsure``: confirmed
    normals are always kept, confirmed anomalies always removed (see :mod:`core.refine`).
    ``on_round`` receives each refinement round as soon as it is done. ``session`` is the id of
    the studio session that starts the fit (None from the command line): the registry keeps the
    run private to it until it is shared (see :class:`core.store.Registry`).

    The run is built in a partial folder beside ``out_dir`` (:func:`core.store.staged_directory`):
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
    config = config.validate().for_data(dataset.kind)
    _check_trainable(dataset, config)
    pinned = pinned_from_verdicts(dataset.ids, verdicts)
    registry = registry or Registry()
    out_dir = Path(out_dir)
    attempt = {"fingerprint": dataset.fingerprint, "config": asdict(config),
               "verdicts": hashlib.blake2b(pinned.tobytes(), digest_size=16).hexdigest()}
    check_destination(out_dir, resume=resume)
    run_id = registry.start_run(
        out_dir, kind=dataset.kind, data_source=str(dataset.source), fingerprint=dataset.fingerprint,
        n_samples=len(dataset), config=asdict(config), run_id=_interrupted_run(out_dir, attempt) if resume else None,
        session=session,
    )
    try:
        with staged_directory(out_dir, resume=resume) as staging:
            write_json(staging / RESUME_DIR / ATTEMPT_FILE, {**attempt, "run_id": run_id})
            result = _fit(dataset, config, pinned, out_dir, staging, run_id, registry, on_round, on_progress, cancel,
                          compute or LocalCompute())
    except BaseException as error:
        try:
            registry.fail_run(run_id, str(error) or type(error).__name__, cancelled=isinstance(error, CANCELS))
        except RefineryError as registry_error:  # e.g. the registry is on the disk that just filled up
            log.warning("could not mark run %s failed: %s", run_id, registry_error)
        raise
    registry.finish_run(run_id, result.metrics.as_dict() if result.metrics else {})
    return result


def _interrupted_run(out_dir: Path, attempt: dict) -> str | None:
    """The run id of the interrupted fit into ``out_dir``, after checking it was started like this one.

    None when there is none to continue (no partial folder, or it was killed before it said).
    """
    saved_path = partial_dir(out_dir) / RESUME_DIR / ATTEMPT_FILE
    if not saved_path.is_file():
        return None
    saved = read_json(saved_path)
    run_id = saved.pop("run_id")
    attempt = json.loads(json.dumps(attempt))  # tuples as lists, as saved
    if saved != attempt:
        changed = [name for name in ("fingerprint", "verdicts") if saved.get(name) != attempt[name]]
        changed += [key for key in attempt["config"] if saved.get("config", {}).get(key) != attempt["config"][key]]
        names = ", ".join("data" if name == "fingerprint" else name for name in changed)
        raise RunError(f"the unfinished fit in {partial_dir(out_dir)} was started with other {names}; "
                       "resume it with the same data and settings, or delete that folder to start over")
    log.info("resuming run %s from %s", run_id, partial_dir(out_dir))
    return run_id


def _fit(dataset, config, pinned, out_dir, staging, run_id, registry, on_round, on_progress, cancel, compute) -> FitResult:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    unlabeled = dataset.without_labels()
    encoder = make_encoder(config, dataset, checkpoint_dir=staging / RESUME_DIR / TRAINING_DIR)
    if config.objective == "none":
        encoder.fit(unlabeled)
        embeddings = _cached_embeddings(
            staging / RESUME_DIR / EMBEDDINGS_CACHE, encoder, unlabeled, compute, on_progress, cancel
        )
    else:
        encoder.fit(unlabeled, on_progress=on_progress, cancel=cancel)
        embeddings = check_finite(encoder.embed_training_data(on_progress, cancel))
    timings["embed_s"] = time.perf_counter() - started
    retrain = _self_training(encoder, config, staging, on_progress, cancel)

    started = time.perf_counter()

    def record_round(record: RefinementRound) -> None:
        registry.add_round(
            run_id, round=record.round, n_active=int(np.sum(record.votes >= 0)), n_removed=len(record.removed),
            gamma=record.gamma, precision=record.precision, recall=record.recall, seconds=record.seconds,
            note=record.note,
        )
        if on_round is not None:
            on_round(record)

    model = refine_and_fit(
        embeddings, config, labels=dataset.labels, pinned=pinned, retrain=retrain, on_round=record_round,
        on_progress=on_progress, cancel=cancel, compute=compute,
    )
    timings["refine_and_detector_s"] = time.perf_counter() - started
    scores = Scores(dataset.ids, model.train_score, model.train_score > model.threshold, model.threshold, dataset.labels)
    on_progress(ProgressEvent("score", len(dataset), len(dataset), f"threshold {model.threshold:.4g}"))
    if dataset.kind == IMAGES and config.localization != "none":
        started = time.perf_counter()
        _fit_localizer(dataset, config, model.kept, on_progress, cancel).save(staging)
        timings["localization_s"] = time.perf_counter() - started

    result = FitResult(
        run_dir=out_dir, run_id=run_id, config=config, rounds=model.rounds, kept=model.kept,
        contamination=model.contamination, contamination_interval=model.contamination_interval, scores=scores,
        timings=timings,
    )
    _save_run(staging, result, dataset, encoder, model.embeddings, pinned,
              model.round_embeddings if retrain is not None else [])
    return result


def _self_training(encoder, config, staging, on_progress, cancel) -> Callable[[np.ndarray], np.ndarray] | None:
    """STOC's retrain step for refinement: fine-tune on the kept samples, save the round's weights,
    re-embed everything. None when the representation is frozen or self-training is off."""
    if config.objective == "none" or not config.refine or config.retrain_epochs == 0:
        return None

    def retrain(kept: np.ndarray) -> np.ndarray:
        encoder.retrain(kept, on_progress=on_progress, cancel=cancel)
        encoder.save(staging, suffix=f"_round_{encoder.rounds_trained}")
        return check_finite(encoder.embed_training_data(on_progress, cancel))

    return retrain


def _fit_localizer(dataset, config, kept, on_progress, cancel):
    """The patch model for anomaly maps, fitted on the kept training images only."""
    kept_paths = [path for path, keep in zip(dataset.paths, kept) if keep]
    if config.localization == "cutpaste":
        localizer = CutPastePatchLocalizer(device=config.device, seed=config.seed)
    else:
        localizer = PatchLocalizer(
            config.localization, image_size=config.image_size, backbone=config.backbone, device=config.device,
            seed=config.seed,
        )
    return localizer.fit(kept_paths, on_progress=on_progress, cancel=cancel)


@dataclass(frozen=True)
class RefinedModel:
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
    on_progress: ProgressCallback = ignore_progress,
    cancel: CancelToken | None = None,
    compute: Compute | None = None,
) -> RefinedModel:
    """STOC refinement (when configured), the final detector on the kept samples, and the threshold.

    This is the whole fit after encoding; benchmarks call it directly so that they measure exactly
    what ``refinery fit`` does. ``labels`` only feed the rounds' precision/recall fields;
    ``pinned`` carries an expert's verdicts (:func:`pinned_from_verdicts`). ``retrain`` (STOC
    self-training) receives the kept mask after every round, returns new embeddings of all samples,
    and runs once more after the last round so that the final detector sees the last representation.
    ``compute`` fits and scores the detectors (default: this process, streaming chunks of rows, so
    ``embeddings`` may be a memory-mapped file). ``config.detector`` fits the final detector and sets the
    threshold; ``config.refine_detector`` makes up the refinement ensemble and estimates the contamination.
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
            on_progress=on_progress, cancel=cancel, compute=compute,
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
    return RefinedModel(rounds, kept, contamination, interval, detector, train_score, threshold, final, worked_on)


def _check_trainable(dataset: Dataset, config: FitConfig) -> None:
    needed = max(2 * MIN_SAMPLES_PER_DETECTOR, config.ensemble * MIN_SAMPLES_PER_DETECTOR if config.refine else 0)
    if len(dataset) < needed:
        unit = "rows" if dataset.kind == "table" else "images"
        raise DataError(
            f"{len(dataset)} {unit} is too few: this fit needs at least {needed} "
            f"({MIN_SAMPLES_PER_DETECTOR} per detector with K={config.ensemble})"
        )


def _cached_embeddings(path: Path, encoder: Encoder, dataset: Dataset, compute: Compute, on_progress, cancel) -> np.ndarray:
    """The embeddings saved at ``path`` (a ``.npy`` file) by an interrupted attempt of this fit, or new ones.

    Images are embedded straight into a memory-mapped file, so extraction holds one batch in memory
    whatever the number of images; the file only gets its final name once complete.
    """
    if path.is_file():
        log.info("reusing the embeddings extracted before the interruption (%s)", path)
        return check_finite(np.load(path, mmap_mode="r"))
    if dataset.kind != IMAGES:
        embeddings = check_finite(compute.embed(encoder, dataset, on_progress=on_progress, cancel=cancel))
        write_npy(path, embeddings)
        return embeddings
    partial = path.with_name(f".{path.name}.partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    rows = embedding_memmap(partial, len(dataset), encoder.embedding_dim)
    compute.embed(encoder, dataset, out=rows, on_progress=on_progress, cancel=cancel)
    rows.flush()
    with disk_errors(path):
        os.replace(partial, path)
    return check_finite(rows)




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
    flagged_share = contamination + config.false_alarm_rate * (1.0 - contamination)
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


def _save_run(
    directory: Path, result: FitResult, dataset: Dataset, encoder: Encoder, embeddings: np.ndarray, pinned: np.ndarray,
    round_embeddings: list[np.ndarray],
) -> None:
    """Write the run's artifacts; ``round_embeddings`` (self-training only) are the representation
    each round worked on, saved as ``round_<r>`` beside the final ``train`` embeddings."""
    result.config.save(directory / "config.json")
    save_encoder(encoder, directory)
    write_arrays(directory / "embeddings.safetensors", {
        "train": np.asarray(embeddings, dtype=np.float32),  # no copy: a memory-mapped file is streamed
        "kept": result.kept.astype(np.uint8),
        "train_anomaly_score": result.scores.anomaly_score,
        "pinned": pinned,
        **{f"round_{number}": np.asarray(rows, dtype=np.float32) for number, rows in enumerate(round_embeddings, start=1)},
    })
    write_json(directory / "refinement.json", [
        {
            "round": r.round, "n_removed": len(r.removed), "removed_ids": [dataset.ids[i] for i in r.removed],
            "n_returned": len(r.returned), "returned_ids": [dataset.ids[i] for i in r.returned],
            "thresholds": r.thresholds.tolist(), "gamma": r.gamma, "gamma_interval": r.gamma_interval,
            "seconds": r.seconds, "capped": r.capped,
            "precision": r.precision, "recall": r.recall, "note": r.note,
        }
        for r in result.rounds
    ])
    if result.rounds:
        write_arrays(directory / "refinement.safetensors", {
            **{f"kept_{r.round}": r.kept.astype(np.uint8) for r in result.rounds},
            **{f"votes_{r.round}": r.votes for r in result.rounds},
            **{f"anomaly_score_{r.round}": r.anomaly_score for r in result.rounds},
        })
    frame = result.scores.to_frame()
    frame["kept"] = result.kept.astype(int)
    frame["round_removed"] = _round_removed(result.rounds, len(dataset))
    atomic_write_text(directory / "scores.csv", frame.to_csv(index=False))
    write_json(directory / "run.json", {
        "format": RUN_FORMAT,
        "run_id": result.run_id,
        "kind": dataset.kind,
        "data_source": str(dataset.source),
        "fingerprint": dataset.fingerprint,
        "n_samples": len(dataset),
        "embedding_dim": int(embeddings.shape[1]),
        "contamination": result.contamination,
        "contamination_interval": result.contamination_interval,
        "contamination_source": "estimated" if result.config.gamma == "auto" else "given (gamma)",
        "threshold": result.scores.threshold,
        "false_alarm_rate": result.config.false_alarm_rate,
        "threshold_meaning": threshold_meaning(result.config.false_alarm_rate),
        "metrics": result.metrics.as_dict() if result.metrics else None,
        "timings": result.timings,
        "skipped": [asdict(item) for item in dataset.skipped],
        "columns": [asdict(profile) for profile in dataset.columns],
        # Written last: the SHA-256 of every other artifact, checked when the run is opened.
        "artifacts": artifact_manifest(directory, exclude=("run.json", RESUME_DIR)),
    })


def saved_column_choice(info: dict, config: FitConfig) -> ColumnChoice:
    """A run's table column roles: those its fit settled on (``run.json``), or the config's choices
    for a run saved before roles were recorded."""
    if info.get("columns"):
        return chosen_roles([ColumnProfile(**profile) for profile in info["columns"]])
    return config.column_choice()


def threshold_meaning(false_alarm_rate: float) -> str:
    """What a run's threshold means, in words (run.json, the CLI, the studio)."""
    return (f"flags about {false_alarm_rate:.0%} of normal data (its false-alarm rate): set on out-of-sample scores "
            f"of the training samples, of which the estimated contamination is taken to be anomalous")


def _round_removed(rounds: list[RefinementRound], n: int) -> np.ndarray:
    """Round in which each training sample was last removed (0 = kept at the end, or came back)."""
    removed_in = np.zeros(n, dtype=np.int64)
    for record in rounds:
        removed_in[record.removed] = record.round
        removed_in[record.returned] = 0
    return removed_in


class FittedRun:
    """A saved run, ready to score new data.

    The final detector is re-fitted on the run's saved kept embeddings (deterministic under the
    run's seed), then checked against the training scores saved at fit time: any difference
    means the artifacts were damaged or tampered with, and opening fails.
    """

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        if not (self.run_dir / "run.json").is_file():
            raise RunError(f"{self.run_dir} is not a Refinery run (no run.json); pass the --out folder of a fit")
        self.info = read_json(self.run_dir / "run.json")
        check_artifacts(self.run_dir, self.info.get("artifacts", {}))  # runs saved before manifests have none
        self.config = FitConfig.load(self.run_dir / "config.json")
        arrays = map_arrays(self.run_dir / "embeddings.safetensors")  # streamed from the file, not read into memory
        self._train, self._kept = arrays["train"], np.flatnonzero(arrays["kept"])
        self.detector = fit_rows(make_detector(self.config.detector, random_state=self.config.seed), self._train, self._kept)
        check = -score_rows([self.detector], self._train)[0]
        if not np.allclose(check, arrays["train_anomaly_score"], rtol=SCORE_TOLERANCE, atol=SCORE_TOLERANCE):
            raise RunError(f"{self.run_dir} does not reproduce its saved scores: the run is damaged or was tampered with")
        self.encoder = load_encoder(self.config, self.info["kind"], self.run_dir)
        self.threshold = float(self.info["threshold"])
        self.localizer = None
        if self.info["kind"] == IMAGES and self.config.localization != "none":
            localizer_class = CutPastePatchLocalizer if self.config.localization == "cutpaste" else PatchLocalizer
            self.localizer = localizer_class.load(self.run_dir, device=self.config.device)

    def column_choice(self) -> ColumnChoice:
        """The table column roles to load new data with (see :func:`saved_column_choice`)."""
        return saved_column_choice(self.info, self.config)

    @cached_property
    def kept_embeddings(self) -> np.ndarray:
        """``(K, D) float32``: the embeddings of the kept training samples, read when first needed."""
        return np.asarray(self._train[self._kept])

    def score(
        self, dataset: Dataset, on_progress: ProgressCallback = ignore_progress, cancel: CancelToken | None = None,
        compute: Compute | None = None,
    ) -> Scores:
        """Score every sample of ``dataset`` with this run's encoder, detector and threshold.

        ``compute`` runs the embedding and scoring (default: this process, chunk by chunk)."""
        if dataset.kind != self.info["kind"]:
            raise DataError(f"this run was fitted on {self.info['kind']} but the data is {dataset.kind}")
        compute = compute or LocalCompute()
        normality = compute.score_dataset(self.encoder, self.detector, dataset, on_progress=on_progress, cancel=cancel)
        anomaly_score = -np.asarray(normality, dtype=np.float64)
        on_progress(ProgressEvent("score", len(dataset), len(dataset), "scored"))
        return Scores(dataset.ids, anomaly_score, anomaly_score > self.threshold, self.threshold, dataset.labels)


    def iter_anomaly_maps(
        self, dataset: Dataset, on_progress: ProgressCallback = ignore_progress, cancel: CancelToken | None = None
    ) -> Iterator[tuple[str, np.ndarray]]:
        """``(id, (H, W) float32 map)`` per image, lazily, at the image's own size; higher = more anomalous.

        Checks that maps are possible before returning, so a caller can fail before writing anything.
        """
        if self.localizer is None:
            raise RunError("this run has no localization model (tables, or fitted with localization 'none')")
        if dataset.kind != IMAGES:
            raise DataError("anomaly maps are for images; this data is a table")
        return zip(dataset.ids, self.localizer.iter_anomaly_maps(dataset.paths, on_progress=on_progress, cancel=cancel))

    def iter_gradcam_maps(
        self,
        dataset: Dataset,
        method: str = "gradcam",
        on_progress: ProgressCallback = ignore_progress,
        cancel: CancelToken | None = None,
    ) -> Iterator[tuple[str, np.ndarray]]:
        """``(id, (H, W) float32 map)``: Grad-CAM of each image's anomaly score, at the image's own size.

        The target is the squared Mahalanobis distance of the pooled embedding under the run's GDE
        (for runs with another detector, a GDE fitted on the same kept embeddings stands in), so the
        map shows which regions raised the score. ``method`` is ``gradcam`` or ``gradcam++``.
        """
        if dataset.kind != IMAGES:
            raise DataError("Grad-CAM explanations are for images; for tables use explain_rows")
        return self._gradcam_batches(self._explainer(method), dataset, on_progress, cancel)

    def anomaly_map(self, image_path: Path) -> np.ndarray:
        """``(H, W) float32`` localization map of one image file, at its own size."""
        if self.localizer is None:
            raise RunError("this run has no localization model (tables, or fitted with localization 'none')")
        return next(iter(self.localizer.iter_anomaly_maps([Path(image_path)])))

    def gradcam_map(self, image_path: Path, method: str = "gradcam") -> np.ndarray:
        """``(H, W) float32`` Grad-CAM of one image file's anomaly score (see :meth:`iter_gradcam_maps`)."""
        with self._explainer(method) as explainer:
            return explainer.explain([Path(image_path)], self.config.image_size)[0]

    def _explainer(self, method: str) -> ScoreExplainer:
        if self.info["kind"] != IMAGES:
            raise DataError("Grad-CAM explanations are for image runs; for tables use explain_rows")
        gde = self.detector if hasattr(self.detector, "precision_") else make_detector("gde").fit(self.kept_embeddings)
        return ScoreExplainer(self._gradcam_model, self.config.feature_layers, gde.location_, gde.precision_, method=method)

    @cached_property
    def _gradcam_model(self):
        """A private copy of the backbone: Grad-CAM hooks must not touch the process-wide shared one,
        which a background job may be running at the same moment."""
        return copy.deepcopy(self.encoder.model)

    def _gradcam_batches(self, explainer, dataset, on_progress, cancel) -> Iterator[tuple[str, np.ndarray]]:
        batch = self.config.batch_size
        with explainer:
            for start in range(0, len(dataset), batch):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                paths = dataset.paths[start : start + batch]
                yield from zip(dataset.ids[start : start + batch], explainer.explain(paths, self.config.image_size))
                on_progress(ProgressEvent("gradcam", min(start + batch, len(dataset)), len(dataset)))

    def explain_rows(self, dataset: Dataset, ids: list[str] | None = None, k: int = 5) -> list[RowExplanation]:
        """Top deviating features of table rows (all rows, or those with ``ids``), most anomalous first."""
        if self.info["kind"] != "table" or dataset.kind != "table":
            raise DataError("feature explanations are for tables; for images use localization maps")
        if self.config.objective != "none":
            raise RunError("feature explanations need a run on the columns themselves (objective 'none'); "
                           "this run scores a learned representation")
        if ids is not None:
            position = {sample_id: index for index, sample_id in enumerate(dataset.ids)}
            unknown = [i for i in ids if i not in position]
            if unknown:
                raise DataError(f"no row with id {', '.join(unknown[:5])} (ids are the table's id column, or 0-based row numbers without one)")
            dataset = dataset.subset(np.array([position[i] for i in ids]))
        encoded = check_finite(self.encoder.embed(dataset))
        state = self.encoder.state_
        explanations = explain_table_rows(
            encoded, self.kept_embeddings, self.encoder.feature_names, self.detector,
            medians=state.medians, scales=state.scales, ids=dataset.ids, k=k,
        )
        return sorted(explanations, key=lambda row: -row.anomaly_score)


def open_run(run_dir: Path | str) -> FittedRun:
    """Open a saved run for scoring (see :class:`FittedRun`)."""
    return FittedRun(run_dir)
