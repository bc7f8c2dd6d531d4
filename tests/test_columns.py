"""Column roles of a table (issue 15): ids carried through and never features, labels never silently
features, the user's choices first, problems named with the role that fixes them."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from core.cli import main
from core.data.columns import _column_facts, _table_facts, profile_columns, role_of
from core.data.tables import load_table
from core.errors import DataError


def analyst_table(rng: np.random.Generator, n: int = 120) -> pd.DataFrame:
    """An operations analyst's records: a text id, measurements, a site, a fraud flag; row 7 is odd."""
    frame = pd.DataFrame({"id": [f"REC-{i:06d}" for i in rng.permutation(n) + 1000],
                          "amount": rng.normal(100, 10, n).round(2), "items": rng.integers(1, 9, n),
                          "site": rng.choice(["north", "south", "east"], n), "is_fraud": np.zeros(n, int)})
    frame.loc[7, ["amount", "is_fraud"]] = [900.0, 1]
    return frame


def roles(frame: pd.DataFrame, **choices) -> dict[str, str]:
    return {profile.name: profile.role for profile in profile_columns(frame, **choices)}


def test_automatic_roles_find_the_id_the_label_and_the_features():
    frame = analyst_table(np.random.default_rng(0))
    frame.insert(0, "row", np.arange(len(frame)))  # the index DataFrame.to_csv writes by default
    assert roles(frame) == {"row": "ignore", "id": "id", "amount": "feature", "items": "feature",
                            "site": "feature", "is_fraud": "label"}, "a text id is preferred to a row counter"
    profiles = {p.name: p for p in profile_columns(frame)}
    assert profiles["site"].kind == "categorical" and profiles["site"].distinct == 3
    assert "used for metrics only" in profiles["is_fraud"].reason
    assert profiles["amount"].example == f"{frame.loc[0, 'amount']:.6g}", "without float noise"
    assert roles(frame, id_column="none")["id"] == "ignore", "an identifier is never a feature, even without ids"
    assert roles(frame, label_column="none")["is_fraud"] == "feature"


def test_the_users_choices_come_first_and_wrong_ones_are_refused():
    frame = analyst_table(np.random.default_rng(1))
    chosen = roles(frame, id_column="id", ignore_columns=["site"], label_column="is_fraud")
    assert chosen == {"id": "id", "amount": "feature", "items": "feature", "site": "ignore", "is_fraud": "label"}
    with pytest.raises(DataError, match="no column 'shop'; its columns are"):
        profile_columns(frame, ignore_columns=["shop"])
    with pytest.raises(DataError, match="'site' cannot be both ignore and id"):
        profile_columns(frame, id_column="site", ignore_columns=["site"])
    with pytest.raises(DataError, match="id column 'site' must name each row once: .* repeat"):
        profile_columns(frame, id_column="site")
    with pytest.raises(DataError, match="no feature column: id is the id, amount is ignored, items is ignored"):
        profile_columns(frame[["id", "amount", "items"]], ignore_columns=["amount", "items"])


def test_problems_are_shown_with_the_role_that_fixes_them():
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"x": rng.normal(size=80), "note": [f"free text {i % 70}" for i in range(80)],
                          "dead": np.nan})
    problems = {p.name: p.problem for p in profile_columns(frame)}
    assert problems["x"] == ""
    assert "70 distinct values" in problems["note"] and "set its role to id if it names rows, else to ignore" in problems["note"]
    assert problems["dead"] == "no value in any row: set its role to ignore"
    assert all(p.problem == "" for p in profile_columns(frame, ignore_columns=["note", "dead"]))


