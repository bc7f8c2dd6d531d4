"""The sidebar every page shows: active data, active run, device and job state.

It is drawn before the page; a page that changes the data reruns the script (``services.use_data``),
and a finished job's run becomes active as the sidebar reads it (``services.active_run_dir``), so
the sidebar names every change at once.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.progress import stage_text
from pages.components import services


def draw() -> None:
    with st.sidebar:
        path, _, protocol = services.active_data()
        st.markdown("**Data**")
        extra = f", protocol {protocol[0]:.0%} anomalies" if protocol else ""
        st.caption(f"{Path(path).name}{extra}")
        st.markdown("**Run**")
        run_dir = services.active_run_dir()
        if run_dir is not None:
            st.caption(Path(run_dir).name)
        else:
            st.caption("another session's run (not shown)" if services.run_refused() else "none yet (Refine page)")
        st.markdown("**Device**")
        st.caption(services.device_name())
        st.markdown("**Job**")
        job = services.watched_job()
        running = job is not None and job.active
        # While the job runs, its line redraws on its own, like the page's live view.
        st.fragment(_job_line, run_every=services.LIVE_REFRESH_S if running else None)()


def _job_line() -> None:
    job = services.watched_job()
    if job is None:
        busy = services.job_runner().active() is not None
        st.caption("idle" + (" (another session's job is running; yours would queue)" if busy else ""))
    else:
        progress = f" ({stage_text(job.stage, job.done, job.total)})" if job.state == "running" and job.stage else ""
        st.caption(f"{job.title}: {job.state}{progress}")
