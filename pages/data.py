"""Data page: pick a built-in set, upload files or point to a server folder; see what was found."""
from pathlib import Path

import numpy as np
import streamlit as st

from core.data.images import IMAGE_SUFFIXES
from core.data.sources import (
    builtin_sources,
    earlier_uploads,
    prepare_builtin,
    resolve_server_folder,
    save_uploads,
)
from core.data.tables import TABLE_SUFFIXES
from core.store import refinery_home
from pages.components import services, state, widgets

PREVIEW_IMAGES = 24
UPLOAD_TYPES = sorted({suffix.lstrip(".") for suffix in (*IMAGE_SUFFIXES, *TABLE_SUFFIXES, ".zip")})


def choose_source() -> None:
    builtin, upload, server = st.tabs(["Built-in data sets", "Upload", "Folder or file on the server"])
    with builtin:
        sources = builtin_sources()
        chosen = st.radio(
            "Data set", sources, key="builtin_choice", format_func=lambda source: source.title,
            captions=[source.description if source.available else f"Not installed: {source.unavailable_reason}"
                      for source in sources],
        )
        if st.button("Use this data set", key="use_builtin", type="primary", disabled=not chosen.available):
            with st.spinner(f"Preparing {chosen.title}..."):
                path = prepare_builtin(chosen.key, services.workspace())
            services.use_data(path, chosen.label_column, services.builtin_source(chosen.key))
    with upload:
        files = st.file_uploader(
            "Images (several files or one .zip) or one table", type=UPLOAD_TYPES, accept_multiple_files=True,
            key="upload_files",
        )
        label_column = st.text_input("Label column of a table (optional; used for metrics only)", key="upload_label")
        if st.button("Use the uploaded files", key="use_upload", disabled=not files):
            path = save_uploads([(file.name, file.getvalue()) for file in files], services.workspace(),
                                session=state.session_id())
            services.use_data(path, label_column or None, services.upload_source(path))
        earlier = earlier_uploads(services.workspace(), state.session_id())
        if earlier:
            chosen = st.selectbox("Or an earlier upload of this session", earlier, format_func=lambda path: path.name,
                                  key="earlier_upload")
            if st.button("Use this upload", key="use_earlier_upload"):
                services.use_data(chosen, label_column or None, services.upload_source(chosen))
    with server:
        typed = st.text_input("Path of a folder of images, a .zip or a table on this server", key="server_path")
        server_label = st.text_input("Label column of a table (optional)", key="server_label")
        if st.button("Use this path", key="use_server", disabled=not typed):
            services.use_data(resolve_server_folder(typed, private=[refinery_home()]), server_label or None,
                              services.server_source(typed))


def show_dataset(path: str, label_column: str | None) -> None:
    dataset = services.dataset(path, label_column)
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
        st.dataframe(dataset.table.head(50))
        return
    shown = np.arange(len(dataset))[:: max(1, len(dataset) // PREVIEW_IMAGES)][:PREVIEW_IMAGES]
    widgets.gallery(
        [services.thumbnail(str(dataset.paths[i])) for i in shown],
        [dataset.ids[i] for i in shown],
    )


def protocol_form(path: str, label_column: str | None, protocol) -> None:
    dataset = services.dataset(path, label_column)
    if not dataset.has_labels:
        return
    with st.expander("Contamination protocol (benchmarks and demos)", expanded=protocol is not None):
        st.caption("Train on 80% of the normal samples plus labelled anomalies making up the chosen share "
                   "(the STOC/SRR protocol). Labels stay for display and metrics; nothing trains on them.")
        ratio = st.slider("Anomalies in training", 0.0, 0.3, 0.1, 0.01, key="protocol_ratio")
        seed = st.number_input("Seed", 0, 10_000, 0, key="protocol_seed")
        left, right = st.columns(2)
        if left.button("Apply protocol", key="apply_protocol"):
            services.protocol_dataset(path, label_column, ratio, int(seed))
            st.session_state[state.PROTOCOL] = (ratio, int(seed))
            st.rerun()
        if protocol is not None:
            st.success(services.protocol_dataset(path, label_column, *protocol).description)
            if right.button("Remove protocol", key="clear_protocol"):
                st.session_state[state.PROTOCOL] = None
                st.rerun()


def body() -> None:
    st.title("Data")
    widgets.guarded(choose_source)  # a refused choice (one that does not load) shows its message; the active data stays below
    path, label_column, protocol = services.active_data()
    show_dataset(path, label_column)
    protocol_form(path, label_column, protocol)
    widgets.page_link("pages/refine.py", "Next: refine this data", ":material/arrow_forward:")


widgets.guarded(body)
