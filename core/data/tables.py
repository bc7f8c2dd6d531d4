"""Tables: ``.csv``, ``.parquet``, ``.npz`` and ``.mat`` files as a table :class:`Dataset`.

The loader keeps the raw feature columns: no encoding, scaling or NaN handling here (the tabular
encoder in :mod:`core.models` does that). Labels are used for metrics only and never stay in the
feature table.

- ``.csv``: UTF-8 (a byte-order mark is accepted), first row is the header; the delimiter is sniffed
  among ``, ; TAB |`` from the first 64 KB (comma when undecidable). In a semicolon table, a text
  column whose values are all numbers with a decimal comma (``1,5``) is read as numbers.
- ``.parquet``: read with pyarrow; the stored index is dropped.
- ``.npz``: ``np.load(..., allow_pickle=False)`` always; array ``X`` (N, D) and optional ``y`` (N,).
  Object arrays are refused (they would need unpickling). 1-D ``X`` is one feature; ``X`` with more
  than two dimensions is flattened to (N, D).
- ``.mat``: MATLAB v4-v7.2 via ``scipy.io.loadmat``; same ``X``/``y`` keys. v7.3 (HDF5) is refused.

Labels: ``label_column`` names a column (csv, parquet) or an array (npz, mat; default ``y``). Values
must be 0/1 (1 = anomaly) or booleans; missing values (NaN/empty) become -1 (unknown).

Column roles (csv, parquet): every column is an id, a feature, the label or ignored, decided by
:func:`core.data.columns.profile_columns` from the caller's choices and the column's values; only
features stay in ``Dataset.table``, the id column's values become ``Dataset.ids``.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from core.data.columns import (
    AUTO,
    FEATURE,
    ID,
    IGNORE,
    LABEL,
    NO_ID,
    NO_LABEL,
    ColumnProfile,
    profile_columns,
    role_of,
)
from core.data.dataset import TABLE, Dataset
from core.data.fingerprint import fingerprint_table
from core.errors import DataError

logger = logging.getLogger(__name__)

TABLE_SUFFIXES = frozenset({".csv", ".parquet", ".npz", ".mat"})
"""Suffixes (matched case-insensitively) that :func:`load_table` reads."""

MAX_TABLE_BYTES = 2 * 1024**3
"""Largest table file read (2 GiB); for ``.npz`` also the cap on the uncompressed arrays."""

SNIFF_BYTES = 64 * 1024
"""How much of a CSV is looked at to guess its delimiter."""

CSV_DELIMITERS = ",;\t|"

_DECIMAL_COMMA_NUMBER = r"[+-]?\d*,?\d+(?:[eE][+-]?\d+)?"

ARRAY_LABEL_KEY = "y"
"""Default label array name in ``.npz`` and ``.mat`` files."""


@contextlib.contextmanager
def _parsing(path: Path, what: str) -> Iterator[None]:
    """Turn any parser failure on an untrusted file into a one-line DataError."""
    try:
        yield
    except DataError:
        raise
    except MemoryError as exc:
        raise DataError(f"{path.name} is too large to load into memory; use a smaller table") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"cannot read {path.name} as {what}: byte {exc.start} is not UTF-8 text; "
                        "save the file as UTF-8 (in Excel: 'CSV UTF-8')") from exc
    except Exception as exc:  # noqa: BLE001 - third-party parsers raise many types on bad input
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read {path.name} as {what} ({detail}); check the file is a valid {what}") from exc


def _check_columns(names: list, path: Path) -> None:
    duplicates = sorted({str(n) for n, count in Counter(names).items() if count > 1})
    if duplicates:
        raise DataError(f"{path.name} has duplicate column names {duplicates}; rename them so each is unique")


def _sniff_delimiter(sample: str) -> str:
    try:
        return csv.Sniffer().sniff(sample, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        return ","


def _read_csv(path: Path) -> pd.DataFrame:
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES + 1)
    sample = head[:SNIFF_BYTES].decode("utf-8-sig", errors="replace")
    if len(head) > SNIFF_BYTES and "\n" in sample:
        sample = sample[: sample.rindex("\n")]
    if not sample.strip():
        raise DataError(f"{path.name} is empty; a CSV needs a header row and at least one data row")
    delimiter = _sniff_delimiter(sample)
    with _parsing(path, "CSV"):
        # The header is read whole from the file (it may be longer than the sample), since pandas
        # would silently rename a repeated name ("a", "a.1").
        with open(path, encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle, delimiter=delimiter), [])
        _check_columns(header, path)
        frame = pd.read_csv(path, sep=delimiter, encoding="utf-8-sig", low_memory=False)
    logger.info("read %s with delimiter %r", path, delimiter)
    return _decimal_commas(frame) if delimiter == ";" else frame


def _decimal_commas(frame: pd.DataFrame) -> pd.DataFrame:
    """Text columns of a semicolon table whose values are all numbers written with a decimal comma
    (``1,5``, as spreadsheets write them in many locales) as float columns."""
    for column in frame.columns:
        series = frame[column]
        if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
            continue
        text = series.dropna().astype(str).str.strip()
        if len(text) and text.str.fullmatch(_DECIMAL_COMMA_NUMBER).all() and text.str.contains(",").any():
            frame[column] = pd.to_numeric(text.str.replace(",", ".", regex=False)).reindex(frame.index)
            logger.info("column %r read as numbers with a decimal comma", column)
    return frame


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _parsing(path, "Parquet file"):
        with pq.ParquetFile(path) as parquet:
            schema = parquet.schema_arrow
            _check_columns(schema.names, path)
            nested = [field.name for field in schema if pa.types.is_nested(field.type)]
            if nested:
                raise DataError(f"{path.name} has nested columns {nested[:10]} (lists, structs or maps); "
                                "flatten them into plain columns")
            frame = parquet.read().to_pandas()
    return frame.reset_index(drop=True)


def _as_feature_matrix(values: np.ndarray, path: Path) -> np.ndarray:
    if values.dtype.kind == "O":
        raise DataError(f"{path.name}: X is an object array; pickled objects are refused, "
                        "save X as a numeric array")
    if values.dtype.kind in "cV":
        raise DataError(f"{path.name}: X has dtype {values.dtype} (complex or structured); "
                        "save X as a plain 2-D numeric array")
    if values.ndim == 0:
        raise DataError(f"{path.name}: X is a scalar; save X as an (N, D) array")
    if values.ndim == 1:
        return values.reshape(-1, 1)
    if values.ndim > 2:
        logger.info("%s: X of shape %s flattened to (N, D)", path, values.shape)
        return values.reshape(values.shape[0], -1)
    return values


def read_frame(path: Path) -> pd.DataFrame:
    """A ``.csv`` or ``.parquet`` table as a DataFrame, every column as its file holds it."""
    return _read_csv(path) if path.suffix.lower() == ".csv" else _read_parquet(path)


def _read_npz(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray | None]:
    with _parsing(path, "NumPy .npz archive"):
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path.name} is not a NumPy .npz archive; save it with np.savez(path, X=..., y=...)")
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
        if declared > MAX_TABLE_BYTES:
            raise DataError(f"{path.name} expands to {declared} bytes, over the limit of {MAX_TABLE_BYTES}; "
                            "use a smaller table")
        with np.load(path, allow_pickle=False) as arrays:
            keys = list(arrays.files)
            if "X" not in keys:
                raise DataError(f"{path.name} has no array 'X' (found {keys}); "
                                "save features as X and optional labels as y")
            try:
                features = arrays["X"]
                labels = arrays[label_key] if label_key in keys else None
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise DataError(f"{path.name} holds object arrays; pickled objects are refused, "
                                    "save X and y as numeric arrays") from exc
                raise
    return features, labels


def _read_mat(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray | None]:
    import scipy.io
    import scipy.sparse

    try:
        contents = scipy.io.loadmat(path)
    except NotImplementedError as exc:
        raise DataError(f"{path.name} is a MATLAB v7.3 (HDF5) file, which is not supported; "
                        "re-save it in MATLAB with save(..., '-v7') or convert it to .npz") from exc
    except Exception as exc:  # noqa: BLE001 - loadmat raises many types on bad input
        raise DataError(f"cannot read {path.name} as a MATLAB .mat file ({exc}); "
                        "check the file is a valid .mat file") from exc
    keys = sorted(k for k in contents if not k.startswith("__"))
    if "X" not in keys:
        raise DataError(f"{path.name} has no variable 'X' (found {keys}); "
                        "save features as X and optional labels as y")
    features = contents["X"]
    if not scipy.sparse.issparse(features) and features.dtype.kind in "OV":
        raise DataError(f"{path.name}: X is a cell or struct array; save X as a numeric matrix")
    if scipy.sparse.issparse(features):
        if features.shape[0] * features.shape[1] * 8 > MAX_TABLE_BYTES:
            raise DataError(f"{path.name}: sparse X of shape {features.shape} is too large as a dense table")
        features = features.toarray()
    labels = contents.get(label_key)
    if scipy.sparse.issparse(labels):
        labels = labels.toarray()
    return np.asarray(features), None if labels is None else np.asarray(labels)


def parse_labels(values: np.ndarray | pd.Series, where: str) -> np.ndarray | None:
    """Convert label values to the Dataset convention.

    Parameters
    ----------
    values : (N,) array or Series
        0/1 (1 = anomaly) or booleans; NaN/None mark unknown samples.
    where : str
        Names the column and file in error messages.

    Returns
    -------
    (N,) int8 array or None
        1 anomaly, 0 normal, -1 unknown; None when no value is known.

    Raises
    ------
    DataError
        If a value is not 0/1/true/false.
    """
    series = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values))
    missing = series.isna().to_numpy()
    present = series[~missing]
    if present.empty:
        logger.warning("%s has no known label; labels ignored", where)
        return None
    out = np.full(len(series), -1, dtype=np.int8)
    if pd.api.types.is_bool_dtype(present.dtype) or pd.api.types.is_numeric_dtype(present.dtype):
        numbers = present.to_numpy(dtype=np.float64)
        bad = present[~np.isin(numbers, (0.0, 1.0))].tolist()
    else:
        numbers = np.zeros(len(present))
        bad = []
        for position, value in enumerate(present.tolist()):
            if isinstance(value, (bool, np.bool_, int, float, np.integer, np.floating)) and value in (0, 1):
                numbers[position] = float(value)
            else:
                bad.append(value)
    if bad:
        examples = sorted({repr(b) for b in bad})[:5]
        raise DataError(f"{where} must hold 0/1 (1 = anomaly) or true/false, found {', '.join(examples)}; "
                        "map labels to 0/1 first (if -1 marks anomalies, as in scikit-learn, write 1)")
    out[~missing] = numbers.astype(np.int8)
    return out


def _array_labels(labels: np.ndarray, n_rows: int, where: str) -> np.ndarray | None:
    if labels.dtype.kind in "OcV":
        raise DataError(f"{where} has dtype {labels.dtype}; save it as a 0/1 numeric array")
    if labels.size != n_rows or (labels.ndim > 1 and max(labels.shape) != labels.size):
        raise DataError(f"{where} has shape {labels.shape} but X has {n_rows} rows; save y as an (N,) array")
    return parse_labels(labels.reshape(-1), where)


def table_dataset(
    features: pd.DataFrame,
    source: Path | str,
    labels: np.ndarray | None = None,
    ids: list[str] | None = None,
    columns: tuple[ColumnProfile, ...] = (),
) -> Dataset:
    """Wrap a feature table as a table :class:`Dataset` (ids ``"0"`` .. ``"N-1"`` unless given).

    Parameters
    ----------
    features : pandas.DataFrame, (N, D)
        Feature columns only; the index is dropped.
    source : Path or str
        Where the data came from (shown to the user).
    labels : (N,) int8 array, optional
        1 anomaly, 0 normal, -1 unknown.
    ids : list of str, optional
        The rows' ids (the user's id column); 0-based row numbers when None.
    columns : tuple of ColumnProfile
        Every column of the file with its role (see :mod:`core.data.columns`).

    Raises
    ------
    DataError
        If the table has no row, no column, duplicate column names or labels of the wrong length.
    """
    source = Path(source)
    if features.shape[0] == 0:
        raise DataError(f"{source.name} has no rows; a table needs at least one sample")
    if features.shape[1] == 0:
        raise DataError(f"{source.name} has no feature column besides the label; add feature columns")
    _check_columns(list(features.columns), source)
    features = features.reset_index(drop=True)
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int8)
        if labels.shape != (features.shape[0],):
            raise DataError(f"{source.name}: {labels.shape[0]} labels for {features.shape[0]} rows")
        if not np.any(labels >= 0):
            labels = None
    return Dataset(
        kind=TABLE,
        ids=[str(i) for i in range(features.shape[0])] if ids is None else list(ids),
        source=source,
        fingerprint=fingerprint_table(features),
        labels=labels,
        table=features,
        columns=tuple(columns),
    )


def load_table(
    path: Path | str,
    label_column: str | None = None,
    *,
    id_column: str = AUTO,
    ignore_columns: tuple[str, ...] | list[str] = (),
    label_required: bool = True,
) -> Dataset:
    """Load a ``.csv``, ``.parquet``, ``.npz`` or ``.mat`` table as a table :class:`Dataset`.

    Parameters
    ----------
    path : Path or str
        The table file (see the module docstring for each format).
    label_column : str, optional
        Label column (csv, parquet) or array name (npz, mat; default ``"y"`` when present).
        Labels are 0/1 (1 = anomaly) or booleans, used for metrics only. For csv and parquet,
        None finds a 0/1 column named like a label, ``"none"`` means no label column.
    id_column : str
        The column that names the rows (csv, parquet): a name, ``"auto"`` (default: a column
        with a distinct text or counter in every row) or ``"none"`` (0-based row numbers).
    ignore_columns : sequence of str
        Columns to drop (csv, parquet).
    label_required : bool
        When False, columns named above that the file lacks are not an error (scoring new data
        with the run's column roles: a new batch may lack its label, id or ignored columns).

    Returns
    -------
    Dataset
        ``kind="table"``, ``table`` holding the feature columns, ``ids`` the id column's values
        (0-based row numbers without one), ``columns`` every column's role.

    Raises
    ------
    DataError
        If the file is missing, too large, unreadable, unsafe (pickled objects), has duplicate
        column names, no rows, no feature column, or invalid labels.

    Examples
    --------
    >>> data = load_table("sensors.csv", label_column="is_faulty")  # doctest: +SKIP
    >>> data.table.shape, data.labels.mean()  # doctest: +SKIP
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path.name}: unsupported table format {suffix or '(no suffix)'}; "
                        f"use one of {', '.join(sorted(TABLE_SUFFIXES))}")
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    size = path.stat().st_size
    if size > MAX_TABLE_BYTES:
        raise DataError(f"{path.name} is {size} bytes, over the limit of {MAX_TABLE_BYTES}; use a smaller table")

    labels: np.ndarray | None = None
    ids: list[str] | None = None
    columns: list[ColumnProfile] = []
    if suffix in (".csv", ".parquet"):
        frame = read_frame(path)
        if not label_required:  # scoring: the run's roles, as far as this file has the columns
            present = {str(column) for column in frame.columns}
            label_column = label_column if label_column in present else NO_LABEL
            id_column = id_column if id_column in (AUTO, NO_ID) or id_column in present else NO_ID
            ignore_columns = [name for name in ignore_columns if name in present]
        columns = profile_columns(frame, id_column=id_column, label_column=label_column, ignore_columns=ignore_columns)
        by_name = {str(column): column for column in frame.columns}
        [label] = role_of(columns, LABEL) or [None]
        if label is not None:
            labels = parse_labels(frame[by_name[label]], f"label column {label!r} of {path.name}")
        [id_name] = role_of(columns, ID) or [None]
        if id_name is not None:
            ids = frame[by_name[id_name]].astype(str).tolist()
        for profile in columns:
            if profile.role != FEATURE:
                logger.warning("%s: column %r is %s (%s)", path.name, profile.name,
                               "ignored" if profile.role == IGNORE else f"the {profile.role}", profile.reason)
        frame = frame[[by_name[name] for name in role_of(columns, FEATURE)]]
    else:
        key = ARRAY_LABEL_KEY if label_column is None else label_column
        reader = _read_npz if suffix == ".npz" else _read_mat
        raw_features, raw_labels = reader(path, key)
        if raw_labels is None and label_column is not None and label_required:
            raise DataError(f"{path.name} has no array {label_column!r} to use as labels")
        matrix = _as_feature_matrix(raw_features, path)
        frame = pd.DataFrame(matrix, columns=[f"x{j}" for j in range(matrix.shape[1])])
        if raw_labels is not None:
            labels = _array_labels(raw_labels, matrix.shape[0], f"array {key!r} of {path.name}")
    dataset = table_dataset(frame, path, labels, ids, tuple(columns))
    logger.info("loaded %s: %d rows x %d feature columns%s", path, dataset.table.shape[0],
                dataset.table.shape[1], "" if dataset.labels is None else ", with labels")
    return dataset
