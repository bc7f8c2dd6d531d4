"""Patches cut from images: the dense grid a patch model scores and the random crops it trains on.

:func:`patch_grid` and :func:`unfold_patches` tile an image with patches at a stride (the bottom and
right edges reflected so every pixel is covered); :class:`RandomPatchObjective` feeds random crops of
each training image to an image objective (CutPaste's patch-level training). The way back from patch
scores to pixels is :func:`core.explain.smoothing.receptive_field_upsample`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def patch_grid(size: int, patch_size: int, stride: int) -> tuple[int, int]:
    """Patches a side and the (reflect-padded) side they tile, for a ``size x size`` image.

    ``n = ceil((size - patch_size) / stride) + 1`` patches start at ``0, stride, ..., (n - 1) * stride``
    and cover ``(n - 1) * stride + patch_size >= size`` pixels.
    """
    count = math.ceil((size - patch_size) / stride) + 1
    return count, (count - 1) * stride + patch_size


def unfold_patches(images: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """Every ``patch_size`` patch at ``stride`` of square images, row by row.

    Parameters
    ----------
    images : (B, 3, S, S) float tensor
    patch_size, stride : int
        ``stride <= patch_size <= S``. When ``S - patch_size`` is not a multiple of ``stride``,
        the bottom and right edges are reflected so that the last patches end at the border.

    Returns
    -------
    (B, n * n, 3, patch_size, patch_size) tensor
        ``n`` from :func:`patch_grid`; patch ``i * n + j`` starts at row ``i * stride``, column
        ``j * stride``.
    """
    count, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    n, padded = patch_grid(size, patch_size, stride)
    if padded > size:
        images = F.pad(images, (0, padded - size, 0, padded - size), mode="reflect")
    columns = F.unfold(images, patch_size, stride=stride)            # (B, C * P * P, n * n)
    return columns.transpose(1, 2).reshape(count, n * n, channels, patch_size, patch_size)


class RandomPatchObjective(nn.Module):
    """An image objective applied to random patches: crops, then ``objective.loss`` on the crops.

    ``loss(encoder, images (B, 3, S, S), generator)`` crops ``patches_per_image`` patches of
    ``patch_size`` at random places of each image (drawn with ``generator``) and returns
    ``objective.loss(encoder, patches (B * patches_per_image, 3, P, P), generator)``.
    """

    def __init__(self, objective: nn.Module, patch_size: int, patches_per_image: int) -> None:
        super().__init__()
        self.objective = objective
        self.patch_size = patch_size
        self.patches_per_image = patches_per_image

    def loss(self, encoder: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, _, height, width = batch.shape
        side, shape = self.patch_size, (count, self.patches_per_image)
        tops = torch.randint(0, height - side + 1, shape, generator=generator).tolist()
        lefts = torch.randint(0, width - side + 1, shape, generator=generator).tolist()
        patches = torch.stack([batch[index, :, top:top + side, left:left + side]
                               for index in range(count) for top, left in zip(tops[index], lefts[index])])
        return self.objective.loss(encoder, patches.contiguous(memory_format=torch.channels_last), generator)
