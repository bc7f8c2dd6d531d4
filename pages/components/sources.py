"""Choosing data: a built-in set, an upload or a path on the server, for the Data page (the data to fit)
and the Score page (new data to score with a run)."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.data.builtin import builtin_sources, prepare_builtin
from core.data.columns import ColumnChoice
from core.data.images import IMAGE_SUFFIXES
from core.data.server_paths import resolve_server_folder
from core.data.tables import TABLE_SUFFIXES
from core.data.uploads import MAX_UPLOAD_MB, earlier_uploads, save_uploads
from core.registry import refinery_home
from pages.components import services, state

UPLOAD_TYPES = sorted({suffix.lstrip(".") for suffix in (*IMAGE_SUFFIXES, *TABLE_SUFFIXES, ".zip")})
UPLOAD_HELP = (f"At most {MAX_UPLOAD_MB} MiB for all the files together. "
               "Larger data: put it on the server and type its path in the next tab.")


def pick_source(verb: str = "Use", prefix: str = "") -> tuple[Path, ColumnChoice, str] | None:
    """Tabs for a built-in set, an upload and a server path, each with a ``verb`` button; returns
    ``(path, column roles, source)`` of the data whose button was pressed in this run, else None.

    ``prefix`` starts every widget key, so that two pages keep their choices apart. A refused choice
    (an upload over the limit, a path that does not exist) raises its error.
    """
    builtin, upload, server = st.tabs(["Built-in data sets", "Upload", "Folder or file on the server"])
    with builtin:
        sources = builtin_sources()
        chosen = st.radio(
            "Data set", sources, key=f"{prefix}builtin_choice", format_func=lambda source: source.title,
            captions=[source.description if source.available else f"Not installed: {source.unavailable_reason}"
                      for source in sources],
        )
        if st.button(f"{verb} this data set", key=f"{prefix}use_builtin", type="primary", disabled=not chosen.available):
            with st.spinner(f"Preparing {chosen.title}..."):
                path = prepare_builtin(chosen.key, services.workspace())
            return path, ColumnChoice(label_column=chosen.label_column), services.builtin_source(chosen.key)
    with upload:
        files = st.file_uploader(
            "Images (several files or one .zip) or one table", type=UPLOAD_TYPES, accept_multiple_files=True,
            key=f"{prefix}upload_files", help=UPLOAD_HELP,
        )
        if st.button(f"{verb} the uploaded files", key=f"{prefix}use_upload", disabled=not files):
            path = save_uploads([(file.name, file.getvalue()) for file in files], services.workspace(),
                                session=state.session_id())
            return path, ColumnChoice(), services.upload_source(path)
        earlier = earlier_uploads(services.workspace(), state.session_id())
        if earlier:
            chosen = st.selectbox("Or an earlier upload of this session", earlier, format_func=lambda path: path.name,
                                  key=f"{prefix}earlier_upload")
            if st.button(f"{verb} this upload", key=f"{prefix}use_earlier_upload"):
                return chosen, ColumnChoice(), services.upload_source(chosen)
    with server:
        typed = st.text_input("Path of a folder of images, a .zip or a table on this server", key=f"{prefix}server_path")
        if st.button(f"{verb} this path", key=f"{prefix}use_server", disabled=not typed):
            return resolve_server_folder(typed, private=[refinery_home()]), ColumnChoice(), services.server_source(typed)
    return None
