"""Browser uploads, stored safely in the workspace, and a session's earlier uploads.

Uploads (:func:`save_uploads`) are untrusted: every name is reduced to a safe base name and every
file is written with ``open(path, "xb")`` into a new folder under ``<workspace>/uploads``; nothing
is written anywhere else. A studio session's uploads go into a folder of their own, named by the
session's id (a hash of its secret key, never the key), and :func:`earlier_uploads` lists only
that folder.
"""
from __future__ import annotations

import logging
import os
import re
import time
import unicodedata
from collections.abc import Sequence
from itertools import islice
from pathlib import Path, PurePosixPath

from core.data.archive import MAX_FILES
from core.data.folders import new_folder, removed_on_error
from core.data.images import IMAGE_SUFFIXES
from core.data.tables import TABLE_SUFFIXES
from core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MAX_UPLOAD_MB = 512
"""Default cap on the total size of one upload, in MiB; the studio's ``.streamlit/config.toml``
sets ``server.maxUploadSize`` to the same number (a test checks it). Browsers hold an upload in
the server's memory, so larger data belongs in a server folder."""
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024**2

MAX_NAME_CHARS = 100
"""Longest stored upload name, suffix included."""

ZIP_SUFFIX = ".zip"
UPLOAD_SUFFIXES = IMAGE_SUFFIXES | TABLE_SUFFIXES | {ZIP_SUFFIX}
"""Suffixes (matched case-insensitively) that :func:`save_uploads` accepts."""

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_SESSION_ID = re.compile(r"[0-9a-f]{16,64}")
_FALLBACK_STEM = "upload"


def _safe_name(name: str) -> str:
    """A base name with no path part, no leading dot, only ``[A-Za-z0-9._-]``, at most MAX_NAME_CHARS."""
    base = re.split(r"[\\/]", name)[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode("ascii")
    base = _UNSAFE_CHARS.sub("_", base).lstrip(".")
    path = PurePosixPath(base) if base else None
    suffix = path.suffix if path is not None and len(path.suffix) <= 10 else ""
    stem = base[: len(base) - len(suffix)] if suffix else base
    stem = stem[: MAX_NAME_CHARS - len(suffix)] or _FALLBACK_STEM
    return stem + suffix


def _deduplicated(names: list[str]) -> list[str]:
    """``names`` with ``-1``, ``-2``... added before the suffix of repeats (case-insensitively)."""
    taken: set[str] = set()
    unique = []
    for name in names:
        path = PurePosixPath(name)
        candidate, number = name, 0
        while candidate.lower() in taken:
            number += 1
            candidate = f"{path.stem[: MAX_NAME_CHARS - len(path.suffix) - 8]}-{number}{path.suffix}"
        taken.add(candidate.lower())
        unique.append(candidate)
    return unique


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n[:80]) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _uploads_dir(workspace: Path | str, session: str | None) -> Path:
    """``<workspace>/uploads``, or its sub-folder of the studio session ``session`` (ConfigError unless hex)."""
    uploads = Path(workspace) / "uploads"
    if session is None:
        return uploads
    if not isinstance(session, str) or not _SESSION_ID.fullmatch(session):
        raise ConfigError(f"session must be a studio session id (16 to 64 lowercase hex digits), got {session!r}")
    return uploads / session


def _upload_entry(folder: Path, names: Sequence[str]) -> Path:
    """What ``load_dataset`` reads of an upload folder holding ``names``: its one zip or table, else the folder."""
    if len(names) == 1 and PurePosixPath(names[0]).suffix.lower() not in IMAGE_SUFFIXES:
        return folder / names[0]
    return folder


