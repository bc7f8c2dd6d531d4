"""Building a folder whole or not at all, and resuming a fit that was killed while building its run.

A run (or a batch) is built in a partial folder beside its destination (``.<name>.partial``,
:func:`partial_dir`) and renamed into place only when complete (:func:`staged_directory`). A killed
fit leaves the partial folder; its ``resume/`` subfolder (:data:`RESUME_DIR`) keeps how the fit was
started (:func:`write_attempt`), which a resume checks (:func:`interrupted_run`), and the work
worth keeping. What a run folder holds is :mod:`core.run_dir`'s business.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.errors import RunError
from core.files import disk_errors, read_json, write_json

log = logging.getLogger(__name__)

RESUME_DIR = "resume"
"""Subfolder of a partial run folder for what only a resumed fit needs; not part of the finished run."""
ATTEMPT_FILE = "fit.json"
"""In a partial run folder's ``resume/``: what the fit was started with (data, config, verdicts) and its run id."""
EMBEDDINGS_CACHE = "embeddings.npy"
"""In ``resume/``: the frozen encoder's embeddings, written as soon as they are extracted."""
TRAINING_DIR = "training"
"""In ``resume/``: the self-supervised training loop's checkpoints, one folder per training stage."""


def partial_dir(destination: Path) -> Path:
    """The folder a run is built in before it becomes ``destination``: ``.<name>.partial`` beside it."""
    destination = Path(destination)
    return destination.parent / f".{destination.name}.partial"


def check_destination(destination: Path, *, resume: bool = False) -> None:
    """Raise RunError unless a run can be built into ``destination``.

    ``destination`` must not exist or be an empty folder, and its partial folder may exist only
    when ``resume`` is set.
    """
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise RunError(f"{destination} already exists and is not empty; choose another --out or remove it")
    staging = partial_dir(destination)
    if staging.exists() and not resume:
        raise RunError(
            f"{staging} holds an unfinished fit of {destination} (another fit is writing it, or one was "
            "interrupted); continue it with --resume (same data and settings) or delete that folder"
        )


@contextmanager
def staged_directory(destination: Path, *, resume: bool = False) -> Iterator[Path]:
    """Yield the partial folder of ``destination``; it becomes ``destination`` if the block succeeds.

    An exception in the block removes the folder; a killed process leaves it behind. With
    ``resume``, an existing partial folder is reused: its ``RESUME_DIR`` (cached work) is kept and
    everything else is cleared, since the run's files are all written again. ``RESUME_DIR`` is
    dropped before the rename. See :func:`check_destination` for what ``destination`` may be.
    """
    destination = Path(destination)
    check_destination(destination, resume=resume)
    staging = partial_dir(destination)
    with disk_errors(destination):
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.mkdir()
        except FileExistsError:
            if not resume:  # another fit created it since the check
                raise RunError(f"{staging} appeared while starting: another fit is writing {destination}") from None
            for entry in staging.iterdir():
                if not entry.is_dir():
                    entry.unlink()
                elif entry.name != RESUME_DIR:
                    shutil.rmtree(entry)
            for unfinished in staging.rglob(".*.tmp"):  # atomic writes the kill cut short
                unfinished.unlink()
    try:
        yield staging
        with disk_errors(destination):
            shutil.rmtree(staging / RESUME_DIR, ignore_errors=True)
            if destination.exists():
                destination.rmdir()
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise




def write_attempt(staging: Path, attempt: dict, run_id: str) -> None:
    """Record in the partial folder how this fit was started, so that a resume can check it."""
    write_json(staging / RESUME_DIR / ATTEMPT_FILE, {**attempt, "run_id": run_id})


def interrupted_run(out_dir: Path, attempt: dict) -> str | None:
    """The run id of the interrupted fit into ``out_dir``, after checking it was started like this one.

    None when there is none to continue (no partial folder, or it was killed before it said).
    """
    saved_path = partial_dir(out_dir) / RESUME_DIR / ATTEMPT_FILE
    if not saved_path.is_file():
        return None
    saved = read_json(saved_path)
    run_id = saved.pop("run_id")
    attempt = json.loads(json.dumps(attempt))  # tuples as lists, as saved
    if saved != attempt:
        changed = [name for name in ("fingerprint", "verdicts") if saved.get(name) != attempt[name]]
        changed += [key for key in attempt["config"] if saved.get("config", {}).get(key) != attempt["config"][key]]
        names = ", ".join("data" if name == "fingerprint" else name for name in changed)
        raise RunError(f"the unfinished fit in {partial_dir(out_dir)} was started with other {names}; "
                       "resume it with the same data and settings, or delete that folder to start over")
    log.info("resuming run %s from %s", run_id, partial_dir(out_dir))
    return run_id
