"""Hostile files built cheaply, byte by byte, for ``tests/test_hostile_input.py``.

Nothing here allocates the content it describes: a 100-megapixel PNG is streamed row by row
through zlib, a decompression bomb is only a header, a 50,001-entry zip is written as raw records.
"""
from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# PNG colour types and bytes per pixel of the constant images written by constant_png.
_PNG_KINDS = {
    # kind: (bit depth, colour type, one pixel's bytes or None for 1-bit)
    "1-bit": (1, 0, None),
    "16-bit": (16, 0, (40_000).to_bytes(2, "big")),
    "rgba": (8, 6, bytes((10, 200, 30, 100))),
}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _ihdr(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))


def constant_png(path: Path, width: int, height: int, kind: str) -> Path:
    """A ``width x height`` PNG of one colour (``kind``: ``1-bit`` white, ``16-bit`` gray 40000,
    ``rgba`` (10, 200, 30, alpha 100)), streamed: a 100-megapixel image takes well under a megabyte."""
    bit_depth, colour_type, pixel = _PNG_KINDS[kind]
    row = b"\x00" + (b"\xff" * ((width + 7) // 8) if pixel is None else pixel * width)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.write_bytes(PNG_SIGNATURE + _ihdr(width, height, bit_depth, colour_type) + _chunk(b"IDAT", idat)
                     + _chunk(b"IEND", b""))
    return path


def png_noise(path: Path, size: int) -> Path:
    """A PNG signature followed by ``size`` seeded random bytes: PIL cannot identify it.

    Seeded because a few random tails (about 1 in 600) start with a valid-looking chunk name, and PIL
    then reports a truncated read instead: both are skips, but the test names the reason."""
    path.write_bytes(PNG_SIGNATURE + random.Random(size).randbytes(size))
    return path


def png_header_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A valid-looking PNG whose header claims ``width x height`` pixels, with a few bytes of data."""
    path.write_bytes(PNG_SIGNATURE + _ihdr(width, height) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + _chunk(b"IEND", b""))
    return path


def png_text_bomb(path: Path, megabytes: int = 64) -> Path:
    """An 8 x 8 PNG with a compressed text chunk (zTXt) that inflates to ``megabytes`` MiB."""
    compressor = zlib.compressobj(9)
    block = b"A" * 1024**2
    text = b"".join(compressor.compress(block) for _ in range(megabytes)) + compressor.flush()
    pixels = zlib.compress((b"\x00" + b"\x80" * 24) * 8)
    path.write_bytes(PNG_SIGNATURE + _ihdr(8, 8) + _chunk(b"zTXt", b"Comment\x00\x00" + text)
                     + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b""))
    return path


def zip_of_empty_files(path: Path, n_files: int) -> Path:
    """A stored zip of ``n_files`` empty files ``f/<i>.png``, written as raw records (fast even for 100k)."""
    local, central = [], []
    offset = 0
    empty_crc = 0
    for i in range(n_files):
        name = f"f/{i}.png".encode()
        header = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 0, empty_crc, 0, 0, len(name), 0) + name
        central.append(struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, empty_crc, 0, 0,
                                   len(name), 0, 0, 0, 0, 0, offset) + name)
        local.append(header)
        offset += len(header)
    directory = b"".join(central)
    # Above 65,535 entries the count field saturates at 0xFFFF (a ZIP64 record would hold the
    # real number); zipfile reads entries up to the directory's size, not the count.
    count = min(n_files, 0xFFFF)
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, count, count, len(directory), offset, 0)
    path.write_bytes(b"".join(local) + directory + end)
    return path


def zip_with_nul_name(path: Path, content: bytes) -> Path:
    """A zip of ``good.png`` (``content``) and an entry whose name is ``"\x00evil.png"``, which
    zipfile reads as an empty name (it cuts names at the first NUL); zipfile cannot write either."""
    placeholder = b"@@NUL-NAME@@.png"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("good.png", content)
        archive.writestr(placeholder.decode(), b"pwned")
    data = buffer.getvalue()
    assert data.count(placeholder) == 2  # the local and the central header
    path.write_bytes(data.replace(placeholder, b"\x00evil.png".ljust(len(placeholder), b"_")))
    return path


class CreatesMarker:
    """Unpickling this calls ``open(marker, "w")``: a file appears if anything ever unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def pickle_npz(path: Path, marker: Path, *, member: str = "X", numeric_x: bool = False) -> Path:
    """An ``.npz`` whose ``member`` is an object array that creates ``marker`` when unpickled.

    With ``numeric_x``, ``X`` is a plain (12, 3) float array and the pickle sits in ``member``.
    """
    arrays = {member: np.array([CreatesMarker(marker)] * 2, dtype=object)}
    if numeric_x:
        arrays["X"] = np.arange(36, dtype=np.float64).reshape(12, 3)
    np.savez(path, **arrays)
    return path


def npz_claiming_shape(path: Path, shape: tuple[int, ...]) -> Path:
    """An ``.npz`` whose ``X.npy`` header declares ``shape`` (float64) but holds only 64 bytes."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": shape})
    buffer.write(bytes(64))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("X.npy", buffer.getvalue())
    return path
