"""Content fingerprints that identify the samples of a data set.

A fingerprint depends only on the samples (image bytes with their ids, or the feature columns of a
table), never on labels or masks: the same data with or without labels has the same fingerprint, so
caches keyed by (fingerprint, config) are shared between the two.

Every fingerprint is the first :data:`FINGERPRINT_HEX_CHARS` hex characters of a SHA-256 digest, with a
domain tag (``images-v1``, ``table-v1``, ``subset-v1``) so that different kinds never collide by design.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import DataError

FINGERPRINT_HEX_CHARS = 32
"""Length of a fingerprint: 32 hex characters = 128 bits of SHA-256."""

_CHUNK_BYTES = 1 << 20


def _update_field(digest: Any, data: bytes) -> None:
    """Feed ``data`` preceded by its length, so field boundaries are unambiguous."""
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def _finish(digest: Any) -> str:
    return digest.hexdigest()[:FINGERPRINT_HEX_CHARS]


def fingerprint_files(
    root: Path | str, ids: Sequence[str], paths: Sequence[Path | str] | None = None
) -> str:
    """Hash image files by their ids and contents, streaming each file.

    Parameters
    ----------
    root : Path or str
        Folder the ids are relative to; used to find the files when ``paths`` is None.
    ids : sequence of str, length N
        Relative POSIX paths; they are part of the hash (renaming a file changes it).
    paths : sequence of Path, length N, optional
        The files, aligned with ``ids``; defaults to ``root / id``.

    Returns
    -------
    str
        Hex fingerprint of :data:`FINGERPRINT_HEX_CHARS` characters.

    Raises
    ------
    DataError
        If a file cannot be read.
    """
    root = Path(root)
    if paths is None:
        paths = [root / i for i in ids]
    if len(paths) != len(ids):
        raise ValueError(f"ids ({len(ids)}) and paths ({len(paths)}) differ in length")
    digest = hashlib.sha256(b"images-v1")
    digest.update(len(ids).to_bytes(8, "little"))
    for sample_id, path in zip(ids, paths):
        _update_field(digest, sample_id.encode("utf-8"))
        try:
            with open(path, "rb") as handle:
                size = handle.seek(0, 2)
                handle.seek(0)
                digest.update(size.to_bytes(8, "little"))
                while chunk := handle.read(_CHUNK_BYTES):
                    digest.update(chunk)
        except OSError as exc:
            raise DataError(f"cannot read {path} to fingerprint it ({exc.strerror or exc}); "
                            "check the file still exists and is readable") from exc
    return _finish(digest)


def fingerprint_table(frame: pd.DataFrame) -> str:
    """Hash a table's feature columns: names, dtypes and values, in order.

    The row index is ignored; the label column must not be in ``frame`` (labels never change a
    fingerprint).

    Parameters
    ----------
    frame : pandas.DataFrame, (N, D)
        Feature columns.

    Returns
    -------
    str
        Hex fingerprint of :data:`FINGERPRINT_HEX_CHARS` characters.
    """
    digest = hashlib.sha256(b"table-v1")
    digest.update(int(frame.shape[0]).to_bytes(8, "little"))
    digest.update(int(frame.shape[1]).to_bytes(8, "little"))
    for position, (dtype, row_hashes) in enumerate(_column_hashes(frame)):
        _update_field(digest, str(frame.columns[position]).encode("utf-8"))
        _update_field(digest, str(dtype).encode("utf-8"))
        digest.update(row_hashes.tobytes())
    return _finish(digest)


def _column_hashes(frame: pd.DataFrame) -> list[tuple[object, np.ndarray]]:
    """Each column's dtype and ``(N,) <u8`` row hashes (pandas' ``hash_pandas_object``), in column order.

    A number's hash depends on that number only, so the columns of one numeric dtype are hashed in one
    call, the same hashes as column by column: a table of thousands of columns takes milliseconds.
    """
    hashes: list[tuple[object, np.ndarray] | None] = [None] * frame.shape[1]
    blocks, others = dtype_blocks(frame, "biuf")
    for position in others:
        column = frame.iloc[:, position]
        hashes[position] = (column.dtype, pd.util.hash_pandas_object(column, index=False).to_numpy(dtype="<u8"))
    for dtype, positions in blocks.items():
        block = frame.iloc[:, positions].to_numpy(dtype=dtype)  # (N, k)
        block_hashes = pd.util.hash_array(block.ravel(order="F")).astype("<u8").reshape(len(positions), -1)
        for position, row_hashes in zip(positions, block_hashes):
            hashes[position] = (dtype, row_hashes)
    return hashes


def dtype_blocks(frame: pd.DataFrame, kinds: str) -> tuple[dict[np.dtype, list[int]], list[int]]:
    """The positions of ``frame``'s columns whose NumPy dtype kind is in ``kinds`` (``"iuf"``), grouped by dtype,
    and the positions of every other column: what can be read as one array per dtype, and what cannot."""
    blocks: dict[np.dtype, list[int]] = {}
    others = []
    for position, dtype in enumerate(frame.dtypes):
        if isinstance(dtype, np.dtype) and dtype.kind in kinds:
            blocks.setdefault(dtype, []).append(position)
        else:
            others.append(position)
    return blocks, others


def fingerprint_subset(parent_fingerprint: str, indices: np.ndarray) -> str:
    """Fingerprint of the samples at ``indices`` (in that order) of a fingerprinted data set.

    Parameters
    ----------
    parent_fingerprint : str
        Fingerprint of the full data set.
    indices : (M,) int array
        Positions taken from the parent.

    Returns
    -------
    str
        Hex fingerprint of :data:`FINGERPRINT_HEX_CHARS` characters.
    """
    digest = hashlib.sha256(b"subset-v1")
    _update_field(digest, parent_fingerprint.encode("ascii"))
    digest.update(np.asarray(indices, dtype="<i8").tobytes())
    return _finish(digest)
