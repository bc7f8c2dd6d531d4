"""The expert's verdicts belong to the samples of a data set (its fingerprint and the sample ids), not to
one run: every run on the same data shows them, two sessions judging at once keep both their verdicts,
a verdict on a session's private run stays private, and a registry that keyed verdicts by run carries
them to its runs' data when opened.
"""
from __future__ import annotations

import sqlite3
import threading
from contextlib import closing

import pytest

from core.registry import Registry

ALICE, BOB = "a" * 32, "b" * 32
DATA, OTHER_DATA = "f" * 32, "0" * 32


def register(registry: Registry, tmp_path, name: str, fingerprint: str = DATA, session: str | None = None) -> str:
    """A finished run on the data with ``fingerprint``; its id."""
    run_id = registry.start_run(tmp_path / name, kind="table", data_source="t.csv", fingerprint=fingerprint,
                                n_samples=10, config={}, session=session)
    registry.finish_run(run_id, {})
    return run_id


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "registry.sqlite")


def test_a_verdict_recorded_on_one_run_is_found_from_every_run_of_the_same_data(registry, tmp_path):
    first, second = register(registry, tmp_path, "first"), register(registry, tmp_path, "second")
    register(registry, tmp_path, "other", OTHER_DATA)
    registry.set_verdict(DATA, "3", "anomaly", "scratch", run_id=first)
    registry.set_verdict(DATA, "7", "normal", run_id=second)
    assert registry.verdicts(DATA) == {"3": ("anomaly", "scratch"), "7": ("normal", "")}
    assert registry.verdicts(OTHER_DATA) == {}  # other data: other samples, whatever their ids
    registry.set_verdict(DATA, "3", "normal", run_id=second)  # a changed mind, on the other run, replaces it
    assert registry.verdicts(DATA) == {"3": ("normal", ""), "7": ("normal", "")}
    with pytest.raises(sqlite3.IntegrityError):
        registry.set_verdict(DATA, "4", "maybe", run_id=first)


def test_two_sessions_judging_the_same_sample_keep_their_own_verdicts(registry, tmp_path):
    shared = register(registry, tmp_path, "cli")  # the command line's run: every session sees it
    registry.set_verdict(DATA, "3", "anomaly", "Alice's", run_id=shared, session=ALICE)
    registry.set_verdict(DATA, "3", "normal", "Bob's", run_id=shared, session=BOB)
    assert registry.verdicts(DATA, visible_to=ALICE)["3"] == ("anomaly", "Alice's")
    assert registry.verdicts(DATA, visible_to=BOB)["3"] == ("normal", "Bob's")
    assert registry.verdicts(DATA)["3"] == ("normal", "Bob's")  # the command line's view: the latest
    assert registry.verdicts(DATA, visible_to="c" * 32)["3"] == ("normal", "Bob's")


def test_a_verdict_on_a_private_run_is_seen_only_where_that_run_is(registry, tmp_path):
    private = register(registry, tmp_path, "alice", session=ALICE)
    bobs = register(registry, tmp_path, "bob", session=BOB)  # Bob's own run of the same data
    registry.set_verdict(DATA, "3", "anomaly", "private note", run_id=private, session=ALICE)
    assert registry.verdicts(DATA, visible_to=ALICE) == {"3": ("anomaly", "private note")}
    assert registry.verdicts(DATA, visible_to=BOB) == {}
    registry.share_run(private, True, session=ALICE)
    assert registry.verdicts(DATA, visible_to=BOB) == {"3": ("anomaly", "private note")}
    registry.set_verdict(DATA, "5", "normal", run_id=bobs, session=BOB)
    assert registry.verdicts(DATA, visible_to=ALICE) == {"3": ("anomaly", "private note")}  # Bob's run is private
    registry.share_run(private, False, session=ALICE)
    assert registry.verdicts(DATA, visible_to=BOB) == {"5": ("normal", "")}


