"""CutPaste (arXiv 2104.04015): tell normal images from ones with a pasted patch or scar.

Augmentations
-------------
``cutpaste``: a rectangle covering 2-15 % of the image, aspect ratio (width / height) log-uniform
in [0.3, 3.3], is cut from a random place of the same image, colour-jittered and pasted at
another random place. Sizes are whole pixels, chosen so that area share and aspect ratio stay
inside those ranges even on a 32x32 image.

``scar``: a thin rectangle, cut and jittered the same way, rotated by an angle uniform in
[-45, 45] degrees and pasted at a random place (it always lies wholly inside the image).
The paper's scar is 2-16 px wide and 10-25 px long on 256 px images; here both ranges are
scaled by ``min(H, W) / 256`` and rounded, with floors of 1 px width and 3 px length
(see :func:`scar_size_range`): 32 px images get scars 1-2 x 3 px, 64 px images 1-4 x 3-6 px,
256 px images the paper's sizes.

Both return the changed image and the boolean mask of pasted pixels; every pixel outside the
mask is left exactly as it was. The patch is resampled bilinearly through one batched
``grid_sample`` call: target pixel -> (rotated) patch frame -> source pixel; with no rotation
the source positions are whole pixels, so the pasted pixels are exact (jittered) copies.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError, DataError
from core.models.objectives import _sampling as sample
from core.models.objectives._base import Objective, check_dims, check_images, mlp_head
from core.models.objectives.color import color_jitter

PATCH_AREA = (0.02, 0.15)
PATCH_ASPECT = (0.3, 3.3)
SCAR_WIDTH_256 = (2, 16)
SCAR_LENGTH_256 = (10, 25)
SCAR_MIN_WIDTH, SCAR_MIN_LENGTH = 1, 3
SCAR_MAX_ANGLE = 45.0
PATCH_JITTER = 0.1

VARIANTS = {"3way": "cutpaste", "binary": "cutpaste-binary", "scar": "cutpaste-scar"}


def cutpaste(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a jittered rectangle cut from each image at a random place of the same image.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, 3, H, W)`` float in [0, 1], H and W at least 8.
    generator : torch.Generator
        Drives patch size, source and target places and the colour jitter.

    Returns
    -------
    images : torch.Tensor
        ``(B, 3, H, W)``, equal to the input outside ``mask``.
    mask : torch.Tensor
        ``(B, 1, H, W)`` bool, true on the pasted rectangle (2-15 % of the pixels).
    """
    check_images(images)
    count, _, height, width = images.shape
    patch_w, patch_h = _patch_sizes(generator, count, height, width, images.device)
    angle = torch.zeros(count, device=images.device)
    return _transplant(images, generator, patch_w, patch_h, angle)


def scar(images: torch.Tensor, generator: torch.Generator,
         max_angle: float = SCAR_MAX_ANGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a thin jittered rectangle, rotated by up to ``max_angle`` degrees, into each image.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, 3, H, W)`` float in [0, 1], H and W at least 8.
    generator : torch.Generator
        Drives scar size, angle, source and target places and the colour jitter.
    max_angle : float, default=45
        Angles are uniform in ``[-max_angle, max_angle]`` degrees; 0 gives upright scars
        ``width`` px across and ``length`` px tall.

    Returns
    -------
    images : torch.Tensor
        ``(B, 3, H, W)``, equal to the input outside ``mask``.
    mask : torch.Tensor
        ``(B, 1, H, W)`` bool, true on the pasted scar.
    """
    check_images(images)
    count, _, height, width = images.shape
    (w_lo, w_hi), (l_lo, l_hi) = scar_size_range(height, width)
    device = images.device
    scar_w = sample.integers(generator, w_lo, w_hi, (count,), device)
    scar_l = sample.integers(generator, l_lo, l_hi, (count,), device)
    angle = sample.uniform(generator, (count,), -max_angle, max_angle, device) * (math.pi / 180.0)
    return _transplant(images, generator, scar_w, scar_l, angle)


def scar_size_range(height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Scar ``(width_lo, width_hi), (length_lo, length_hi)`` in px for an ``height x width`` image.

    The paper's ranges for 256 px images, scaled by ``min(height, width) / 256`` and rounded;
    widths are at least 1 px, lengths at least 3 px, and neither exceeds the image's shorter
    side.
    """
    side = min(height, width)
    scale = side / 256.0

    def scaled(bounds: tuple[int, int], floor: int) -> tuple[int, int]:
        low = min(side, max(floor, round(bounds[0] * scale)))
        return low, min(side, max(low, round(bounds[1] * scale)))

    return scaled(SCAR_WIDTH_256, SCAR_MIN_WIDTH), scaled(SCAR_LENGTH_256, SCAR_MIN_LENGTH)


