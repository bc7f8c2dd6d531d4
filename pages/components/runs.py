"""The engine as the pages see it, run part: saved runs, their models, layouts, maps, new fits.

These import torch (through the engine); the Data page does not need them (see
:mod:`pages.components.services`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from core import engine
from core.data import Dataset
from core.explain.render import mask_contour, overlay
from core.project import run_layouts
from core.results import SavedRun
from pages.components import state
from pages.components.services import image, registry, submit_job, workspace


@st.cache_resource(max_entries=8)
def saved_run(run_dir: str) -> SavedRun:
    return SavedRun(run_dir)


@st.cache_resource(show_spinner="Opening the run's model...", max_entries=2)
def fitted_run(run_dir: str) -> engine.FittedRun:
    return engine.open_run(run_dir)


@st.cache_resource(show_spinner="Loading the run's data...", max_entries=2)
def run_dataset(run_dir: str) -> Dataset:
    return engine.run_dataset(run_dir, workspace=workspace())


@st.cache_data(show_spinner="Computing the UMAP map (cached for this run)...", max_entries=8)
def layouts(run_dir: str) -> np.ndarray:
    """(S, N, 2) UMAP layouts of the run's samples (see core.project)."""
    return run_layouts(run_dir).layouts


@st.cache_data(max_entries=128, show_spinner="Localizing...")
def localization_overlay(run_dir: str, path: str, mask_path: str | None) -> np.ndarray:
    """The image with its anomaly map blended over it (run-level colour scale) and the mask outlined."""
    run = fitted_run(run_dir)
    amap = run.anomaly_map(Path(path))
    shown = overlay(image(path), amap, vmax=run.localizer.display_scale_)
    return _outlined(shown, mask_path)


@st.cache_data(max_entries=128, show_spinner="Computing Grad-CAM...")
def gradcam_overlay(run_dir: str, path: str, mask_path: str | None) -> np.ndarray:
    """The image with the Grad-CAM of its anomaly score blended over it (scaled to this image's maximum),
    mask outlined."""
    cam = fitted_run(run_dir).gradcam_map(Path(path))
    return _outlined(overlay(image(path), cam), mask_path)


def _outlined(shown: np.ndarray, mask_path: str | None) -> np.ndarray:
    if mask_path is None:
        return shown
    mask = image(mask_path)[..., 0] > 127
    return mask_contour(shown, mask)


def start_fit(dataset_: Dataset, config, verdicts: dict[str, str] | None = None, name: str = "") -> str:
    """Queue a fit of ``dataset_`` as this session's job (its run private to the session); the job id."""
    out_dir = engine.new_run_dir(name or Path(dataset_.source).name)
    work = engine.fit_work(dataset_, config, out_dir, verdicts=verdicts, registry=registry(),
                           session=state.session_id())
    title = f"fit {out_dir.name}" + (" with verdicts" if verdicts else "")
    return submit_job(title, work)
