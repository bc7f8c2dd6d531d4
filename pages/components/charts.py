"""Plotly figures of the studio. Inputs are arrays from the engine; no decisions are made here."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core.results import ScoreAxis, score_axis, score_text, tick_text

WEBGL_FROM_POINTS = 2_000
KEPT_COLOUR, REMOVED_COLOUR = "#2563eb", "#dc2626"
OUTCOME_COLOURS = (REMOVED_COLOUR, "#9ca3af", "#f59e0b")


def _layout(figure: go.Figure, title: str, height: int = 320) -> go.Figure:
    """Title, height and margins; a horizontal legend above the plot, right-aligned, clear of the x axis title."""
    figure.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=60, b=10),
                         legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1.0,
                                     traceorder="normal"))
    return figure


def round_timeline(rounds: Sequence, n_samples: int) -> go.Figure:
    """Stacked bars per round: samples kept after it and samples it removed."""
    names = [f"round {record.round}" for record in rounds]
    removed = [len(record.removed) for record in rounds]
    kept = [int(np.sum(record.kept)) for record in rounds]
    figure = go.Figure([
        go.Bar(name="kept", x=names, y=kept, marker_color=KEPT_COLOUR),
        go.Bar(name="removed in this round", x=names, y=removed, marker_color=REMOVED_COLOUR),
    ])
    figure.update_layout(barmode="stack", yaxis_title="samples", yaxis_range=[0, n_samples])
    return _layout(figure, "Refinement timeline")


BINS = 40
LABEL_ROW = 0.09
"""Height of one threshold label's row, as a share of the plot area (each label has a row of its own)."""


def score_histogram(
    scores: np.ndarray,
    *,
    threshold: float,
    threshold_name: str,
    marked: np.ndarray | None = None,
    marked_name: str = "removed",
    unmarked_name: str = "others",
    other_lines: dict[str, float] | None = None,
    title: str = "",
) -> go.Figure:
    """Histogram of ``scores`` (NaN dropped), ``marked`` samples stacked in red, labelled threshold lines.

    The x axis spans every score and every line (no sample is cut off); it is linear or logarithmic
    as :func:`score_axis` decides, and its title says which. Each line's label has a row of its own,
    so labels never overlap however close the lines are.
    """
    scores = np.asarray(scores, dtype=np.float64)
    valid = np.isfinite(scores)
    marked = np.zeros(len(scores), bool) if marked is None else np.asarray(marked, bool)
    axis = score_axis(scores[valid])
    position = axis.forward(scores[valid])
    lines = {threshold_name: float(threshold), **(other_lines or {})}
    line_positions = axis.forward(np.array(list(lines.values()), dtype=np.float64))
    low, high = (float(np.min(position)), float(np.max(position))) if len(position) else (0.0, 1.0)
    edges = np.linspace(low, high, BINS + 1) if high > low else np.array([low - 0.5, low + 0.5])
    width = edges[1] - edges[0]
    bounds = np.column_stack([axis.inverse(edges[:-1]), axis.inverse(edges[1:])])
    ranges = [f"{score_text(low)} to {score_text(high)}" for low, high in bounds]
    figure = go.Figure()
    peak = 1
    stacked = np.zeros(len(edges) - 1)
    for name, selector, colour in ((unmarked_name, ~marked[valid], KEPT_COLOUR), (marked_name, marked[valid], REMOVED_COLOUR)):
        if not selector.any():
            continue
        counts, _ = np.histogram(position[selector], bins=edges)
        stacked += counts
        figure.add_trace(go.Bar(
            x=(edges[:-1] + edges[1:]) / 2, y=counts, width=width, name=name, marker_color=colour, customdata=bounds,
            hovertext=ranges, hovertemplate="anomaly_score %{hovertext}: %{y} samples<extra>%{fullData.name}</extra>",
        ))
        peak = max(peak, int(stacked.max()))
    # Labels take the top rows of the plot area; the bars stay below them.
    headroom = 1.0 - LABEL_ROW * len(lines) - 0.02
    span = (min(low, *line_positions) - width / 2, max(high, *line_positions) + width / 2)
    figure.update_layout(barmode="stack", bargap=0.05, yaxis_title="samples", yaxis_range=[0, peak / headroom],
                         xaxis_title=f"anomaly_score, {axis.scale} scale (higher = more anomalous)",
                         xaxis_range=list(span))
    if axis.scale != "linear":
        ticks = _nice_ticks(axis, span)
        figure.update_xaxes(tickvals=axis.forward(ticks), ticktext=[tick_text(value) for value in ticks])
    for row, ((name, value), x) in enumerate(zip(lines.items(), line_positions)):
        figure.add_vline(x=x, line_dash="dash" if row else "solid", line_color="#6b7280" if row else "#111827")
        on_right = (x - span[0]) > 0.7 * (span[1] - span[0])  # the label reads away from the plot's edge
        figure.add_annotation(
            x=x, xref="x", y=1.0 - row * LABEL_ROW, yref="paper", yanchor="top", xanchor="right" if on_right else "left",
            text=f"{name}: {score_text(value)}", showarrow=False, bgcolor="rgba(255,255,255,0.85)", font_size=12,
        )
    return _layout(figure, title)


def _nice_ticks(axis: ScoreAxis, span: tuple[float, float]) -> np.ndarray:
    """Round scores (0 and 1, 2, 5 x 10^k) spread over ``span`` of ``axis``, none closer than a ninth of it."""
    low, high = axis.inverse(np.array(span))
    top = int(np.ceil(np.log10(max(abs(low), abs(high), 1e-12))))
    candidates = [(0.0, True)] + [(sign * m * 10.0**k, m == 1) for k in range(top - 12, top + 1)
                                  for m in (1, 2, 5) for sign in (1, -1)]
    gap = (span[1] - span[0]) / 9
    chosen: list[float] = []
    for powers_of_ten in (True, False):  # powers of ten first, then 2 and 5 where there is room
        for value, is_power in candidates:
            if is_power != powers_of_ten or not low <= value <= high:
                continue
            where = axis.forward(np.array([value]))[0]
            if np.isfinite(where) and all(abs(where - axis.forward(np.array([c]))[0]) >= gap for c in chosen):
                chosen.append(value)
    return np.array(sorted(chosen))


