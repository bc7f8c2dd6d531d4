"""Paths typed by the user: checked to exist, to be readable, and to stay out of private folders.

:func:`resolve_server_folder` checks a path on the machine running Refinery; the studio passes the
Refinery home as private, so that no session reads another's uploads or runs through it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from core.errors import DataError


def resolve_server_folder(path: str | Path, *, private: Sequence[Path | str] = ()) -> Path:
    """Check a folder or file path typed by the user and return it absolute.

    Parameters
    ----------
    path : str or Path
        A path on the machine running Refinery (not the user's computer). Surrounding spaces and
        quotes are removed, ``~`` is expanded, and a relative path is taken from the server's
        working directory; links are resolved.
    private : sequence of Path or str
        Folders the path may neither lie in nor contain: the studio passes the Refinery home, whose
        uploads, extracted archives and runs belong to the sessions that made them.

    Returns
    -------
    Path
        The absolute path of an existing, readable folder or file.

    Raises
    ------
    DataError
        If the path is empty, does not exist, cannot be read, or is (or holds) a private folder;
        the message says what to check.
    """
    text = str(path).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()
    if not text:
        raise DataError("no path given; type the path of a folder of images, a .zip or a table on the server")
    if "\x00" in text:
        raise DataError(f"{text!r} contains a NUL character; type a plain path")
    try:
        resolved = Path(text).expanduser().resolve()
    except (RuntimeError, OSError) as exc:
        raise DataError(f"cannot resolve {text!r} ({exc}); type an absolute path such as /data/images") from exc
    if not resolved.exists():
        raise DataError(f"{resolved} does not exist on the server; check the spelling (the path is read on "
                        "the machine running Refinery, not on your computer), or upload the files instead")
    for folder in (Path(folder).resolve() for folder in private):
        if resolved.is_relative_to(folder) or folder.is_relative_to(resolved):
            raise DataError(f"Refinery keeps every session's uploads and runs in {folder}, and {resolved} lies in it "
                            "or holds it; type a path outside it, or upload the files instead")
    try:
        if resolved.is_dir():
            with os.scandir(resolved) as entries:
                next(entries, None)
        elif resolved.is_file():
            with open(resolved, "rb") as handle:
                handle.read(1)
        else:
            raise DataError(f"{resolved} is neither a folder nor a regular file; "
                            "type the path of a folder of images, a .zip or a table")
    except OSError as exc:
        raise DataError(f"{resolved} cannot be read ({exc.strerror or exc}); ask for read permission "
                        "for the user running Refinery, or copy the data somewhere readable") from exc
    return resolved
