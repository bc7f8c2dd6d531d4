"""Fingerprints: stable, content-based, label-independent, subset-aware."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.data.dataset import Dataset
from core.data.fingerprint import FINGERPRINT_HEX_CHARS, fingerprint_files, fingerprint_subset, fingerprint_table
from core.data.tables import table_dataset
from core.errors import DataError


def test_file_fingerprint_follows_content_and_ids(tmp_path):
    (tmp_path / "a.png").write_bytes(b"alpha")
    (tmp_path / "b.png").write_bytes(b"beta")
    base = fingerprint_files(tmp_path, ["a.png", "b.png"])
    assert len(base) == FINGERPRINT_HEX_CHARS and int(base, 16) >= 0
    assert fingerprint_files(tmp_path, ["a.png", "b.png"], [tmp_path / "a.png", tmp_path / "b.png"]) == base
    assert fingerprint_files(tmp_path, ["b.png", "a.png"]) != base  # order matters
    (tmp_path / "b.png").write_bytes(b"betA")
    assert fingerprint_files(tmp_path, ["a.png", "b.png"]) != base  # one byte changed
    (tmp_path / "b.png").write_bytes(b"beta")
    assert fingerprint_files(tmp_path, ["a.png", "b.png"]) == base
    (tmp_path / "ab.png").write_bytes(b"")
    (tmp_path / "a").mkdir()
    # boundaries between ids and contents are unambiguous
    assert fingerprint_files(tmp_path, ["a.png"]) != fingerprint_files(tmp_path, ["ab.png"])
    with pytest.raises(DataError, match="cannot read"):
        fingerprint_files(tmp_path, ["gone.png"])


def test_table_fingerprint_ignores_index_and_labels_but_not_values():
    frame = pd.DataFrame({"a": [1.0, 2.0, np.nan], "b": ["x", "y", "z"]})
    base = fingerprint_table(frame)
    assert fingerprint_table(frame.set_axis([7, 8, 9])) == base
    assert fingerprint_table(frame.assign(a=[1.0, 2.0, 3.0])) != base
    assert fingerprint_table(frame.rename(columns={"a": "c"})) != base
    assert fingerprint_table(frame[["b", "a"]]) != base
    labelled = table_dataset(frame, "mem", labels=np.array([0, 1, 0]))
    assert labelled.fingerprint == table_dataset(frame, "mem").fingerprint == base
    assert labelled.without_labels().fingerprint == base


def test_a_table_keeps_the_fingerprint_earlier_versions_gave_it():
    """Verdicts and runs find their data by fingerprint: the value is pinned (computed column by column with
    pandas' hash_pandas_object before numeric columns were hashed together)."""
    frame = pd.DataFrame({"count": np.arange(6), "ratio": [0.5, np.nan, -0.0, np.inf, 2.25, 1e300],
                          "flag": [True, False] * 3, "kind": ["a", "b", "c"] * 2,
                          "small": np.arange(6, dtype=np.uint8), "maybe": pd.array([1, None] * 3, dtype="Int64")})
    assert fingerprint_table(frame) == "c9a3d43cf32e843da021e1f8cd6be069"


def test_subset_fingerprint():
    parent = "0123456789abcdef0123456789abcdef"
    first = fingerprint_subset(parent, np.array([0, 2]))
    assert first == fingerprint_subset(parent, [0, 2])
    assert first != fingerprint_subset(parent, np.array([2, 0]))
    assert first != fingerprint_subset("f" * 32, np.array([0, 2]))
    data = table_dataset(pd.DataFrame({"a": [1, 2, 3]}), "mem", labels=np.array([0, 0, 1]))
    part = data.subset(np.array([2, 0]))
    assert isinstance(part, Dataset) and part.ids == ["2", "0"] and part.labels.tolist() == [1, 0]
    assert part.fingerprint == fingerprint_subset(data.fingerprint, np.array([2, 0]))
