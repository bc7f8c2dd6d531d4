"""New folders in the workspace: made under a unique name, removed again when filling them fails.

Extracted archives, uploads and built-in data sets are each written into a new folder of their own
(:func:`new_folder`); :func:`removed_on_error` removes it when anything goes wrong while it is
filled (an error, a cancel, Ctrl-C), so no half-written folder is left behind.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.errors import DataError


def new_folder(parent: Path, prefix: str, what: str) -> Path:
    """A new empty folder ``<parent>/<prefix>XXXX`` (``parent`` made if missing), as an absolute path.

    Raises
    ------
    DataError
        If it cannot be made: "cannot create ``what`` in ``parent``", with the cause.
    """
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent)).resolve()
    except OSError as exc:
        raise DataError(f"cannot create {what} in {parent} ({exc}); check the workspace is writable") from exc


@contextmanager
def removed_on_error(folder: Path) -> Iterator[Path]:
    """Yield ``folder``; remove it, with everything in it, if the block raises anything."""
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
