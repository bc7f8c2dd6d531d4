"""Files written so that a crash never leaves half of one: atomic writes, JSON, ``.npy``, checksums.

Every file is written to a temporary name, synced and renamed, so a file is either whole or absent.
A write the disk refuses (full, read-only, no permission) is a :class:`~core.errors.StorageError`
that names the cause.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from core.errors import RunError, StorageError


DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device; free some space and try again",
    errno.EDQUOT: "the disk quota is exceeded; free some space and try again",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
}


@contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn the OS refusing a write under ``path`` (``DISK_ERRORS``) into a StorageError naming the cause."""
    try:
        yield
    except OSError as error:
        cause = DISK_ERRORS.get(error.errno)
        if cause is None:
            raise
        raise StorageError(f"cannot write {path}: {cause}") from error


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary file handle whose content becomes ``path`` (synced, atomic rename) when the block ends
    without an error; nothing is left behind otherwise."""
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a synced temporary file and an atomic rename."""
    with atomic_writer(path) as handle:
        handle.write(data)


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
    """Parse a JSON file of a run; a missing or damaged one is a RunError that says what to do."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path} is missing: the run is incomplete; fit the run again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"{path} is damaged or was tampered with ({error}); fit the run again") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