def save_uploads(
    files: Sequence[tuple[str, bytes]],
    workspace: Path | str,
    *,
    session: str | None = None,
    max_total_bytes: int = MAX_UPLOAD_BYTES,
    max_files: int = MAX_FILES,
) -> Path:
    """Store files uploaded from a browser in a new folder of the workspace.

    Parameters
    ----------
    files : sequence of (name, bytes)
        What the browser sent: the name as given by the client (untrusted) and the content.
        Accepted: several images, or exactly one ``.zip`` or table (see :data:`UPLOAD_SUFFIXES`).
    workspace : Path or str
        The files go into a new folder ``<workspace>/uploads/<time>-<random>/``; nothing is written
        elsewhere. Each name is reduced to a safe base name: path parts and leading dots removed,
        characters outside ``A-Z a-z 0-9 . _ -`` replaced by ``_`` (accents dropped), at most
        :data:`MAX_NAME_CHARS` characters; repeated names get ``-1``, ``-2``... before the suffix.
    session : str, optional
        The id of the studio session uploading (16 to 64 lowercase hex digits, a hash of its key):
        the new folder is made in ``<workspace>/uploads/<session>/`` instead, where
        :func:`earlier_uploads` finds it.
    max_total_bytes : int
        Cap on the total size of the files (default :data:`MAX_UPLOAD_BYTES`).
    max_files : int
        Cap on the number of files (default 50,000, as for a zip).

    Returns
    -------
    Path
        What to pass to ``load_dataset``: the stored zip or table file, or the folder holding the
        images.

    Raises
    ------
    DataError
        If nothing was uploaded, a suffix is not supported (the files are named), a zip or table
        comes with other files, the upload is over a limit, or the files cannot be written. Nothing
        is left behind on refusal.
    ConfigError
        If ``session`` is not a session id.

    Examples
    --------
    >>> path = save_uploads([(f.name, f.getvalue()) for f in uploaded], workspace)  # doctest: +SKIP
    """
    if not files:
        raise DataError("nothing was uploaded; choose several images, or one .zip or table file")
    if len(files) > max_files:
        raise DataError(f"{len(files)} files uploaded, over the limit of {max_files}; "
                        "upload a .zip or put the folder on the server and type its path")
    total = sum(memoryview(content).nbytes for _, content in files)
    if total > max_total_bytes:
        raise DataError(f"the upload is {total:,} bytes, over the limit of {max_total_bytes:,}; "
                        "upload fewer or smaller files, or put the data on the server and type its path")
    names = [_safe_name(name) for name, _ in files]
    kinds = [PurePosixPath(name).suffix.lower() for name in names]
    unsupported = [original for (original, _), suffix in zip(files, kinds) if suffix not in UPLOAD_SUFFIXES]
    if unsupported:
        raise DataError(f"unsupported file type: {_listing(unsupported)}; upload images "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))}), or one {ZIP_SUFFIX} or table "
                        f"({', '.join(sorted(TABLE_SUFFIXES))})")
    singles = [original for (original, _), suffix in zip(files, kinds) if suffix not in IMAGE_SUFFIXES]
    if len(singles) > 1:
        raise DataError(f"{len(singles)} zip or table files uploaded ({_listing(singles)}); upload one at a time")
    if singles and len(files) > 1:
        raise DataError(f"{_listing(singles)} was uploaded together with {len(files) - 1} other file(s); upload either "
                        "one zip or table file alone, or only images")
    names = _deduplicated(names)

    uploads = _uploads_dir(workspace, session)
    folder = new_folder(uploads, time.strftime("%Y%m%d-%H%M%S-"), "an upload folder")
    with removed_on_error(folder):
        try:
            for name, (_, content) in zip(names, files):
                target = folder / name
                if target.parent != folder:  # defence in depth: _safe_name leaves no separator
                    raise DataError(f"unsafe upload name {name!r}; rename the file")
                with open(target, "xb") as sink:
                    sink.write(content)
        except OSError as exc:
            raise DataError(f"cannot store the upload in {folder} ({exc}); check the workspace has free space") from exc
    logger.info("stored %d uploaded file(s), %d bytes, in %s", len(files), total, folder)
    return _upload_entry(folder, names)


def earlier_uploads(workspace: Path | str, session: str) -> list[Path]:
    """The uploads that :func:`save_uploads` stored for the studio session ``session``, newest first.

    Parameters
    ----------
    workspace : Path or str
        The workspace given to :func:`save_uploads`.
    session : str
        The session's id; only its own folder ``<workspace>/uploads/<session>/`` is read.

    Returns
    -------
    list of Path
        What each upload gives ``load_dataset``, as :func:`save_uploads` returned it: the stored zip
        or table file, or the folder holding the images. Empty when the session uploaded nothing.

    Raises
    ------
    ConfigError
        If ``session`` is not a session id.
    """
    folder = _uploads_dir(workspace, session)
    if not folder.is_dir():
        return []
    entries = []
    uploads = sorted((path for path in folder.iterdir() if path.is_dir()), key=lambda path: path.stat().st_mtime_ns)
    for upload in reversed(uploads):
        with os.scandir(upload) as listing:
            names = [entry.name for entry in islice(listing, 2)]  # one file or more is all that matters
        if names:
            entries.append(_upload_entry(upload, names))
    return entries
