"""Rendered granite tiles with planted defects and their pixel masks: a built-in set for localization.

Every image is drawn from a seed with numpy alone (no data file, no licence to honour): a polished
granite surface (a mottled ground with dark, light and pink mineral grains; a soft quartz vein in
about a quarter of the tiles) and, on a defective tile, one defect of a kind in
:data:`DEFECT_KINDS`:

- ``scratch``: a thin, crisp, light arc where the polish is scored;
- ``crack``: a dark, jagged line that wanders and may fork;
- ``stain``: an irregular brownish blot that darkens the grains under it without hiding them;
- ``chip``: a missing piece: a rough, matte, lighter pit with a shadow on its upper-left wall.

The defect's mask marks its pixels (a thin line's mask is a pixel wider on each side, as an
annotator would draw it). :func:`write_texture_set` writes ``good/<n>.png`` (normal) and
``other/<kind>-<n>.png`` with ``other/<kind>-<n>_mask.png`` beside it, the layout
:func:`~core.data.images.load_image_folder` reads as labels and masks. Same seed, same images.

Examples
--------
>>> image, mask = render_tile(np.random.default_rng(0), "crack")
>>> image.shape, image.dtype, mask.shape, bool(mask.any())
((128, 128, 3), dtype('uint8'), (128, 128), True)
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from core.data.images import MASK_STEM_SUFFIX
from core.progress import QUIET, Monitor

TILE_SIZE = 128
"""Side of every tile, in pixels."""

DEFECT_KINDS = ("scratch", "crack", "stain", "chip")
"""The kinds of planted defects, one per defective tile, in turn."""

VEIN_SHARE = 0.25
"""Share of tiles (normal or not) crossed by a soft quartz vein: normal lines a defect must differ from."""

_GROUND = np.array([148.0, 140.0, 134.0])
_MINERALS = (  # colour, smoothing sigma of the grain field (px), share of the surface it covers
    (np.array([38.0, 36.0, 40.0]), 1.1, 0.14),    # mica and hornblende: dark grains
    (np.array([212.0, 208.0, 202.0]), 1.4, 0.16),  # quartz: light grains
    (np.array([176.0, 128.0, 112.0]), 1.6, 0.10),  # feldspar: pink grains
)


# ------------------------------------------------------------------------------------------ helpers

def _smooth_noise(rng: np.random.Generator, sigma: float, size: int = TILE_SIZE) -> np.ndarray:
    """``(size, size)`` float64 Gaussian noise smoothed with a Gaussian of ``sigma`` px, unit variance."""
    white = rng.standard_normal((size, size))
    frequency = np.fft.fftfreq(size)
    squared = frequency[:, None] ** 2 + frequency[None, :] ** 2
    field = np.fft.ifft2(np.fft.fft2(white) * np.exp(-2.0 * math.pi ** 2 * sigma ** 2 * squared)).real
    return (field - field.mean()) / (field.std() + 1e-12)


def _grid(size: int = TILE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(y, x)``, each ``(size, size)`` float64."""
    return np.mgrid[0:size, 0:size].astype(np.float64) + 0.5


def _distance_to_path(points: np.ndarray, size: int = TILE_SIZE) -> np.ndarray:
    """``(size, size)`` distance in px from every pixel centre to the polyline ``points`` ``(P, 2)`` (y, x)."""
    y, x = _grid(size)
    best = np.full((size, size), np.inf)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        dy, dx = y1 - y0, x1 - x0
        length2 = dy * dy + dx * dx
        t = np.clip(((y - y0) * dy + (x - x0) * dx) / length2, 0.0, 1.0) if length2 > 0 else 0.0
        best = np.minimum(best, np.hypot(y - (y0 + t * dy), x - (x0 + t * dx)))
    return best


