"""Every session-state key and query parameter the pages use, in one place.

The studio session's key, the active data with its column roles, the active run, the batch of it that is
viewed and the watched job are mirrored into the URL
(``?session=...&data=...&label=...&id=...&ignore=...&part=...&run=...&batch=...&job=...``) so
that a browser refresh, or the URL opened in a second tab, comes back to the same studio session,
data, run and job. Streamlit clears the URL's parameters on every page change (navigation menu,
``st.page_link``, ``st.switch_page``), so the session keeps them too and puts them back into the URL.

A *studio session* is what one browser works in: its uploads and the runs it starts are private
to it until it shares a run (SECURITY.md, "Sessions"). It is named by a random secret key, made
for a browser that comes without one and kept in the URL; anyone with the URL has the session.
Its public id, a hash of the key (:func:`session_id`), is what the registry and the uploads
folder record.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path

import streamlit as st

from core.data.columns import AUTO, ColumnChoice

# Session-state keys
DATA_PATH = "data_path"              # str: the folder, zip or table being worked on
DATA_SOURCE = "data_source"          # str: how the URL names the active data (the URL's ``data``, see services)
COLUMN_CHOICE = "column_choice"      # ColumnChoice: a table's column roles as the user chose them
COLUMN_ROLES = "column_roles"        # prefix of the Data page's roles editor, one key per loaded table
PROTOCOL = "protocol"                # tuple[float, int] | None: (anomaly ratio, seed) of a contamination protocol
SELECTION = "selection"              # list[int]: sample indices selected on the Embeddings page
INSPECT_QUEUE = "inspect_queue"      # str: which list the Inspect page pages through
INSPECT_POSITION = "inspect_position"  # int: position in that list
INSPECT_ID = "inspect_id"            # str: sample id to open on the Inspect page
ADOPTED_JOB = "adopted_job"          # str: the finished job whose run this session made active
ACTIVE_RUN = "active_run"            # str: the active run's folder (the URL's ``run``, kept across page changes)
WATCHED_JOB = "watched_job"          # str: the watched job's id (the URL's ``job``, kept across page changes)
SESSION_KEY = "session_key"          # str: the studio session's secret key (the URL's ``session``)
COMPARE_WITH = "compare_with"        # str: the run folder a verdict re-run is compared with on the Results page
IN_STUDIO = "in_studio"              # bool: the session runs app.py's navigation (not one page on its own)
VIEWED_BATCH = "viewed_batch"        # str: the batch of the active run that Inspect and Embeddings show (the URL's ``batch``)
TRAIN_PART = "train_part"            # bool: fit an MVTec-layout folder's train/ part only (its test/ part is scored later)
SCORE_JOB = "score_job"              # str: the scoring job this session started last (the Score page says how it ended)
SHOWN_BATCH = "shown_batch"          # str: the finished scoring job whose batch was made the viewed one (once)

# Query parameters
RUN_PARAM = "run"
JOB_PARAM = "job"
SESSION_PARAM = "session"
DATA_PARAM = "data"                  # the active data's source (services.data_source / services.source_path)
LABEL_PARAM = "label"                # a table's label column: absent finds one, "none" = no label
ID_PARAM = "id"                      # its id column: absent finds one ("auto"), "none" = row numbers
IGNORE_PARAM = "ignore"              # its ignored columns, one parameter each (?ignore=a&ignore=b)
BATCH_PARAM = "batch"                # the viewed batch of the run: absent = the run's training data
PART_PARAM = "part"                  # "train": fit only the train/ part of the active MVTec-layout data
TRAIN_PART_VALUE = "train"

KEY_BYTES = 32
"""Random bytes in a new session key (``secrets.token_urlsafe``: 43 URL-safe characters)."""
_KEY_FORMAT = re.compile(r"[A-Za-z0-9_-]{32,128}")


def data_choice() -> tuple[str | None, ColumnChoice, tuple[float, int] | None]:
    """(path, column roles, protocol) of the active data; path None until one is chosen."""
    return (st.session_state.get(DATA_PATH), st.session_state.get(COLUMN_CHOICE, ColumnChoice()),
            st.session_state.get(PROTOCOL))


def data_source() -> str | None:
    """How the URL names the active data (see :func:`choose_data`)."""
    return st.session_state.get(DATA_SOURCE)


def choose_data(path: Path | str, columns: ColumnChoice = ColumnChoice(), source: str | None = None) -> None:
    """Make ``path`` with the column roles ``columns`` the active data (clears a protocol and selection
    made on other data or roles).

    ``source`` is how the URL names it (``?data=...``, with the roles in ``label``, ``id`` and
    ``ignore``), so that a reload restores it; None leaves it out of the URL."""
    if data_choice()[:2] != (str(path), columns):
        st.session_state[PROTOCOL] = None
        # a reload restores the URL's data with its train/-only choice; other data starts without it
        st.session_state[TRAIN_PART] = (source is not None and source == st.query_params.get(DATA_PARAM)
                                        and st.query_params.get(PART_PARAM) == TRAIN_PART_VALUE)
        st.session_state[SELECTION] = []
    st.session_state[DATA_PATH] = str(path)
    st.session_state[COLUMN_CHOICE] = columns
    st.session_state[DATA_SOURCE] = source
    _put_data_in_url()


def requested_data() -> tuple[str, ColumnChoice] | None:
    """(source, column roles) the URL names when they are not this session's active data: a reload, or
    a URL opened in a new tab; None otherwise. A URL without them (a page change cleared it) gets this
    session's back."""
    source = st.query_params.get(DATA_PARAM)
    if source is None:
        _put_data_in_url()
        return None
    columns = ColumnChoice(label_column=st.query_params.get(LABEL_PARAM),
                           id_column=st.query_params.get(ID_PARAM, AUTO),
                           ignore_columns=tuple(st.query_params.get_all(IGNORE_PARAM)))
    if (source, columns) == (data_source(), data_choice()[1]):
        return None
    return source, columns


