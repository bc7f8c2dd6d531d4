"""Pure rendering helpers for anomaly maps: colour scale, heatmap overlay, colour bar, mask contour, regions.

Only numpy, scipy and Pillow: the app, the CLI and the benchmarks draw the same pixels. The colormap is a
fixed lookup table (``JET``, the usual Grad-CAM / anomalib heatmap) so that a colour means the same
value on every image given the same scale.

A heatmap is drawn on a :class:`ColourScale`: values at or below its ``floor``, the *normal floor*
(a high percentile of the map values of normal images: kept training images, which the run calls
normal), are transparent, so the image shows through wherever the map looks like normal data; from
the floor up to ``top`` values run from blue to red. A *per-run* scale (:func:`run_scale`) takes
``top`` from the run's most anomalous images, so one colour means one value on every image of the run;
a *per-image* scale (:func:`image_scale`) keeps the floor and stretches the colours to one image's peak.

Example
-------
>>> scale = run_scale(localizer.display_scale_, top_maps, "feature distance")   # doctest: +SKIP
>>> shown = with_colour_bar(heatmap(image, amap, scale), scale)                  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

NORMAL_QUANTILE = 0.99
"""Quantile of normal images' map values that is the normal floor (the patch localizers' ``display_quantile``)."""
TOP_QUANTILE = 0.99
"""Quantile of the pooled map values of the run's most anomalous images that gets the top colour."""
SCALE_IMAGES = 16
"""Images that set a run's scale: the most anomalous ones (top) and, where no floor is stored, kept ones."""
MIN_SPAN = 0.25
"""The top colour sits at least ``MIN_SPAN * |floor|`` above the floor, so a clean run or a normal image
on a per-image scale does not paint values a hair above the floor in the top colour."""
_SAMPLE = 65536
"""Map values drawn per map when a quantile is estimated (seeded)."""


def _jet_lut() -> np.ndarray:
    """MATLAB's jet: blue -> cyan -> yellow -> red, 256 entries ``(256, 3) uint8``."""
    x = np.linspace(0.0, 1.0, 256)
    channels = [np.clip(1.5 - np.abs(4.0 * x - centre), 0.0, 1.0) for centre in (3.0, 2.0, 1.0)]
    return np.rint(np.stack(channels, axis=1) * 255).astype(np.uint8)


JET = _jet_lut()
"""``(256, 3) uint8`` lookup table: index 0 is the low end (dark blue), 255 the high end (dark red)."""

_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


def colorize(amap: np.ndarray, vmin: float = 0.0, vmax: float | None = None, lut: np.ndarray = JET) -> np.ndarray:
    """Map values to colours: ``(H, W) float`` -> ``(H, W, 3) uint8``.

    Values are clipped to ``[vmin, vmax]`` and spread over the table; NaN takes the low end.
    ``vmax=None`` uses the map's own maximum (colours then differ in meaning between images; pass
    a run-level display scale to compare images).
    """
    amap = np.asarray(amap, dtype=np.float64)
    if amap.ndim != 2:
        raise ValueError(f"amap must be (H, W); got shape {amap.shape}")
    if vmax is None:
        vmax = float(np.nanmax(amap)) if amap.size and np.isfinite(amap).any() else vmin
    span = vmax - vmin
    scaled = np.nan_to_num((amap - vmin) / span if span > 0 else np.zeros_like(amap), nan=0.0)
    index = np.rint(np.clip(scaled, 0.0, 1.0) * (len(lut) - 1)).astype(np.intp)
    return lut[index]


