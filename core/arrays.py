"""Named arrays in safetensors files (no pickle): a streamed writer, a reader and a memory-mapped reader."""
from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

import numpy as np
from safetensors.numpy import load_file

from core.errors import RunError
from core.files import atomic_writer
from core.mapped import MappedPages

_SAFETENSORS_DTYPES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
_WRITE_CHUNK_BYTES = 8 << 20


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Save named arrays as safetensors (no pickle), atomically.

    The file is written as the format defines it (an 8-byte header length, a JSON header with each
    array's dtype, shape and byte range, then the arrays' little-endian bytes), one chunk of rows at a
    time: a memory-mapped array is streamed from its file, never read into memory whole.
    """
    arrays = {name: np.asarray(array) for name, array in arrays.items()}
    header, offset = {}, 0
    for name, array in arrays.items():
        dtype = _SAFETENSORS_DTYPES.get(array.dtype.newbyteorder("="))
        if dtype is None:
            raise TypeError(f"{name}: safetensors has no dtype {array.dtype}")
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with atomic_writer(path) as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for array in arrays.values():
            _write_rows(handle, array)


def _write_rows(handle: BinaryIO, array: np.ndarray) -> None:
    """``array``'s bytes in C order, little-endian, in chunks of rows; a memory-mapped source's pages are
    handed back after each chunk."""
    little = array.dtype.newbyteorder("<")
    if array.ndim == 0 or array.size == 0:
        handle.write(np.ascontiguousarray(array, dtype=little).tobytes())
        return
    rows_per_chunk = max(1, _WRITE_CHUNK_BYTES // max(array[0].nbytes, 1))
    pages = MappedPages.of(array)
    for start in range(0, len(array), rows_per_chunk):
        stop = min(start + rows_per_chunk, len(array))
        handle.write(np.ascontiguousarray(array[start:stop], dtype=little).data)
        if pages is not None:
            pages.release(stop)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Load arrays written by :func:`write_arrays`; a damaged file is a RunError."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise RunError(f"{path} is missing: the run is incomplete") from None
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise RunError(f"{path} is damaged or was tampered with ({error}); fit the run again") from None


MAX_HEADER_BYTES = 100 << 20
"""Largest safetensors header :func:`map_arrays` reads (the reference reader's limit)."""


def map_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a file written by :func:`write_arrays`, memory-mapped read-only instead of read.

    Each array is a view of its bytes in the file, so opening a run costs no memory per sample until
    rows are used. The header is checked against the file (dtypes, shapes, byte ranges inside it);
    anything else is a RunError, as for :func:`read_arrays`.
    """
    path = Path(path)
    names = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {length}")
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        arrays = {}
        for name, entry in header.items():
            dtype, shape, (begin, end) = names[entry["dtype"]], tuple(int(n) for n in entry["shape"]), entry["data_offsets"]
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if min(shape, default=0) < 0 or not 0 <= begin <= end <= size - 8 - length or end - begin != nbytes:
                raise ValueError(f"{name}: byte range {begin}-{end} does not hold shape {list(shape)} of {dtype}")
            arrays[name] = (np.zeros(shape, dtype) if nbytes == 0 else
                            np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", offset=8 + length + begin, shape=shape))
        return arrays
    except FileNotFoundError:
        raise RunError(f"{path} is missing: the run is incomplete") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise RunError(f"{path} is damaged or was tampered with ({error}); fit the run again") from None
