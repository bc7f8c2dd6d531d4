"""A saved run's results read back for display and export: samples, rounds, neighbours, curves, comparisons.

:class:`RunResults` only reads the run directory (:mod:`core.run_dir`; no model is loaded), so the app
can open any run in the registry quickly; scoring new data and anomaly maps go through
:class:`core.run_model.RunModel`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from core.errors import DataError
from core.metrics import DetectionMetrics, detection_metrics
from core.refine import describe_contamination
from core.run_dir import pair, read_config, read_embeddings, read_image_score, read_info, read_rounds, read_samples


class RunResults:
    """A run directory, read for display.

    Attributes
    ----------
    run_dir : Path
    info : dict
        ``run.json``: kind, data source, threshold, contamination, metrics, timings, skipped files.
    config : FitConfig
    samples : DataFrame
        ``scores.csv`` of the training data: ``id, anomaly_score, is_anomaly[, label], kept,
        round_removed`` (0 = kept), plus ``rank`` (1 = most anomalous).
    rounds : list of RefinementRound
        The saved refinement rounds, as the fit produced them.
    """

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        self.info = read_info(self.run_dir)
        self.config = read_config(self.run_dir)
        samples = read_samples(self.run_dir)
        samples["rank"] = samples["anomaly_score"].rank(ascending=False, method="first").astype(int)
        self.samples = samples
        self.rounds = read_rounds(self.run_dir, list(samples["id"]))

    # ------------------------------------------------------------------ facts

    @property
    def name(self) -> str:
        """What the studio and the CLI call the run: its folder's name (unique, dated, readable)."""
        return self.run_dir.name

    @property
    def run_id(self) -> str:
        """The registry's key of the run; shown only as a secondary detail next to :attr:`name`."""
        return self.info["run_id"]

    @property
    def fingerprint(self) -> str:
        """The content hash of the run's training data; the expert's verdicts are kept under it, so that
        every run on the same data shows them (:meth:`core.registry.Registry.verdicts`)."""
        return self.info["fingerprint"]

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def source(self) -> Path:
        """The folder (images) or table file the run was fitted on."""
        return Path(self.info["data_source"])

    @property
    def threshold(self) -> float:
        return float(self.info["threshold"])

    @property
    def contamination(self) -> float:
        """The training set's contamination: estimated without labels, or the user's gamma."""
        return float(self.info["contamination"])

    @property
    def contamination_text(self) -> str:
        """The contamination in words, with its interval when it was estimated."""
        return describe_contamination(self.contamination, pair(self.info.get("contamination_interval")))

    @property
    def image_score_text(self) -> str:
        """Which score ``anomaly_score`` is, and why: ``Image score: map (auto: ...)`` (images only, else empty)."""
        return f"Image score: {read_image_score(self.info).describe()}" if self.kind == "images" else ""

    @property
    def threshold_meaning(self) -> str:
        """What the threshold means (runs made before it was stated: flags the contamination share of training)."""
        return self.info.get("threshold_meaning") or (
            f"flags the {self.contamination:.1%} estimated contamination share of the training scores")

    @property
    def labels(self) -> np.ndarray | None:
        """(N,) 1 anomaly / 0 normal / -1 unknown, or None; for display and metrics only."""
        return self.samples["label"].to_numpy() if "label" in self.samples else None

    @property
    def metrics(self) -> DetectionMetrics | None:
        return detection_metrics(self.labels, self.samples["anomaly_score"].to_numpy(), self.samples["is_anomaly"].to_numpy())

    @cached_property
    def embeddings(self) -> np.ndarray:
        """(N, D) float32 training embeddings of the final representation."""
        return read_embeddings(self.run_dir)["train"]

    def kept_after(self, round_number: int) -> np.ndarray:
        """(N,) bool: samples still kept after ``round_number`` (0 = before refinement: all)."""
        kept = np.ones(len(self.samples), dtype=bool)
        for record in self.rounds:
            if record.round <= round_number:
                kept = record.kept
        return kept

    def index_of(self, sample_id: str) -> int:
        matches = np.flatnonzero(self.samples["id"].to_numpy() == sample_id)
        if len(matches) == 0:
            raise DataError(f"no sample with id {sample_id!r} in run {self.name}")
        return int(matches[0])

    def image_path(self, sample_id: str) -> Path:
        """The image file of a training sample; refuses ids that would leave the data folder."""
        if self.kind != "images":
            raise DataError("this run was fitted on a table; its samples are rows, not image files")
        root = self.source.resolve()
        path = (root / sample_id).resolve()
        if not path.is_relative_to(root):
            raise DataError(f"sample id {sample_id!r} points outside the run's data folder")
        if not path.is_file():
            raise DataError(f"{path} is gone: the run's data folder was moved or deleted")
        return path

    def nearest_kept(self, index: int, k: int = 6) -> pd.DataFrame:
        """The ``k`` kept training samples closest to sample ``index`` in embedding space (itself excluded).

        Columns: ``index, id, distance, anomaly_score``; nearest first.
        """
        embeddings = self.embeddings
        candidates = np.flatnonzero(self.samples["kept"].to_numpy().astype(bool))
        candidates = candidates[candidates != index]
        distance = np.linalg.norm(embeddings[candidates] - embeddings[index], axis=1)
        order = np.argsort(distance, kind="stable")[:k]
        chosen = candidates[order]
        return pd.DataFrame({
            "index": chosen,
            "id": self.samples["id"].to_numpy()[chosen],
            "distance": distance[order],
            "anomaly_score": self.samples["anomaly_score"].to_numpy()[chosen],
        })

    def export_frame(self, verdicts: dict[str, tuple[str, str]]) -> pd.DataFrame:
        """Scores with the expert's ``verdict`` and ``verdict_note`` columns (empty where none)."""
        frame = self.samples.drop(columns=["rank"]).copy()
        frame["verdict"] = [verdicts.get(i, ("", ""))[0] for i in frame["id"]]
        frame["verdict_note"] = [verdicts.get(i, ("", ""))[1] for i in frame["id"]]
        return frame


