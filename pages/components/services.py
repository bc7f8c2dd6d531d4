"""The engine as the pages see it, light part: data, registry, jobs, thumbnails, device.

Nothing here imports torch, so the first page a visitor opens (Data) renders without waiting for
it; :func:`device_name` imports it in a background thread, which also warms the engine for the
Refine page. Run-level resources (models, layouts, maps) live in :mod:`pages.components.runs`.
``st.cache_resource`` holds shared objects (the job runner, the registry, loaded data sets);
``st.cache_data`` holds arrays keyed by their file, so page switches are fast.

The active data is named in the URL by its *source* (:func:`builtin_source`, :func:`upload_source`,
:func:`server_source`), which :func:`source_path` checks as the Data page checks a choice, so a URL
cannot open what the page would refuse (another session's upload, Refinery's own storage).

Runs and jobs are seen through the studio session (:func:`state.session_id`): a session sees its
own runs and jobs, shared runs and the command line's runs; another session's private run or job
named in the URL is refused (:func:`run_refused`, :func:`job_refused`), never opened.
"""
from __future__ import annotations

import importlib
import threading
from pathlib import Path

import numpy as np
import streamlit as st

from core.data import Dataset, load_dataset, read_rgb
from core.data.builtin import prepare_builtin
from core.data.columns import ColumnChoice
from core.data.parts import TRAIN_PART, has_mvtec_layout, mvtec_part
from core.data.protocol import contaminate
from core.data.server_paths import resolve_server_folder
from core.data.uploads import earlier_uploads
from core.errors import DataError, RefineryError
from core.jobs import DONE, JobRunner, JobStatus, Work
from core.registry import Registry, RunRecord, refinery_home
from pages.components import state

THUMBNAIL_PX = 96
LIVE_REFRESH_S = 1.0
"""Seconds between redraws of a running job's live view and sidebar line."""
FOREIGN_RUN = ("This run belongs to another session and was not shared with this one, so it is not shown. "
               "Open one of your runs on the Results page, or ask the session that made it to share it.")
FOREIGN_JOB = ("This job belongs to another session, so it is not shown. Start a fit of your own below; it queues "
               "behind other sessions' jobs.")


@st.cache_resource
def job_runner() -> JobRunner:
    """The process-wide job runner: one worker, so jobs from every tab and session queue."""
    return JobRunner()


@st.cache_resource
def registry() -> Registry:
    return Registry()


def submit_job(title: str, work: Work) -> str:
    """Queue ``work`` (see :meth:`core.jobs.JobRunner.submit`) as this session's job; its id."""
    return job_runner().submit(title, work, owner=state.session_id())


def job_refused() -> bool:
    """Whether the URL names another session's job, which this session may not watch."""
    chosen = job_runner().status(state.job_id()) if state.job_id() else None
    return chosen is not None and chosen.owner != state.session_id()


def watched_job() -> JobStatus | None:
    """This session's job: the one in the URL, else its newest queued or running one (the URL opened
    in a second tab without its job); None when it has none, or the URL names another session's."""
    if job_refused():
        return None
    runner = job_runner()
    status = runner.status(state.job_id()) if state.job_id() else None
    if status is None:
        status = next((job for job in runner.jobs(owner=state.session_id()) if job.active), None)
        if status is not None:
            state.set_job_id(status.job_id)
    return status


def visible_runs() -> list[RunRecord]:
    """The runs this session may see, newest first: its own, shared ones and the command line's."""
    return registry().runs(visible_to=state.session_id())


def run_refused() -> bool:
    """Whether the URL names another session's private run, which this session may not open."""
    chosen = state.run_dir()
    return chosen is not None and not registry().may_open(chosen, state.session_id())


def workspace() -> Path:
    """Where uploads are stored and archives extracted."""
    return refinery_home() / "workspace"


DEMO_SOURCE = "builtin:demo"
"""The active data until the user picks other data: the bundled demo."""


def builtin_source(key: str) -> str:
    """The URL's name of the built-in data set ``key``."""
    return f"builtin:{key}"


def upload_source(path: Path | str) -> str:
    """The URL's name of one of this session's uploads (its path in the workspace)."""
    return f"upload:{Path(path).relative_to(workspace()).as_posix()}"


def server_source(typed: str) -> str:
    """The URL's name of a path on the server, as the user typed it."""
    return f"path:{typed}"


