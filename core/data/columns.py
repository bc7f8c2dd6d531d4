"""What each column of a table is for: its *role*, decided before a run and shown to the user.

Roles:

- ``id``: names the row; carried into every output (scores, tables, explanations), never a feature.
- ``feature``: numeric, boolean or categorical (text with at most ``MAX_CATEGORIES`` values); the
  encoder turns it into numbers.
- ``label``: 0/1 (1 = anomaly) or booleans; used for metrics only, never a feature.
- ``ignore``: read and dropped.

The user's choices (``id_column``, ``label_column``, ``ignore_columns``) come first. Then, with
``id_column="auto"``, the first column that names rows (:func:`is_identifier`) is the id; any other
column that names rows is ignored, so an identifier is never a feature. Without a ``label_column``,
a 0/1 column named like a label (``is_fraud``, ``label``, ``anomaly``...) becomes the label: it is
used for metrics only, and the profile says so; it is never used silently as a feature.

:func:`profile_columns` returns one :class:`ColumnProfile` per column with its role, kind, counts,
an example value and, where the column cannot be used as it is, the problem and the role that
fixes it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.data.fingerprint import dtype_blocks
from core.errors import DataError

ID, FEATURE, LABEL, IGNORE = "id", "feature", "label", "ignore"
ROLES = (ID, FEATURE, LABEL, IGNORE)
AUTO, NO_ID = "auto", "none"
"""``id_column`` values: find the id column automatically / use 0-based row numbers."""
NO_LABEL = "none"
"""``label_column`` value: the table has no label column (None finds one named like a label)."""

MAX_CATEGORIES = 50
"""Most distinct values of a text column encoded as categories (one-hot)."""
MIN_ID_ROWS = 10
"""Fewest rows at which distinct values in every row are taken for names of rows (a few distinct
words or consecutive numbers in a tiny table are categories or measurements)."""
_LABEL_LIKE = re.compile(r"^(is_?)?(label|labels|y|target|class|anomaly|anomalous|outlier|fraud|faulty|defect|"
                         r"defective|ground_truth|attack|failure)$")


@dataclass(frozen=True)
class ColumnChoice:
    """A user's column roles for a table (hashable, so a studio cache can key on it).

    ``label_column``: None finds a 0/1 column named like a label, ``"none"`` means no label;
    ``id_column``: ``"auto"``, ``"none"`` (row numbers) or a name; ``ignore_columns``: names.
    """

    label_column: str | None = None
    id_column: str = AUTO
    ignore_columns: tuple[str, ...] = ()

    def load_kwargs(self) -> dict[str, object]:
        """Keyword arguments of :func:`core.data.load_dataset` and :func:`core.engine.load_data`."""
        return {"label_column": self.label_column, "id_column": self.id_column,
                "ignore_columns": tuple(self.ignore_columns)}


@dataclass(frozen=True)
class ColumnProfile:
    """One column of a table as the Data page and ``refinery fit`` describe it.

    Attributes
    ----------
    name : str
    role : {"id", "feature", "label", "ignore"}
    kind : {"numeric", "boolean", "categorical", "text", "empty"}
        What its values are; "text" has more distinct values than a category may have.
    distinct, missing : int
        Distinct non-missing values, and missing ones.
    example : str
        The first non-missing value, as text.
    reason : str
        Why it has its role ("you chose it", "a distinct value in every row"...).
    problem : str
        Empty, or why the fit would refuse the column in its role, with the role that fixes it.
    """

    name: str
    role: str
    kind: str
    distinct: int
    missing: int
    example: str
    reason: str
    problem: str = ""


def as_numeric(series: pd.Series) -> np.ndarray | None:
    """The column as float64 (NaN where empty), or None when it holds text that is not a number."""
    if pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    converted = pd.to_numeric(series, errors="coerce")
    if converted.isna().sum() > series.isna().sum():
        return None
    return converted.to_numpy(dtype=np.float64, na_value=np.nan)


def is_identifier(series: pd.Series) -> bool:
    """Whether ``series`` names rows rather than measures them.

    From ``MIN_ID_ROWS`` rows on, true for a text column with a distinct value in every row, most of
    them not numbers (one-hot encoding it would make every row equally unusual), and for an integer
    row counter (distinct, consecutive values in any order, such as the index a spreadsheet or
    ``DataFrame.to_csv`` writes). A boolean column, or one with a missing value, is not one.
    """
    if (len(series) < MIN_ID_ROWS or pd.api.types.is_bool_dtype(series) or series.isna().any()
            or series.nunique() != len(series)):
        return False
    values = as_numeric(series)
    if values is None:  # text: an identifier unless it is mostly numbers with a typo or two
        return bool(pd.to_numeric(series, errors="coerce").isna().mean() > 0.5)
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        return False
    return bool(np.all(np.diff(np.sort(values)) == 1))


def _is_binary(series: pd.Series) -> bool:
    values = as_numeric(series.dropna())
    return values is not None and len(values) > 0 and set(np.unique(values)) <= {0.0, 1.0}


def cell_text(value) -> str:
    """A cell as the user wrote it, without float noise (0.1 + 0.2 shows as 0.3)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _kind(series: pd.Series, distinct: int) -> str:
    if series.notna().sum() == 0:
        return "empty"
    if pd.api.types.is_bool_dtype(series):
        return "boolean"
    if as_numeric(series) is not None:
        return "numeric"
    return "categorical" if distinct <= MAX_CATEGORIES else "text"


