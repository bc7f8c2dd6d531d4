"""Plotly figures of the studio. Inputs are arrays from the engine; no decisions are made here."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

WEBGL_FROM_POINTS = 2_000
KEPT_COLOUR, REMOVED_COLOUR = "#2563eb", "#dc2626"


def _layout(figure: go.Figure, title: str, height: int = 320) -> go.Figure:
    figure.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=40, b=10), legend_orientation="h")
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


def score_histogram(
    scores: np.ndarray,
    *,
    threshold: float,
    threshold_name: str,
    marked: np.ndarray | None = None,
    marked_name: str = "removed",
    other_lines: dict[str, float] | None = None,
    title: str = "",
) -> go.Figure:
    """Histogram of ``scores`` (NaN dropped), ``marked`` samples stacked in red, threshold lines."""
    scores = np.asarray(scores, dtype=np.float64)
    valid = np.isfinite(scores)
    marked = np.zeros(len(scores), bool) if marked is None else np.asarray(marked, bool)
    edges = np.histogram_bin_edges(scores[valid], bins=40)
    figure = go.Figure()
    for name, selector, colour in (("others", valid & ~marked, KEPT_COLOUR), (marked_name, valid & marked, REMOVED_COLOUR)):
        if selector.any():
            figure.add_trace(go.Histogram(x=scores[selector], name=name, marker_color=colour,
                                          xbins=dict(start=edges[0], end=edges[-1], size=edges[1] - edges[0])))
    figure.update_layout(barmode="stack", xaxis_title="anomaly_score (higher = more anomalous)", yaxis_title="samples")
    for index, (name, value) in enumerate({threshold_name: threshold, **(other_lines or {})}.items()):
        figure.add_vline(x=value, line_dash="dash" if index else "solid", line_color="#111827" if not index else "#6b7280",
                         annotation_text=name, annotation_position="top right" if not index else "top left")
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
