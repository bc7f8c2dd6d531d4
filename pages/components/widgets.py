"""Reusable page pieces: the error boundary, a background job's progress, links between pages, column warnings, thumbnail galleries and the
threshold control."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import streamlit as st

from core.errors import RefineryError
from pages.components import navigation, services

log = logging.getLogger("refinery.app")


def guarded(body: Callable[[], None]) -> None:
    """Run a page body; errors become messages on the page, never tracebacks.

    A :class:`~core.errors.RefineryError` already says what to do; anything else is logged with
    its traceback on the server and summarised on the page. Streamlit's own control flow
    (``st.rerun``, ``st.stop``) derives from ``BaseException`` and passes through.
    """
    try:
        body()
    except RefineryError as error:
        st.error(str(error))
    except Exception as error:  # noqa: BLE001 - the page must survive any failure
        log.exception("page failed")
        st.error(f"Something went wrong ({type(error).__name__}: {error}). The server log has the details; "
                 "reload the page to start over.")


def job_progress(status) -> None:
    """The job's progress as a whole (one bar, one ETA), its stage in plain words and that stage's ETA."""
    if status.state == "queued":
        st.info(f"**{status.title}** is queued behind another job; it starts when that one finishes.")
        return
    left = (f"about {_duration(status.overall_eta_s)} left in all" if status.overall_eta_s is not None
            else "estimating the time left")
    whole = status.overall if status.overall is not None else status.fraction
    st.progress(whole, text=f"**{status.stage_text}**: {left}")
    stage_left = f"; this step: about {_duration(status.eta_s)} left" if status.eta_s is not None else ""
    note = f" ({status.message})" if status.message else ""
    st.caption(f"{status.title}: running for {_duration(status.elapsed_s)}{stage_left}{note}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def cancel_button(job_id: str, key: str) -> None:
    """A Cancel button for a running job: the job stops at its next batch."""
    if st.button("Cancel", key=key, icon=":material/stop:"):
        services.job_runner().cancel(job_id)
        st.toast("Cancelling at the next batch...")


def require_run() -> str | None:
    """The active run's folder; without one, the page says why (no run yet, or the URL names another
    session's private run), links to where to get one, and gets None."""
    run_dir = services.active_run_dir()
    if run_dir is not None:
        return run_dir
    if services.run_refused():
        st.warning(services.FOREIGN_RUN)
        navigation.link(navigation.RESULTS, "Your runs")
    else:
        st.info("No run yet: start one on the Refine page.")
        navigation.link(navigation.REFINE, "Refine")
    return None


def column_problems(dataset) -> None:
    """A warning for each column of a table that a fit would refuse in its role, naming the role that fixes it."""
    for profile in dataset.columns:
        if profile.problem:
            st.warning(f"Column **{profile.name}**: {profile.problem} (Data page, Columns).", icon=":material/warning:")


def gallery(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    *,
    columns: int = 8,
    key: str | None = None,
    buttons: Sequence[str] | None = None,
) -> int | None:
    """Thumbnails in a grid; with ``key``, a small button under each returns the clicked position."""
    clicked = None
    for start in range(0, len(images), columns):
        cells = st.columns(columns)
        for offset, cell in enumerate(cells[: len(images) - start]):
            position = start + offset
            with cell:
                st.image(images[position], caption=captions[position], width="stretch")
                if key is not None and st.button(
                    (buttons or ["Inspect"] * len(images))[position], key=f"{key}-{position}", width="stretch"
                ):
                    clicked = position
    return clicked


THRESHOLD_BY = ("share of samples flagged", "anomaly_score value")


def threshold_control(scores: np.ndarray, default: float, *, key: str) -> float:
    """A threshold on ``scores`` (anomaly_score), starting at ``default``.

    Chosen as the share of samples flagged (a slider in steps of 0.1%: fine wherever the scores
    crowd, however long their tail) or typed as a value. At the slider's starting share the
    threshold is ``default`` itself, not the nearest quantile.
    """
    by = st.radio("Set the threshold by", THRESHOLD_BY, horizontal=True, key=f"{key}_by")
    if by == THRESHOLD_BY[1]:
        magnitude = abs(default) or 1.0
        return float(st.number_input("Threshold on anomaly_score", value=float(default), format="%.6g",
                                     step=10.0 ** (np.floor(np.log10(magnitude)) - 2), key=key,
                                     help="Samples scoring above it are called anomalous."))
    start = round(100.0 * float(np.mean(scores > default)), 1)
    share = st.slider("Share of samples flagged (%)", 0.0, 100.0, start, 0.1, format="%.1f%%", key=f"{key}_share",
                      help="The threshold is set so that this share of the samples scores above it.")
    return float(default) if share == start else float(np.quantile(scores, 1.0 - share / 100.0))
