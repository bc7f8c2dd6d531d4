"""Embeddings page: the UMAP map of a run's samples, coloured and sliced by round; select to browse."""
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.data.columns import cell_text
from pages.components import charts, navigation, runs, services, state, widgets

GALLERY_LIMIT = 48
LABEL_NAMES = {0: "normal", 1: "anomaly", -1: "unknown"}
COLOURINGS = ("anomaly_score", "kept / removed", "round removed", "label", "verdict")
BATCH_COLOURINGS = ("anomaly_score", "label", "verdict")  # a batch was scored, not refined
TRAINING_COLOUR = "#d4d4d8"
COLUMN_COLOURING = "column: "   # a table's feature column, e.g. "column: site"
HOVER_COLUMNS = 6               # a table row's first feature values shown on hover
# Samples removed in round 1, 2, ...: reds and oranges, so that removed reads red beside the blue kept
# (a string here would be drawn on the page: Streamlit's magic shows a page's bare expressions).
ROUND_COLOURS = (charts.REMOVED_COLOUR, "#f97316", "#9f1239", "#f43f5e", "#c2410c", "#fb923c")


def colouring(run, name: str, round_number: int, verdicts: dict, table: pd.DataFrame | None) -> tuple[np.ndarray, bool]:
    """Values to colour by and whether they are categories (``table``: a table run's feature columns)."""
    samples = run.samples
    if name.startswith(COLUMN_COLOURING):
        column = table[name.removeprefix(COLUMN_COLOURING)]
        numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
        return (column.to_numpy() if numeric else column.astype(str).to_numpy()), not numeric
    if name == "anomaly_score":
        return samples["anomaly_score"].to_numpy(), False
    if name == "kept / removed":
        return np.where(run.kept_after(round_number), "kept", "removed"), True
    if name == "round removed":
        removed_in = samples["round_removed"].to_numpy()
        return np.where((removed_in > 0) & (removed_in <= round_number), "round " + removed_in.astype(str), "kept"), True
    if name == "label":
        return samples["label"].map(LABEL_NAMES).to_numpy(), True
    return np.array([verdicts.get(i, ("no verdict", ""))[0] for i in samples["id"]]), True


def outcome_colours(figure) -> None:
    """Kept samples blue and removed ones red on the map, as in every chart of the studio."""
    for trace in figure.data:
        if trace.name == "kept":
            trace.marker.color = charts.KEPT_COLOUR
        elif trace.name == "removed":
            trace.marker.color = charts.REMOVED_COLOUR
        elif trace.name.startswith("round "):
            trace.marker.color = ROUND_COLOURS[(int(trace.name.split()[1]) - 1) % len(ROUND_COLOURS)]


def hover_texts(run, table: pd.DataFrame | None) -> list[str]:
    """Each point's hover: id, anomaly_score and rank, and a table row's first feature values."""
    texts = [f"{i} · anomaly_score {charts.score_text(s)} · rank {r}"
             for i, s, r in zip(run.samples["id"], run.samples["anomaly_score"], run.samples["rank"])]
    if table is None:
        return texts
    columns = [[f"{name} {cell_text(value)}" for value in table[name]] for name in table.columns[:HOVER_COLUMNS]]
    return [f"{text}<br>{' · '.join(values)}" for text, *values in zip(texts, *columns)]


def selected_gallery(run, selected: list[int], table: pd.DataFrame | None) -> None:
    order = sorted(selected, key=lambda i: -run.samples["anomaly_score"].iat[i])[:GALLERY_LIMIT]
    st.subheader(f"{len(selected)} selected" + (f" (the {GALLERY_LIMIT} most anomalous shown)" if len(selected) > GALLERY_LIMIT else ""))
    ids = run.samples["id"].to_numpy()
    if run.kind != "images":
        rows = charts.with_score_text(run.samples.iloc[order])
        if table is not None:  # the rows in context: their values beside their scores
            rows = pd.concat([rows.reset_index(drop=True), table.iloc[order].reset_index(drop=True)], axis=1)
        st.dataframe(rows, hide_index=True)
        return
    captions = [f"{ids[i]} · {charts.score_text(run.samples['anomaly_score'].iat[i])}" for i in order]
    clicked = widgets.gallery([services.thumbnail(str(run.image_path(ids[i]))) for i in order], captions, key="selected")
    if clicked is not None:
        navigation.inspect_sample(ids[order[clicked]])


def with_training_backdrop(figure, layout: np.ndarray) -> None:
    """The run's training samples in grey under a batch's points (no customdata: they cannot be selected)."""
    figure.add_trace(go.Scattergl(x=layout[:, 0], y=layout[:, 1], mode="markers", name="training data",
                                  hoverinfo="skip", marker=dict(size=5, color=TRAINING_COLOUR)))
    figure.data = (figure.data[-1], *figure.data[:-1])  # drawn first, so underneath
    for trace in figure.data[1:]:
        trace.name = trace.name or "this batch"  # a score-coloured batch is one trace, unnamed ("trace 1")


def body() -> None:
    st.title("Embeddings")
    run_dir = widgets.require_run()
    if run_dir is None:
        return
    run = runs.viewed(run_dir)  # the training data, or a batch of new data scored with the run
    batch = run is not runs.run_results(run_dir)
    layouts = runs.layouts(run_dir)
    verdicts = services.registry().verdicts(run.fingerprint, visible_to=state.session_id())
    table = runs.viewed_values(run_dir, run)
    choices = [name for name in (BATCH_COLOURINGS if batch else COLOURINGS)
               if (name != "label" or run.labels is not None) and (name != "verdict" or verdicts)]
    choices += [] if table is None else [COLUMN_COLOURING + str(column) for column in table.columns]
    left, right = st.columns([1, 2])
    colour_name = left.selectbox("Colour by", choices, key="batch_colour_by" if batch else "colour_by")
    round_number = 0 if batch else len(run.rounds)
    if batch:
        right.caption("The batch's samples are placed on the run's map (after its last round), where its "
                      "training samples most like them lie; the training samples are grey.")
    elif run.rounds:
        round_number = right.slider("After refinement round", 0, len(run.rounds), len(run.rounds), key="map_round",
                                    help="Round 0 is the data before refinement.")
    values, categorical = colouring(run, colour_name, round_number, verdicts, table)
    hover = hover_texts(run, table)
    layout = run.placement if batch else layouts[min(round_number, len(layouts) - 1)]
    figure = charts.scatter_map(layout, values, colour_name=colour_name, categorical=categorical, hover=hover)
    if batch:
        with_training_backdrop(figure, layouts[-1])
    if colour_name in ("kept / removed", "round removed"):
        outcome_colours(figure)
    event = st.plotly_chart(figure, on_select="rerun", selection_mode=("points", "box", "lasso"), key="map")
    points = [point for point in event.selection.points if point.get("customdata") is not None] if event else []
    picked = sorted({int(np.ravel(point["customdata"])[0]) for point in points})  # the grey backdrop is not selectable
    if picked:
        state.set_selection(picked)
    st.caption("Drag a box or lasso round points (or click one) to list them below; Inspect opens one.")
    if state.selection():
        selected_gallery(run, state.selection(), table)


widgets.guarded(body)