def source_path(source: str) -> Path:
    """The data a source names: a built-in set by key, one of this session's uploads, or a server path
    outside Refinery's own storage. DataError (or ConfigError) when it names none of these."""
    kind, _, value = source.partition(":")
    if kind == "builtin":
        return prepare_builtin(value, workspace())
    if kind == "upload":
        found = [entry for entry in earlier_uploads(workspace(), state.session_id())
                 if entry.relative_to(workspace()).as_posix() == value]
        if not found:
            raise DataError(f"{value!r} is not one of this session's uploads; upload the files again")
        return found[0]
    if kind == "path":
        return resolve_server_folder(value, private=[refinery_home()])
    raise DataError(f"{source!r} names no data; the URL's data is 'builtin:KEY', 'upload:PATH' or 'path:PATH'")


def use_data(path: Path | str, columns: ColumnChoice, source: str) -> None:
    """Make ``path`` with the column roles ``columns`` the active data once it loads, then draw the page
    again so that the sidebar names it. Data that does not load (a truncated zip, a table without a
    chosen column, an id column that repeats a value) raises its error and the active data stays as
    it was."""
    dataset(str(path), columns)
    state.choose_data(path, columns, source)
    st.rerun()


def active_data() -> tuple[str, ColumnChoice, tuple[float, int] | None]:
    """(path, column roles, protocol) of the active data: the URL's (a reload), else this session's,
    else the built-in demo. A URL naming data that no longer loads is dropped with a message."""
    requested = state.requested_data()
    if requested is not None:
        source, columns = requested
        try:
            path = source_path(source)
            dataset(str(path), columns)
        except RefineryError as error:
            state.forget_requested_data()
            st.toast(f"The data in the URL could not be opened ({error}); the studio kept its data.",
                     icon=":material/warning:")
        else:
            state.choose_data(path, columns, source)
    path, columns, protocol = state.data_choice()
    if path is None:
        path = source_path(DEMO_SOURCE)
        state.choose_data(path, ColumnChoice(), DEMO_SOURCE)
        return str(path), ColumnChoice(), None
    return path, columns, protocol


def active_run_dir() -> str | None:
    """The run of this session's job that just finished (once, see :func:`state.adopt_job_result`), else
    the run in the URL, else the newest finished run this session may see whose folder still exists;
    None without one, or when the URL names another session's private run (:func:`run_refused`)."""
    job = watched_job()
    if job is not None and job.state == DONE:
        state.adopt_job_result(job.job_id, job.result.run_dir)
    if run_refused():
        return None
    chosen = state.run_dir()
    if chosen is None:
        latest = next((run for run in visible_runs() if run.status == "done" and Path(run.path).is_dir()), None)
        if latest is not None:
            state.set_run_dir(latest.path)
            chosen = latest.path
    return chosen


@st.cache_resource(show_spinner="Loading data...", max_entries=4)
def dataset(path: str, columns: ColumnChoice) -> Dataset:
    """The data at ``path``; a table's columns take the roles ``columns`` (images ignore them)."""
    return load_dataset(path, workspace=workspace(), **columns.load_kwargs())


@st.cache_resource(max_entries=8)
def protocol_dataset(path: str, columns: ColumnChoice, ratio: float, seed: int):
    """The contamination protocol's split of a labelled data set (see core.data.protocol.contaminate)."""
    return contaminate(dataset(path, columns), ratio, seed)


def training_dataset(path: str, columns: ColumnChoice, protocol: tuple[float, int] | None) -> Dataset:
    """What a fit on the active data trains on: the data, its protocol's training split, or the train/
    part of an MVTec-layout folder when the Data page chose it (:func:`state.train_part_only`)."""
    if protocol is not None:
        return protocol_dataset(path, columns, *protocol).train
    if state.train_part_only() and has_mvtec_layout(dataset(path, columns)):
        return train_part(path, columns)
    return dataset(path, columns)


@st.cache_resource(max_entries=4)
def train_part(path: str, columns: ColumnChoice) -> Dataset:
    """The train/ part of the MVTec-layout data at ``path`` (see :mod:`core.data.parts`)."""
    return mvtec_part(dataset(path, columns), TRAIN_PART)


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
        for module in ("core.engine", "core.layouts"):  # warm-up for the run pages
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
