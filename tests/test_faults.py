"""Faults: a fit killed mid-way resumes to the same run; a full or read-only disk fails cleanly;
the registry takes many writers at once.

The kill tests run ``refinery fit`` in a subprocess that stops at a chosen stage and count
(``REFINERY_HOLD_AT``, read by the CLI's progress callback) and send SIGKILL once it says so.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from core.errors import RunError, StorageError
from core.progress import HOLD_AT_VARIABLE
from core.registry import INTERRUPTED, Registry
from core.staging import EMBEDDINGS_CACHE, RESUME_DIR, partial_dir

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo" / "fashion-mnist-sneakers"
FROZEN = [str(DEMO), "--image-size", "96", "--batch-size", "8", "--localization", "none"]
"""300 images through the frozen backbone: 38 batches to extract, about 0.6 s on 2 cores."""
SELF_SUPERVISED = [str(DEMO), "--image-size", "32", "--localization", "none", "--objective", "contrastive",
                   "--encoder", "small-cnn", "--epochs", "4", "--retrain-epochs", "1", "--rounds", "1"]
"""Contrastive training of the small CNN: 4 epochs of 4 steps, then one epoch after its one round."""

posix = pytest.mark.skipif(os.name != "posix", reason="needs POSIX processes (SIGKILL, pids)")


def cli_env(home: Path) -> dict:
    """The CLI's environment: its own Refinery home, and one torch thread (compared runs all use one;
    on 2 shared cores a second thread fighting other work made a fit 4x slower, not faster)."""
    return {**os.environ, "REFINERY_HOME": str(home), "OMP_NUM_THREADS": "1"}


def fit_killed_at(args: list[str], home: Path, stage: str, done: int) -> None:
    """Run ``refinery fit ARGS`` until it reports ``stage`` at ``done`` or more, then SIGKILL it.

    ``REFINERY_HOLD_AT`` makes the CLI announce that point on stderr and stop there, so the kill lands at
    the same place on a fast or a slow machine.
    """
    process = subprocess.Popen([sys.executable, "-m", "core.cli", "fit", *args], cwd=ROOT,
                               env={**cli_env(home), HOLD_AT_VARIABLE: f"{stage}:{done}"},
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = []
    try:
        for line in process.stderr:
            log.append(line)
            if line.startswith("WARNING holding at "):
                os.kill(process.pid, signal.SIGKILL)
                assert process.wait() == -signal.SIGKILL
                return
        pytest.fail(f"the fit never reached {stage} {done}; it ended with: {''.join(log)[-600:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def fit(args: list[str], home: Path, *extra: str) -> str:
    """Run ``refinery -v fit ARGS EXTRA`` to the end; its log (stderr)."""
    done = subprocess.run([sys.executable, "-m", "core.cli", "-v", "fit", *args, *extra], cwd=ROOT, env=cli_env(home),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def assert_interrupted(home: Path, out: Path) -> str:
    """The killed fit left no run, a partial folder of whole files, and (once reaped) a failed registry row."""
    assert not out.exists()
    staging = partial_dir(out)
    for path in staging.rglob("*"):
        if path.is_dir() or path.name.endswith((".tmp", ".partial")):  # a write cut short; never read
            continue
        if path.suffix == ".npy":
            np.load(path, mmap_mode="r")
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".pt":
            import torch

            torch.load(path, weights_only=True)
        else:
            raise AssertionError(f"unexpected file in the partial folder: {path}")
    [record] = Registry(home / "registry.sqlite").runs()
    assert record.status == "failed" and record.message == INTERRUPTED
    return record.run_id


def assert_same_run(resumed: Path, reference: Path) -> None:
    a, b = pd.read_csv(resumed / "scores.csv"), pd.read_csv(reference / "scores.csv")
    assert a["id"].tolist() == b["id"].tolist()
    np.testing.assert_allclose(a["anomaly_score"], b["anomaly_score"], rtol=1e-6)
    assert a["kept"].tolist() == b["kept"].tolist() and a["is_anomaly"].tolist() == b["is_anomaly"].tolist()
    assert not (resumed / RESUME_DIR).exists() and not partial_dir(resumed).exists()


def assert_resumed_as_one_run(home: Path, run_id: str, out: Path, rounds: int = 3) -> None:
    registry = Registry(home / "registry.sqlite")
    [record] = registry.runs()
    assert (record.run_id, record.status) == (run_id, "done")
    assert json.loads((out / "run.json").read_text())["run_id"] == run_id
    assert [r["round"] for r in registry.rounds(run_id)] == list(range(1, rounds + 1))


@pytest.fixture(scope="module")
def frozen_reference(tmp_path_factory) -> Path:
    """An uninterrupted frozen-backbone fit, for comparison."""
    folder = tmp_path_factory.mktemp("reference")
    fit([*FROZEN, "--out", str(folder / "run")], folder / "home")
    return folder / "run"


@posix
def test_killed_during_feature_extraction(tmp_path, frozen_reference, monkeypatch, capsys):
    home, out = tmp_path / "home", tmp_path / "run"
    fit_killed_at([*FROZEN, "--out", str(out)], home, "embed", 64)
    run_id = assert_interrupted(home, out)
    complete = sorted(p.name for p in (partial_dir(out) / RESUME_DIR).iterdir() if not p.name.startswith("."))
    assert complete == ["fit.json"], "killed mid-extraction: the embeddings file never got its final name"

    from core.cli import main

    monkeypatch.setenv("REFINERY_HOME", str(home))
    assert main(["fit", *FROZEN, "--out", str(out)]) == 1
    assert "--resume" in capsys.readouterr().err, "a partial folder is not overwritten without --resume"
    assert main(["fit", *FROZEN, "--out", str(out), "--resume", "--seed", "1"]) == 1
    assert "other seed" in capsys.readouterr().err, "resuming with other settings is refused"

    fit([*FROZEN, "--out", str(out), "--resume"], home)
    assert_same_run(out, frozen_reference)
    assert_resumed_as_one_run(home, run_id, out)


@posix
def test_killed_during_a_refinement_round(tmp_path, frozen_reference):
    home, out = tmp_path / "home", tmp_path / "run"
    fit_killed_at([*FROZEN, "--out", str(out)], home, "refine", 1)
    run_id = assert_interrupted(home, out)
    assert (partial_dir(out) / RESUME_DIR / EMBEDDINGS_CACHE).is_file(), "cached right after extraction"

    log = fit([*FROZEN, "--out", str(out), "--resume"], home)
    assert "reusing the embeddings extracted before the interruption" in log
    assert_same_run(out, frozen_reference)
    assert_resumed_as_one_run(home, run_id, out)


@posix
@pytest.mark.slow
def test_killed_during_a_training_epoch(tmp_path):
    home, out = tmp_path / "home", tmp_path / "run"
    fit_killed_at([*SELF_SUPERVISED, "--out", str(out)], home, "train", 9)  # step 9 of 16: in epoch 3
    run_id = assert_interrupted(home, out)
    checkpoint = partial_dir(out) / RESUME_DIR / "training" / "initial" / "checkpoint.json"
    epoch = json.loads(checkpoint.read_text())["epoch"]
    assert epoch == 2, "held at step 9 of 16: two whole epochs were checkpointed"

    log = fit([*SELF_SUPERVISED, "--out", str(out), "--resume"], home)
    assert f"resuming training from epoch {epoch}/4" in log
    fit([*SELF_SUPERVISED, "--out", str(tmp_path / "reference")], tmp_path / "reference-home")
    assert_same_run(out, tmp_path / "reference")
    assert_resumed_as_one_run(home, run_id, out, rounds=1)


def test_a_partial_folder_is_reused_only_when_resuming(tmp_path):
    from core.staging import staged_directory

    out = tmp_path / "run"
    left = partial_dir(out)  # what a killed fit leaves: cached work, run files, a write cut short
    (left / RESUME_DIR).mkdir(parents=True)
    (left / RESUME_DIR / "cached.txt").write_text("work")
    (left / RESUME_DIR / ".half.json.x1.tmp").write_text("{")
    (left / "scores.csv").write_text("id")
    with pytest.raises(RunError, match="--resume"):
        with staged_directory(out):
            pass
    with staged_directory(out, resume=True) as staging:
        assert [p.relative_to(staging).as_posix() for p in sorted(staging.rglob("*"))] == ["resume", "resume/cached.txt"]
        (staging / "scores.csv").write_text("id,anomaly_score")
    assert [p.name for p in out.iterdir()] == ["scores.csv"] and not left.exists()


# ---------------------------------------------------------------------------- full and read-only disks


def refusal(error_number: int, path) -> OSError:
    """The error the OS raises when the disk refuses a write to ``path``."""
    return OSError(error_number, os.strerror(error_number), os.fsdecode(path))


@pytest.mark.parametrize("error_number, cause", [(errno.ENOSPC, "no space left on the device"),
                                                 (errno.EROFS, "the file system is read-only")])
def test_a_full_or_read_only_disk_fails_cleanly(tmp_path, monkeypatch, capsys, error_number, cause):
    from core.cli import main
    from sample_data import write_digits_table

    monkeypatch.setenv("REFINERY_HOME", str(tmp_path / "home"))
    table, runs = write_digits_table(tmp_path / "digits.csv"), tmp_path / "runs"
    assert main(["fit", str(table), "--out", str(runs / "old")]) == 0
    before = {path: path.read_bytes() for path in (runs / "old").iterdir()}
    real_replace, real_mkdir, real_open = os.replace, os.mkdir, os.open

    def replace(source, target):  # a full disk: the run's last file does not fit
        if Path(target).name == "scores.csv":
            raise refusal(error_number, target)
        real_replace(source, target)

    def mkdir(path, *rest, **options):  # a read-only disk: nothing can be created under runs/
        if runs in Path(path).parents:
            raise refusal(error_number, path)
        real_mkdir(path, *rest, **options)

    def open_(path, flags, *rest, **options):
        if flags & os.O_CREAT and runs in Path(path).parents:
            raise refusal(error_number, path)
        return real_open(path, flags, *rest, **options)

    if error_number == errno.ENOSPC:
        monkeypatch.setattr(os, "replace", replace)
    else:
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "open", open_)
    assert main(["fit", str(table), "--out", str(runs / "new")]) == 1
    monkeypatch.undo()

    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("refinery: error: cannot write") and cause in error, error
    assert sorted(p.name for p in runs.iterdir()) == ["old"], "no new run, partial folder or temporary file"
    assert {path: path.read_bytes() for path in (runs / "old").iterdir()} == before
    failed = next(r for r in Registry(tmp_path / "home" / "registry.sqlite").runs() if r.path.endswith("new"))
    assert failed.status == "failed" and cause in failed.message


# ---------------------------------------------------------------------------- registry: owners and concurrent writers


def write_runs(path: str, worker: int, runs: int) -> None:
    """One writer process: ``runs`` full run lifecycles, listing the runs as the app does in between."""
    registry = Registry(Path(path))
    for index in range(runs):
        run_id = registry.start_run(Path(path).parent / f"run-{worker}-{index}", kind="table", data_source="x",
                                    fingerprint="f", n_samples=10, config={"worker": worker})
        for number in (1, 2):
            registry.add_round(run_id, round=number, n_active=10, n_removed=1, gamma=0.1, precision=None,
                               recall=None, seconds=0.0, note=f"round {number}")
        registry.set_verdict(run_id, "3", "anomaly")
        registry.finish_run(run_id, {"auroc": 0.5})
        if index % 10 == 0:
            registry.runs()


def test_the_registry_takes_concurrent_writers_from_processes(tmp_path):
    path, workers, runs = tmp_path / "new" / "registry.sqlite", 4, 25
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=write_runs, args=(str(path), worker, runs)) for worker in range(workers)]
    for process in processes:  # all create, migrate and write the registry at the same time
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [process.exitcode for process in processes] == [0] * workers, "a writer failed (see its traceback above)"
    registry = Registry(path)
    records = registry.runs()
    assert len(records) == workers * runs and {record.status for record in records} == {"done"}
    assert all(len(registry.rounds(r.run_id)) == 2 and registry.verdicts(r.run_id) for r in records)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


OLD_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, path TEXT NOT NULL, created REAL NOT NULL, status TEXT NOT NULL,
    kind TEXT, data_source TEXT, fingerprint TEXT, n_samples INTEGER, config TEXT, metrics TEXT, message TEXT);
INSERT INTO runs VALUES ('old-done', '/r/a', 1.0, 'done', 'table', 'x', 'f', 10, '{}', '{"auroc": 0.9}', NULL);
INSERT INTO runs VALUES ('old-running', '/r/b', 2.0, 'running', 'table', 'x', 'f', 10, '{}', '{}', NULL);
"""


