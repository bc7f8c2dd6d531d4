"""Encoding table rows as numeric feature vectors: robust scaling, one-hot categories, imputation.

The encoder is fitted on the training table only and saved as plain JSON with the run, so
scoring a new table applies exactly the same transformation.

It sees the feature columns only: ids, labels and ignored columns are taken out when the table
is loaded (:mod:`core.data.columns`). Rules (documented for users in README.md):
- numeric and boolean columns are features; text columns whose values all parse as numbers
  are numeric;
- other text columns with at most ``MAX_CATEGORIES`` distinct values are one-hot encoded
  (a category unseen in training encodes as all zeros); more distinct values is an error. Each
  column's one-hot block is weighted so that, between two random training rows, it adds as much
  to the squared distance as a normally distributed numeric column does (``category_spread``):
  a categorical column counts like one numeric column, so a random one cannot split the data
  into islands;
- NaN and +-inf are imputed with the training median of the column (counted and logged);
  a column with no finite value in training is an error;
- each numeric column is centred on its median and divided by its interquartile range
  (its standard deviation when the IQR is 0; 1 when the column is constant); the result is
  clipped to +-``MAX_SCALED`` so that a huge value (a sentinel such as 1e308) stays a finite,
  very anomalous number instead of overflowing float32.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.data.columns import MAX_CATEGORIES, as_numeric
from core.data.dataset import Dataset
from core.errors import DataError
from core.progress import QUIET, Monitor

log = logging.getLogger(__name__)

NUMERIC_SPREAD = 2 / 1.349**2
"""Mean squared difference between two rows of a normal column scaled by its interquartile range."""
MAX_SCALED = 1e6
"""Largest encoded magnitude of a numeric value, in interquartile ranges from the median."""


@dataclass
class TableEncoderState:
    """What a fitted :class:`TableEncoder` learned; JSON-serialisable."""

    numeric: list[str] = field(default_factory=list)
    medians: list[float] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    categories: dict[str, list[str]] = field(default_factory=dict)
    category_weights: dict[str, float] = field(default_factory=dict)


class TableEncoder:
    """Numeric columns robust-scaled, low-cardinality text columns one-hot encoded.

    A learned tabular encoder (issue 5) plugs in behind the same ``fit`` / ``embed`` /
    ``save`` / ``load`` interface.
    """

    kind = "table"
    state_file = "table_encoder.json"

    def __init__(self, category_spread: float | None = NUMERIC_SPREAD) -> None:
        """``category_spread``: the mean squared distance a categorical column adds between two random
        training rows (see the module docstring); None keeps plain one-hot columns (weight 1)."""
        self.category_spread = category_spread
        self.state_: TableEncoderState | None = None

    @property
    def feature_names(self) -> list[str]:
        """Names of the output columns, in order."""
        state = self._state()
        onehot = [f"{column}={value}" for column, values in state.categories.items() for value in values]
        return state.numeric + onehot

    def fit(self, dataset: Dataset, monitor: Monitor = QUIET) -> "TableEncoder":
        """Learn column kinds, medians, scales and categories from ``dataset.table`` (one quick pass:
        ``monitor`` is there for the encoder interface)."""
        frame = _require_table(dataset)
        state = TableEncoderState()
        for column in frame.columns:
            values = as_numeric(frame[column])
            if values is not None:
                finite = values[np.isfinite(values)]
                if finite.size == 0:
                    raise DataError(f"column {column!r} has no finite value; drop it or fill it in")
                median = float(np.median(finite))
                q25, q75 = np.percentile(finite, [25, 75])
                scale = float(q75 - q25) or float(np.std(finite)) or 1.0
                state.numeric.append(str(column))
                state.medians.append(median)
                state.scales.append(scale)
                continue
            distinct = sorted(frame[column].dropna().astype(str).unique())
            if len(distinct) > MAX_CATEGORIES:
                raise DataError(
                    f"column {column!r} holds text with {len(distinct)} distinct values (more than "
                    f"{MAX_CATEGORIES}); it cannot be encoded as categories: make it the id column if it names "
                    "rows (--id-column, or its role on the Data page), else ignore it (--ignore-columns)"
                )
            state.categories[str(column)] = distinct
            state.category_weights[str(column)] = self._category_weight(frame[column])
        self.state_ = state
        return self

    def embed(self, dataset: Dataset, monitor: Monitor = QUIET) -> np.ndarray:
        """Return ``(N, D) float32`` encoded rows; D = numeric columns + one-hot columns."""
        state = self._state()
        frame = _require_table(dataset)
        frame.columns = [str(column) for column in frame.columns]
        missing = [c for c in state.numeric + list(state.categories) if c not in frame.columns]
        if missing:
            raise DataError(f"the table lacks columns the run was fitted on: {', '.join(missing[:10])}")
        used = set(state.numeric) | set(state.categories)
        extra = [c for c in frame.columns if c not in used]
        if extra:
            log.warning("ignoring %d columns the run was not fitted on: %s", len(extra), ", ".join(extra[:10]))
        parts = [self._numeric_block(frame, state)]
        for column, values in state.categories.items():
            text = frame[column].astype(str).to_numpy()
            onehot = (text[:, None] == np.asarray(values)[None, :]).astype(np.float32)
            parts.append(onehot * np.float32(state.category_weights.get(column, 1.0)))
        encoded = np.concatenate(parts, axis=1).astype(np.float32)
        monitor.report("embed", len(frame), len(frame), "table encoded")
        return encoded

    def save(self, directory: Path) -> None:
        from core.files import atomic_write_text

        atomic_write_text(Path(directory) / self.state_file, json.dumps(asdict(self._state()), indent=1))

    @classmethod
    def load(cls, directory: Path) -> "TableEncoder":
        encoder = cls()
        raw = json.loads((Path(directory) / cls.state_file).read_text())
        encoder.state_ = TableEncoderState(**raw)
        return encoder

    def _category_weight(self, column: pd.Series) -> float:
        """The weight of a one-hot block: ``category_spread`` = 2 w^2 (1 - sum of squared category shares)."""
        shares = column.dropna().astype(str).value_counts(normalize=True).to_numpy()
        differ = 1.0 - float(np.sum(shares**2))  # chance that two random rows differ
        if self.category_spread is None or differ == 0.0:
            return 1.0
        return float(np.sqrt(self.category_spread / (2.0 * differ)))

    def _numeric_block(self, frame: pd.DataFrame, state: TableEncoderState) -> np.ndarray:
        block = np.empty((len(frame), len(state.numeric)), np.float64)
        for j, column in enumerate(state.numeric):
            values = as_numeric(frame[column])
            if values is None:
                raise DataError(f"column {column!r} was numeric when the run was fitted but now holds text")
            block[:, j] = values
        bad = ~np.isfinite(block)
        if bad.any():
            log.warning("imputed %d NaN/inf values with the training medians", int(bad.sum()))
            block = np.where(bad, np.asarray(state.medians)[None, :], block)
        with np.errstate(over="ignore", invalid="ignore"):  # huge values: clipped just below
            scaled = (block - np.asarray(state.medians)) / np.asarray(state.scales)
        return np.clip(np.nan_to_num(scaled, nan=0.0), -MAX_SCALED, MAX_SCALED)

    def _state(self) -> TableEncoderState:
        if self.state_ is None:
            raise RuntimeError("TableEncoder is not fitted; call fit() first")
        return self.state_


def _require_table(dataset: Dataset) -> pd.DataFrame:
    if dataset.table is None:
        raise DataError("expected a table, got images")
    return dataset.table.copy()

