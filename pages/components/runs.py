"""The engine as the pages see it, run part: saved runs, their models, layouts, maps, new fits.

These import torch (through the engine); the Data page does not need them (see
:mod:`pages.components.services`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import streamlit as st

from core import batches, engine
from core.data import Dataset
from core.errors import RefineryError, RunError
from core.explain.attribution import column_shares
from core.layouts import run_layouts
from core.registry import RunRecord
from core.results import RunResults
from core.run_dir import read_info
from pages.components import state
from pages.components.services import registry, submit_job, workspace


@st.cache_resource(max_entries=8)
def run_results(run_dir: str) -> RunResults:
    return RunResults(run_dir)


def runs_table(records: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per run: its name (the folder's), status and the settings that tell runs apart.

    ``gamma`` shows the contamination a finished ``auto`` run estimated (``auto: 8.3%``) or the
    share the user gave; ``K (ensemble)`` is K detectors of the refinement detector's kind (``5 × mcd``).
    """
    rows = []
    for record in records:
        config = record.config
        refined = config.get("refine", True)
        gamma = config.get("gamma", "-")
        estimate = _estimated_contamination(record.path) if record.status == "done" and gamma == "auto" else None
        rows.append({
            "run": Path(record.path).name, "status": record.status, "kind": record.kind,
            "detector": config.get("detector", "-"),
            "K (ensemble)": f"{config.get('ensemble', '-')} × {config.get('refine_detector', '-')}" if refined else "no refinement",
            "gamma": gamma if gamma != "auto" else ("auto" if estimate is None else f"auto: {estimate:.1%}"),
            "rounds": str(config.get("rounds", "-")) if refined else "-",
            "objective": config.get("objective", "-"),
            "image size": f"{config['image_size']} px" if record.kind == "images" and "image_size" in config else "-",
            "samples": record.n_samples,
            "AUROC": record.metrics.get("auroc"),
            "created": pd.Timestamp(record.created, unit="s").strftime("%Y-%m-%d %H:%M"),
            "message": record.message or "", "id": record.run_id, "path": record.path,
        })
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["gamma"] = frame["gamma"].astype(str)
    return frame


@st.cache_data(max_entries=512, show_spinner=False)
def _estimated_contamination(run_dir: str) -> float | None:
    """The contamination a finished run's ``run.json`` records; None when it cannot be read."""
    try:
        return float(read_info(Path(run_dir))["contamination"])
    except (RunError, KeyError, TypeError, ValueError):
        return None


@st.cache_resource(show_spinner="Opening the run's model...", max_entries=2)
def run_model(run_dir: str) -> engine.RunModel:
    return engine.open_run(run_dir)


@st.cache_resource(show_spinner="Loading the run's data...", max_entries=2)
def run_dataset(run_dir: str) -> Dataset:
    return engine.run_dataset(run_dir, workspace=workspace())


def run_values(run_dir: str, kind: str) -> pd.DataFrame | None:
    """A table run's feature columns in the run's sample order; None for images, or (with a note on the
    page) when the run's table can no longer be read."""
    if kind == "images":
        return None
    try:
        return run_dataset(run_dir).table
    except RefineryError as error:
        st.info(f"The run's table could not be read again ({error}); its values are not shown.")
        return None


@st.cache_data(show_spinner="Explaining the flagged rows...", max_entries=4)
def flagged_column_shares(run_dir: str) -> dict[str, float]:
    """Each column's mean share of the scores of a table run's flagged rows, largest first (empty when
    nothing is flagged); computed once per run, not on every redraw of the Results page."""
    run = run_results(run_dir)
    flagged = [i for i, flag in zip(run.samples["id"], run.samples["is_anomaly"]) if flag]
    if not flagged:
        return {}
    fitted = run_model(run_dir)
    return column_shares(fitted.explain_rows(run_dataset(run_dir), flagged, k=len(fitted.encoder.feature_names)))


@st.cache_data(max_entries=128, show_spinner="Localizing...")
def anomaly_map(run_dir: str, path: str) -> np.ndarray:
    """``(H, W) float32`` localization map of the image at ``path`` under the run's localizer."""
    return run_model(run_dir).anomaly_map(Path(path))


@st.cache_data(max_entries=128, show_spinner="Computing Grad-CAM...")
def gradcam_map(run_dir: str, path: str) -> np.ndarray:
    """``(H, W) float32`` Grad-CAM of the anomaly score of the image at ``path``."""
    return run_model(run_dir).gradcam_map(Path(path))


@st.cache_data(show_spinner="Computing the UMAP map (cached for this run)...", max_entries=8)
def layouts(run_dir: str) -> np.ndarray:
    """(S, N, 2) UMAP layouts of the run's samples (see core.layouts)."""
    return run_layouts(run_dir).layouts