# ---------------------------------------------------------------------------- evaluation helpers

HEAVY_TAIL_IQRS = 10.0
"""A score this many interquartile ranges from the median makes the score axis logarithmic (a Gaussian's
farthest of 100,000 samples lies about 3.3 away)."""


@dataclass(frozen=True)
class ScoreAxis:
    """How a score axis is drawn: ``scale`` names it (it goes into the axis title), ``forward`` maps a
    score to its position on the axis, ``inverse`` maps back (for ticks and hover text)."""

    scale: str  # "linear", "log" or "symmetric log"
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]


def score_text(value: float) -> str:
    """A score or threshold as every page shows it: whole numbers with separators from 1,000 up (1,172),
    four significant digits below (86.26), so one sample reads the same everywhere."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def tick_text(value: float) -> str:
    """An axis tick of a score axis: whole numbers with separators (1,000), three significant digits otherwise."""
    return f"{value:,.0f}" if value == round(value) and abs(value) < 1e7 else f"{value:.3g}"


def score_axis(scores: np.ndarray) -> ScoreAxis:
    """A linear axis, or a log one when the scores are heavy-tailed.

    Scores are heavy-tailed when the farthest one lies more than ``HEAVY_TAIL_IQRS`` interquartile
    ranges from the median: a linear axis would then crowd nearly every sample into a few bars. Positive scores get a log axis; scores of
    both signs a symmetric log (``asinh(score / s)``, linear within ``s``, the median absolute score,
    logarithmic beyond).
    """
    finite = np.asarray(scores, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if len(finite) < 2:
        return ScoreAxis("linear", _identity, _identity)
    low, q25, median, q75, high = np.quantile(finite, [0.0, 0.25, 0.5, 0.75, 1.0])
    if max(high - median, median - low) <= HEAVY_TAIL_IQRS * (q75 - q25):
        return ScoreAxis("linear", _identity, _identity)
    if low > 0:
        return ScoreAxis("log", np.log10, lambda x: np.power(10.0, x))
    scale = float(np.median(np.abs(finite))) or 1.0
    return ScoreAxis("symmetric log", lambda x: np.arcsinh(np.asarray(x) / scale), lambda x: np.sinh(x) * scale)


def _identity(values):
    return np.asarray(values, dtype=np.float64)




@dataclass(frozen=True)
class Curves:
    """ROC and precision-recall curves of anomaly scores against labels."""

    fpr: np.ndarray
    tpr: np.ndarray
    precision: np.ndarray
    recall: np.ndarray


def score_curves(labels: np.ndarray, anomaly_score: np.ndarray) -> Curves | None:
    """ROC and PR curves over the labelled samples, or None unless both classes are present."""
    known = np.asarray(labels) >= 0
    y, score = np.asarray(labels)[known], np.asarray(anomaly_score)[known]
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, score)
    precision, recall, _ = precision_recall_curve(y, score)
    return Curves(fpr, tpr, precision, recall)


def confusion_at(labels: np.ndarray, anomaly_score: np.ndarray, threshold: float) -> pd.DataFrame:
    """2x2 counts of labelled samples: rows ``label normal/anomaly``, columns ``called normal/anomaly``."""
    known = np.asarray(labels) >= 0
    truth = np.asarray(labels)[known] == 1
    called = np.asarray(anomaly_score)[known] > threshold
    counts = [[int(np.sum(~truth & ~called)), int(np.sum(~truth & called))],
              [int(np.sum(truth & ~called)), int(np.sum(truth & called))]]
    return pd.DataFrame(counts, index=["label normal", "label anomaly"], columns=["called normal", "called anomaly"])


def verdict_agreement(samples: pd.DataFrame, verdicts: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """Expert verdicts against the model's call: rows verdict, columns ``model normal/anomaly``, counts."""
    judged = samples[samples["id"].isin(verdicts.keys())]
    verdict = judged["id"].map(lambda i: verdicts[i][0]).to_numpy()
    called = np.where(judged["is_anomaly"].astype(bool), "model anomaly", "model normal")
    table = pd.crosstab(verdict, called).reindex(
        index=["normal", "anomaly", "unsure"], columns=["model normal", "model anomaly"], fill_value=0
    )
    table.index.name, table.columns.name = "verdict", None
    return table


