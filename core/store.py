"""Runs on disk: atomic artifact files in a run directory and a SQLite registry of runs.

A run directory is built under a temporary name beside its destination and renamed into place
only when complete, so a crash or an error never leaves a half-written run behind. The registry
(``registry.sqlite`` in the Refinery home, ``$REFINERY_HOME`` or ``~/.refinery``) lists runs,
their rounds and metrics, and the expert's verdicts; it uses WAL mode and a busy timeout so the
app and the CLI can write at once.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors.numpy import load_file, save

from core.errors import RunError

BUSY_TIMEOUT_S = 30.0

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
    message TEXT
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
CREATE TABLE IF NOT EXISTS verdicts (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    sample_id TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('normal', 'anomaly', 'unsure')),
    note TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, sample_id)
);
"""


def refinery_home() -> Path:
    """Folder for the registry and workspaces: ``$REFINERY_HOME`` or ``~/.refinery``."""
    return Path(os.environ.get("REFINERY_HOME") or Path.home() / ".refinery")


# ----------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a synced temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True))


def write_npy(path: Path, array: np.ndarray) -> None:
    """Save one array as a ``.npy`` file (plain numpy format, no pickled objects), atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Save named arrays as safetensors (no pickle), atomically."""

    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Load arrays written by :func:`write_arrays`; a damaged file is a RunError."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise RunError(f"{path} is missing: the run is incomplete") from None
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise RunError(f"{path} is damaged or was tampered with ({error}); fit the run again") from None


@contextmanager
def staged_directory(destination: Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``destination`` only if the block succeeds.

    ``destination`` must not exist or be an empty folder.
    """
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise RunError(f"{destination} already exists and is not empty; choose another --out or remove it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.partial-"))
    try:
        yield staging
        if destination.exists():
            destination.rmdir()
        os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- registry


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


class Registry:
    """The SQLite list of runs. Each method opens its own short connection (thread- and process-safe)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path else refinery_home() / "registry.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            with db:
                yield db

    def start_run(self, path: Path, *, kind: str, data_source: str, fingerprint: str, n_samples: int, config: dict) -> str:
        """Register a run as ``running``; returns its id."""
        run_id = uuid.uuid4().hex[:12]
        with self._connect() as db:
            db.execute(
                "INSERT INTO runs VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, '{}', NULL)",
                (run_id, str(Path(path).resolve()), time.time(), kind, data_source, fingerprint, n_samples, json.dumps(config)),
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
            db.execute("UPDATE runs SET status='done', metrics=? WHERE run_id=?", (json.dumps(metrics), run_id))

    def fail_run(self, run_id: str, message: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE runs SET status='failed', message=? WHERE run_id=?", (message, run_id))

    def runs(self) -> list[RunRecord]:
        """All runs, newest first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY created DESC").fetchall()
        return [
            RunRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], json.loads(r[8] or "{}"), json.loads(r[9] or "{}"), r[10])
            for r in rows
        ]

    def rounds(self, run_id: str) -> list[dict]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM rounds WHERE run_id=? ORDER BY round", (run_id,)).fetchall()
        return [dict(row) for row in rows]

    def set_verdict(self, run_id: str, sample_id: str, verdict: str, note: str = "") -> None:
        """Record (or replace) an expert's verdict: ``normal``, ``anomaly`` or ``unsure``."""
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?)",
                (run_id, sample_id, verdict, note, time.time()),
            )

    def verdicts(self, run_id: str) -> dict[str, tuple[str, str]]:
        with self._connect() as db:
            rows = db.execute("SELECT sample_id, verdict, note FROM verdicts WHERE run_id=?", (run_id,)).fetchall()
        return {sample: (verdict, note or "") for sample, verdict, note in rows}