def test_an_older_registry_is_migrated_and_its_orphaned_runs_reaped(tmp_path):
    path = tmp_path / "registry.sqlite"
    with closing(sqlite3.connect(path)) as db:
        db.executescript(OLD_SCHEMA)
    registry = Registry(path)
    statuses = {record.run_id: (record.status, record.message) for record in registry.runs()}
    assert statuses == {"old-done": ("done", None), "old-running": ("failed", INTERRUPTED)}
    run_id = registry.start_run(tmp_path / "run", kind="table", data_source="x", fingerprint="f", n_samples=1, config={})
    assert Registry(path).runs()[0].status == "running", "the run of a live process is not reaped"
    registry.finish_run(run_id, {})


START_AND_WAIT = """
import sys, time
from pathlib import Path
from core.registry import Registry
registry = Registry(Path(sys.argv[1]))
print(registry.start_run(Path(sys.argv[2]), kind="table", data_source="x", fingerprint="f", n_samples=1, config={}),
      flush=True)
time.sleep(120)
"""


@posix
def test_a_run_is_reaped_when_its_process_ends_and_only_then(tmp_path):
    path, out = tmp_path / "registry.sqlite", tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", START_AND_WAIT, str(path), str(out)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        run_id = owner.stdout.readline().strip()
        registry = Registry(path)
        assert registry.runs()[0].status == "running"
        with pytest.raises(RunError, match=f"being fitted by process {owner.pid}"):
            registry.start_run(out, kind="table", data_source="x", fingerprint="f", n_samples=1, config={}, run_id=run_id)
    finally:
        owner.kill()
        owner.wait()
    assert registry.reap_stale() == [run_id]
    assert [(r.status, r.message) for r in registry.runs()] == [("failed", INTERRUPTED)]
    resumed = registry.start_run(out, kind="table", data_source="x", fingerprint="f", n_samples=1, config={}, run_id=run_id)
    assert resumed == run_id and registry.runs()[0].status == "running"


def test_a_read_only_registry_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "registry.sqlite"
    Registry(path)
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda database, **options: real_connect(
        f"file:{database}?mode=ro", uri=True, **options))
    with pytest.raises(StorageError, match="cannot write the registry .* read-only"):
        Registry(path).start_run(tmp_path / "run", kind="table", data_source="x", fingerprint="f", n_samples=1, config={})


def test_the_hold_point_is_checked_and_optional():
    from core.progress import ProgressEvent, holding_at, ignore_progress

    assert holding_at(ignore_progress, None) is ignore_progress and holding_at(ignore_progress, "") is ignore_progress
    for bad in ("embed", "embed:", ":3", "embed:x"):
        with pytest.raises(ValueError, match="REFINERY_HOLD_AT must look like"):
            holding_at(ignore_progress, bad)
    seen = []
    holding_at(seen.append, "embed:64")(ProgressEvent("embed", 63, 300))
    holding_at(seen.append, "embed:64")(ProgressEvent("refine", 100, 300))
    assert [event.done for event in seen] == [63, 100], "events before the point, or of other stages, pass through"
