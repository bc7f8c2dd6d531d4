"""Batched colour augmentations on ``(B, 3, H, W)`` float images in [0, 1].

Each function takes one factor per image and matches the single-image operation of the
same name in ``torchvision.transforms.functional`` (tests check this), so a whole batch is
jittered in a few tensor operations on any device.
"""
from __future__ import annotations

import torch

from core.models.objectives import _sampling as sample

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma of ``(B, 3, H, W)`` images as ``(B, 1, H, W)`` (torchvision's ITU-R 601 weights)."""
    weights = images.new_tensor(_GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _per_image(factor: torch.Tensor) -> torch.Tensor:
    return factor.reshape(-1, 1, 1, 1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = _per_image(factor)
    return (factor * images + (1.0 - factor) * other).clamp(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale every pixel by ``factor`` ``(B,)`` (0 gives black, 1 the original)."""
    return (images * _per_image(factor)).clamp(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its mean grey level by ``factor`` ``(B,)`` (0 gives flat grey)."""
    mean = grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its grey version by ``factor`` ``(B,)`` (0 gives grey)."""
    return _blend(images, grayscale(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by ``shift`` ``(B,)`` turns, in [-0.5, 0.5]."""
    hue, saturation, value = _rgb_to_hsv(images)
    hue = (hue + shift.reshape(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(hue, saturation, value)


def _rgb_to_hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    red, green, blue = images.unbind(dim=1)
    value = images.amax(dim=1)
    chroma = value - images.amin(dim=1)
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    rc, gc, bc = (value - red) / safe, (value - green) / safe, (value - blue) / safe
    hue = torch.where(value == red, bc - gc, torch.where(value == green, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(chroma > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return hue, saturation, value


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.long().remainder(6).unsqueeze(0)
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    channels = (
        torch.stack((value, q, p, p, t, value)),
        torch.stack((t, value, value, q, p, p)),
        torch.stack((p, p, t, value, value, q)),
    )
    return torch.stack([c.gather(0, sector).squeeze(0) for c in channels], dim=1).clamp(0.0, 1.0)


def color_jitter(images: torch.Tensor, generator: torch.Generator, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1) -> torch.Tensor:
    """Random brightness, contrast, saturation and hue, drawn independently per image.

    Factors are uniform in ``[1 - s, 1 + s]`` (hue shift in ``[-hue, hue]``), as in
    torchvision's ``ColorJitter``; the four operations are applied in this fixed order
    rather than a random one, which keeps the batch a handful of tensor operations.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, 3, H, W)`` float in [0, 1].
    generator : torch.Generator
        Source of the factors.

    Returns
    -------
    images : torch.Tensor
        ``(B, 3, H, W)`` float in [0, 1].
    """
    count, device = images.shape[0], images.device

    def factor(strength: float) -> torch.Tensor:
        return sample.uniform(generator, (count,), max(0.0, 1.0 - strength), 1.0 + strength, device)

    images = adjust_brightness(images, factor(brightness))
    images = adjust_contrast(images, factor(contrast))
    images = adjust_saturation(images, factor(saturation))
    return adjust_hue(images, sample.uniform(generator, (count,), -hue, hue, device))


def random_grayscale(images: torch.Tensor, generator: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """Replace each ``(B, 3, H, W)`` image by its grey version (3 equal channels) with probability ``p``."""
    chosen = sample.bernoulli(generator, (images.shape[0], 1, 1, 1), p, images.device)
    return torch.where(chosen, grayscale(images).expand_as(images), images)