def with_score_text(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its ``anomaly_score`` column as :func:`score_text` writes it, for a table on a page."""
    return frame.assign(anomaly_score=frame["anomaly_score"].map(score_text))




def vote_bars(
    votes: np.ndarray,
    ensemble: int,
    outcomes: dict[str, np.ndarray],
    *,
    title: str = "",
) -> go.Figure:
    """Stacked bars of samples by how many of the ``ensemble`` detectors flagged them, one colour per outcome.

    ``votes`` (N,) int: detectors that flagged each sample, -1 where none judged it (an expert's
    confirmed anomaly, shown as its own bar left of 0). ``outcomes`` maps a name to an (N,) bool mask
    (disjoint); the first is drawn in blue, the others in ``OUTCOME_COLOURS``. A line between 0 and 1
    marks the rule of refinement: a sample is kept only while no detector flags it.
    """
    votes = np.asarray(votes)
    positions = np.arange(-1 if np.any(votes < 0) else 0, ensemble + 1)
    figure = go.Figure()
    stacked = np.zeros(len(positions), dtype=np.int64)
    for (name, mask), colour in zip(outcomes.items(), (KEPT_COLOUR, *OUTCOME_COLOURS)):
        mask = np.asarray(mask, bool)
        if mask.any():
            counts = [int(np.sum(mask & (votes == v))) for v in positions]
            stacked += counts
            figure.add_trace(go.Bar(x=positions.tolist(), y=counts, name=name, marker_color=colour,
                                    hovertemplate="%{y} samples<extra>%{fullData.name}</extra>"))
    labels = [("expert: anomaly" if v < 0 else f"{v} of {ensemble}") for v in positions]
    figure.update_layout(barmode="stack", yaxis_title="samples", xaxis_title="detectors that flagged the sample",
                         yaxis_range=[0, max(int(stacked.max()), 1) / (1.0 - LABEL_ROW - 0.02)],  # room for the labels
                         xaxis=dict(tickvals=positions.tolist(), ticktext=labels,
                                    range=[positions[0] - 0.5, ensemble + 0.5]))
    figure.add_vline(x=0.5, line_color="#111827")
    for text, anchor in (("none flagged: kept ", "right"), (" flagged: removed", "left")):
        figure.add_annotation(x=0.5, xref="x", y=1.0, yref="paper", yanchor="top", xanchor=anchor, showarrow=False,
                              text=text, font_size=12, bgcolor="rgba(255,255,255,0.85)")
    return _layout(figure, title)


def scatter_map(
    layout: np.ndarray,
    colour: np.ndarray,
    *,
    colour_name: str,
    categorical: bool,
    hover: Sequence[str],
) -> go.Figure:
    """2-D map of the samples; WebGL from ``WEBGL_FROM_POINTS`` points on. ``customdata`` = sample index."""
    trace_type = go.Scattergl if len(layout) >= WEBGL_FROM_POINTS else go.Scatter
    index = np.arange(len(layout))
    figure = go.Figure()
    if categorical:
        values = np.asarray(colour).astype(str)
        for value in sorted(set(values)):
            chosen = values == value
            figure.add_trace(trace_type(
                x=layout[chosen, 0], y=layout[chosen, 1], mode="markers", name=value, customdata=index[chosen],
                text=np.asarray(hover)[chosen], hovertemplate="%{text}<extra></extra>", marker=dict(size=6),
            ))
    else:  # anomaly scores are heavy-tailed: spread the colours over the 2nd-98th percentile
        low, high = np.nanquantile(colour, [0.02, 0.98])
        figure.add_trace(trace_type(
            x=layout[:, 0], y=layout[:, 1], mode="markers", customdata=index, text=list(hover),
            hovertemplate="%{text}<extra></extra>",
            marker=dict(size=6, color=colour, colorscale="Turbo", cmin=low, cmax=high,
                        colorbar=dict(title=colour_name)),
        ))
    figure.update_layout(dragmode="lasso", xaxis_visible=False, yaxis_visible=False)
    return _layout(figure, "", height=600)


def roc_and_pr(curves) -> tuple[go.Figure, go.Figure]:
    """ROC and precision-recall figures from :class:`core.results.Curves`."""
    roc = go.Figure([go.Scatter(x=curves.fpr, y=curves.tpr, mode="lines", name="ROC"),
                     go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line_dash="dot", name="chance")])
    roc.update_layout(xaxis_title="false positive rate", yaxis_title="true positive rate")
    pr = go.Figure([go.Scatter(x=curves.recall, y=curves.precision, mode="lines", name="PR")])
    pr.update_layout(xaxis_title="recall", yaxis_title="precision", yaxis_range=[0, 1.02])
    return _layout(roc, "ROC curve"), _layout(pr, "Precision-recall curve")


def feature_bars(features: Sequence[str], shares: Sequence[float]) -> go.Figure:
    """Horizontal bars: each feature's share of a row's anomaly score, largest on top."""
    figure = go.Figure(go.Bar(x=list(shares)[::-1], y=list(features)[::-1], orientation="h",
                              marker_color=REMOVED_COLOUR))
    figure.update_layout(xaxis_title="share of the row's anomaly score", xaxis_tickformat=".0%")
    return _layout(figure, "Top deviating features", height=260)
