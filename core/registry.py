"""The SQLite registry of runs: their status, rounds and metrics, and the expert's verdicts.

The registry (``registry.sqlite`` in the Refinery home, ``$REFINERY_HOME`` or ``~/.refinery``)
lists runs, their rounds and metrics, and the expert's verdicts; it uses WAL mode and a busy
timeout so the app and the CLI can write at once. A run's status is ``running``, ``done``,
``failed`` or ``cancelled`` (stopped by the user: the studio's Cancel button, Ctrl-C). A running
run records its owner process (host, pid, process start time); opening the registry marks runs
whose owner has ended as failed, "interrupted (process ended)", so no run stays ``running`` forever.

A run started from the studio records the id of its studio session (``session``, a hash of the
session's secret key): it is private to that session until the session shares it
(:meth:`Registry.share_run`). Runs without a session (the command line's) belong to the machine's
owner and are visible to every session. :meth:`Registry.runs` with ``visible_to`` and
:meth:`Registry.may_open` apply that rule.

A write the disk refuses (full, read-only, no permission) is a :class:`~core.errors.StorageError`
that names the cause.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sqlite3
import time
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from core.errors import RunError, StorageError
from core.files import DISK_ERRORS, disk_errors

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0
FAILED, CANCELLED = "failed", "cancelled"
"""The ``status`` of a run that ended without a result: by an error, or stopped by the user (besides
``running`` and ``done``)."""
INTERRUPTED = "interrupted (process ended)"
"""Registry message of a run whose process ended without finishing or failing it."""

_VERDICTS_TABLE = """
CREATE TABLE IF NOT EXISTS verdicts (
    fingerprint TEXT NOT NULL,
    sample_id TEXT NOT NULL,
    session TEXT NOT NULL DEFAULT '',
    verdict TEXT NOT NULL CHECK (verdict IN ('normal', 'anomaly', 'unsure')),
    note TEXT,
    created REAL NOT NULL,
    run_id TEXT,
    PRIMARY KEY (fingerprint, sample_id, session)
);
"""
"""A verdict belongs to a sample of the data (its ``fingerprint`` and ``sample_id``), not to a run, so
every run on the same data shows it. One verdict per sample and author (``session``: the studio
session that recorded it, '' for the command line's), so two sessions never overwrite each other;
``run_id`` is the run it was recorded on, which decides who else may see it
(:meth:`Registry.verdicts`)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    kind TEXT,
    data_source TEXT,
    fingerprint TEXT,
    n_samples INTEGER,
    config TEXT,
    metrics TEXT,
    message TEXT,
    owner TEXT,
    session TEXT,
    shared INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    round INTEGER NOT NULL,
    n_active INTEGER NOT NULL,
    n_removed INTEGER NOT NULL,
    gamma REAL NOT NULL,
    removal_precision REAL,
    removal_recall REAL,
    seconds REAL NOT NULL,
    note TEXT NOT NULL,
    PRIMARY KEY (run_id, round)
);
""" + _VERDICTS_TABLE


def refinery_home() -> Path:
    """Folder for the registry and workspaces: ``$REFINERY_HOME`` or ``~/.refinery``."""
    return Path(os.environ.get("REFINERY_HOME") or Path.home() / ".refinery")


_RUN_COLUMNS = "run_id, path, created, status, kind, data_source, fingerprint, n_samples, config, metrics, message"
_RECORD_COLUMNS = f"{_RUN_COLUMNS}, session, shared"


@dataclass(frozen=True)
class RunRecord:
    """One row of the registry."""

    run_id: str
    path: str
    created: float
    status: str
    kind: str | None
    data_source: str | None
    fingerprint: str | None
    n_samples: int | None
    config: dict
    metrics: dict
    message: str | None
    session: str | None = None
    """The studio session that started the run; None for the command line's runs."""
    shared: bool = False
    """Whether that session shared the run with the other sessions."""

    def owned_by(self, session: str) -> bool:
        """Whether ``session`` started this run (and may share it)."""
        return self.session is not None and self.session == session

    def visible_to(self, session: str) -> bool:
        """Whether ``session`` may list and open this run: its own, a shared one, or the command line's."""
        return self.session is None or self.shared or self.session == session