def test_verdicts_written_at_once_by_two_sessions_are_all_kept(tmp_path):
    path, samples = tmp_path / "registry.sqlite", 60
    run = register(Registry(path), tmp_path, "cli")
    start = threading.Barrier(2)
    errors = []

    def judge(session: str, verdict: str) -> None:
        registry = Registry(path)  # each studio session is a thread of the server with the same registry file
        start.wait()
        try:
            for index in range(samples):
                mine = f"{session[0]}-{index}"
                registry.set_verdict(DATA, mine, verdict, run_id=run, session=session)
                registry.set_verdict(DATA, "both", verdict, session[0], run_id=run, session=session)
                registry.verdicts(DATA, visible_to=session)  # pages read while the other session writes
        except Exception as error:  # collected for the assertion below
            errors.append(error)

    threads = [threading.Thread(target=judge, args=(ALICE, "anomaly")), threading.Thread(target=judge, args=(BOB, "normal"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    registry = Registry(path)
    for session, verdict in ((ALICE, "anomaly"), (BOB, "normal")):
        seen = registry.verdicts(DATA, visible_to=session)
        assert {f"{session[0]}-{index}" for index in range(samples)} <= set(seen)
        assert seen["both"] == (verdict, session[0])  # neither session's verdict on it replaced the other's
    assert len(registry.verdicts(DATA)) == 2 * samples + 1


# ----------------------------------------------------------------------------- older registries

VERDICTS_BY_RUN = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, path TEXT NOT NULL, created REAL NOT NULL, status TEXT NOT NULL,
    kind TEXT, data_source TEXT, fingerprint TEXT, n_samples INTEGER, config TEXT, metrics TEXT, message TEXT,
    owner TEXT, session TEXT, shared INTEGER NOT NULL DEFAULT 0);
CREATE TABLE rounds (run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, round INTEGER NOT NULL,
    n_active INTEGER NOT NULL, n_removed INTEGER NOT NULL, gamma REAL NOT NULL, removal_precision REAL,
    removal_recall REAL, seconds REAL NOT NULL, note TEXT NOT NULL, PRIMARY KEY (run_id, round));
CREATE TABLE verdicts (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    sample_id TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('normal', 'anomaly', 'unsure')),
    note TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, sample_id)
);
INSERT INTO runs VALUES ('cli-a', '/r/a', 1.0, 'done', 'table', 'x', 'ffffffffffffffffffffffffffffffff', 10, '{}', '{}',
    NULL, NULL, NULL, 0);
INSERT INTO runs VALUES ('cli-b', '/r/b', 2.0, 'done', 'table', 'x', 'ffffffffffffffffffffffffffffffff', 10, '{}', '{}',
    NULL, NULL, NULL, 0);
INSERT INTO runs VALUES ('alice', '/r/c', 3.0, 'done', 'table', 'x', 'ffffffffffffffffffffffffffffffff', 10, '{}', '{}',
    NULL, NULL, 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 0);
INSERT INTO runs VALUES ('other', '/r/d', 4.0, 'done', 'table', 'x', '00000000000000000000000000000000', 10, '{}', '{}',
    NULL, NULL, NULL, 0);
INSERT INTO verdicts VALUES ('cli-a', '3', 'anomaly', 'first look', 10.0);
INSERT INTO verdicts VALUES ('cli-b', '3', 'normal', 'second look', 20.0);
INSERT INTO verdicts VALUES ('cli-a', '4', 'unsure', NULL, 11.0);
INSERT INTO verdicts VALUES ('alice', '4', 'anomaly', 'hers', 12.0);
INSERT INTO verdicts VALUES ('other', '3', 'normal', 'other data', 13.0);
"""
"""A registry from before verdicts belonged to the data: keyed by run. Two command-line runs and a private
run of Alice's on one data set, one run on other data."""


def old_registry(path):
    with closing(sqlite3.connect(path)) as db:
        db.executescript(VERDICTS_BY_RUN)
    return path


def test_an_older_registry_carries_its_verdicts_to_the_data_of_their_runs(tmp_path):
    registry = Registry(old_registry(tmp_path / "registry.sqlite"))
    with closing(sqlite3.connect(registry.path)) as db:
        assert {"fingerprint", "session"} <= {row[1] for row in db.execute("PRAGMA table_info(verdicts)")}
        assert db.execute("SELECT name FROM sqlite_master WHERE name='verdicts_by_run'").fetchone() is None
    assert registry.verdicts(DATA) == {"3": ("normal", "second look"), "4": ("anomaly", "hers")}  # the latest
    assert registry.verdicts(DATA, visible_to=BOB) == {"3": ("normal", "second look"), "4": ("unsure", "")}
    assert registry.verdicts(DATA, visible_to=ALICE)["4"] == ("anomaly", "hers")  # her own wins for her
    assert registry.verdicts(OTHER_DATA) == {"3": ("normal", "other data")}
    registry.set_verdict(DATA, "9", "anomaly", "on no listed run", session=BOB)  # new verdicts, by anyone
    registry.set_verdict(DATA, "4", "normal", "Bob's", run_id=register(registry, tmp_path, "new"), session=BOB)
    after = Registry(registry.path)  # opening it again migrates nothing more
    assert after.verdicts(DATA, visible_to=BOB) == {"3": ("normal", "second look"), "4": ("normal", "Bob's"),
                                                    "9": ("anomaly", "on no listed run")}
    assert after.verdicts(DATA, visible_to=ALICE)["4"] == ("anomaly", "hers")


def test_openers_racing_to_migrate_the_verdicts_carry_each_one_once(tmp_path):
    for attempt in range(10):
        path = old_registry(tmp_path / f"registry-{attempt}.sqlite")
        errors = []

        def open_registry() -> None:
            try:
                Registry(path)
            except Exception as error:  # collected for the assertion below
                errors.append(error)

        threads = [threading.Thread(target=open_registry) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT COUNT(*) FROM verdicts").fetchone() == (4,)  # 5 less one replaced
