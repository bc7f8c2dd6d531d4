"""The in-memory description of a loaded data set, shared by every loader."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from core.data.columns import ColumnProfile

IMAGES = "images"
TABLE = "table"


@dataclass(frozen=True)
class SkippedFile:
    """A file a loader could not use; reported to the user, never silently dropped."""

    name: str
    reason: str


@dataclass(frozen=True, eq=False)
class Dataset:
    """Samples to score: image files or table rows, with optional labels and masks.

    Labels and masks are used for metrics and display only; nothing trains on them.

    Attributes
    ----------
    kind : {"images", "table"}
    ids : list of str, length N
        Image path relative to ``source`` (POSIX separators); a table's id column, or the 0-based
        row number when it has none.
    source : Path
        The folder, archive or table file the data came from.
    fingerprint : str
        Hex content hash of the samples (see :mod:`core.data.fingerprint`).
    labels : (N,) int8 array or None
        1 = anomaly, 0 = normal, -1 = unknown for that sample; None when no sample has a label.
    paths : list of Path or None
        Image files, aligned with ``ids`` (images only).
    masks : dict id -> Path
        Ground-truth defect masks for the images that have one.
    table : pandas.DataFrame or None
        Feature columns, one row per id (tables only); the label column is not in it.
    skipped : list of SkippedFile
        Unreadable files left out, with the reason.
    columns : tuple of ColumnProfile
        Every column of a table file with its role (id, feature, label, ignore); empty for images
        and for tables built in memory.
    """

    kind: Literal["images", "table"]
    ids: list[str]
    source: Path
    fingerprint: str
    labels: np.ndarray | None = None
    paths: list[Path] | None = None
    masks: dict[str, Path] = field(default_factory=dict)
    table: pd.DataFrame | None = None
    skipped: list[SkippedFile] = field(default_factory=list)
    columns: tuple[ColumnProfile, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None and bool(np.any(self.labels >= 0))

    def subset(self, indices: np.ndarray) -> "Dataset":
        """The samples at ``indices`` (same order), with a fingerprint of the subset."""
        from core.data.fingerprint import fingerprint_subset

        indices = np.asarray(indices, dtype=np.int64)
        ids = [self.ids[i] for i in indices]
        return replace(
            self,
            ids=ids,
            fingerprint=fingerprint_subset(self.fingerprint, indices),
            labels=None if self.labels is None else self.labels[indices],
            paths=None if self.paths is None else [self.paths[i] for i in indices],
            masks={i: self.masks[i] for i in ids if i in self.masks},
            table=None if self.table is None else self.table.iloc[indices].reset_index(drop=True),
        )

    def without_labels(self) -> "Dataset":
        """The same samples with labels and masks removed."""
        return replace(self, labels=None, masks={})
