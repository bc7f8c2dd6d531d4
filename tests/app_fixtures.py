"""Real runs and ``AppTest`` helpers for the studio's page tests (``tests/test_app_pages.py``).

Runs are fitted by the engine itself on the bundled demo images and the built-in digits table,
straight into a given Refinery home (its ``runs/`` and ``registry.sqlite``), so the pages read
exactly what a user's fit would leave behind: the command line's runs, or a studio session's when
given its id (:func:`session_id`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

import streamlit as st
from streamlit.testing.v1 import AppTest

from core import engine
from core.config import FitConfig
from core.data.builtin import DEMO_DIR, prepare_builtin
from core.registry import Registry
from pages.components.navigation import StudioPage
from pages.components.state import SESSION_PARAM, session_id_of

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
RUN_TIMEOUT_S = 120.0
"""One script run may open a model or compute a UMAP layout: far above a page's usual second."""


def clear_streamlit_caches() -> None:
    """Forget every ``st.cache_resource`` / ``st.cache_data`` entry (job runner, registry, data, arrays)."""
    st.cache_resource.clear()
    st.cache_data.clear()


def fit_demo_run(home: Path, **changes) -> Path:
    """Fit the bundled 300-image demo (suggested config, with ``changes``) into ``home``; returns the run folder."""
    dataset = engine.load_data(DEMO_DIR, workspace=home / "workspace")
    config = engine.suggested_config(dataset).with_changes(**changes)
    result = engine.fit(dataset, config, engine.new_run_dir("demo", root=home / "runs"),
                        registry=Registry(home / "registry.sqlite"))
    return result.run_dir.resolve()


def fit_digits_run(home: Path, *, session: str | None = None) -> Path:
    """Fit the built-in 200-row digits table (label column ``label``) into ``home``, as the command line
    does or, with ``session``, as that studio session's private run; returns the run folder."""
    workspace = home / "workspace"
    dataset = engine.load_data(prepare_builtin("digits", workspace), label_column="label", workspace=workspace)
    config = engine.suggested_config(dataset, FitConfig(label_column="label"))  # as `refinery fit --label-column`
    result = engine.fit(dataset, config, engine.new_run_dir("digits", root=home / "runs"),
                        registry=Registry(home / "registry.sqlite"), session=session)
    return result.run_dir.resolve()


def run_id(run_dir: Path | str) -> str:
    return json.loads((Path(run_dir) / "run.json").read_text())["run_id"]


def session_id(at: AppTest) -> str:
    """The id of ``at``'s studio session (the owner of its runs and uploads), from the key in its URL."""
    return session_id_of(at.query_params[SESSION_PARAM])


def studio(page: StudioPage | None = None, *, run: Path | str | None = None, url: Mapping[str, str] | None = None) -> AppTest:
    """The whole app (``app.py``) after its first run, switched to ``page`` when given.

    ``url`` holds the query parameters of the URL opened, e.g. another session's ``at.query_params``
    (the same URL in a second tab, or a link to another session's run); without ``session`` among
    them, the browser is a new one and gets a studio session of its own. ``run`` goes into the URL
    as ``?run=...``, as a link to a run would.
    """
    at = AppTest.from_file(str(APP), default_timeout=RUN_TIMEOUT_S)
    for name, value in (url or {}).items():
        at.query_params[name] = value
    if run is not None:
        at.query_params["run"] = str(run)
    at.run()
    if page is not None:
        at.switch_page(script(page)).run()
    return at


def standalone(page: StudioPage, *, run: Path | str | None = None) -> AppTest:
    """One page run on its own, without ``app.py`` (its navigation and sidebar)."""
    at = AppTest.from_file(script(page), default_timeout=RUN_TIMEOUT_S)
    if run is not None:
        at.query_params["run"] = str(run)
    return at.run()


def script(page: StudioPage) -> str:
    """``page``'s script, as ``AppTest.from_file`` and ``AppTest.switch_page`` take it."""
    return str(page.path)


JOB_TIMEOUT_S = 300.0
"""Longest wait for a page's job (a small fit, about 20 s alone): generous, for a 2-core box that two test
workers and other work share; a job that never ends still fails the test."""


RERUN_EVERY_S = 2.5
"""How often :func:`wait_for_job` reruns the page. An AppTest run draws the whole page in the test's process,
beside the job's thread, and takes the GIL from the fit for a good part of a second on a busy box; the
studio's live fragment redraws every second, but a few redraws during a fit exercise the live view as well."""


def wait_for_job(at: AppTest, runner, timeout_s: float = JOB_TIMEOUT_S) -> AppTest:
    """Rerun ``at`` every ``RERUN_EVERY_S`` until its watched job has finished.

    ``runner`` is the process-wide :class:`core.jobs.JobRunner` the pages use; the job is the one
    in ``at``'s URL (``?job=...``). Ends with one more run, which draws the finished view.
    """
    job_id = at.query_params.get("job")
    assert job_id, f"no job in the URL: {dict(at.query_params)}"
    deadline = time.monotonic() + timeout_s
    while runner.status(job_id).active:
        assert time.monotonic() < deadline, f"job {job_id} still {runner.status(job_id).state} after {timeout_s} s"
        time.sleep(RERUN_EVERY_S)
        at.run()
        assert not at.exception, at.exception
    return at.run()


def new_images(folder: Path, good: int = 8, other: int = 4) -> Path:
    """A folder of new data for the Score page: the demo's first ``good`` sneakers and ``other`` anomalies."""
    for part, count in (("good", good), ("other", other)):
        (folder / part).mkdir(parents=True, exist_ok=True)
        for path in sorted((DEMO_DIR / part).glob("*.png"))[:count]:
            (folder / part / path.name).write_bytes(path.read_bytes())
    return folder