def forget_requested_data() -> None:
    """Drop a data choice from the URL that could not be restored; this session's own goes back in."""
    for param in (DATA_PARAM, LABEL_PARAM, ID_PARAM, IGNORE_PARAM, PART_PARAM):
        st.query_params.pop(param, None)
    _put_data_in_url()


def _put_data_in_url() -> None:
    source = data_source()
    if source is None:
        return
    columns = data_choice()[1]
    st.query_params[DATA_PARAM] = source
    shown = {LABEL_PARAM: columns.label_column, ID_PARAM: None if columns.id_column == AUTO else columns.id_column,
             IGNORE_PARAM: list(columns.ignore_columns) or None,
             PART_PARAM: TRAIN_PART_VALUE if train_part_only() else None}
    for param, value in shown.items():
        if value is None:
            st.query_params.pop(param, None)
        else:
            st.query_params[param] = value


def _mirrored(param: str, key: str) -> str | None:
    """The URL's value of ``param`` (a link or a refresh), else the session's, put back into the URL."""
    value = st.query_params.get(param)
    if value is not None:
        st.session_state[key] = value
    elif st.session_state.get(key) is not None:
        value = st.session_state[key]
        st.query_params[param] = value
    return value


def _set_mirrored(param: str, key: str, value: str | None) -> None:
    if value is None:
        st.query_params.pop(param, None)
        st.session_state.pop(key, None)
    else:
        st.query_params[param] = value
        st.session_state[key] = value


def session_key() -> str:
    """The studio session's secret key: the URL's (a reload or a copied URL), else this session's,
    else a new random one (a browser that came without a key). A malformed key is replaced."""
    key = _mirrored(SESSION_PARAM, SESSION_KEY)
    if key is None or not _KEY_FORMAT.fullmatch(key):
        key = secrets.token_urlsafe(KEY_BYTES)
        _set_mirrored(SESSION_PARAM, SESSION_KEY, key)
    return key


def session_id() -> str:
    """The studio session's public id (see :func:`session_id_of`)."""
    return session_id_of(session_key())


def session_id_of(key: str) -> str:
    """The public id of the studio session with ``key``: 32 hex digits of its SHA-256, the owner of its
    runs in the registry and the name of its uploads folder. Knowing it grants nothing; the key itself
    is kept only in the URL and this session's state."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()[:32]


def run_dir() -> str | None:
    """The active run's folder (URL, else this session)."""
    return _mirrored(RUN_PARAM, ACTIVE_RUN)


def set_run_dir(path: Path | str | None) -> None:
    if path is not None and run_dir() != str(path):
        st.session_state[SELECTION] = []
        st.session_state[INSPECT_POSITION] = 0
        _set_mirrored(BATCH_PARAM, VIEWED_BATCH, None)  # a batch belongs to its run
    _set_mirrored(RUN_PARAM, ACTIVE_RUN, None if path is None else str(path))


def viewed_batch() -> str | None:
    """The batch of the active run that Inspect and Embeddings show (URL, else this session); None: the
    run's training data."""
    return _mirrored(BATCH_PARAM, VIEWED_BATCH)


def set_viewed_batch(name: str | None) -> None:
    """Show the active run's batch ``name`` (None: its training data) on Inspect and Embeddings."""
    if name != viewed_batch():
        st.session_state[SELECTION] = []
        st.session_state[INSPECT_POSITION] = 0
    _set_mirrored(BATCH_PARAM, VIEWED_BATCH, name)


def train_part_only() -> bool:
    """Whether a fit takes only the train/ part of the active (MVTec-layout) data."""
    return bool(st.session_state.get(TRAIN_PART, False))


def set_train_part_only(value: bool) -> None:
    """Fit only the train/ part of the active data (or all of it); kept in the URL (``?part=train``) with the data."""
    st.session_state[TRAIN_PART] = bool(value)
    _put_data_in_url()


def job_id() -> str | None:
    """The watched job's id (URL, else this session)."""
    return _mirrored(JOB_PARAM, WATCHED_JOB)


def set_job_id(value: str | None) -> None:
    _set_mirrored(JOB_PARAM, WATCHED_JOB, value)


def selection() -> list[int]:
    return list(st.session_state.get(SELECTION, []))


def set_selection(indices: list[int]) -> None:
    st.session_state[SELECTION] = list(indices)


def adopt_job_result(job_id: str, run_dir: Path | str) -> None:
    """Make a finished job's run active, once: later visits keep whatever run the user chose since."""
    if st.session_state.get(ADOPTED_JOB) != job_id:
        st.session_state[ADOPTED_JOB] = job_id
        set_run_dir(run_dir)


def open_in_inspect(sample_id: str) -> None:
    """Ask the Inspect page to show ``sample_id`` next."""
    st.session_state[INSPECT_ID] = sample_id
