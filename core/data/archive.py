"""Safe extraction of an uploaded zip archive into a fresh folder of the workspace.

Nothing in an archive is trusted. Before anything is written, every entry is checked:

- its name is a relative path without ``..`` components, drive letters or NUL characters
  (backslashes count as separators, as Windows tools write them);
- it is not a symbolic link (Unix mode in ``external_attr``) and not a duplicate name;
- the number of files, the total declared size and the declared compression ratio of each large
  entry are within limits (zip-bomb guards).

While streaming, the bytes actually written are counted again, because declared sizes can lie.
Entries are written only with ``open(target, "xb")`` under the new folder; permissions, times and
links recorded in the archive are ignored. Nested archives are left as plain files (never extracted).
On any rejection the partial folder is removed and :class:`~core.errors.DataError` is raised.
"""
from __future__ import annotations

import logging
import re
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from core.data.folders import new_folder, removed_on_error
from core.errors import DataError
from core.progress import QUIET, Monitor

logger = logging.getLogger(__name__)

MAX_TOTAL_BYTES = 2 * 1024**3
"""Default cap on the total uncompressed size of an archive (2 GiB)."""

MAX_FILES = 50_000
"""Default cap on the number of files in an archive."""

MAX_RATIO = 100.0
"""Default cap on one entry's uncompressed/compressed size ratio (zip-bomb guard)."""

RATIO_MIN_BYTES = 1024**2
"""Entries smaller than this (1 MiB) are exempt from the ratio check: a small blank file can
legitimately compress 1000-fold, and it cannot exhaust a disk."""

_CHUNK_BYTES = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
_REZIP = "re-create the archive from a plain folder of images"
_GENUINE = "if the data is genuine, unzip it yourself and pass the folder"


def _entry_parts(name: str) -> tuple[str, ...]:
    """The safe relative path components of an entry name, or raise DataError."""
    if not name:  # zipfile cuts a name at its first NUL, so "\x00evil" arrives empty
        raise DataError(f"unsafe entry with an empty name (or one starting with a NUL character); {_REZIP}")
    if "\x00" in name:
        raise DataError(f"unsafe entry name {name!r}: contains a NUL character; {_REZIP}")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        raise DataError(f"unsafe entry {name!r}: absolute path; {_REZIP}")
    parts = tuple(p for p in unified.split("/") if p not in ("", "."))
    if ".." in parts:
        raise DataError(f"unsafe entry {name!r}: '..' would write outside the extraction folder; {_REZIP}")
    if any(_DRIVE.match(p) for p in parts):
        raise DataError(f"unsafe entry {name!r}: drive letter in path; {_REZIP}")
    return parts


def _check_entries(
    infos: list[zipfile.ZipInfo], max_total_bytes: int, max_files: int, max_ratio: float
) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Validate every entry before anything is written; return (info, parts) for each."""
    checked: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
    seen: set[tuple[str, ...]] = set()
    n_files = 0
    declared_total = 0
    for info in infos:
        parts = _entry_parts(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DataError(f"unsafe entry {info.filename!r}: symbolic links are refused; {_REZIP}")
        if info.is_dir():
            checked.append((info, parts))
            continue
        if not parts:
            raise DataError(f"unsafe entry {info.filename!r}: empty file name; {_REZIP}")
        if parts in seen:
            raise DataError(f"entry {info.filename!r} appears twice; {_REZIP}")
        seen.add(parts)
        n_files += 1
        if n_files > max_files:
            raise DataError(f"more than {max_files} files; split the archive or pass a folder")
        declared_total += info.file_size
        if declared_total > max_total_bytes:
            raise DataError(f"uncompressed size over the limit of {max_total_bytes} bytes; "
                            "split the archive or pass a folder")
        if info.file_size >= RATIO_MIN_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
            raise DataError(f"entry {info.filename!r} expands {info.file_size / max(info.compress_size, 1):.0f}-fold "
                            f"(limit {max_ratio:.0f}); refused as a possible zip bomb: {_GENUINE}")
        checked.append((info, parts))
    return checked


def extract_zip(
    zip_path: Path | str,
    workspace_dir: Path | str,
    *,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_files: int = MAX_FILES,
    max_ratio: float = MAX_RATIO,
    monitor: Monitor = QUIET,
) -> Path:
    """Extract a zip archive into a new folder inside ``workspace_dir``.

    Parameters
    ----------
    zip_path : Path or str
        The archive.
    workspace_dir : Path or str
        Folder the new extraction folder is created in (created if missing). Nothing is written
        outside it.
    max_total_bytes : int
        Cap on the total uncompressed size, declared and actually written (default 2 GiB).
    max_files : int
        Cap on the number of files (default 50,000).
    max_ratio : float
        Cap on the uncompressed/compressed ratio of each entry of at least 1 MiB (default 100).
    monitor : Monitor
        Receives ``("extract", files_done, files_total)`` after each file and is checked between
        files; a cancelled extraction is removed.

    Returns
    -------
    Path
        The new folder holding the archive's files (``<workspace>/<zip stem>-XXXX``).

    Raises
    ------
    DataError
        If the archive is unreadable, encrypted or unsafe; the partial folder is removed.
    """
    zip_path = Path(zip_path)
    workspace_dir = Path(workspace_dir)
    dest = new_folder(workspace_dir, f"{zip_path.stem[:40]}-", "an extraction folder")
    with removed_on_error(dest):
        try:
            _extract_into(zip_path, dest, max_total_bytes, max_files, max_ratio, monitor)
        except DataError as exc:
            raise DataError(f"{zip_path.name}: {exc}") from exc
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError,
                RuntimeError, NotImplementedError, ValueError) as exc:
            raise DataError(f"{zip_path.name} is not a readable zip archive ({exc}); "
                            "re-create it with a standard zip tool, without a password") from exc
    logger.info("extracted %s into %s", zip_path, dest)
    return dest


def _extract_into(
    zip_path: Path,
    dest: Path,
    max_total_bytes: int,
    max_files: int,
    max_ratio: float,
    monitor: Monitor,
) -> None:
    with zipfile.ZipFile(zip_path) as archive:
        entries = _check_entries(archive.infolist(), max_total_bytes, max_files, max_ratio)
        n_files = sum(1 for info, _ in entries if not info.is_dir())
        written_total = 0
        done = 0
        for info, parts in entries:
            monitor.check()
            target = dest.joinpath(*parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            # Defence in depth: the names were checked, but a folder on the way must not be a link.
            if not target.parent.resolve().is_relative_to(dest):
                raise DataError(f"unsafe entry {info.filename!r}: resolves outside the extraction folder; {_REZIP}")
            written = 0
            with archive.open(info) as source, open(target, "xb") as sink:
                while chunk := source.read(_CHUNK_BYTES):
                    written += len(chunk)
                    written_total += len(chunk)
                    if written > info.file_size:
                        raise DataError(f"entry {info.filename!r} holds more bytes than it declares; {_REZIP}")
                    if written_total > max_total_bytes:
                        raise DataError(f"uncompressed size over the limit of {max_total_bytes} bytes; "
                                        "split the archive or pass a folder")
                    if written >= RATIO_MIN_BYTES and written > max_ratio * max(info.compress_size, 1):
                        raise DataError(f"entry {info.filename!r} expands over {max_ratio:.0f}-fold; "
                                        f"refused as a possible zip bomb: {_GENUINE}")
                    sink.write(chunk)
            done += 1
            monitor.report("extract", done, n_files, PurePosixPath(*parts).as_posix())