def overlay(
    image_rgb: np.ndarray,
    amap: np.ndarray,
    alpha: float = 0.5,
    vmin: float = 0.0,
    vmax: float | None = None,
    lut: np.ndarray = JET,
) -> np.ndarray:
    """Blend a colour-coded anomaly map over its image.

    Parameters
    ----------
    image_rgb : (H, W, 3) or (H, W) uint8
        The image the map belongs to (grayscale is shown as gray RGB).
    amap : (H, W) float
        Anomaly map at the image's size (higher = more anomalous).
    alpha : float in [0, 1]
        Weight of the colours: 0 shows the image only, 1 the colours only.
    vmin, vmax : float
        Values shown as the lowest and highest colour (see :func:`colorize`); pass the run's display
        scale as ``vmax`` so colours mean the same on every image.

    Returns
    -------
    (H, W, 3) uint8
    """
    image = _as_rgb(image_rgb)
    if np.shape(amap) != image.shape[:2]:
        raise ValueError(f"amap shape {np.shape(amap)} does not match the image's {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = colorize(amap, vmin, vmax, lut).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.rint(blended).astype(np.uint8)


@dataclass(frozen=True)
class ColourScale:
    """How map values become colours: transparent up to ``floor``, ``JET`` from ``floor`` to ``top``.

    Attributes
    ----------
    floor : float
        The normal floor: values at or below it are not coloured (the image shows through).
    top : float
        Values at or above it get the top colour (dark red); ``top > floor``.
    units : str
        What the values are (shown on the colour bar), e.g. ``"feature distance"``.
    """

    floor: float
    top: float
    units: str = ""

    def __post_init__(self) -> None:
        if not (np.isfinite(self.floor) and np.isfinite(self.top) and self.top > self.floor):
            raise ValueError(f"a colour scale needs finite floor < top; got floor={self.floor}, top={self.top}")


def normal_floor(normal_maps: Iterable[np.ndarray], quantile: float = NORMAL_QUANTILE, seed: int = 0) -> float:
    """The normal floor: the ``quantile`` of the pooled values of maps of normal (kept) images.

    Parameters
    ----------
    normal_maps : iterable of (H, W) float
        Maps of images the run calls normal; each contributes at most 65,536 seeded random values.
    quantile : float in (0, 1)

    Returns
    -------
    float
    """
    return _pooled_quantile(normal_maps, quantile, seed)


def run_scale(
    floor: float, top_maps: Iterable[np.ndarray], units: str = "", quantile: float = TOP_QUANTILE, seed: int = 0
) -> ColourScale:
    """The run's colour scale: ``floor`` up to the ``quantile`` of the pooled values of ``top_maps``.

    Parameters
    ----------
    floor : float
        The normal floor (:func:`normal_floor`, or a localizer's ``display_scale_``, the same quantity).
    top_maps : iterable of (H, W) float
        Maps of the run's most anomalous images (see :func:`scale_images`): red then means "as high as
        the hot part of the run's worst images", on every image of the run.
    units : str
    quantile : float in (0, 1)

    Returns
    -------
    ColourScale
        ``top`` is at least ``MIN_SPAN * |floor|`` above the floor (and above it when the floor is 0).
    """
    return ColourScale(float(floor), _top_above(floor, _pooled_quantile(top_maps, quantile, seed)), units)


def image_scale(scale: ColourScale, amap: np.ndarray) -> ColourScale:
    """A per-image scale: the run's floor, the top colour at this map's own peak (at least the minimum span)."""
    peak = float(np.nanmax(amap)) if np.isfinite(amap).any() else scale.floor
    return ColourScale(scale.floor, _top_above(scale.floor, peak), scale.units)


def scale_images(
    anomaly_score: np.ndarray, kept: np.ndarray, n: int = SCALE_IMAGES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Which images set a run's colour scale.

    Parameters
    ----------
    anomaly_score : (N,) float
        The run's scores (higher = more anomalous).
    kept : (N,) bool or 0/1
        The refinement outcome: kept images are the run's normal data.
    n : int
        Images in each group.

    Returns
    -------
    normal : (<= n,) int64
        A seeded sample of kept images, in index order: their maps give the floor where the run
        stores none (Grad-CAM).
    top : (<= n,) int64
        The ``n`` most anomalous images, most anomalous first: their maps give the top.
    """
    anomaly_score = np.asarray(anomaly_score, dtype=np.float64)
    kept_index = np.flatnonzero(np.asarray(kept).astype(bool))
    rng = np.random.default_rng(seed)
    normal = np.sort(rng.choice(kept_index, min(n, kept_index.size), replace=False)).astype(np.int64)
    top = np.argsort(-anomaly_score, kind="stable")[:n].astype(np.int64)
    return normal, top


def heatmap(image_rgb: np.ndarray, amap: np.ndarray, scale: ColourScale, alpha: float = 0.5) -> np.ndarray:
    """The image with its map's values above ``scale.floor`` blended over it in colour.

    Pixels at or below the floor (and NaN) keep the image's own value: only what stands above
    normal data is coloured, blue just above the floor up to red at ``scale.top`` and beyond.

    Parameters
    ----------
    image_rgb : (H, W, 3) or (H, W) uint8
    amap : (H, W) float
        Anomaly map at the image's size (higher = more anomalous).
    scale : ColourScale
    alpha : float in [0, 1]
        Weight of the colours where they are drawn.

    Returns
    -------
    (H, W, 3) uint8
    """
    amap = np.asarray(amap, dtype=np.float64)
    coloured = overlay(image_rgb, amap, alpha, scale.floor, scale.top)
    above = hot_pixels(amap, scale)
    return np.where(above[..., None], coloured, _as_rgb(image_rgb))


def hot_pixels(amap: np.ndarray, scale: ColourScale, level: float = 0.0) -> np.ndarray:
    """``(H, W) bool``: the pixels :func:`heatmap` colours (``level=0``), or those at least ``level`` of
    the way from the floor to the top (``level=1``: the top colour)."""
    amap = np.asarray(amap, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return amap > scale.floor + level * (scale.top - scale.floor)


def colour_bar(scale: ColourScale, height: int, ticks: int = 5) -> np.ndarray:
    """A vertical colour bar of ``scale`` with its values written beside it: ``(height, W, 3) uint8``.

    Top colour at the top; ``ticks`` evenly spaced values from ``top`` down to ``floor``, the floor
    marked "normal", the units written above the bar. Below the floor there is no colour: the bottom
    of the bar is the floor. White background, black text; the text size follows ``height``.
    """
    if height < 16:
        raise ValueError(f"a colour bar needs a height of at least 16 px; got {height}")
    font = ImageFont.load_default(size=max(10, height // 14))
    line = font.size + 4
    bar_top, bar_bottom = line + 4, height - line // 2 - 1
    labels = [f"{value:.3g}" for value in np.linspace(scale.top, scale.floor, ticks)]
    labels[-1] += " normal"
    text_width = max(int(np.ceil(font.getlength(text))) for text in labels + [scale.units])
    bar_width = max(8, font.size)
    width = bar_width + 6 + text_width + 4
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    values = np.linspace(scale.top, scale.floor, bar_bottom - bar_top)
    strip = colorize(values[:, None], scale.floor, scale.top)
    canvas.paste(Image.fromarray(np.repeat(strip, bar_width, axis=1)), (0, bar_top))
    draw.text((0, 1), scale.units, fill="black", font=font)
    for row, text in zip(np.linspace(bar_top, bar_bottom - 1, ticks), labels):
        draw.line([(bar_width, row), (bar_width + 4, row)], fill="black")
        draw.text((bar_width + 6, row), text, fill="black", font=font, anchor="lm")
    return np.asarray(canvas)


def with_colour_bar(shown: np.ndarray, scale: ColourScale, gap: int = 6) -> np.ndarray:
    """``shown`` (an ``(H, W, 3) uint8`` heatmap) with the :func:`colour_bar` of ``scale`` to its right."""
    shown = _as_rgb(shown)
    bar = colour_bar(scale, shown.shape[0])
    spacer = np.full((shown.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([shown, spacer, bar], axis=1)


def mask_contour(
    image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 255, 0), thickness: int = 1
) -> np.ndarray:
    """Draw the boundary of a ground-truth mask on a copy of ``image``.

    Boundary pixels are mask pixels with a 4-neighbour outside the mask (or outside the image), so
    the line lies just inside the region; ``thickness`` widens it inwards.

    Parameters
    ----------
    image : (H, W, 3) or (H, W) uint8
    mask : (H, W) bool
    color : RGB triple
    thickness : int >= 1

    Returns
    -------
    (H, W, 3) uint8
    """
    out = _as_rgb(image).copy()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != out.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match the image's {out.shape[:2]}")
    if thickness < 1:
        raise ValueError(f"thickness must be >= 1, got {thickness}")
    inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    out[mask & ~inner] = np.asarray(color, dtype=np.uint8)
    return out


def threshold_map(
    amap: np.ndarray, threshold: float, min_area: int = 16
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Predicted defect mask and one box per defect region.

    Pixels with ``amap > threshold`` (the ``anomaly_score > threshold`` rule) are grouped into
    8-connected components; components smaller than ``min_area`` pixels are dropped from the mask
    and get no box.

    Returns
    -------
    mask : (H, W) bool
    boxes : list of (x0, y0, x1, y1)
        Half-open pixel boxes (``mask[y0:y1, x0:x1]`` holds the whole component), in raster order
        of the components' first pixel.
    """
    amap = np.asarray(amap)
    if amap.ndim != 2:
        raise ValueError(f"amap must be (H, W); got shape {amap.shape}")
    labels, count = ndimage.label(amap > threshold, structure=_STRUCTURE_8)
    if count == 0:
        return np.zeros(amap.shape, dtype=bool), []
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    keep = areas >= min_area
    keep[0] = False
    boxes = [
        (box[1].start, box[0].start, box[1].stop, box[0].stop)
        for index, box in enumerate(ndimage.find_objects(labels), start=1)
        if keep[index]
    ]
    return keep[labels], boxes


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8; got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"image must be (H, W, 3) or (H, W); got shape {image.shape}")


def _top_above(floor: float, top: float) -> float:
    """``top``, raised to at least ``MIN_SPAN * |floor|`` above the floor (1 above a floor of 0)."""
    return max(float(top), float(floor) + (MIN_SPAN * abs(floor) or 1.0))


def _pooled_quantile(maps: Iterable[np.ndarray], quantile: float, seed: int) -> float:
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1); got {quantile}")
    rng = np.random.default_rng(seed)
    pooled = []
    for amap in maps:
        values = np.asarray(amap, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size > _SAMPLE:
            values = values[rng.choice(values.size, _SAMPLE, replace=False)]
        pooled.append(values)
    values = np.concatenate(pooled) if pooled else np.empty(0)
    if values.size == 0:
        raise ValueError("a colour scale needs at least one map with finite values")
    return float(np.quantile(values, quantile))
