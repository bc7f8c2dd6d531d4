"""Turning coarse patch scores into smooth full-resolution anomaly maps.

The CutPaste / anomalib practice: dense patch scores ``(h, w)`` are upsampled bilinearly to the
working resolution, smoothed there with a Gaussian (``sigma = 4`` pixels by default), then resized
bilinearly to each input image's own height and width. Scores of patches that overlap at a stride
are spread back over their own pixels instead (:func:`receptive_field_upsample`). Every step is
linear with non-negative weights, so non-negative scores stay non-negative.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SIGMA = 4.0
"""Gaussian smoothing in pixels at the working resolution (anomalib's PatchCore/PaDiM default)."""


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian ``(2 * int(4 * sigma + 0.5) + 1,) float32`` (anomalib's kernel size)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 pixels, got {sigma}")
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float = DEFAULT_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, H, W)`` maps with reflected borders; same shape back.

    ``sigma = 0`` returns the maps unchanged. Borders are reflected (replicated when a side is
    shorter than the kernel radius), so a map's edges are not pulled towards zero.
    """
    if sigma == 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps.device, maps.dtype)
    radius = (len(kernel) - 1) // 2
    x = maps.unsqueeze(1)
    for dim in (-1, -2):
        side = x.shape[dim]
        pad = (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius)
        x = F.pad(x, pad, mode="reflect" if radius < side else "replicate")
        weight = kernel.view(1, 1, 1, -1) if dim == -1 else kernel.view(1, 1, -1, 1)
        x = F.conv2d(x, weight)
    return x.squeeze(1)


def upsample_and_smooth(scores: torch.Tensor, size: int, sigma: float = DEFAULT_SIGMA) -> torch.Tensor:
    """``(B, h, w)`` patch scores -> ``(B, size, size)`` maps: bilinear upsampling, then Gaussian blur."""
    upsampled = F.interpolate(scores.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return gaussian_blur(upsampled.squeeze(1), sigma)


def receptive_field_upsample(
    scores: torch.Tensor, patch_size: int, stride: int, sigma: float, size: int
) -> torch.Tensor:
    """Patch scores ``(B, h, w)`` -> pixel maps ``(B, size, size)`` (FCDD's receptive-field upsampling).

    A pixel's value is the weighted mean of the scores of the patches that contain it, the weight
    being ``exp(-(dy**2 + dx**2) / (2 sigma**2))`` for its offset ``(dy, dx)`` from the patch
    centre (``sigma = 0``: equal weights). Patch ``(i, j)`` covers rows ``i * stride`` to
    ``i * stride + patch_size - 1`` and the same columns; ``size`` must not exceed the covered side
    ``(h - 1) * stride + patch_size``. Non-negative scores give non-negative maps.
    """
    offsets = torch.arange(patch_size, dtype=torch.float64) - (patch_size - 1) / 2
    weights = torch.ones(patch_size, dtype=torch.float64) if sigma == 0 else torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = torch.outer(weights, weights).to(scores.device, scores.dtype)[None, None]
    total = F.conv_transpose2d(scores.unsqueeze(1), kernel, stride=stride)
    mass = F.conv_transpose2d(torch.ones_like(scores[:1]).unsqueeze(1), kernel, stride=stride)
    return (total / mass)[:, 0, :size, :size]


def resize_map(anomaly_map: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one ``(H0, W0)`` map to ``(height, width) float32`` numpy."""
    if tuple(anomaly_map.shape) != (height, width):
        anomaly_map = F.interpolate(anomaly_map[None, None], size=(height, width), mode="bilinear",
                                    align_corners=False)[0, 0]
    return np.ascontiguousarray(anomaly_map.float().cpu().numpy(), dtype=np.float32)

