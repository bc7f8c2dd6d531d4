"""The registry keeps each studio session's runs to itself (its *workspace*) until the session shares them.

A studio session is named in the registry by its id (``session``, a hash of its secret key);
the command line's runs have none and are visible to every session. Older registries gain the
``session`` and ``shared`` columns on opening, their runs becoming the command line's.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from contextlib import closing

import pytest

from core.errors import Cancelled, RunError
from core.registry import Registry

ALICE, BOB = "a" * 32, "b" * 32


def start(registry: Registry, run_dir, session: str | None = None, **changes) -> str:
    """Register a finished run saved in ``run_dir`` (with its ``run.json``) for ``session``; its id."""
    run_id = registry.start_run(run_dir, kind="table", data_source="t.csv", fingerprint="f", n_samples=10,
                                config={}, session=session, **changes)
    run_dir.mkdir(exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id}))
    registry.finish_run(run_id, {})
    return run_id


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "registry.sqlite")


@pytest.fixture
def three_runs(registry, tmp_path) -> dict[str, str]:
    """One run of Alice's, one of Bob's, one from the command line: their ids by owner."""
    return {"alice": start(registry, tmp_path / "alice", ALICE), "bob": start(registry, tmp_path / "bob", BOB),
            "cli": start(registry, tmp_path / "cli")}


def listed(registry: Registry, session: str | None = None) -> set[str]:
    return {record.run_id for record in registry.runs(visible_to=session)}


def test_a_session_lists_its_own_runs_and_the_command_lines(registry, three_runs):
    assert listed(registry, ALICE) == {three_runs["alice"], three_runs["cli"]}
    assert listed(registry, BOB) == {three_runs["bob"], three_runs["cli"]}
    assert listed(registry, "c" * 32) == {three_runs["cli"]}
    assert listed(registry) == set(three_runs.values())  # the command line's view: every run
    records = {record.run_id: record for record in registry.runs()}
    assert records[three_runs["alice"]].session == ALICE and records[three_runs["cli"]].session is None
    assert not any(record.shared for record in records.values())


def test_a_shared_run_is_listed_for_every_session_until_unshared(registry, three_runs):
    registry.share_run(three_runs["alice"], True, session=ALICE)
    assert listed(registry, BOB) == set(three_runs.values())
    record = next(record for record in registry.runs(visible_to=BOB) if record.run_id == three_runs["alice"])
    assert record.shared and record.visible_to(BOB) and not record.owned_by(BOB) and record.owned_by(ALICE)
    registry.share_run(three_runs["alice"], False, session=ALICE)
    assert listed(registry, BOB) == {three_runs["bob"], three_runs["cli"]}


@pytest.mark.parametrize("owner", ["bob", "cli"])
def test_only_the_session_that_made_a_run_can_share_it(registry, three_runs, owner):
    with pytest.raises(RunError, match="only the session that started it can share it"):
        registry.share_run(three_runs[owner], True, session=ALICE)
    assert not any(record.shared for record in registry.runs())


def test_may_open_refuses_another_sessions_private_run_however_its_path_is_spelled(registry, three_runs, tmp_path):
    bob = tmp_path / "bob"
    for spelling in (bob, f"{bob}/", tmp_path / "alice" / ".." / "bob", bob / "."):
        assert not registry.may_open(spelling, ALICE), spelling
        assert registry.may_open(spelling, BOB), spelling
    assert registry.may_open(tmp_path / "cli", ALICE) and registry.may_open(tmp_path / "alice", ALICE)
    copy = tmp_path / "elsewhere" / "bob-copy"  # the same run under another path: known by its run.json
    shutil.copytree(bob, copy)
    assert not registry.may_open(copy, ALICE) and registry.run_at(copy).run_id == three_runs["bob"]
    assert registry.may_open(tmp_path / "not-a-run", ALICE) and registry.run_at(tmp_path / "not-a-run") is None
    registry.share_run(three_runs["bob"], True, session=BOB)
    assert registry.may_open(bob, ALICE) and registry.may_open(copy, ALICE)


def test_a_resumed_fit_keeps_its_session_and_sharing(registry, three_runs, tmp_path):
    registry.share_run(three_runs["alice"], True, session=ALICE)
    registry.start_run(tmp_path / "alice", kind="table", data_source="t.csv", fingerprint="f", n_samples=10,
                       config={}, run_id=three_runs["alice"])  # `refinery fit --resume` gives no session
    record = registry.run_at(tmp_path / "alice")
    assert (record.run_id, record.status) == (three_runs["alice"], "running")
    assert (record.session, record.shared) == (ALICE, True)


BEFORE_OWNERS = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, path TEXT NOT NULL, created REAL NOT NULL, status TEXT NOT NULL,
    kind TEXT, data_source TEXT, fingerprint TEXT, n_samples INTEGER, config TEXT, metrics TEXT, message TEXT);
INSERT INTO runs VALUES ('old-done', '/r/a', 1.0, 'done', 'table', 'x', 'f', 10, '{}', '{"auroc": 0.9}', NULL);
"""
BEFORE_SESSIONS = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, path TEXT NOT NULL, created REAL NOT NULL, status TEXT NOT NULL,
    kind TEXT, data_source TEXT, fingerprint TEXT, n_samples INTEGER, config TEXT, metrics TEXT, message TEXT,
    owner TEXT);