def start_fit(dataset_: Dataset, config, verdicts: dict[str, str] | None = None, name: str = "") -> str:
    """Queue a fit of ``dataset_`` as this session's job (its run private to the session); the job id."""
    out_dir = engine.new_run_dir(name or Path(dataset_.source).name)
    work = engine.fit_work(dataset_, config, out_dir, verdicts=verdicts, registry=registry(),
                           session=state.session_id())
    title = f"fit {out_dir.name}" + (" with verdicts" if verdicts else "")
    return submit_job(title, work)


# ----------------------------------------------------------------------------- batches of new data (Score page)


@st.cache_resource(max_entries=16)
def batch_results(run_dir: str, name: str) -> batches.BatchResults:
    """A saved batch of the run (unchanging once written, so cached by its name)."""
    return batches.BatchResults(run_dir, name)


@st.cache_resource(show_spinner="Loading the batch's data...", max_entries=2)
def batch_dataset(run_dir: str, name: str) -> Dataset:
    """A batch's data, loaded again as it was scored (its table's rows, for the Inspect page)."""
    batch = batch_results(run_dir, name)
    return batches.load_batch_data(batch.source, run_model(run_dir).column_choice(), part=batch.info.get("part"),
                                   workspace=workspace())


@st.cache_data(show_spinner="Scoring the kept training samples out of sample (once per run)...", max_entries=8)
def reference_scores(run_dir: str) -> np.ndarray:
    """The run's out-of-sample scores of its kept training samples, the drift check's reference."""
    return batches.reference_scores(run_dir)


def drift(run_dir: str, name: str) -> batches.DriftCheck:
    return batches.batch_drift(batch_results(run_dir, name), reference_scores(run_dir))


TRAINING = "training data"


def viewed(run_dir: str) -> RunResults | batches.BatchResults:
    """What Inspect and Embeddings show of the run: its training data, or the batch the URL names
    (``?batch=...``), chosen in a box at the top of the page that says which it is."""
    names = batches.batch_names(run_dir)
    current = state.viewed_batch()
    if current is not None and current not in names:
        st.warning(f"This run has no batch {current!r}; showing its training data.")
        state.set_viewed_batch(None)
        current = None
    if names:
        options = [TRAINING, *names]
        chosen = st.selectbox(
            "Looking at", options, index=options.index(current or TRAINING), key=f"view-{run_dir}-{current}",
            help="The run's training data, or a batch of new data scored with the run on the Score page.",
            format_func=lambda name: name if name == TRAINING else f"batch {name}")
        if (None if chosen == TRAINING else chosen) != current:
            state.set_viewed_batch(None if chosen == TRAINING else chosen)
            st.rerun()
    if current is None:
        return run_results(run_dir)
    batch = batch_results(run_dir, current)
    st.info(f"**Batch {batch.name}**: {len(batch.samples)} new {'images' if batch.kind == 'images' else 'rows'} "
            f"from {batch.source_text}, scored with run {Path(run_dir).name}. Verdicts here are kept for this batch.",
            icon=":material/playlist_add_check:")
    return batch


def viewed_values(run_dir: str, view) -> pd.DataFrame | None:
    """The feature columns of what is viewed (see :func:`run_values`): the training table or the batch's."""
    if not isinstance(view, batches.BatchResults):
        return run_values(run_dir, view.kind)
    return None if view.kind == "images" else batch_dataset(run_dir, view.name).table


def viewed_dataset(run_dir: str, view) -> Dataset:
    """The data of what is viewed: the run's training data or the batch's."""
    return batch_dataset(run_dir, view.name) if isinstance(view, batches.BatchResults) else run_dataset(run_dir)


def viewed_mask(run_dir: str, view, sample_id: str) -> str | None:
    """The ground-truth mask file of a viewed sample, or None."""
    if isinstance(view, batches.BatchResults):
        mask = view.mask_path(sample_id)
    else:
        mask = run_dataset(run_dir).masks.get(sample_id)
    return str(mask) if mask else None


def viewed_map(run_dir: str, view, sample_id: str, path: str) -> np.ndarray:
    """A viewed image's localization map: the one a batch saved when scored, else computed (cached)."""
    saved = view.saved_map(sample_id) if isinstance(view, batches.BatchResults) else None
    return saved if saved is not None else anomaly_map(run_dir, path)


def start_score(run_dir: str, data: Path, *, part: str | None = None, name: str = "") -> str:
    """Queue the scoring of ``data`` (its MVTec ``part``) with the run as this session's job; the job id."""
    label = name or Path(data).name + (f" ({part}/)" if part else "")
    return submit_job(f"score {label} with {Path(run_dir).name}",
                      batches.score_work(run_dir, data, part=part, name=name, workspace=workspace()))