def test_the_loader_keys_rows_by_the_id_and_keeps_only_features(tmp_path):
    frame = analyst_table(np.random.default_rng(3))
    frame.to_csv(tmp_path / "records.csv", index=False)
    data = load_table(tmp_path / "records.csv")
    assert data.ids == frame["id"].tolist()
    assert list(data.table.columns) == ["amount", "items", "site"]
    assert data.labels.tolist() == frame["is_fraud"].tolist()
    assert [(p.name, p.role) for p in data.columns][:2] == [("id", "id"), ("amount", "feature")]
    new_batch = frame.drop(columns=["is_fraud"]).head(5)
    new_batch.to_csv(tmp_path / "batch.csv", index=False)
    scored = load_table(tmp_path / "batch.csv", label_column="is_fraud", id_column="id", ignore_columns=["gone"],
                        label_required=False)  # a run's roles: five rows could not show that "id" names rows
    assert scored.ids == frame["id"].head(5).tolist() and scored.labels is None, "a new batch may lack the label"


def test_the_cli_runs_an_analysts_table_keyed_by_its_ids(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))
    # Earlier tests in this worker may have changed logging (a library's dictConfig disables existing
    # loggers); the roles' log lines are what the user reads, so read them at their own logger.
    for name in ("core.data.tables", "core.models.tabular"):
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
        caplog.set_level(logging.WARNING, logger=name)
    frame = analyst_table(np.random.default_rng(4))
    frame.to_csv(tmp_path / "records.csv", index=False)
    assert main(["fit", str(tmp_path / "records.csv"), "--out", str(tmp_path / "run"), "--ignore-columns", "items"]) == 0
    scores = pd.read_csv(tmp_path / "run" / "scores.csv")
    assert sorted(scores["id"]) == sorted(frame["id"]), "every output row carries the analyst's id"
    assert scores.set_index("id")["anomaly_score"].idxmax() == frame.loc[7, "id"]
    assert "column 'id' is the id" in caplog.text and "column 'items' is ignored (your choice)" in caplog.text
    caplog.clear()

    frame.drop(columns=["is_fraud"]).to_csv(tmp_path / "new.csv", index=False)
    assert main(["score", str(tmp_path / "run"), str(tmp_path / "new.csv"), "--out", str(tmp_path / "new-scores.csv")]) == 0
    assert "ignoring" not in caplog.text, "the id column is expected, not an extra column"
    assert pd.read_csv(tmp_path / "new-scores.csv")["id"].tolist() == frame["id"].tolist()
    assert main(["explain", str(tmp_path / "run"), str(tmp_path / "new.csv"), "--ids", frame.loc[7, "id"]]) == 0
    assert f"row {frame.loc[7, 'id']}:" in capsys.readouterr().out


def test_numeric_columns_read_together_say_what_each_says_alone():
    """profile_columns reads a dtype's columns as one block (a 10,000-column table: 0.7 s, not 12 s);
    each column's counts, kind, example and whether it names rows stay what that column alone gives."""
    n = 12
    frame = pd.DataFrame({
        "counter": np.arange(n)[::-1], "counter_float": np.arange(n, dtype=float) + 5, "bytes": np.arange(n, dtype=np.uint8),
        "gaps": [np.nan, 3.0] * (n // 2), "empty": [np.nan] * n, "zeros": [0.0, -0.0] * (n // 2),
        "infinite": [np.inf, 1.0] + [2.0] * (n - 2), "halves": np.arange(n) / 2, "repeats": [1, 2, 3] * (n // 3),
        "small": np.arange(n, dtype=np.int32) * 2, "flag": [True, False] * (n // 2), "text": [f"t{i}" for i in range(n)]})
    assert _table_facts(frame) == [_column_facts(frame.iloc[:, i]) for i in range(frame.shape[1])]
    assert _table_facts(frame.iloc[:0]) == [_column_facts(frame.iloc[:0, i]) for i in range(frame.shape[1])]


def test_role_of_lists_columns_in_order():
    profiles = profile_columns(analyst_table(np.random.default_rng(5)))
    assert role_of(profiles, "feature") == ["amount", "items", "site"] and role_of(profiles, "id") == ["id"]
