"""Data page: pick a built-in set, upload files or point to a server folder; see what was found and,
for a table, what each column is for (its role)."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from core.data.parts import has_mvtec_layout
from core.data.columns import ID, LABEL, ROLES, ColumnChoice, chosen_roles, role_of
from core.errors import RefineryError
from pages.components import navigation, services, sources, state, widgets

PREVIEW_IMAGES = 24
ROLES_HELP = ("id: names the row in every output, never a feature. feature: what the fit measures. "
              "label: 0/1 (1 = anomaly), used for metrics only. ignore: left out.")


def choose_source() -> None:
    chosen = sources.pick_source()
    if chosen is not None:
        services.use_data(*chosen)
    st.caption("A table's columns get their roles (id, feature, label, ignore) below, once it is loaded.")


def show_dataset(path: str, columns: ColumnChoice) -> None:
    dataset = services.dataset(path, columns)
    labels = dataset.labels
    st.subheader(Path(path).name)
    cells = st.columns(5)
    cells[0].metric("Kind", dataset.kind)
    cells[1].metric("Samples", len(dataset))
    cells[2].metric("Labelled anomalous", int(np.sum(labels == 1)) if labels is not None else "-")
    cells[3].metric("Masks", len(dataset.masks))
    cells[4].metric("Skipped files", len(dataset.skipped))
    if labels is None:
        st.caption("No labels found: fine for refinement; metrics need labels (folders good/ and other/, "
                   "an MVTec layout, or a table's label column).")
    if dataset.skipped:
        with st.expander(f"{len(dataset.skipped)} files could not be used and were skipped"):
            st.dataframe([{"file": item.name, "reason": item.reason} for item in dataset.skipped], hide_index=True)
    if dataset.kind == "table":
        st.dataframe(dataset.table.head(50).set_axis(pd.Index(dataset.ids[:50], name="id")))
        column_roles(path, dataset)
        return
    shown = np.arange(len(dataset))[:: max(1, len(dataset) // PREVIEW_IMAGES)][:PREVIEW_IMAGES]
    widgets.gallery(
        [services.thumbnail(str(dataset.paths[i])) for i in shown],
        [dataset.ids[i] for i in shown],
    )


def column_roles(path: str, dataset) -> None:
    """Every column of the table with its role, which the user may change and apply (the data reloads)."""
    if not dataset.columns:  # .npz and .mat tables: features and labels are arrays, not named columns
        return
    st.subheader("Columns")
    st.caption(ROLES_HELP)
    shown = pd.DataFrame([{"column": p.name, "role": p.role, "type": p.kind, "distinct": p.distinct,
                           "missing": p.missing, "example": p.example, "why / problem": p.problem or p.reason}
                          for p in dataset.columns])
    edited = st.data_editor(
        shown, hide_index=True, key=f"{state.COLUMN_ROLES}-{dataset.fingerprint}",
        disabled=[name for name in shown.columns if name != "role"],
        column_config={"role": st.column_config.SelectboxColumn("role", options=ROLES, required=True)},
    )
    widgets.column_problems(dataset)
    if st.button("Apply column roles", key="apply_roles"):
        apply_roles(path, dataset, list(edited["role"]))


def apply_roles(path: str, dataset, roles: list[str]) -> None:
    """Reload the active data with ``roles`` (one per column); a message instead when a table would
    get two ids or two labels, or the loader refuses the roles (an id column that repeats a value)."""
    profiles = [replace(profile, role=role) for profile, role in zip(dataset.columns, roles)]
    for role in (ID, LABEL):
        if len(role_of(profiles, role)) > 1:
            st.error(f"A table has at most one {role} column, not {' and '.join(role_of(profiles, role))}: "
                     "give all but one of them another role.")
            return
    try:
        services.use_data(path, chosen_roles(profiles), state.data_source())
    except RefineryError as error:
        st.error(f"The roles were not applied, the data keeps its roles: {error}")


def protocol_form(path: str, columns: ColumnChoice, protocol) -> None:
    dataset = services.dataset(path, columns)
    if not dataset.has_labels:
        return
    with st.expander("Contamination protocol (benchmarks and demos)", expanded=protocol is not None):
        st.caption("Train on 80% of the normal samples plus labelled anomalies making up the chosen share "
                   "(the STOC/SRR protocol). Labels stay for display and metrics; nothing trains on them.")
        ratio = st.slider("Anomalies in training", 0.0, 0.3, 0.1, 0.01, key="protocol_ratio")
        seed = st.number_input("Seed", 0, 10_000, 0, key="protocol_seed")
        left, right = st.columns(2)
        if left.button("Apply protocol", key="apply_protocol"):
            services.protocol_dataset(path, columns, ratio, int(seed))
            st.session_state[state.PROTOCOL] = (ratio, int(seed))
            st.rerun()
        if protocol is not None:
            st.success(services.protocol_dataset(path, columns, *protocol).description)
            if right.button("Remove protocol", key="clear_protocol"):
                st.session_state[state.PROTOCOL] = None
                st.rerun()


def mvtec_form(path: str, columns: ColumnChoice) -> None:
    """For an MVTec-layout folder: fit on its train/ part only, and score its test/ part later as a batch."""
    dataset = services.dataset(path, columns)
    if not has_mvtec_layout(dataset):
        return
    st.toggle("Fit on train/ only", key="train_part_toggle", value=state.train_part_only(),
              on_change=lambda: state.set_train_part_only(st.session_state["train_part_toggle"]),
              help="This folder has the MVTec layout (train/good and test/<defect>). Fit on the train/ images "
                   "only; then score the test/ images with the run on the Score page, as new data.")
    if state.train_part_only():
        st.caption(f"The fit takes the {len(services.train_part(path, columns))} images under train/; "
                   "the Score page offers test/ as a batch once the run exists.")


def body() -> None:
    st.title("Data")
    widgets.guarded(choose_source)  # a refused choice (one that does not load) shows its message; the active data stays below
    path, columns, protocol = services.active_data()
    show_dataset(path, columns)
    mvtec_form(path, columns)
    protocol_form(path, columns, protocol)
    navigation.link(navigation.REFINE, "Next: refine this data", ":material/arrow_forward:")


widgets.guarded(body)
