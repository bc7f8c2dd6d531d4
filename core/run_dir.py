"""The run directory: its file names, and the one place that writes, reads and checks them.

A run directory (the ``--out`` folder of a fit) holds:

========================== ================================================================
``run.json``               what the run is: data source, kind, threshold, contamination,
                           metrics, timings, column roles, and the SHA-256 of every other file
``config.json``            the :class:`~core.config.FitConfig` it was fitted with
``scores.csv``             the training samples' scores (:meth:`Scores.to_frame`; the run's image
                           score, ``run.json``'s ``image_score``) with ``kept`` and ``round_removed``
``embeddings.safetensors`` ``train`` embeddings, ``kept``, ``train_anomaly_score`` (the final
                           detector's scores of them, which reopening the run checks), ``pinned``
                           and, with self-training, each round's ``round_<r>`` embeddings
``refinement.json``        one record per refinement round (:func:`round_record`)
``refinement.safetensors`` each round's ``kept_<r>``, ``votes_<r>``, ``anomaly_score_<r>``
``layouts.safetensors``    the UMAP layouts, written on first use (:mod:`core.layouts`)
encoder and localizer      written by their owners (:func:`core.models.encoder.save_encoder`,
files                      the localizers' ``save``)
========================== ================================================================

A run directory is built whole or not at all: in a partial folder beside its destination
(``.<name>.partial``, :func:`core.staging.staged_directory`), renamed into place only when complete, so a crash or
an error never leaves a half-written run behind. An error removes the partial folder; a killed
process leaves it, and a resumed fit continues from its ``resume/`` folder: ``fit.json`` (how it was
started), ``embeddings.npy`` and ``training/`` checkpoints. ``run.json`` lists the SHA-256 of every
other file, checked when the run is opened (:func:`check_artifacts`).
"""
from __future__ import annotations

import io
import logging
import secrets
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from core.arrays import map_arrays, read_arrays, write_arrays
from core.config import FitConfig
from core.data.columns import ColumnChoice, ColumnProfile, chosen_roles
from core.errors import RunError
from core.files import atomic_write_text, file_sha256, read_json, write_json, write_npy
from core.image_score import ImageScoreChoice
from core.metrics import DetectionMetrics, detection_metrics
from core.refine import RefinementRound
from core.registry import refinery_home
from core.staging import RESUME_DIR, partial_dir

if TYPE_CHECKING:
    from core.data import Dataset
    from core.models.encoder import Encoder

log = logging.getLogger(__name__)

RUN_FORMAT = 1
RUN_INFO = "run.json"
CONFIG = "config.json"
SCORES = "scores.csv"
EMBEDDINGS = "embeddings.safetensors"
ROUNDS = "refinement.json"
ROUND_ARRAYS = "refinement.safetensors"
LAYOUTS = "layouts.safetensors"
BATCHES = "batches"
"""Batches of new data scored with the run, one folder each (their files: :mod:`core.batches`)."""
BATCH_INFO, BATCH_ARRAYS, BATCH_MAPS = "batch.json", "placement.safetensors", "maps"
BUNDLE_SUFFIXES = (".json", ".safetensors", ".csv", ".pt")
"""The files of a run that its download bundle holds (config, weights, scores, refinement record)."""