INSERT INTO runs VALUES ('old-done', '/r/a', 1.0, 'done', 'table', 'x', 'f', 10, '{}', '{"auroc": 0.9}', NULL,
    'host:1:2');
"""


def open_at_once(path, openers: int = 4) -> list[Exception]:
    """Open the registry at ``path`` from several threads at the same moment; the errors they met."""
    errors = []

    def open_registry() -> None:
        try:
            Registry(path)
        except Exception as error:  # collected for the caller to assert on
            errors.append(error)

    threads = [threading.Thread(target=open_registry) for _ in range(openers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


@pytest.mark.parametrize("schema", [None, BEFORE_OWNERS, BEFORE_SESSIONS], ids=["new", "before-owners", "before-sessions"])
def test_openers_racing_to_create_or_migrate_a_registry_all_succeed(tmp_path, schema):
    # Switching a file to write-ahead logging needs it to itself, and SQLite does not wait for that:
    # before the openers retried, about 1 race in 12 failed with "database is locked".
    for attempt in range(25):
        path = tmp_path / f"registry-{attempt}.sqlite"
        if schema is not None:
            with closing(sqlite3.connect(path)) as db:
                db.executescript(schema)
        assert open_at_once(path) == []


@pytest.mark.parametrize("schema", [BEFORE_OWNERS, BEFORE_SESSIONS], ids=["before-owners", "before-sessions"])
def test_an_older_registry_gains_sessions_and_its_runs_stay_visible_to_everyone(tmp_path, schema):
    path = tmp_path / "registry.sqlite"
    with closing(sqlite3.connect(path)) as db:
        db.executescript(schema)
    assert open_at_once(path) == []  # all migrate at once
    registry = Registry(path)
    with closing(sqlite3.connect(path)) as db:
        assert {"owner", "session", "shared"} <= {row[1] for row in db.execute("PRAGMA table_info(runs)")}
    [old] = registry.runs(visible_to=ALICE)
    assert (old.run_id, old.status, old.metrics) == ("old-done", "done", {"auroc": 0.9})
    assert (old.session, old.shared) == (None, False)  # the command line's: visible to every session
    assert registry.may_open("/r/a", ALICE)
    new = start(registry, tmp_path / "new", BOB)
    assert listed(registry, ALICE) == {"old-done"} and listed(registry, BOB) == {"old-done", new}


# ----------------------------------------------------------------------------- how a run ended


def fit_stopped_by(home, stop: BaseException):
    """Fit a small table with ``home`` as the Refinery home, ``stop`` raised at the fit's first progress event
    (as Ctrl-C or an error would strike); the registry's one record of it."""
    from core import engine
    from core.progress import Monitor
    from sample_data import write_digits_table

    def on_progress(event):
        raise stop

    table = write_digits_table(home / "digits.csv", n_normal=60, n_anomalous=6)
    dataset = engine.load_data(table, label_column="label")
    with pytest.raises(type(stop)):
        engine.fit(dataset, engine.suggested_config(dataset), home / "runs" / "r", monitor=Monitor(on_progress))
    [record] = Registry().runs()
    return record


@pytest.mark.parametrize(("stop", "status"), [
    (KeyboardInterrupt(), "cancelled"), (Cancelled("cancelled by the user"), "cancelled"), (ValueError("disk on fire"), "failed"),
], ids=["ctrl-c", "cancel token", "error"])
def test_a_run_the_user_stopped_is_cancelled_and_refinery_runs_says_so(tmp_path, monkeypatch, capsys, stop, status):
    from core.cli import main

    monkeypatch.setenv("REFINERY_HOME", str(tmp_path))
    record = fit_stopped_by(tmp_path, stop)
    assert record.status == status
    assert main(["runs"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(record.run_id))
    assert line.split()[1] == status


def test_fail_run_records_what_it_is_told(registry, tmp_path):
    run_id = registry.start_run(tmp_path / "r", kind="table", data_source="t.csv", fingerprint="f", n_samples=10,
                                config={})
    registry.fail_run(run_id, "stopped", cancelled=True)
    assert (registry.run_at(tmp_path / "r").status, registry.run_at(tmp_path / "r").message) == ("cancelled", "stopped")
    registry.fail_run(run_id, "out of memory")
    assert registry.run_at(tmp_path / "r").status == "failed"
