"""The engine as the pages see it: cached resources (models, runs, arrays) and one call per action.

``st.cache_resource`` holds shared objects (the job runner, the registry, loaded data sets and
runs); ``st.cache_data`` holds arrays keyed by their run folder or file, so page switches are fast.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from core import engine
from core.data import Dataset, read_rgb
from core.data.protocol import contaminate
from core.data.sources import DEMO_DIR
from core.explain.render import mask_contour, overlay
from core.jobs import JobRunner
from core.models.device import resolve_device
from core.project import run_layouts
from core.results import SavedRun
from core.store import Registry, refinery_home
from pages.components import state

THUMBNAIL_PX = 96


@st.cache_resource
def job_runner() -> JobRunner:
    """The process-wide job runner: one worker, so jobs from every tab and session queue."""
    return JobRunner()


@st.cache_resource
def registry() -> Registry:
    return Registry()


def workspace() -> Path:
    """Where uploads are stored and archives extracted."""
    return refinery_home() / "workspace"


def active_data() -> tuple[str, str | None, tuple[float, int] | None]:
    """(path, label column, protocol) of the active data; the built-in demo until the user picks other data."""
    path, label_column, protocol = state.data_choice()
    if path is None:
        state.choose_data(DEMO_DIR)
        return str(DEMO_DIR), None, None
    return path, label_column, protocol


def active_run_dir() -> str | None:
    """The run in the URL, else the newest finished run in the registry whose folder still exists."""
    chosen = state.run_dir()
    if chosen is None:
        latest = next((run for run in registry().runs() if run.status == "done" and Path(run.path).is_dir()), None)
        if latest is not None:
            state.set_run_dir(latest.path)
            chosen = latest.path
    return chosen


@st.cache_resource(show_spinner="Loading data...", max_entries=4)
def dataset(path: str, label_column: str | None) -> Dataset:
    return engine.load_data(path, label_column=label_column, workspace=workspace())


@st.cache_resource(max_entries=8)
def protocol_dataset(path: str, label_column: str | None, ratio: float, seed: int):
    """The contamination protocol's split of a labelled data set (see core.data.protocol.contaminate)."""
    return contaminate(dataset(path, label_column), ratio, seed)


def training_dataset(path: str, label_column: str | None, protocol: tuple[float, int] | None) -> Dataset:
    """What a fit on the active data trains on: the data, or its protocol's training split."""
    if protocol is None:
        return dataset(path, label_column)
    return protocol_dataset(path, label_column, *protocol).train


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


@st.cache_data(max_entries=4096, show_spinner=False)
def thumbnail(path: str, size: int = THUMBNAIL_PX) -> np.ndarray:
    return read_rgb(path, size)


@st.cache_data(max_entries=256, show_spinner=False)
def image(path: str) -> np.ndarray:
    """The image at its own size, RGB."""
    from PIL import Image

    with Image.open(path) as opened:
        return np.asarray(opened.convert("RGB"))


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


@st.cache_data(show_spinner=False)
def device_name() -> str:
    device = resolve_device("auto")
    if device.type == "cuda":
        import torch

        return f"GPU ({torch.cuda.get_device_name(0)})"
    return "CPU"


def start_fit(dataset_: Dataset, config, verdicts: dict[str, str] | None = None, name: str = "") -> str:
    """Queue a fit of ``dataset_`` and return the job id."""
    out_dir = engine.new_run_dir(name or Path(dataset_.source).name)
    work = engine.fit_work(dataset_, config, out_dir, verdicts=verdicts, registry=registry())
    title = f"fit {out_dir.name}" + (" with verdicts" if verdicts else "")
    return job_runner().submit(title, work)
