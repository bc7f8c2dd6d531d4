"""The refinement record of a run or a running job: timeline, per-round histograms and removals."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import streamlit as st

from core.data.columns import cell_text
from pages.components import charts, navigation, services, widgets

STRIP_IMAGES = 16
CONFIRMED = "confirmed anomaly (expert)"
"""What a removed sample shows instead of votes and a margin when the expert's verdict removed it."""


MARGIN_HELP = (
    "Consensus margin: how far past the detectors' thresholds a sample lies, averaged over the detectors "
    "that did not train on it, in units of each detector's score spread (0 = at the threshold, positive = "
    "beyond it). It only orders the removed samples, most suspicious first; the votes decide removal. It is "
    "not the run's anomaly_score, which the final detector gives and every other page shows."
)


def show_rounds(
    rounds: Sequence,
    *,
    ids: Sequence[str],
    labels: np.ndarray | None,
    image_path: Callable[[str], str] | None,
    key: str,
    inspectable: bool = True,
    anomaly_score: np.ndarray | None = None,
    values: pd.DataFrame | None = None,
) -> None:
    """Timeline plus one tab per round: note, removal precision/recall, the detectors' votes, removed samples.

    ``rounds`` are :class:`core.refine.RefinementRound` (of a running job or a saved run);
    ``image_path`` maps an id to its file (None for tables). ``inspectable`` adds an
    Inspect button under each removed image (not inside a live fragment, which cannot switch pages).
    ``anomaly_score`` (N,) is the saved run's score of each sample (None while the fit runs), shown
    next to each removed sample so that it reads as on every other page. ``values`` (a table's feature
    columns, one row per sample) puts each removed row's values beside it, with the features outside the
    typical range (5-95%) of the rows kept in that round.
    """
    if not rounds:
        st.caption("No refinement round has finished yet.")
        return
    st.plotly_chart(charts.round_timeline(rounds, len(ids)), key=f"{key}-timeline")
    tabs = st.tabs([f"Round {record.round}" for record in rounds])
    kept_before = np.ones(len(ids), bool)
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
            ensemble = len(record.thresholds)
            st.plotly_chart(charts.vote_bars(
                record.votes, ensemble, round_outcomes(record, kept_before),
                title=f"Round {record.round}: how many of the {ensemble} detectors flagged each training sample",
            ), key=f"{key}-votes-{record.round}")
            st.caption(f"Each of the {ensemble} detectors flags about the {record.gamma:.1%} of samples it scores "
                       "as most anomalous (its threshold is set on samples it did not train on); a sample is kept "
                       "only if none flags it.")
            _removed_strip(record, ids, labels, image_path, anomaly_score, values,
                           f"{key}-strip-{record.round}" if inspectable else None)
            kept_before = record.kept


def round_outcomes(record, kept_before: np.ndarray) -> dict[str, np.ndarray]:
    """Disjoint (N,) masks of what ``record`` did to each sample, given who was kept before it."""
    removed = np.zeros(len(record.kept), bool)
    removed[record.removed] = True
    out = ~record.kept
    return {
        "kept": record.kept & (record.votes <= 0),
        "removed in this round": removed,
        "still out (removed earlier)": out & ~removed & ~kept_before,
        "flagged, kept (removal cap or an expert's verdict)": record.kept & (record.votes > 0),
    }


def outside_typical(values: pd.DataFrame, kept: np.ndarray, rows: np.ndarray) -> list[str]:
    """For each of ``rows``, its numeric features outside the 5-95% range of the ``kept`` rows, comma-separated."""
    numeric = values.select_dtypes("number")
    low, high = numeric[kept].quantile(0.05), numeric[kept].quantile(0.95)
    chosen = numeric.iloc[rows]
    outside = (chosen < low) | (chosen > high)
    return [", ".join(numeric.columns[flags]) for flags in outside.to_numpy()]


def _removed_strip(record, ids, labels, image_path, anomaly_score, values, key: str | None) -> None:
    shown = record.removed[:STRIP_IMAGES]
    if len(shown) == 0:
        return
    st.markdown(f"**Removed in round {record.round}**, largest consensus margin first"
                + (f" (first {STRIP_IMAGES} of {len(record.removed)})" if len(record.removed) > STRIP_IMAGES else ""),
                help=MARGIN_HELP)
    ensemble = len(record.thresholds)
    # A confirmed anomaly is removed before round 1 unjudged: no votes (-1), no consensus margin (NaN).
    votes = [(CONFIRMED if record.votes[i] < 0 else f"{record.votes[i]}/{ensemble} votes") for i in shown]
    margin = [("-" if np.isnan(record.anomaly_score[i]) else f"{record.anomaly_score[i]:+.1f}") for i in shown]
    if image_path is None:
        table = {"id": [ids[i] for i in shown], "votes": votes, "consensus margin": margin}
        if anomaly_score is not None:
            table["anomaly_score"] = [charts.score_text(anomaly_score[i]) for i in shown]
        if values is not None:  # the rows in context: what lies outside the kept rows' range, then the values
            table["outside the kept rows' 5-95%"] = outside_typical(values, record.kept, shown)
            table |= {str(column): [cell_text(values[column].iat[i]) for i in shown] for column in values.columns}
        st.dataframe(table, hide_index=True)
        return
    captions = [
        f"{ids[i]} · {vote}" + ("" if vote == CONFIRMED else f" · margin {m}")
        + ("" if anomaly_score is None else f" · anomaly_score {charts.score_text(anomaly_score[i])}")
        + ("" if labels is None else (" · labelled anomaly" if labels[i] == 1 else ""))
        for i, vote, m in zip(shown, votes, margin)
    ]
    clicked = widgets.gallery([services.thumbnail(image_path(ids[i])) for i in shown], captions, key=key)
    if clicked is not None:
        navigation.inspect_sample(ids[shown[clicked]])