@dataclass(frozen=True)
class _Facts:
    """What :func:`profile_columns` reads off one column's values."""

    distinct: int
    missing: int
    kind: str
    identifier: bool
    example: str


def _column_facts(series: pd.Series) -> _Facts:
    distinct, missing = int(series.nunique()), int(series.isna().sum())
    example = "" if missing == len(series) else cell_text(series.dropna().iloc[0])
    return _Facts(distinct, missing, _kind(series, distinct), is_identifier(series), example)


def _numeric_facts(block: pd.DataFrame) -> list[_Facts]:
    """:func:`_column_facts` of every column of ``block`` (one integer or float dtype) at once: a table of
    thousands of measured columns takes milliseconds instead of seconds."""
    values = block.to_numpy()                                            # (N, k), the block's own dtype
    n_rows = len(values)
    gaps = np.isnan(values) if values.dtype.kind == "f" else np.zeros(values.shape, dtype=bool)
    missing = gaps.sum(axis=0)
    ordered = np.sort(values, axis=0)                                    # NaN last
    changes = np.ones(values.shape, dtype=bool)
    changes[1:] = ordered[1:] != ordered[:-1]
    present = np.arange(n_rows)[:, None] < (n_rows - missing)[None, :]
    distinct = (changes & present).sum(axis=0)
    identifier = ((n_rows >= MIN_ID_ROWS) & (missing == 0) & (distinct == n_rows)
                  & np.isfinite(values).all(axis=0) & (values == np.round(values)).all(axis=0)
                  & (np.diff(ordered, axis=0) == 1).all(axis=0))
    first = np.argmax(~gaps, axis=0) if n_rows else np.zeros(values.shape[1], dtype=int)
    return [_Facts(int(distinct[j]), int(missing[j]), "empty" if missing[j] == n_rows else "numeric",
                   bool(identifier[j]), "" if missing[j] == n_rows else cell_text(values[first[j], j].item()))
            for j in range(values.shape[1])]


def _table_facts(frame: pd.DataFrame) -> list[_Facts]:
    """:func:`_column_facts` of every column, in column order; integer and float columns together, per dtype."""
    facts: list[_Facts | None] = [None] * frame.shape[1]
    blocks, others = dtype_blocks(frame, "iuf")
    for position in others:
        facts[position] = _column_facts(frame.iloc[:, position])
    for positions in blocks.values():
        for position, column_facts in zip(positions, _numeric_facts(frame.iloc[:, positions])):
            facts[position] = column_facts
    return facts


def _problem(kind: str, role: str, distinct: int) -> str:
    if role != FEATURE:
        return ""
    if kind == "empty":
        return "no value in any row: set its role to ignore"
    if kind == "text":
        return (f"text with {distinct} distinct values (more than {MAX_CATEGORIES}) cannot be a category: "
                "set its role to id if it names rows, else to ignore")
    return ""


