"""The engine as the pages see it, light part: data, registry, jobs, thumbnails, device.

Nothing here imports torch, so the first page a visitor opens (Data) renders without waiting for
it; :func:`device_name` imports it in a background thread, which also warms the engine for the
Refine page. Run-level resources (models, layouts, maps) live in :mod:`pages.components.runs`.
``st.cache_resource`` holds shared objects (the job runner, the registry, loaded data sets);
``st.cache_data`` holds arrays keyed by their file, so page switches are fast.
"""
from __future__ import annotations

import importlib
import threading
from pathlib import Path

import numpy as np
import streamlit as st

from core.data import Dataset, load_dataset, read_rgb
from core.data.protocol import contaminate
from core.data.sources import DEMO_DIR
from core.jobs import JobRunner
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
    return load_dataset(path, label_column=label_column, workspace=workspace())


@st.cache_resource(max_entries=8)
def protocol_dataset(path: str, label_column: str | None, ratio: float, seed: int):
    """The contamination protocol's split of a labelled data set (see core.data.protocol.contaminate)."""
    return contaminate(dataset(path, label_column), ratio, seed)


def training_dataset(path: str, label_column: str | None, protocol: tuple[float, int] | None) -> Dataset:
    """What a fit on the active data trains on: the data, or its protocol's training split."""
    if protocol is None:
        return dataset(path, label_column)
    return protocol_dataset(path, label_column, *protocol).train


@st.cache_data(max_entries=4096, show_spinner=False)
def thumbnail(path: str, size: int = THUMBNAIL_PX) -> np.ndarray:
    return read_rgb(path, size)


@st.cache_data(max_entries=256, show_spinner=False)
def image(path: str) -> np.ndarray:
    """The image at its own size, RGB."""
    from PIL import Image

    with Image.open(path) as opened:
        return np.asarray(opened.convert("RGB"))


@st.cache_resource
def _device_probe() -> dict[str, str]:
    """Import the engine (torch included, about 2 s on 2 cores) in the background, so the run pages
    find it loaded, and record the device torch finds."""
    found: dict[str, str] = {}

    def probe() -> None:
        for module in ("core.engine", "core.project"):  # warm-up for the run pages
            importlib.import_module(module)
        import torch

        from core.models.device import resolve_device

        if resolve_device("auto").type == "cuda":
            found["name"] = f"GPU ({torch.cuda.get_device_name(0)})"
        else:
            found["name"] = "CPU"

    threading.Thread(target=probe, name="refinery-device-probe", daemon=True).start()
    return found


def device_name() -> str:
    """``GPU (name)`` or ``CPU``; ``detecting...`` while torch is still being imported."""
    return _device_probe().get("name", "detecting...")