def judged_samples(samples: pd.DataFrame, verdicts: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """The samples with an expert's verdict, most anomalous first.

    Columns ``id, verdict, note, model, anomaly_score, rank, disagrees``: ``model`` is the run's call
    (``normal`` / ``anomaly``, from ``is_anomaly``); ``disagrees`` is True where the expert and the
    model disagree (verdict ``anomaly`` on a sample the model calls normal, or ``normal`` on one it
    calls an anomaly; ``unsure`` disagrees with nothing). Verdicts on ids not in ``samples`` are left out.
    """
    judged = samples[samples["id"].isin(verdicts.keys())].sort_values("rank")
    verdict = judged["id"].map(lambda i: verdicts[i][0])
    called = judged["is_anomaly"].astype(bool)
    return pd.DataFrame({
        "id": judged["id"],
        "verdict": verdict,
        "note": judged["id"].map(lambda i: verdicts[i][1]),
        "model": np.where(called, "anomaly", "normal"),
        "anomaly_score": judged["anomaly_score"],
        "rank": judged["rank"],
        "disagrees": ((verdict == "anomaly") & ~called) | ((verdict == "normal") & called),
    }).reset_index(drop=True)


@dataclass(frozen=True)
class RunComparison:
    """Two runs on the same samples: their metrics side by side and the samples whose call changed."""

    metrics: pd.DataFrame     # rows: metric names; columns: the two runs' names
    changed: pd.DataFrame     # id, anomaly_score and is_anomaly under each run, for samples whose call differs


def compare_runs(before: RunResults, after: RunResults) -> RunComparison:
    """Compare two runs fitted on the same data (e.g. before and after verdict-guided refinement)."""
    if list(before.samples["id"]) != list(after.samples["id"]):
        raise DataError("these runs were fitted on different samples; compare runs of the same data set")
    rows = {}
    labelled = before.metrics is not None or after.metrics is not None  # no label: no metric rows
    for run in (before, after):
        metrics = run.metrics.as_dict() if run.metrics else {}
        rows[run.name] = {
            "kept": int(run.samples["kept"].sum()),
            "removed": int((~run.samples["kept"].astype(bool)).sum()),
            "called anomaly": int(run.samples["is_anomaly"].sum()),
            "threshold": run.threshold,
            **({name: metrics.get(name, np.nan) for name in ("auroc", "ap", "f1")} if labelled else {}),
        }
    merged = pd.DataFrame({
        "id": before.samples["id"],
        f"anomaly_score {before.name}": before.samples["anomaly_score"],
        f"anomaly_score {after.name}": after.samples["anomaly_score"],
        f"is_anomaly {before.name}": before.samples["is_anomaly"],
        f"is_anomaly {after.name}": after.samples["is_anomaly"],
    })
    changed = merged[before.samples["is_anomaly"].to_numpy() != after.samples["is_anomaly"].to_numpy()]
    return RunComparison(pd.DataFrame(rows), changed.reset_index(drop=True))
