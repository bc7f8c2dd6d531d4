"""Tables: csv (sniffed delimiter, BOM), parquet, npz (never unpickled), mat; labels; errors."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import scipy.io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.data import tables as tables_module
from core.data.tables import load_table, parse_labels, table_dataset
from core.errors import DataError

FRAME = pd.DataFrame({"temp": [20.5, 21.0, 35.2, 19.9], "pressure": [1, 2, 3, 4],
                      "site": ["a", "b", "a", "c"], "faulty": [0, 0, 1, 0]})


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_csv_delimiters_are_sniffed(tmp_path, delimiter):
    path = tmp_path / "sensors.csv"
    FRAME.to_csv(path, sep=delimiter, index=False)
    data = load_table(path, label_column="faulty")
    assert data.kind == "table" and data.ids == ["0", "1", "2", "3"]
    assert list(data.table.columns) == ["temp", "pressure", "site"]
    assert data.table["temp"].tolist() == FRAME["temp"].tolist()
    assert data.labels.dtype == np.int8 and data.labels.tolist() == [0, 0, 1, 0]
    assert data.source == path


def test_csv_with_byte_order_mark_and_semicolons(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffa;b;label\n1,5;2;0\n3,5;4;1\n".encode("utf-8"))
    data = load_table(path, label_column="label")
    assert list(data.table.columns) == ["a", "b"]  # no BOM glued to the first name
    assert data.labels.tolist() == [0, 1]


def test_label_column_does_not_change_the_fingerprint(tmp_path):
    FRAME.to_csv(tmp_path / "with.csv", index=False)
    FRAME.drop(columns="faulty").to_csv(tmp_path / "without.csv", index=False)
    with_labels = load_table(tmp_path / "with.csv", label_column="faulty")
    without = load_table(tmp_path / "without.csv")
    assert without.labels is None
    assert with_labels.fingerprint == without.fingerprint
    assert with_labels.table.equals(without.table)
    changed = FRAME.drop(columns="faulty").assign(temp=[20.5, 21.0, 35.2, 20.0])
    changed.to_csv(tmp_path / "changed.csv", index=False)
    assert load_table(tmp_path / "changed.csv").fingerprint != without.fingerprint


def test_missing_label_column_lists_the_columns(tmp_path):
    FRAME.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"no column 'label'; its columns are \['temp', 'pressure', 'site', 'faulty'\]"):
        load_table(tmp_path / "t.csv", label_column="label")


def test_a_label_like_column_is_the_label_and_said_so_unless_there_is_none(tmp_path, caplog):
    FRAME.rename(columns={"faulty": "is_fraud"}).to_csv(tmp_path / "t.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="core.data.tables"):
        data = load_table(tmp_path / "t.csv")
    assert "is_fraud" not in data.table.columns and data.labels is not None, "never silently a feature"
    assert "column 'is_fraud' is the label (named like a label, with 0/1 values" in caplog.text
    assert "is_fraud" in load_table(tmp_path / "t.csv", label_column="none").table.columns


@pytest.mark.parametrize("values, expected", [
    ([0, 1, 1], [0, 1, 1]),
    ([True, False, True], [1, 0, 1]),
    ([0.0, 1.0, np.nan], [0, 1, -1]),
    (pd.array([1, None, 0], dtype="Int64"), [1, -1, 0]),
    (np.array([True, None, False], dtype=object), [1, -1, 0]),
])
def test_labels_accept_0_1_bool_and_missing(values, expected):
    assert parse_labels(pd.Series(values), "labels").tolist() == expected


@pytest.mark.parametrize("values", [[0, 2], [-1, 1], ["yes", "no"], [0.5, 1.0]])
def test_other_label_values_are_refused(values):
    with pytest.raises(DataError, match="must hold 0/1"):
        parse_labels(pd.Series(values), "label column 'y'")


def test_all_missing_labels_mean_no_labels():
    assert parse_labels(pd.Series([np.nan, np.nan]), "labels") is None


def test_non_numeric_table_is_fine_here(tmp_path):
    path = tmp_path / "words.csv"
    path.write_text("colour,shape\nred,round\nblue,square\n")
    data = load_table(path)
    assert data.table.shape == (2, 2) and data.labels is None


def test_csv_errors(tmp_path):
    (tmp_path / "dup.csv").write_text("a,b,a\n1,2,3\n")
    with pytest.raises(DataError, match=r"duplicate column names \['a'\]"):
        load_table(tmp_path / "dup.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv is empty"):
        load_table(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="no rows"):
        load_table(tmp_path / "header.csv")
    (tmp_path / "labels_only.csv").write_text("y\n0\n1\n")
    with pytest.raises(DataError, match="no feature column"):
        load_table(tmp_path / "labels_only.csv", label_column="y")
    (tmp_path / "latin.csv").write_bytes("a,b\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="cannot read latin.csv as CSV"):
        load_table(tmp_path / "latin.csv")


def test_parquet_round_trip_and_duplicates(tmp_path):
    FRAME.set_index(pd.Index([10, 11, 12, 13])).to_parquet(tmp_path / "t.parquet")
    data = load_table(tmp_path / "t.parquet", label_column="faulty")
    assert list(data.table.columns) == ["temp", "pressure", "site"]
    assert list(data.table.index) == [0, 1, 2, 3]
    assert data.labels.tolist() == [0, 0, 1, 0]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_arrays([pa.array([1, 2]), pa.array([3, 4])], names=["x", "x"]),
                   tmp_path / "dup.parquet")
    with pytest.raises(DataError, match="duplicate column names"):
        load_table(tmp_path / "dup.parquet")
    pq.write_table(pa.table({"a": [1, 2], "tags": [[1], [2, 3]]}), tmp_path / "nested.parquet")
    with pytest.raises(DataError, match=r"nested columns \['tags'\]"):
        load_table(tmp_path / "nested.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(DataError, match="cannot read bad.parquet as Parquet"):
        load_table(tmp_path / "bad.parquet")


def test_npz_with_x_and_y(tmp_path):
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez(tmp_path / "d.npz", X=X, y=np.array([0, 1, 0, 0]))
    data = load_table(tmp_path / "d.npz")
    assert list(data.table.columns) == ["x0", "x1", "x2"]
    assert np.array_equal(data.table.to_numpy(), X) and data.labels.tolist() == [0, 1, 0, 0]
    np.savez(tmp_path / "other.npz", X=X, target=np.array([1, 1, 0, 0]), y=np.array([0, 0, 0, 0]))
    assert load_table(tmp_path / "other.npz", label_column="target").labels.tolist() == [1, 1, 0, 0]
    np.savez_compressed(tmp_path / "images.npz", X=np.zeros((5, 4, 4), np.uint8))
    assert load_table(tmp_path / "images.npz").table.shape == (5, 16)


def test_npz_refuses_pickles_and_missing_x(tmp_path):
    np.savez(tmp_path / "objects.npz", X=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="pickled objects are refused"):
        load_table(tmp_path / "objects.npz")
    np.savez(tmp_path / "objects_y.npz", X=np.zeros((2, 2)), y=np.array([0, "x"], dtype=object))
    with pytest.raises(DataError, match="pickled objects are refused"):
        load_table(tmp_path / "objects_y.npz")
    np.savez(tmp_path / "nox.npz", features=np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"has no array 'X' \(found \['features'\]\)"):
        load_table(tmp_path / "nox.npz")
    np.save(tmp_path / "single.npy", np.zeros((2, 2)))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(DataError, match="not a NumPy .npz archive"):
        load_table(tmp_path / "single.npz")
    np.savez(tmp_path / "short_y.npz", X=np.zeros((3, 2)), y=np.array([0, 1]))
    with pytest.raises(DataError, match="X has 3 rows"):
        load_table(tmp_path / "short_y.npz")
    np.savez(tmp_path / "no_target.npz", X=np.zeros((3, 2)))
    with pytest.raises(DataError, match="no array 'target'"):
        load_table(tmp_path / "no_target.npz", label_column="target")


def test_mat_files(tmp_path):
    X = np.random.default_rng(0).normal(size=(6, 2))
    scipy.io.savemat(tmp_path / "odds.mat", {"X": X, "y": np.array([[0], [0], [1], [0], [0], [1]])})
    data = load_table(tmp_path / "odds.mat")
    assert np.allclose(data.table.to_numpy(), X) and data.labels.tolist() == [0, 0, 1, 0, 0, 1]
    scipy.io.savemat(tmp_path / "nox.mat", {"data": X})
    with pytest.raises(DataError, match=r"no variable 'X' \(found \['data'\]\)"):
        load_table(tmp_path / "nox.mat")
    scipy.io.savemat(tmp_path / "cells.mat", {"X": np.array([[1, "a"]], dtype=object)})
    with pytest.raises(DataError, match="cell or struct array"):
        load_table(tmp_path / "cells.mat")
    header = b"MATLAB 7.3 MAT-file, HDF5 schema 1.00 .".ljust(116, b" ") + bytes(8) + b"\x00\x02IM"
    (tmp_path / "v73.mat").write_bytes(header + bytes(512))
    with pytest.raises(DataError, match=r"v7.3 \(HDF5\).*save\(..., '-v7'\)"):
        load_table(tmp_path / "v73.mat")


def test_size_limit_and_unsupported_suffix(tmp_path, monkeypatch):
    FRAME.to_csv(tmp_path / "t.csv", index=False)
    monkeypatch.setattr(tables_module, "MAX_TABLE_BYTES", 10)
    with pytest.raises(DataError, match="over the limit of 10"):
        load_table(tmp_path / "t.csv")
    with pytest.raises(DataError, match="unsupported table format .xlsx"):
        load_table(tmp_path / "t.xlsx")
    with pytest.raises(DataError, match="does not exist"):
        load_table(tmp_path / "missing.csv")


def test_table_dataset_checks_shapes():
    with pytest.raises(DataError, match="no rows"):
        table_dataset(pd.DataFrame({"a": []}), "mem")
    with pytest.raises(DataError, match="2 labels for 3 rows"):
        table_dataset(pd.DataFrame({"a": [1, 2, 3]}), "mem", labels=np.array([0, 1]))


@st.composite
def numeric_csvs(draw) -> tuple[bytes, tuple[int, int]]:
    """``(csv bytes, (rows, columns))`` of a well-formed table :func:`load_table` must read: 1-4
    distinct lowercase names that do not name a label, 1-6 rows of numbers, any of the sniffed delimiters, LF or CRLF
    line ends, with or without a byte-order mark."""
    names = draw(st.lists(st.text(alphabet="abcdefxz", min_size=1, max_size=5), min_size=1, max_size=4,
                          unique=True))  # no 'y': a 0/1 column named y is found as the label, not a feature
    number = st.one_of(st.integers(-10**6, 10**6), st.floats(-1e6, 1e6))
    rows = draw(st.lists(st.lists(number, min_size=len(names), max_size=len(names)), min_size=1, max_size=6))
    delimiter = draw(st.sampled_from(tables_module.CSV_DELIMITERS))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    lines = [delimiter.join(map(str, row)) for row in [names, *rows]]
    text = draw(st.sampled_from(["", "\ufeff"])) + newline.join(lines) + newline
    return text.encode("utf-8"), (len(rows), len(names))


_CSV_BYTES = st.one_of(
    numeric_csvs(),
    st.tuples(st.binary(max_size=300), st.none()),
    st.tuples(st.text(alphabet=st.sampled_from(list("ab01,;\t|\"\n\r .-eE\ufeff\x00")), max_size=200).map(
        lambda text: text.encode("utf-8")), st.none()),
)
"""``(content, shape)``: a well-formed table and its shape, or random bytes or csv-like text (shape None)."""


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fuzzed=_CSV_BYTES)
def test_well_formed_csvs_load_and_any_csv_bytes_load_or_raise_data_error(tmp_path, fuzzed):
    content, shape = fuzzed
    path = tmp_path / "fuzz.csv"
    path.write_bytes(content)
    try:
        data = load_table(path)
    except DataError:
        assert shape is None, "a well-formed numeric csv must load"
        return
    assert len(data) == data.table.shape[0] > 0 and data.table.shape[1] > 0
    assert data.ids == [str(i) for i in range(len(data))]
    if shape is not None:
        assert data.table.shape == shape
        assert all(pd.api.types.is_numeric_dtype(dtype) for dtype in data.table.dtypes)