def profile_columns(
    frame: pd.DataFrame,
    *,
    id_column: str = AUTO,
    label_column: str | None = None,
    ignore_columns: tuple[str, ...] | list[str] = (),
) -> list[ColumnProfile]:
    """The role of every column of ``frame`` (see the module docstring), in column order.

    ``label_column``: a name, None (find a 0/1 column named like a label) or ``"none"`` (no label:
    such a column stays a feature).

    Raises
    ------
    DataError
        If a column named in ``id_column``, ``label_column`` or ``ignore_columns`` is not in the
        table, one column is given two roles, or the chosen id column repeats a value or misses one.
    """
    names = [str(column) for column in frame.columns]
    find_label = label_column is None
    chosen = {name: IGNORE for name in ignore_columns}
    for role, name in ((LABEL, None if label_column == NO_LABEL else label_column),
                       (ID, None if id_column in (AUTO, NO_ID) else id_column)):
        if name is None:
            continue
        if name in chosen:
            raise DataError(f"column {name!r} cannot be both {chosen[name]} and {role}; give it one role")
        chosen[name] = role
    unknown = [name for name in chosen if name not in names]
    if unknown:
        shown = names[:30] + ([f"and {len(names) - 30} more"] if len(names) > 30 else [])
        raise DataError(f"the table has no column {', '.join(map(repr, unknown))}; its columns are {shown}")
    id_name = next((name for name, role in chosen.items() if role == ID), None)
    if id_name is not None:
        ids = frame[frame.columns[names.index(id_name)]]
        if ids.isna().any() or ids.nunique() != len(ids):
            repeated = ids[ids.duplicated()].astype(str).unique()[:3].tolist()
            raise DataError(f"id column {id_name!r} must name each row once: "
                            + (f"{', '.join(repeated)} repeat" if repeated else "some rows have no id")
                            + "; choose another id column or none (row numbers)")

    facts = _table_facts(frame)
    naming = [name for name, column_facts in zip(names, facts) if name not in chosen and column_facts.identifier]
    if id_name is None and id_column == AUTO and naming:  # a text id before a row counter
        id_name = next((name for name in naming if as_numeric(frame.iloc[:, names.index(name)]) is None), naming[0])
    profiles = []
    for position, (name, column_facts) in enumerate(zip(names, facts)):
        distinct, missing, kind = column_facts.distinct, column_facts.missing, column_facts.kind
        if name in chosen:
            role, reason = chosen[name], "your choice"
        elif name in naming:
            role = ID if name == id_name else IGNORE
            reason = "a distinct value in every row: it names rows" + (
                "" if role == ID else f"; ignored ({'another column is the id' if id_name else 'ids are row numbers'})")
        elif (find_label and _LABEL_LIKE.match(name.strip().lower()) and _is_binary(frame.iloc[:, position])
              and len(names) - len(chosen) - len(naming) > 1):  # a feature must remain
            role, reason = LABEL, "named like a label, with 0/1 values: used for metrics only, never as a feature"
            find_label = False  # one label at most
        else:
            role, reason = FEATURE, {"numeric": "numbers", "boolean": "true/false", "empty": "no values"}.get(
                kind, f"{distinct} categories" if kind == "categorical" else "text")
        profiles.append(ColumnProfile(name, role, kind, distinct, missing, column_facts.example, reason,
                                      _problem(kind, role, distinct)))
    if not any(profile.role == FEATURE for profile in profiles):
        raise DataError("the table has no feature column: " + ", ".join(
            f"{p.name} is {'ignored' if p.role == IGNORE else 'the ' + p.role}" for p in profiles)
            + "; add the measured columns or change a role")
    return profiles


def role_of(profiles: list[ColumnProfile], role: str) -> list[str]:
    """Names of the columns with ``role``, in column order."""
    return [profile.name for profile in profiles if profile.role == role]


def chosen_roles(profiles: list[ColumnProfile] | tuple[ColumnProfile, ...]) -> ColumnChoice:
    """The roles ``profiles`` settled on, as the choice that gives them again on another file of the
    same columns: scoring a new batch of a few rows reuses a run's id column although so few rows
    could not show that it names them."""
    return ColumnChoice(label_column=next(iter(role_of(profiles, LABEL)), NO_LABEL),
                        id_column=next(iter(role_of(profiles, ID)), NO_ID),
                        ignore_columns=tuple(role_of(profiles, IGNORE)))
