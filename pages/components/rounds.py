"""The refinement record of a run or a running job: timeline, per-round histograms and removals."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import streamlit as st

from pages.components import charts, services, state, widgets

STRIP_IMAGES = 16


def show_rounds(
    rounds: Sequence,
    *,
    ids: Sequence[str],
    labels: np.ndarray | None,
    image_path: Callable[[str], str] | None,
    key: str,
    inspectable: bool = True,
) -> None:
    """Timeline plus one tab per round: note, removal precision/recall, score histogram, removed samples.

    ``rounds`` are :class:`core.refine.RefinementRound` (of a running job or a saved run);
    ``image_path`` maps an id to its file (None for tables). ``inspectable`` adds an
    Inspect button under each removed image (not inside a live fragment, which cannot switch pages).
    """
    if not rounds:
        st.caption("No refinement round has finished yet.")
        return
    st.plotly_chart(charts.round_timeline(rounds, len(ids)), key=f"{key}-timeline")
    tabs = st.tabs([f"Round {record.round}" for record in rounds])
    for record, tab in zip(rounds, tabs):
        with tab:
            st.caption(record.note)
            cells = st.columns(5)
            cells[0].metric("Removed", len(record.removed))
            cells[1].metric("Came back", len(record.returned),
                            help="Removed in an earlier round, judged normal by every detector in this one")
            cells[2].metric("Kept", int(np.sum(record.kept)))
            cells[3].metric("Removal precision", "-" if record.precision is None else f"{record.precision:.2f}")
            cells[4].metric("Recall so far", "-" if record.recall is None else f"{record.recall:.2f}")
            if record.gamma_interval is not None:
                st.caption(f"Estimated contamination of the whole training set: {record.gamma:.1%} "
                           f"(90% interval {record.gamma_interval[0]:.1%}-{record.gamma_interval[1]:.1%})")
            removed_mask = np.zeros(len(ids), bool)
            removed_mask[record.removed] = True
            st.plotly_chart(charts.score_histogram(
                record.anomaly_score, threshold=0.0, threshold_name="ensemble threshold", marked=removed_mask,
                title=f"Round {record.round}: consensus anomaly_score of every training sample",
            ), key=f"{key}-histogram-{record.round}")
            _removed_strip(record, ids, labels, image_path, f"{key}-strip-{record.round}" if inspectable else None)


def _removed_strip(record, ids, labels, image_path, key: str | None) -> None:
    shown = record.removed[:STRIP_IMAGES]
    if len(shown) == 0:
        return
    st.markdown(f"**Removed in round {record.round}**, most suspicious first"
                + (f" (first {STRIP_IMAGES} of {len(record.removed)})" if len(record.removed) > STRIP_IMAGES else ""))
    captions = [
        f"{ids[i]} · {record.anomaly_score[i]:.2f}" + ("" if labels is None else (" · labelled anomaly" if labels[i] == 1 else ""))
        for i in shown
    ]
    if image_path is None:
        st.dataframe({"id": [ids[i] for i in shown], "consensus anomaly_score": record.anomaly_score[shown]},
                     hide_index=True)
        return
    clicked = widgets.gallery([services.thumbnail(image_path(ids[i])) for i in shown], captions, key=key)
    if clicked is not None:
        state.open_in_inspect(ids[shown[clicked]])
        st.switch_page("pages/inspect.py")
