"""Pure rendering helpers for anomaly maps: colour overlay, mask contour, thresholded regions.

Only numpy and scipy: the app, the CLI and the benchmarks draw the same pixels. The colormap is a
fixed lookup table (``JET``, the usual Grad-CAM / anomalib heatmap) so that a colour means the same
value on every image given the same ``vmin`` / ``vmax``.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


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
