"""Batches of new data scored with a saved run: ``refinery score`` for the studio, kept in the run folder.

A batch is new data (a folder, zip or table, or the ``test/`` part of an MVTec folder whose ``train/``
part the run was fitted on) loaded with the run's column roles and scored by
:class:`core.run_model.RunModel` exactly as ``refinery score`` does: the same ``score`` call, maps
included, the same CSV and map files. It is saved whole (built in a partial folder, then renamed,
:func:`core.staging.staged_directory`) under ``<run>/batches/<name>/`` (:data:`core.run_dir.BATCHES`),
so it outlives the studio's process:

========================= ===================================================================
``batch.json``            what it is: name, data source (and MVTec part), fingerprint, kind,
                          counts, the threshold it was scored at, masks, skipped files
``scores.csv``            ``id, anomaly_score, is_anomaly[, label]``: ``refinery score --out``
``placement.safetensors`` ``embeddings`` (M, D) float32 and ``xy`` (M, 2) float32, the samples'
                          places on the run's map (:func:`core.layouts.place_on_layout`)
``maps/``                 one ``.npy`` per image: ``refinery score --maps`` (runs with a localizer)
========================= ===================================================================

The expert's verdicts on a batch are kept under the batch's fingerprint
(:meth:`core.registry.Registry.verdicts`), so they are the batch's own. :func:`drift_check` says in
plain words whether a batch looks like the training data.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from core.compute import LocalCompute
from core.data import IMAGES, Dataset
from core.data.columns import ColumnChoice
from core.data.parts import TRAIN_PART, mvtec_part, mvtec_parts
from core.detectors import make_detector
from core.engine import load_data
from core.errors import DataError
from core.jobs import JobContext, Work
from core.layouts import place_on_layout
from core.metrics import DetectionMetrics, detection_metrics
from core.progress import QUIET, Monitor
from core.refine import cross_fitted_anomaly_scores
from core.run_dir import (
    BATCH_INFO, BATCH_MAPS, BATCHES, check_run_dir, new_run_dir, read_batch, read_batch_map, read_config,
    read_embeddings, read_image_score, read_info, read_samples, write_batch,
)
from core.staging import staged_directory
from core.run_model import RunModel

log = logging.getLogger(__name__)

SCORE_PLAN = (("load", 0.2), ("embed", 1.0), ("maps", 1.0), ("project", 0.05))
"""A scoring job's stages and their rough relative cost, for the studio's ETA."""
SIGNIFICANCE = 0.01
"""The drift check's false-alarm rate: each of its two tests runs at half of it (Bonferroni)."""
SMALL_BATCH = 30
"""Below this many samples the drift check says that only a large change would show."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,100}")


# ----------------------------------------------------------------------------- the data of a batch


def load_batch_data(path: Path | str, roles: ColumnChoice, *, part: str | None = None, workspace: Path | None = None,
                    monitor: Monitor = QUIET) -> Dataset:
    """New data as ``refinery score`` loads it (the run's column ``roles``; a table may lack the label),
    or only its MVTec ``part``."""
    dataset = load_data(path, **roles.load_kwargs(), label_required=False, workspace=workspace, monitor=monitor)
    return dataset if part is None else mvtec_part(dataset, part)


def test_part_of(run_dir: Path | str) -> Path | None:
    """The folder of a run fitted on the ``train/`` part of an MVTec folder, whose ``test/`` part is then
    new data for it; None for any other run."""
    info = read_info(Path(run_dir))
    ids = list(read_samples(Path(run_dir))["id"])
    split = mvtec_parts(ids) if info["kind"] == IMAGES else None
    return Path(info["data_source"]) if split is not None and bool(np.all(split == TRAIN_PART)) else None


# ----------------------------------------------------------------------------- scoring


class _KeptEmbeddings(LocalCompute):
    """:class:`LocalCompute` that also keeps the embeddings it scores, for the samples' places on the map.

    The scoring itself is :class:`LocalCompute`'s, unchanged: the encoder it is handed is wrapped only
    to copy what its ``embed`` returns, so no sample is embedded twice.
    """

    def score_dataset(self, encoder, detector, dataset, *, monitor=QUIET) -> np.ndarray:
        parts: list[np.ndarray] = []
        scores = super().score_dataset(_Recording(encoder, parts), detector, dataset, monitor=monitor)
        self.embeddings = np.concatenate(parts).astype(np.float32, copy=False)
        return scores


class _Recording:
    def __init__(self, encoder, parts: list[np.ndarray]) -> None:
        self._encoder, self._parts = encoder, parts

    def embed(self, dataset, **options) -> np.ndarray:
        embeddings = self._encoder.embed(dataset, **options)
        self._parts.append(np.array(embeddings, dtype=np.float32))
        return embeddings


def score_batch(run: RunModel, dataset: Dataset, *, name: str = "", part: str | None = None,
                maps: bool = True, monitor: Monitor = QUIET) -> "BatchResults":
    """Score ``dataset`` with ``run`` as ``refinery score [--maps]`` does and save it as a batch of the run.

    ``name`` (default: the data's folder or file name) is made unique with the time and a random tag;
    ``part`` records the MVTec part ``dataset`` was taken from. ``maps`` writes the localization maps
    (image runs with a localizer). A sample the map cannot place (the run's layout fails) gets NaN.
    """
    directory = new_run_dir(name or Path(dataset.source).stem or "batch", root=run.run_dir / BATCHES)
    compute = _KeptEmbeddings()
    with staged_directory(directory) as staging:
        with_maps = maps and run.localizer is not None and dataset.kind == IMAGES
        scores = run.score(dataset, monitor=monitor, compute=compute, maps=staging / BATCH_MAPS if with_maps else None)
        try:
            xy = place_on_layout(run.run_dir, compute.embeddings, monitor=monitor)
        except DataError as error:
            log.warning("batch %s is not placed on the run's map: %s", directory.name, error)
            xy = np.full((len(dataset), 2), np.nan, dtype=np.float32)
        monitor.report("project", len(dataset), len(dataset), "placed on the run's map")
        write_batch(staging, {
            "name": directory.name, "created": time.time(), "kind": dataset.kind, "run_id": run.info["run_id"],
            "data_source": str(dataset.source), "part": part, "fingerprint": dataset.fingerprint,
            "n_samples": len(dataset), "n_flagged": int(scores.is_anomaly.sum()), "threshold": scores.threshold,
            "image_score": run.image_score.used,
            "maps": with_maps,
            "masks": {i: Path(path).relative_to(dataset.source).as_posix() for i, path in dataset.masks.items()},
            "skipped": [{"name": item.name, "reason": item.reason} for item in dataset.skipped],
        }, scores, {"embeddings": compute.embeddings, "xy": xy})
    return BatchResults(run.run_dir, directory.name)


def score_work(run_dir: Path | str, data: Path | str, *, part: str | None = None, name: str = "",
               workspace: Path | None = None) -> Work:
    """The studio's scoring job: open the run, load ``data`` (its MVTec ``part``) with the run's column roles,
    score it and save the batch (:func:`score_batch`); the job's result is the :class:`BatchResults`."""

    def work(context: JobContext) -> BatchResults:
        context.plan(SCORE_PLAN)
        run = RunModel(run_dir)
        dataset = load_batch_data(data, run.column_choice(), part=part, workspace=workspace, monitor=context.monitor)
        return score_batch(run, dataset, name=name, part=part, monitor=context.monitor)

    return work


# ----------------------------------------------------------------------------- reading a batch


def batch_names(run_dir: Path | str) -> list[str]:
    """The finished batches of a run, newest first (a partial folder of a running or failed job is left out)."""
    folder = Path(run_dir) / BATCHES
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if _NAME.fullmatch(path.name) and (path / BATCH_INFO).is_file()]
    return [path.name for path in sorted(found, key=lambda path: path.name, reverse=True)]


def batches_table(run_dir: Path | str) -> pd.DataFrame:
    """One row per finished batch of the run, newest first: name, samples, flagged, data, scored."""
    rows = []
    for name in batch_names(run_dir):
        batch = BatchResults(run_dir, name)
        rows.append({"batch": name, "samples": len(batch.samples), "flagged": int(batch.samples["is_anomaly"].sum()),
                     "data": batch.source_text,
                     "scored": pd.Timestamp(batch.info["created"], unit="s").strftime("%Y-%m-%d %H:%M")})
    return pd.DataFrame(rows, columns=["batch", "samples", "flagged", "data", "scored"])


class BatchResults:
    """A scored batch of a run, read for display; it answers what :class:`core.results.RunResults` answers
    for the training data where that applies (samples with ``rank``, ids, images, neighbours, metrics).

    Attributes
    ----------
    samples : DataFrame
        ``scores.csv``: ``id, anomaly_score, is_anomaly[, label]`` plus ``rank`` (1 = most anomalous).
    placement : (M, 2) float32 array
        Each sample's place on the run's map (NaN when it could not be placed).
    """

    def __init__(self, run_dir: Path | str, name: str) -> None:
        self.run_dir = check_run_dir(run_dir)
        if name not in batch_names(self.run_dir):
            raise DataError(f"run {self.run_dir.name} has no batch {name!r}; score one on the Score page")
        self.directory = self.run_dir / BATCHES / name
        self.info, samples, arrays = read_batch(self.directory)
        samples["rank"] = samples["anomaly_score"].rank(ascending=False, method="first").astype(int)
        self.samples = samples
        self.placement, self.embeddings = arrays["xy"], arrays["embeddings"]
        self.config = read_config(self.run_dir)

    name = property(lambda self: self.directory.name)
    fingerprint = property(lambda self: self.info["fingerprint"], doc="Verdicts on the batch are kept under it.")
    kind = property(lambda self: self.info["kind"])
    run_id = property(lambda self: self.info["run_id"])
    threshold = property(lambda self: float(self.info["threshold"]))
    source = property(lambda self: Path(self.info["data_source"]))

    @property
    def source_text(self) -> str:
        """Where the batch came from, in words: ``bottle (test/ part)`` or ``new-images``."""
        return self.source.name + (f" ({self.info['part']}/ part)" if self.info.get("part") else "")

    @property
    def labels(self) -> np.ndarray | None:
        """(M,) 1 anomaly / 0 normal / -1 unknown, or None; for display and metrics only."""
        return self.samples["label"].to_numpy() if "label" in self.samples else None

    @property
    def metrics(self) -> DetectionMetrics | None:
        return detection_metrics(self.labels, self.samples["anomaly_score"].to_numpy(),
                                 self.samples["is_anomaly"].to_numpy())

    def index_of(self, sample_id: str) -> int:
        matches = np.flatnonzero(self.samples["id"].to_numpy() == sample_id)
        if len(matches) == 0:
            raise DataError(f"no sample with id {sample_id!r} in batch {self.name}")
        return int(matches[0])

    def image_path(self, sample_id: str) -> Path:
        """The image file of a sample of the batch; refuses ids that would leave the batch's folder."""
        if self.kind != IMAGES:
            raise DataError("this batch is a table; its samples are rows, not image files")
        return _file_in(self.source, sample_id)

    def mask_path(self, sample_id: str) -> Path | None:
        """The ground-truth mask of a sample (MVTec ``ground_truth/``), or None."""
        mask = self.info.get("masks", {}).get(sample_id)
        return None if mask is None else _file_in(self.source, mask)

    def saved_map(self, sample_id: str) -> np.ndarray | None:
        """The ``(H, W) float32`` localization map saved when the batch was scored, or None."""
        return read_batch_map(self.directory, sample_id) if self.info.get("maps") else None

    @cached_property
    def _training(self) -> tuple[pd.DataFrame, np.ndarray]:
        return read_samples(self.run_dir), read_embeddings(self.run_dir)["train"]

    def nearest_kept(self, index: int, k: int = 6) -> pd.DataFrame:
        """The ``k`` kept *training* samples closest to batch sample ``index`` in embedding space.

        Columns: ``index, id, distance, anomaly_score`` (of the training samples); nearest first.
        """
        samples, train = self._training
        kept = np.flatnonzero(samples["kept"].to_numpy().astype(bool))
        distance = np.linalg.norm(np.asarray(train[kept]) - self.embeddings[index], axis=1)
        order = np.argsort(distance, kind="stable")[:k]
        chosen = kept[order]
        return pd.DataFrame({"index": chosen, "id": samples["id"].to_numpy()[chosen], "distance": distance[order],
                             "anomaly_score": samples["anomaly_score"].to_numpy()[chosen]})


def _file_in(root: Path, relative: str) -> Path:
    root = root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise DataError(f"{relative!r} points outside the batch's data folder")
    if not path.is_file():
        raise DataError(f"{path} is gone: the batch's data folder was moved or deleted")
    return path


# ----------------------------------------------------------------------------- drift


@dataclass(frozen=True)
class DriftCheck:
    """How a batch's scores compare with the training data's (:func:`drift_check`).

    Attributes
    ----------
    n, flagged : int
        Samples in the batch and those above the run's threshold.
    interval : (float, float)
        95% Wilson interval of the flagged share.
    false_alarm_rate : float
        The share of normal data the threshold is stated to flag.
    p_flagged : float
        One-sided binomial test: the chance of ``flagged`` or more if the batch were normal data.
    ks_statistic, p_scores : float
        One-sided two-sample Kolmogorov-Smirnov test: are the batch's scores higher than the
        out-of-sample scores of the kept training samples?
    scores_higher : bool
        That test's answer at half of :data:`SIGNIFICANCE`.
    drifted : bool
        More flagged than the false-alarm rate explains, or scores higher.
    verdict : str
        The outcome in plain words.
    """

    n: int
    flagged: int
    interval: tuple[float, float]
    false_alarm_rate: float
    p_flagged: float
    ks_statistic: float
    p_scores: float
    n_reference: int
    scores_higher: bool
    drifted: bool
    verdict: str

    @property
    def share(self) -> float:
        return self.flagged / self.n


def reference_scores(run_dir: Path | str) -> np.ndarray:
    """``(K,) float64`` out-of-sample anomaly scores of the run's kept training samples, on the run's image score.

    Pooled: each kept sample is scored by the run's detector kind fitted on the kept samples of the
    other folds (as the threshold was set, :func:`core.refine.cross_fitted_anomaly_scores`): the saved
    training scores are in-sample, too normal to compare new data with. Map and both: the saved training
    scores, which are out-of-sample already (:func:`core.image_score.score_training_images`).
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    samples = read_samples(run_dir)
    kept = np.flatnonzero(samples["kept"].to_numpy().astype(bool))
    if read_image_score(read_info(run_dir)).used != "pooled":
        return samples["anomaly_score"].to_numpy(dtype=np.float64)[kept]
    train = read_embeddings(run_dir)["train"]
    factory = lambda: make_detector(config.detector, random_state=config.seed)  # noqa: E731
    return cross_fitted_anomaly_scores(train, kept, np.ones(len(kept), dtype=bool), factory,
                                       folds=max(config.ensemble, 2), seed=config.seed)


def drift_check(anomaly_score: np.ndarray, reference: np.ndarray, threshold: float,
                false_alarm_rate: float) -> DriftCheck:
    """Whether a batch's ``anomaly_score`` looks like the training data's, with a plain-words verdict.

    Two one-sided tests, each at half of :data:`SIGNIFICANCE`: is more of the batch above ``threshold``
    than its ``false_alarm_rate`` explains (binomial), and are its scores higher overall than the
    ``reference`` (:func:`reference_scores`; two-sample Kolmogorov-Smirnov)? Lower scores than the
    training data's are no drift worth a warning, so neither test looks for them.
    """
    anomaly_score = np.asarray(anomaly_score, dtype=np.float64)
    n, flagged = len(anomaly_score), int(np.sum(anomaly_score > threshold))
    if n == 0:
        raise DataError("the batch is empty; there is nothing to compare")
    binomial = stats.binomtest(flagged, n, false_alarm_rate, alternative="greater")
    low, high = stats.binomtest(flagged, n).proportion_ci(0.95, method="wilson")  # two-sided, unlike the test
    # 'less': the batch's score distribution lies below the reference's somewhere = its scores are higher
    ks = stats.ks_2samp(anomaly_score, np.asarray(reference, dtype=np.float64), alternative="less")
    more_flagged = binomial.pvalue < SIGNIFICANCE / 2
    higher = ks.pvalue < SIGNIFICANCE / 2
    counts = (f"{flagged} of {n} flagged ({flagged / n:.1%}, 95% interval {low:.1%} to {high:.1%}) where the "
              f"threshold flags about {false_alarm_rate:.1%} of normal data")
    if more_flagged:
        verdict = (f"More of this batch is flagged than the threshold's false-alarm rate explains: new defects or "
                   f"a changed process. {counts}.")
    elif higher:
        verdict = (f"This batch scores higher overall than the kept training samples (one-sided Kolmogorov-Smirnov "
                   f"test, p = {ks.pvalue:.2g}), though its flagged share is within the false-alarm rate: the "
                   f"process may be drifting. {counts}.")
    else:
        verdict = (f"This batch looks like the training data: {counts}, and its scores are not higher than the "
                   f"kept training samples'.")
    if n < SMALL_BATCH:
        verdict += f" With only {n} samples, only a large change would show."
    return DriftCheck(n, flagged, (float(low), float(high)), float(false_alarm_rate), float(binomial.pvalue),
                      float(ks.statistic), float(ks.pvalue), len(reference), bool(higher), bool(more_flagged or higher),
                      verdict)


def batch_drift(batch: BatchResults, reference: np.ndarray) -> DriftCheck:
    """:func:`drift_check` of a saved batch against its run's ``reference`` scores (:func:`reference_scores`)."""
    false_alarm_rate = read_info(batch.run_dir).get("false_alarm_rate", batch.config.false_alarm_rate)
    return drift_check(batch.samples["anomaly_score"].to_numpy(), reference, batch.threshold, false_alarm_rate)