def _blend(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``image`` ``(H, W, 3)`` moved towards ``colour`` by ``alpha`` ``(H, W)`` in [0, 1]."""
    return image + alpha[..., None] * (colour - image)


def _arc(rng: np.random.Generator, length: float, bend: float) -> np.ndarray:
    """A quadratic Bezier arc of about ``length`` px, bowed by up to ``bend`` px, inside the tile: ``(33, 2)``."""
    margin = 12.0
    angle = rng.uniform(0.0, math.pi)
    direction = np.array([math.sin(angle), math.cos(angle)])
    centre = rng.uniform(margin + length / 2, TILE_SIZE - margin - length / 2, 2) if length < TILE_SIZE - 2 * margin \
        else np.full(2, TILE_SIZE / 2)
    start, end = centre - direction * length / 2, centre + direction * length / 2
    control = centre + np.array([-direction[1], direction[0]]) * rng.uniform(-bend, bend)
    t = np.linspace(0.0, 1.0, 33)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end


# -------------------------------------------------------------------------------------- the surface

def _granite(rng: np.random.Generator) -> np.ndarray:
    """A defect-free granite surface, ``(TILE_SIZE, TILE_SIZE, 3)`` float64 in [0, 255]-ish."""
    tint = (1.0 + rng.normal(0.0, 0.04)) * (1.0 + rng.normal(0.0, 0.012, 3))
    mottle = 0.7 * _smooth_noise(rng, 14.0) + 0.3 * _smooth_noise(rng, 5.0)
    image = _GROUND * tint * (1.0 + 0.05 * mottle)[..., None]
    for colour, sigma, share in _MINERALS:
        field = _smooth_noise(rng, sigma)
        threshold = np.quantile(field, 1.0 - share * rng.uniform(0.8, 1.2))
        alpha = np.clip((field - threshold) / 0.35, 0.0, 1.0)
        image = _blend(image, colour * (1.0 + rng.normal(0.0, 0.02, 3)), alpha)
    if rng.random() < VEIN_SHARE:
        distance = _distance_to_path(_arc(rng, 200.0, 40.0))
        width = rng.uniform(2.5, 5.0)
        image = _blend(image, np.array([200.0, 196.0, 190.0]), 0.45 * np.exp(-0.5 * (distance / width) ** 2))
    y, x = _grid()
    angle = rng.uniform(0.0, 2 * math.pi)
    sheen = 1.0 + 0.04 * ((math.cos(angle) * x + math.sin(angle) * y) / TILE_SIZE - 0.5)
    return image * sheen[..., None] + rng.normal(0.0, 3.0, image.shape)


# -------------------------------------------------------------------------------------- the defects

def _scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    distance = _distance_to_path(_arc(rng, rng.uniform(55.0, 95.0), 12.0))
    half_width = rng.uniform(0.8, 1.3)
    alpha = rng.uniform(0.7, 0.9) * np.clip(half_width + 0.5 - distance, 0.0, 1.0)
    return _blend(image, np.array([232.0, 230.0, 226.0]), alpha), distance <= half_width + 1.0


def _crack(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    def walk(start: np.ndarray, heading: float, steps: int) -> np.ndarray:
        points = [start]
        for _ in range(steps):
            heading += rng.normal(0.0, 0.45)
            step = np.array([math.sin(heading), math.cos(heading)]) * rng.uniform(2.0, 4.0)
            points.append(np.clip(points[-1] + step, 2.0, TILE_SIZE - 2.0))
        return np.array(points)

    trunk = walk(rng.uniform(30.0, TILE_SIZE - 30.0, 2), rng.uniform(0, 2 * math.pi), int(rng.integers(18, 30)))
    distance = _distance_to_path(trunk)
    if rng.random() < 0.5:
        fork = trunk[len(trunk) // 2]
        distance = np.minimum(distance, _distance_to_path(walk(fork, rng.uniform(0, 2 * math.pi),
                                                               int(rng.integers(5, 10)))))
    half_width = rng.uniform(0.8, 1.3)
    core = np.clip(half_width + 0.5 - distance, 0.0, 1.0)
    halo = 0.25 * np.exp(-0.5 * (distance / 2.0) ** 2)
    image = _blend(image, np.array([24.0, 22.0, 22.0]), np.maximum(0.85 * core, halo))
    return image, distance <= half_width + 1.0


def _stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y, x = _grid()
    radius = rng.uniform(12.0, 20.0)
    centre = rng.uniform(radius + 6.0, TILE_SIZE - radius - 6.0, 2)
    shape = 1.0 - np.hypot(y - centre[0], x - centre[1]) / radius + 0.3 * _smooth_noise(rng, radius / 3)
    alpha = np.clip(shape / 0.15, 0.0, 1.0)
    darken = np.array([0.70, 0.64, 0.56]) * rng.uniform(0.95, 1.05)
    ring = 0.08 * np.exp(-0.5 * (shape / 0.06) ** 2) * (shape > -0.1)
    image = image * (1.0 - alpha[..., None] * (1.0 - darken)) * (1.0 - ring[..., None])
    return image, alpha >= 0.5


def _chip(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y, x = _grid()
    radius = rng.uniform(9.0, 14.0)
    centre = rng.uniform(radius + 6.0, TILE_SIZE - radius - 6.0, 2)
    stretch = rng.uniform(0.75, 1.3)
    shape = 1.0 - np.hypot(y - centre[0], (x - centre[1]) * stretch) / radius + 0.25 * _smooth_noise(rng, radius / 3)
    pit = np.clip(shape / 0.08, 0.0, 1.0)
    rough = 1.0 + 0.12 * _smooth_noise(rng, 0.8) + 0.06 * _smooth_noise(rng, 2.5)
    image = _blend(image, np.array([186.0, 181.0, 174.0]) * rough[..., None], pit)
    shadow = np.clip(pit - np.roll(pit, (3, 3), axis=(0, 1)), 0.0, 1.0)
    rim = np.clip(pit - np.roll(pit, (-1, -1), axis=(0, 1)), 0.0, 1.0)
    image = _blend(image, np.array([44.0, 42.0, 42.0]), 0.85 * shadow)
    image = _blend(image, np.array([240.0, 238.0, 234.0]), 0.6 * rim)
    return image, pit >= 0.5


_DEFECTS = {"scratch": _scratch, "crack": _crack, "stain": _stain, "chip": _chip}


# -------------------------------------------------------------------------------------- public API

def render_tile(rng: np.random.Generator, defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One granite tile, with one defect of kind ``defect`` (None: defect-free).

    Parameters
    ----------
    rng : numpy.random.Generator
        Every random choice is drawn from it; the same state gives the same tile. The surface is
        drawn before the defect, so the same state with ``defect=None`` gives the same tile without it.
    defect : str or None
        One of :data:`DEFECT_KINDS`, or None.

    Returns
    -------
    image : (TILE_SIZE, TILE_SIZE, 3) uint8 array
    mask : (TILE_SIZE, TILE_SIZE) bool array
        The defect's pixels; all False for a defect-free tile.

    Raises
    ------
    ValueError
        If ``defect`` is not None and not one of :data:`DEFECT_KINDS`.
    """
    if defect is not None and defect not in _DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; choose one of {', '.join(DEFECT_KINDS)}")
    image = _granite(rng)
    mask = np.zeros((TILE_SIZE, TILE_SIZE), dtype=bool)
    if defect is not None:
        image, mask = _DEFECTS[defect](image, rng)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def write_texture_set(folder: Path | str, n_normal: int, n_defective: int, *, seed: int = 0,
                      monitor: Monitor = QUIET) -> None:
    """Write ``n_normal`` defect-free and ``n_defective`` defective tiles, with masks, into ``folder``.

    Parameters
    ----------
    folder : Path or str
        An existing folder; ``good/`` and ``other/`` are made in it.
    n_normal, n_defective : int
        Tiles of each group; defective tiles take the kinds of :data:`DEFECT_KINDS` in turn.
    seed : int
        Tile ``i`` (counted over all tiles, normal ones first) is drawn from
        ``numpy.random.default_rng([seed, i])``, so a seed gives the same files everywhere numpy
        gives the same numbers.
    monitor : Monitor
        Receives ``("prepare", written, total)`` and is checked before each tile.

    Notes
    -----
    Files: ``good/<i>.png`` and ``other/<kind>-<i>.png`` (RGB), with ``other/<kind>-<i>_mask.png``
    (8-bit grey, 255 on the defect, 0 elsewhere) beside each defective tile.
    """
    folder = Path(folder)
    total = n_normal + n_defective
    width = max(4, len(str(total - 1)))
    for group in ("good", "other"):
        (folder / group).mkdir(exist_ok=True)
    for i in range(total):
        monitor.check()
        if i % 50 == 0:
            monitor.report("prepare", i, total, "rendering granite tiles")
        defect = None if i < n_normal else DEFECT_KINDS[(i - n_normal) % len(DEFECT_KINDS)]
        image, mask = render_tile(np.random.default_rng([seed, i]), defect)
        if defect is None:
            Image.fromarray(image).save(folder / "good" / f"{i:0{width}d}.png")
            continue
        stem = folder / "other" / f"{defect}-{i:0{width}d}"
        Image.fromarray(image).save(stem.with_name(stem.name + ".png"))
        Image.fromarray(mask.astype(np.uint8) * 255).save(stem.with_name(stem.name + MASK_STEM_SUFFIX + ".png"))
    monitor.report("prepare", total, total, "granite tiles rendered")