class Registry:
    """The SQLite list of runs. Each method opens its own short connection (thread- and process-safe).

    Opening it (and listing runs) marks ``running`` runs whose owner process has ended as failed
    (:meth:`reap_stale`).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path else refinery_home() / "registry.sqlite"
        with disk_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)
            _add_missing_columns(db)
            _key_verdicts_by_data(db)
        self.reap_stale()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            with closing(sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)) as db:
                _use_write_ahead_log(db)
                db.execute("PRAGMA foreign_keys=ON")
                with db:
                    yield db
        except sqlite3.OperationalError as error:
            cause = _SQLITE_DISK_ERRORS.get(error.sqlite_errorcode & 0xFF)  # the primary result code
            if cause is None:
                raise
            raise StorageError(f"cannot write the registry {self.path}: {cause}") from error

    def start_run(
        self, path: Path, *, kind: str, data_source: str, fingerprint: str, n_samples: int, config: dict,
        run_id: str | None = None, session: str | None = None,
    ) -> str:
        """Register a run as ``running``, owned by this process; returns its id.

        ``session`` is the id of the studio session that starts the run (None from the command
        line); the run is private to it until shared. With ``run_id`` (a resumed fit), that run is
        registered again: its rounds are cleared and its status, owner and details replaced (its
        session and sharing are kept when the resuming caller gives no session). RunError when a
        live process still owns it.
        """
        run_id = run_id or uuid.uuid4().hex[:12]
        owner = _this_process()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # the check and the claim below are one step for other writers
            row = db.execute("SELECT status, owner FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is not None and row[0] == "running" and row[1] not in (None, owner) and _owner_alive(row[1]):
                host, pid, _ = row[1].rsplit(":", 2)
                raise RunError(f"run {run_id} ({path}) is being fitted by process {pid} on {host}; "
                               "wait for it to end or stop it")
            db.execute("DELETE FROM rounds WHERE run_id=?", (run_id,))
            db.execute(
                f"INSERT INTO runs ({_RUN_COLUMNS}, owner, session) "
                "VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, '{}', NULL, ?, ?) "
                "ON CONFLICT(run_id) DO UPDATE SET path=excluded.path, status='running', kind=excluded.kind, "
                "data_source=excluded.data_source, fingerprint=excluded.fingerprint, n_samples=excluded.n_samples, "
                "config=excluded.config, metrics='{}', message=NULL, owner=excluded.owner, "
                "session=COALESCE(excluded.session, runs.session)",
                (run_id, str(Path(path).resolve()), time.time(), kind, data_source, fingerprint, n_samples,
                 json.dumps(config), owner, session),
            )
        return run_id

    def add_round(self, run_id: str, *, round: int, n_active: int, n_removed: int, gamma: float,
                  precision: float | None, recall: float | None, seconds: float, note: str) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, round, n_active, n_removed, gamma, precision, recall, seconds, note),
            )

    def finish_run(self, run_id: str, metrics: dict) -> None:
        with self._connect() as db:
            db.execute("UPDATE runs SET status='done', metrics=?, message=NULL WHERE run_id=?", (json.dumps(metrics), run_id))

    def fail_run(self, run_id: str, message: str, *, cancelled: bool = False) -> None:
        """Record that the run ended without a result: ``cancelled`` when the user stopped it (an
        exception in ``CANCELS``), else ``failed``; ``message`` says why."""
        status = CANCELLED if cancelled else FAILED
        with self._connect() as db:
            db.execute("UPDATE runs SET status=?, message=? WHERE run_id=?", (status, message, run_id))

    def reap_stale(self) -> list[str]:
        """Mark ``running`` runs whose owner process has ended as failed (``INTERRUPTED``); their ids.

        A run's owner is checked on this host only (pid and process start time on Linux, the pid
        elsewhere); runs owned on another host, or anywhere on Windows, are left as they are.
        Runs from before owners were recorded count as ended. A run marked by mistake is still
        marked done or failed by its process when it ends.
        """
        with self._connect() as db:
            rows = db.execute("SELECT run_id, owner FROM runs WHERE status='running'").fetchall()
            ended = [(run_id, owner) for run_id, owner in rows if owner is None or not _owner_alive(owner)]
            if ended:  # a registry with nothing to mark is only read
                db.executemany(
                    "UPDATE runs SET status='failed', message=? WHERE run_id=? AND status='running' AND owner IS ?",
                    [(INTERRUPTED, run_id, owner) for run_id, owner in ended],
                )
        for run_id, _ in ended:
            log.info("run %s: %s", run_id, INTERRUPTED)
        return [run_id for run_id, _ in ended]

    def runs(self, *, visible_to: str | None = None) -> list[RunRecord]:
        """Runs, newest first (after :meth:`reap_stale`).

        Parameters
        ----------
        visible_to : str, optional
            A studio session's id: only the runs it may see (:meth:`RunRecord.visible_to`: its own,
            shared ones and the command line's). None lists every run (the command line's view).
        """
        self.reap_stale()
        where, parameters = ("", ()) if visible_to is None else (
            "WHERE session IS NULL OR shared OR session=? ", (visible_to,))
        with self._connect() as db:
            rows = db.execute(f"SELECT {_RECORD_COLUMNS} FROM runs {where}ORDER BY created DESC", parameters).fetchall()
        return [_record(row) for row in rows]

    def run_at(self, run_dir: Path | str) -> RunRecord | None:
        """The record of the run saved in ``run_dir``, or None when the registry does not list it.

        The run is found by its folder (however the path is spelled) or, for a folder the registry
        knows under another path, by the run id its ``run.json`` names.
        """
        run_dir = Path(run_dir).resolve()
        try:
            run_id = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("run_id")
        except (OSError, ValueError, AttributeError):  # no run here, or a damaged one: matched by folder only
            run_id = None
        with self._connect() as db:
            row = db.execute(f"SELECT {_RECORD_COLUMNS} FROM runs WHERE path=? OR run_id=? ORDER BY path=? DESC",
                             (str(run_dir), run_id, str(run_dir))).fetchone()
        return None if row is None else _record(row)

    def may_open(self, run_dir: Path | str, session: str) -> bool:
        """Whether ``session`` may open the run in ``run_dir``: False only for another session's
        private run (a folder the registry does not list is no session's)."""
        record = self.run_at(run_dir)
        return record is None or record.visible_to(session)

    def share_run(self, run_id: str, shared: bool, *, session: str) -> None:
        """Share ``session``'s run with every other session (``shared=True``) or make it private again.

        Raises
        ------
        RunError
            If the run is not ``session``'s (another session's, the command line's or unknown).
        """
        with self._connect() as db:
            changed = db.execute("UPDATE runs SET shared=? WHERE run_id=? AND session=?",
                                 (int(shared), run_id, session)).rowcount
        if not changed:
            raise RunError(f"run {run_id} was not started by this session; only the session that started it "
                           "can share it")

    def rounds(self, run_id: str) -> list[dict]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM rounds WHERE run_id=? ORDER BY round", (run_id,)).fetchall()
        return [dict(row) for row in rows]

    def set_verdict(self, fingerprint: str, sample_id: str, verdict: str, note: str = "", *,
                    run_id: str | None = None, session: str | None = None) -> None:
        """Record (or replace) an expert's verdict on a sample: ``normal``, ``anomaly`` or ``unsure``.

        The verdict belongs to the sample ``sample_id`` of the data with ``fingerprint``, so every
        run on that data shows it. ``session`` is the studio session recording it (None: the command
        line); each session has its own verdict on a sample, so two sessions never overwrite each
        other. ``run_id`` is the run it was recorded on: the verdict is visible wherever that run is
        (:meth:`verdicts`).
        """
        with self._connect() as db:
            db.execute(
                "INSERT INTO verdicts (fingerprint, sample_id, session, verdict, note, created, run_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fingerprint, sample_id, session) DO UPDATE SET "
                "verdict=excluded.verdict, note=excluded.note, created=excluded.created, run_id=excluded.run_id",
                (fingerprint, sample_id, session or "", verdict, note, time.time(), run_id),
            )

    def verdicts(self, fingerprint: str, *, visible_to: str | None = None) -> dict[str, tuple[str, str]]:
        """The expert's verdicts on samples of the data with ``fingerprint``, recorded on any run of it:
        sample id -> (verdict, note).

        Parameters
        ----------
        visible_to : str, optional
            A studio session's id: only the verdicts it may see, its own and those recorded on a run it
            may see (:meth:`RunRecord.visible_to`; a verdict on another session's private run stays
            private). Where several verdicts on a sample remain, the session's own wins, else the
            latest. None: every verdict, the latest winning (the command line's view).
        """
        visible = "" if visible_to is None else (
            "AND (verdicts.session=?2 OR runs.run_id IS NULL OR runs.session IS NULL OR runs.shared OR runs.session=?2) ")
        with self._connect() as db:
            rows = db.execute(
                "SELECT sample_id, verdict, note FROM verdicts LEFT JOIN runs USING (run_id) "
                f"WHERE verdicts.fingerprint=?1 {visible}ORDER BY verdicts.session IS ?2, verdicts.created",
                (fingerprint, visible_to),
            ).fetchall()
        return {sample: (verdict, note or "") for sample, verdict, note in rows}  # the last row of a sample wins


_SQLITE_DISK_ERRORS = {
    sqlite3.SQLITE_FULL: DISK_ERRORS[errno.ENOSPC],
    sqlite3.SQLITE_READONLY: DISK_ERRORS[errno.EROFS],
    sqlite3.SQLITE_CANTOPEN: "it cannot be opened or created; check that its folder is writable",
}


_ADDED_COLUMNS = {"owner": "TEXT", "session": "TEXT", "shared": "INTEGER NOT NULL DEFAULT 0"}
"""Columns of ``runs`` that older registries lack, with their definitions (old runs: no owner, no
session, not shared)."""


def _use_write_ahead_log(db: sqlite3.Connection) -> None:
    """Switch the registry to write-ahead logging (a setting of the file, so it happens once).

    The switch needs the database to itself, and SQLite does not wait for that: processes opening
    a new or older registry at the same moment retry for up to ``BUSY_TIMEOUT_S``.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a registry made by an older version up to the current schema."""
    columns = _columns(db, "runs")
    for name, definition in _ADDED_COLUMNS.items():
        if name in columns:
            continue
        try:
            db.execute(f"ALTER TABLE runs ADD COLUMN {name} {definition}")
        except sqlite3.OperationalError as error:  # another process added it since
            if "duplicate column" not in str(error):
                raise


def _key_verdicts_by_data(db: sqlite3.Connection) -> None:
    """Carry the verdicts of a registry that keyed them by run (``run_id, sample_id``) to the data of
    their run (``_VERDICTS_TABLE``): each verdict goes to its run's fingerprint, authored by its run's
    session, remembering the run. Where one sample was judged on several runs of the same data, the
    latest verdict is kept. Done once, in one transaction; an opener that waited for another's
    migration finds it done."""
    if "fingerprint" in _columns(db, "verdicts"):
        return
    db.execute("BEGIN IMMEDIATE")
    if "fingerprint" in _columns(db, "verdicts"):  # another process migrated it while this one waited
        return
    db.execute("ALTER TABLE verdicts RENAME TO verdicts_by_run")
    db.execute(_VERDICTS_TABLE)
    db.execute(
        "INSERT INTO verdicts (fingerprint, sample_id, session, verdict, note, created, run_id) "
        "SELECT runs.fingerprint, old.sample_id, COALESCE(runs.session, ''), old.verdict, old.note, "
        "MAX(old.created), old.run_id FROM verdicts_by_run AS old JOIN runs USING (run_id) "
        "WHERE runs.fingerprint IS NOT NULL GROUP BY runs.fingerprint, old.sample_id, COALESCE(runs.session, '')"
    )  # SQLite takes the bare columns of a MAX() group from the row holding the maximum
    before, after = (db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("verdicts_by_run", "verdicts"))
    db.execute("DROP TABLE verdicts_by_run")
    log.info("registry: verdicts now belong to the data of their run: %d of %d carried over (the rest were "
             "older verdicts on the same samples)", after, before)


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _record(row: tuple) -> RunRecord:
    """A :class:`RunRecord` from a row of ``_RECORD_COLUMNS``."""
    *fields, config, metrics, message, session, shared = row
    return RunRecord(*fields, json.loads(config or "{}"), json.loads(metrics or "{}"), message, session, bool(shared))


def _this_process() -> str:
    """``host:pid:start`` of this process (``start`` empty where the OS does not tell)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid()) or ''}"


def _process_start(pid: int) -> str | None:
    """Linux: the process's start time in clock ticks since boot (tells a reused pid apart); else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if fields[0] not in ("Z", "X") else None  # a zombie has ended


def _owner_alive(owner: str) -> bool:
    """Whether the process recorded as ``host:pid:start`` may still be running (True when unsure)."""
    host, pid_text, started = owner.rsplit(":", 2)
    if host != socket.gethostname() or os.name == "nt":  # Windows: os.kill(pid, 0) would stop the process
        return True
    pid = int(pid_text)
    if Path("/proc/self/stat").exists():
        now = _process_start(pid)
        return now is not None and (not started or now == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
