"""Random views of images for contrastive learning (the SimCLR / DROC augmentation list).

One view = random resized crop + horizontal flip (one batched ``affine_grid`` /
``grid_sample``), colour jitter (0.4, 0.4, 0.4, 0.1) with probability 0.8, grey with
probability 0.2. Everything is drawn per image from one ``torch.Generator``.

Crop scale: the share of the image area a crop covers is uniform in ``crop_scale``. The
ImageNet-sized default (0.08, 1) leaves a 32 px image crops of about 9x9 px; DROC trained
its 32x32 models with crops of at least half the area ("cnr0.5"), so images whose shorter
side is below ``SMALL_IMAGE`` px default to (0.5, 1) (see :func:`default_crop_scale`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from core.models.objectives import _sampling as sample
from core.models.objectives.color import color_jitter, random_grayscale

SMALL_IMAGE = 96
CROP_SCALE = (0.08, 1.0)
SMALL_CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = (0.4, 0.4, 0.4, 0.1)
JITTER_P = 0.8
GRAY_P = 0.2
FLIP_P = 0.5


def default_crop_scale(height: int, width: int) -> tuple[float, float]:
    """(0.08, 1) for images at least ``SMALL_IMAGE`` px on their shorter side, else (0.5, 1)."""
    return CROP_SCALE if min(height, width) >= SMALL_IMAGE else SMALL_CROP_SCALE


def random_resized_crop(images: torch.Tensor, generator: torch.Generator,
                        scale: Sequence[float] = CROP_SCALE, flip_p: float = FLIP_P) -> torch.Tensor:
    """Crop a random rectangle of each image, flip it with probability ``flip_p``, resize back.

    The crop covers an area share uniform in ``scale`` with aspect ratio log-uniform in
    [3/4, 4/3] (as torchvision's ``RandomResizedCrop``); a side longer than the image is
    clipped to it instead of redrawn. Resampling is bilinear.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, C, H, W)`` float.
    generator : torch.Generator
        Drives crop sizes, places and flips.

    Returns
    -------
    views : torch.Tensor
        ``(B, C, H, W)``, same size as the input.
    """
    count, _, height, width = images.shape
    device = images.device
    area = sample.uniform(generator, (count,), scale[0], scale[1], device)
    ratio = sample.log_uniform(generator, (count,), *CROP_RATIO, device)
    crop_w = (area * ratio).sqrt().clamp(max=1.0)  # as a share of the image width
    crop_h = (area / ratio).sqrt().clamp(max=1.0)
    left = sample.uniform(generator, (count,), 0.0, 1.0, device) * (1.0 - crop_w)
    top = sample.uniform(generator, (count,), 0.0, 1.0, device) * (1.0 - crop_h)
    flip = sample.bernoulli(generator, (count,), flip_p, device)
    theta = torch.zeros(count, 2, 3, device=device)
    theta[:, 0, 0] = torch.where(flip, -crop_w, crop_w)
    theta[:, 0, 2] = 2.0 * left + crop_w - 1.0
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = 2.0 * top + crop_h - 1.0
    grid = F.affine_grid(theta, list(images.shape), align_corners=False).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def image_view(images: torch.Tensor, generator: torch.Generator,
               crop_scale: Sequence[float] | None = None) -> torch.Tensor:
    """One random view of each image: crop + flip, colour jitter (p=0.8), grey (p=0.2).

    Parameters
    ----------
    images : torch.Tensor
        ``(B, 3, H, W)`` float in [0, 1].
    generator : torch.Generator
        Drives every random choice.
    crop_scale : (float, float) or None, default=None
        Area share of the crop; None picks :func:`default_crop_scale` for the image size.

    Returns
    -------
    views : torch.Tensor
        ``(B, 3, H, W)`` float in [0, 1].
    """
    if crop_scale is None:
        crop_scale = default_crop_scale(*images.shape[-2:])
    views = random_resized_crop(images, generator, crop_scale)
    jittered = color_jitter(views, generator, *JITTER)
    chosen = sample.bernoulli(generator, (views.shape[0], 1, 1, 1), JITTER_P, views.device)
    views = torch.where(chosen, jittered, views)
    return random_grayscale(views, generator, GRAY_P).clamp(0.0, 1.0)
