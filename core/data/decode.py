"""One image file read safely: size limits, any PIL mode to 8-bit RGB, a cheap decodability probe.

:data:`MAX_IMAGE_PIXELS` (100 megapixels) bounds what is decoded. That is larger than any common
industrial area-scan camera (a 10k x 10k image) while keeping one decoded image under about 600 MB
even as 16-bit RGB; PIL's own ``Image.MAX_IMAGE_PIXELS`` is set to the same value at import, so its
decompression-bomb error fires at twice that. :func:`read_rgb` box-averages an image over
:data:`REDUCE_ABOVE_PIXELS` before converting it to RGB, so reading a 100-megapixel file takes at
most two full-size copies (about 800 MB for RGBA, 600 MB for 16-bit gray). Anything that is not a
regular file (a named pipe would block the reader for ever) is refused.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import DataError

MAX_IMAGE_PIXELS = 100_000_000
"""Largest image (width x height) that is decoded; bigger files are skipped or refused."""

REDUCE_ABOVE_PIXELS = 4096 * 4096
"""Images larger than this are box-averaged before conversion to RGB when read for embedding
(see :func:`read_rgb`); smaller ones are converted at full size."""

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_PROBE_SIZE = (64, 64)
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16-bit and 32-bit integer images are scaled from the full 16-bit range (value / 257);
    float images are scaled by 255 when their maximum is at most 1, otherwise clipped to [0, 255];
    transparent images are composited over black; everything else uses PIL's conversion.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        values = np.asarray(image).astype(np.float64)
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        if mode == "F":
            if values.size and values.max() <= 1.0:
                values = values * 255.0
        else:
            values = values / 257.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "La":
        image = image.convert("LA")
        mode = "LA"
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _reduced(image: Image.Image, size: int) -> Image.Image:
    """``image`` box-averaged by an integer factor when it has over :data:`REDUCE_ABOVE_PIXELS`,
    keeping at least ``2 * size`` pixels on each side, so that :func:`_to_rgb` converts a small
    image (at full size, a 16-bit or transparent one takes four or more full-size copies). Bit and
    palette images are left as they are (their values cannot be averaged)."""
    width, height = image.size
    factor = min(width, height) // (2 * size)
    if width * height <= REDUCE_ABOVE_PIXELS or factor < 2 or image.mode in ("1", "P", "PA"):
        return image
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # PIL averages 32-bit integers, not 16-bit ones
    return image.reduce(factor)


def open_image(path: Path) -> Image.Image:
    """Open ``path`` lazily, refusing non-regular files and images over :data:`MAX_IMAGE_PIXELS`."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # opening a named pipe would block for ever
        raise ValueError("not a regular file (a named pipe, device or socket)")
    image = Image.open(path)
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise Image.DecompressionBombError(
            f"{width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS} pixels")
    if width == 0 or height == 0:
        image.close()
        raise ValueError("zero-sized image")
    return image


def read_rgb(path: Path | str, size: int) -> np.ndarray:
    """Read an image as a square RGB array, for embedding.

    Parameters
    ----------
    path : Path or str
        Image file in any mode PIL reads (16-bit, CMYK, palette, alpha, grayscale...).
    size : int
        Side of the output; the image is resized to ``size x size`` (aspect ratio not kept) with
        PIL's antialiased bilinear filter. JPEGs are decoded at a reduced scale first when they are
        at least twice as large (``draft``). EXIF orientation is not applied, so the output is
        aligned with masks and with the stored pixel grid.

    Returns
    -------
    (size, size, 3) uint8 array

    Raises
    ------
    DataError
        If the file cannot be decoded or has more than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    path = Path(path)
    try:
        with open_image(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (size, size))
            image.load()
            rgb = _to_rgb(_reduced(image, size))
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.array(rgb, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path} is too large to decode safely ({exc}); "
                        "downscale it below 100 megapixels") from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt file may raise anything PIL does
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc}); "
                        "replace or remove the file") from exc


def image_shape(path: Path | str) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header."""
    with open_image(Path(path)) as image:
        width, height = image.size
    return height, width


def probe_image(path: Path) -> str | None:
    """Decode ``path`` cheaply; return why it cannot be used, or None when it is fine."""
    try:
        with open_image(path) as image:
            if image.format == "JPEG":
                image.draft(None, _PROBE_SIZE)
            image.load()
            _to_rgb(image.crop((0, 0, 1, 1)))
    except Image.DecompressionBombError as exc:
        return f"too large to decode safely ({exc})"
    except UnidentifiedImageError:
        return "not an image file PIL can read"
    except Exception as exc:  # noqa: BLE001 - a corrupt file may raise anything; it becomes a skip
        return f"unreadable: {type(exc).__name__}: {exc}"
    return None