@dataclass(frozen=True)
class Scores:
    """Anomaly scores of a data set under a run (higher = more anomalous)."""

    ids: list[str]
    anomaly_score: np.ndarray
    is_anomaly: np.ndarray
    threshold: float
    labels: np.ndarray | None = None

    def to_frame(self) -> pd.DataFrame:
        """The scores table (``scores.csv``, ``refinery score``): ``id, anomaly_score, is_anomaly[, label]``."""
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
    """What a fit produced (:func:`core.pipeline.fit`); :func:`write_run` saves all of it in ``run_dir``."""

    run_dir: Path
    run_id: str
    config: FitConfig
    rounds: list[RefinementRound]
    kept: np.ndarray
    contamination: float
    contamination_interval: tuple[float, float] | None
    scores: Scores
    image_score: ImageScoreChoice = ImageScoreChoice("pooled", "pooled", "asked for")
    """Which score ``scores`` holds (pooled embedding or localization map) and why."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def metrics(self) -> DetectionMetrics | None:
        """Training-set metrics (labels used for evaluation only), or None without labels."""
        return self.scores.metrics()


# ----------------------------------------------------------------------------- naming a new run


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


# ----------------------------------------------------------------------------- checking a run's files

def artifact_manifest(directory: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every visible file under ``directory`` (relative POSIX path -> hex), minus ``exclude`` names."""
    directory = Path(directory)
    return {
        path.relative_to(directory).as_posix(): file_sha256(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not any(part.startswith(".") or part in exclude for part in path.relative_to(directory).parts)
    }


def check_artifacts(directory: Path, manifest: dict[str, str]) -> None:
    """Raise RunError when a file listed in ``manifest`` is missing or its content changed."""
    for name, expected in manifest.items():
        path = Path(directory) / name
        if not path.is_file():
            raise RunError(f"{path} is missing: the run is incomplete; fit the run again")
        if file_sha256(path) != expected:
            raise RunError(f"{path} changed after the fit: the run is damaged or was tampered with; fit the run again")



# ----------------------------------------------------------------------------- writing


def write_run(
    directory: Path, result: FitResult, dataset: Dataset, encoder: Encoder, embeddings: np.ndarray,
    pinned: np.ndarray, round_embeddings: list[np.ndarray], *, detector_score: np.ndarray,
) -> None:
    """Write a finished fit's files into ``directory`` (``run.json`` last, with the manifest of the others).

    ``round_embeddings`` (self-training only) are the representation each round worked on, saved as
    ``round_<r>`` beside the final ``train`` embeddings. ``detector_score`` are the final detector's
    anomaly scores of the training samples (``result.scores`` may hold map scores instead).
    """
    from core.models.encoder import save_encoder  # the encoders import torch: only a fit needs them here
    from core.models.pretrained import weights_digest

    result.config.save(directory / CONFIG)
    save_encoder(encoder, directory)
    write_arrays(directory / EMBEDDINGS, {
        "train": np.asarray(embeddings, dtype=np.float32),  # no copy: a memory-mapped file is streamed
        "kept": result.kept.astype(np.uint8),
        "train_anomaly_score": np.asarray(detector_score, dtype=np.float64),
        "pinned": pinned,
        **{f"round_{number}": np.asarray(rows, dtype=np.float32) for number, rows in enumerate(round_embeddings, start=1)},
    })
    write_json(directory / ROUNDS, [round_record(r, dataset.ids) for r in result.rounds])
    if result.rounds:
        write_arrays(directory / ROUND_ARRAYS, {
            **{f"kept_{r.round}": r.kept.astype(np.uint8) for r in result.rounds},
            **{f"votes_{r.round}": r.votes for r in result.rounds},
            **{f"anomaly_score_{r.round}": r.anomaly_score for r in result.rounds},
        })
    frame = result.scores.to_frame()
    frame["kept"] = result.kept.astype(int)
    frame["round_removed"] = _round_removed(result.rounds, len(dataset))
    atomic_write_text(directory / SCORES, frame.to_csv(index=False))
    write_json(directory / RUN_INFO, {
        "format": RUN_FORMAT,
        "run_id": result.run_id,
        "kind": dataset.kind,
        "weights_sha256": weights_digest(result.config.backbone, result.config.weights) if dataset.kind == "images" else None,
        "data_source": str(dataset.source),
        "fingerprint": dataset.fingerprint,
        "n_samples": len(dataset),
        "embedding_dim": int(embeddings.shape[1]),
        "contamination": result.contamination,
        "contamination_interval": result.contamination_interval,
        "contamination_source": "estimated" if result.config.gamma == "auto" else "given (gamma)",
        "threshold": result.scores.threshold,
        "image_score": result.image_score.as_dict(),
        "false_alarm_rate": result.config.false_alarm_rate,
        "threshold_meaning": threshold_meaning(result.config.false_alarm_rate),
        "metrics": result.metrics.as_dict() if result.metrics else None,
        "timings": result.timings,
        "skipped": [asdict(item) for item in dataset.skipped],
        "columns": [asdict(profile) for profile in dataset.columns],
        # Written last: the SHA-256 of every other artifact, checked when the run is opened.
        "artifacts": artifact_manifest(directory, exclude=(RUN_INFO, RESUME_DIR)),
    })


def round_record(record: RefinementRound, ids: list[str]) -> dict:
    """A round as its ``refinement.json`` entry (sample positions as ids; arrays go to ``refinement.safetensors``)."""
    return {
        "round": record.round, "n_removed": len(record.removed), "removed_ids": [ids[i] for i in record.removed],
        "n_returned": len(record.returned), "returned_ids": [ids[i] for i in record.returned],
        "thresholds": record.thresholds.tolist(), "gamma": record.gamma, "gamma_interval": record.gamma_interval,
        "seconds": record.seconds, "capped": record.capped,
        "precision": record.precision, "recall": record.recall, "note": record.note,
    }


def round_from_record(record: dict, arrays: dict[str, np.ndarray], position: dict[str, int]) -> RefinementRound:
    """The round that :func:`round_record` wrote, with its arrays and ``position`` (id -> sample index)."""
    number = record["round"]
    return RefinementRound(
        round=number,
        kept=arrays[f"kept_{number}"].astype(bool),
        removed=np.array([position[i] for i in record["removed_ids"]], dtype=np.int64),
        returned=np.array([position[i] for i in record.get("returned_ids", [])], dtype=np.int64),
        thresholds=np.asarray(record["thresholds"], dtype=np.float64),
        votes=arrays[f"votes_{number}"],
        anomaly_score=arrays[f"anomaly_score_{number}"],
        gamma=record["gamma"], gamma_interval=pair(record.get("gamma_interval")),
        seconds=record["seconds"], capped=record["capped"],
        precision=record["precision"], recall=record["recall"], note=record["note"],
    )


def threshold_meaning(false_alarm_rate: float) -> str:
    """What a run's threshold means, in words (``run.json``, the CLI, the studio)."""
    return (f"flags about {false_alarm_rate:.0%} of normal data (its false-alarm rate): set on out-of-sample scores "
            f"of the training samples, of which the estimated contamination is taken to be anomalous")


def _round_removed(rounds: list[RefinementRound], n: int) -> np.ndarray:
    """Round in which each training sample was last removed (0 = kept at the end, or came back)."""
    removed_in = np.zeros(n, dtype=np.int64)
    for record in rounds:
        removed_in[record.removed] = record.round
        removed_in[record.returned] = 0
    return removed_in


# ----------------------------------------------------------------------------- reading


def check_run_dir(run_dir: Path | str) -> Path:
    """``run_dir`` as a Path, once it holds a finished run; RunError naming what to pass otherwise."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_INFO).is_file():
        raise RunError(f"{run_dir} is not a Refinery run (no {RUN_INFO}); pass the --out folder of a finished fit")
    return run_dir


def read_info(run_dir: Path) -> dict:
    """``run.json`` of a run directory (checked to be one)."""
    return read_json(check_run_dir(run_dir) / RUN_INFO)


def read_config(run_dir: Path) -> FitConfig:
    return FitConfig.load(Path(run_dir) / CONFIG)


def read_samples(run_dir: Path) -> pd.DataFrame:
    """``scores.csv``: ``id, anomaly_score, is_anomaly[, label], kept, round_removed`` (ids as text)."""
    return pd.read_csv(Path(run_dir) / SCORES, dtype={"id": str}, keep_default_na=False)


def read_embeddings(run_dir: Path) -> dict[str, np.ndarray]:
    """``embeddings.safetensors``, memory-mapped: read from the file as used, not into memory at once."""
    return map_arrays(Path(run_dir) / EMBEDDINGS)


def read_rounds(run_dir: Path, ids: list[str]) -> list[RefinementRound]:
    """The saved refinement rounds, as the fit produced them; ``ids`` are the samples in run order."""
    run_dir = Path(run_dir)
    records = read_json(run_dir / ROUNDS)
    if not records:
        return []
    arrays = read_arrays(run_dir / ROUND_ARRAYS)
    position = {sample_id: index for index, sample_id in enumerate(ids)}
    return [round_from_record(record, arrays, position) for record in records]


def round_count(run_dir: Path) -> int:
    """How many refinement rounds the run saved (0 without refinement)."""
    path = Path(run_dir) / ROUNDS
    return len(read_json(path)) if path.is_file() else 0


def read_image_score(info: dict) -> ImageScoreChoice:
    """Which image score a run's ``info`` (``run.json``) says it used (pooled for runs saved before the choice)."""
    return ImageScoreChoice.from_dict(info.get("image_score"))


def saved_column_choice(info: dict, config: FitConfig) -> ColumnChoice:
    """A run's table column roles: those its fit settled on (``run.json``), or the config's choices
    for a run saved before roles were recorded."""
    if info.get("columns"):
        return chosen_roles([ColumnProfile(**profile) for profile in info["columns"]])
    return config.column_choice()


def write_maps(maps, folder: Path) -> None:
    """One float32 ``.npy`` per ``(id, map)``, at ``folder/<id with its suffix replaced by .npy>`` (DESIGN.md)."""
    for sample_id, anomaly_map in maps:
        write_npy(Path(folder) / Path(sample_id).with_suffix(".npy"), anomaly_map.astype(np.float32))


def write_batch(directory: Path, info: dict, scores: Scores, arrays: dict[str, np.ndarray]) -> None:
    """A scored batch's files into ``directory`` (see :data:`BATCHES`); ``batch.json`` last, as a batch is read by it."""
    atomic_write_text(directory / SCORES, scores.to_frame().to_csv(index=False))
    write_arrays(directory / BATCH_ARRAYS, arrays)
    write_json(directory / BATCH_INFO, info)


def read_batch(directory: Path) -> tuple[dict, pd.DataFrame, dict[str, np.ndarray]]:
    """``batch.json``, ``scores.csv`` (ids as text) and the placement arrays of a batch folder."""
    frame = pd.read_csv(directory / SCORES, dtype={"id": str}, keep_default_na=False)
    return read_json(directory / BATCH_INFO), frame, read_arrays(directory / BATCH_ARRAYS)


def read_batch_map(directory: Path, sample_id: str) -> np.ndarray | None:
    """The saved ``(H, W) float32`` map of a batch's sample, or None when the batch saved none."""
    path = directory / BATCH_MAPS / Path(sample_id).with_suffix(".npy")
    return np.load(path, allow_pickle=False) if path.is_file() else None


def bundle(run_dir: Path | str) -> bytes:
    """A zip of the run's files with :data:`BUNDLE_SUFFIXES` (hidden ones left out), for download."""
    run_dir = Path(run_dir)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(run_dir.rglob("*")):
            relative = path.relative_to(run_dir)
            hidden = any(part.startswith(".") for part in relative.parts)  # also files in hidden folders
            if path.is_file() and not hidden and path.suffix in BUNDLE_SUFFIXES:
                archive.write(path, f"{run_dir.name}/{relative.as_posix()}")
    return buffer.getvalue()


def pair(values: list | None) -> tuple[float, float] | None:
    """A JSON ``[low, high]`` as a tuple (None stays None: a given gamma, or a run older than intervals)."""
    return None if values is None else (float(values[0]), float(values[1]))