def _patch_sizes(generator: torch.Generator, count: int, height: int, width: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-pixel CutPaste patch widths and heights ``(B,)`` int64 inside the area/aspect ranges.

    Area share and log-aspect are drawn as in the paper; the width is then snapped to the
    nearest width for which some whole-pixel height satisfies both ranges, and the height is
    the one nearest the drawn area, clipped to that feasible set.
    """
    total = height * width
    area_lo, area_hi = PATCH_AREA[0] * total, PATCH_AREA[1] * total
    widths = torch.arange(1, width + 1, dtype=torch.float64)
    height_lo = torch.maximum(torch.ceil(area_lo / widths), torch.ceil(widths / PATCH_ASPECT[1]))
    height_hi = torch.minimum(torch.floor(area_hi / widths), torch.floor(widths / PATCH_ASPECT[0]))
    height_hi = height_hi.clamp(max=height)
    feasible = torch.nonzero(height_lo <= height_hi).squeeze(1)
    if feasible.numel() == 0:
        raise DataError(f"no CutPaste patch fits a {height}x{width} image; use larger images")

    area = sample.uniform(generator, (count,), area_lo, area_hi, torch.device("cpu")).double()
    aspect = sample.log_uniform(generator, (count,), *PATCH_ASPECT, torch.device("cpu")).double()
    ideal = (area * aspect).sqrt()
    nearest = (widths[feasible][None, :] - ideal[:, None]).abs().argmin(dim=1)
    index = feasible[nearest]
    patch_w = widths[index]
    patch_h = torch.minimum(torch.maximum((area / patch_w).round(), height_lo[index]), height_hi[index])
    return patch_w.long().to(device), patch_h.long().to(device)


def _transplant(images: torch.Tensor, generator: torch.Generator, patch_w: torch.Tensor,
                patch_h: torch.Tensor, angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``patch_w x patch_h`` rectangles, jitter, rotate by ``angle`` (radians) and paste.

    Source rectangles lie inside the image at whole-pixel places; the rotated rectangle's
    bounding box is placed at a whole-pixel place inside the image.
    """
    count, _, height, width = images.shape
    device = images.device
    source_x = sample.integers(generator, 0, width - patch_w, (count,), device)
    source_y = sample.integers(generator, 0, height - patch_h, (count,), device)
    cos, sin = angle.cos(), angle.sin()
    box_w = torch.ceil(cos.abs() * patch_w + sin.abs() * patch_h - 1e-4).long().clamp(1, width)
    box_h = torch.ceil(sin.abs() * patch_w + cos.abs() * patch_h - 1e-4).long().clamp(1, height)
    centre_x = sample.integers(generator, 0, width - box_w, (count,), device) + (box_w - 1) / 2
    centre_y = sample.integers(generator, 0, height - box_h, (count,), device) + (box_h - 1) / 2
    jittered = color_jitter(images, generator, PATCH_JITTER, PATCH_JITTER, PATCH_JITTER, PATCH_JITTER)

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.to(torch.float32).view(count, 1, 1)

    rows = torch.arange(height, device=device, dtype=torch.float32).view(1, height, 1)
    cols = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, width)
    dx, dy = cols - per_image(centre_x), rows - per_image(centre_y)
    cos, sin = per_image(cos), per_image(sin)
    # Coordinates in the patch frame: 0 .. patch_w - 1 across, 0 .. patch_h - 1 along.
    across = cos * dx + sin * dy + (per_image(patch_w) - 1) / 2
    along = -sin * dx + cos * dy + (per_image(patch_h) - 1) / 2
    mask = (across >= -0.5) & (across < per_image(patch_w) - 0.5)
    mask &= (along >= -0.5) & (along < per_image(patch_h) - 0.5)

    grid_x = (per_image(source_x) + across) * (2.0 / (width - 1)) - 1.0
    grid_y = (per_image(source_y) + along) * (2.0 / (height - 1)) - 1.0
    grid = torch.stack((grid_x, grid_y), dim=-1).to(images.dtype)
    pasted = F.grid_sample(jittered, grid, mode="bilinear", padding_mode="border", align_corners=True)
    mask = mask.unsqueeze(1)
    return torch.where(mask, pasted, images), mask


class CutPasteObjective(Objective):
    """Classify normal images against their CutPaste and/or scar versions.

    Each batch of ``B`` images becomes ``2B`` (binary, scar) or ``3B`` (3-way) encoder inputs:
    the images, then their augmented versions; the loss is the cross-entropy of an MLP
    projection head followed by a linear classifier over 2 or 3 classes.

    Parameters
    ----------
    embedding_dim : int
        Width of the encoder's output.
    variant : {"3way", "binary", "scar"}, default="3way"
        "3way": normal / cutpaste / scar ("cutpaste"); "binary": normal / cutpaste
        ("cutpaste-binary"); "scar": normal / scar ("cutpaste-scar").
    head_dims : sequence of int, default=(512, 128)
        Widths of the Linear-BatchNorm-ReLU projection layers before the classifier.
    """

    kinds = ("images",)

    def __init__(self, embedding_dim: int, variant: str = "3way", head_dims: Sequence[int] = (512, 128)) -> None:
        super().__init__(embedding_dim)
        if variant not in VARIANTS:
            raise ConfigError(f"unknown CutPaste variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.name = VARIANTS[variant]
        head_dims = check_dims("head_dims", head_dims)
        self.options = {"head_dims": list(head_dims)}
        self.augmentations = {"3way": (cutpaste, scar), "binary": (cutpaste,), "scar": (scar,)}[variant]
        self.head: nn.Module = mlp_head(embedding_dim, head_dims, 1 + len(self.augmentations))

    def loss(self, encoder: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = check_images(batch)
        views = [images] + [augment(images, generator)[0] for augment in self.augmentations]
        labels = torch.arange(len(views), device=images.device).repeat_interleave(images.shape[0])
        logits = self.head(self.embed(encoder, torch.cat(views)))
        return F.cross_entropy(logits.float(), labels)
