"""The sidebar every page shows: active data, active run, device and job state."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from pages.components import services, state


def draw() -> None:
    with st.sidebar:
        path, _, protocol = services.active_data()
        st.markdown("**Data**")
        extra = f", protocol {protocol[0]:.0%} anomalies" if protocol else ""
        st.caption(f"{Path(path).name}{extra}")
        st.markdown("**Run**")
        run_dir = services.active_run_dir()
        st.caption(Path(run_dir).name if run_dir else "none yet (Refine page)")
        st.markdown("**Device**")
        st.caption(services.device_name())
        st.markdown("**Job**")
        runner = services.job_runner()
        job = runner.status(state.job_id()) if state.job_id() else runner.active()
        if job is None:
            st.caption("idle")
        else:
            progress = f" ({job.stage} {job.done}/{job.total})" if job.state == "running" and job.total else ""
            st.caption(f"{job.title}: {job.state}{progress}")
