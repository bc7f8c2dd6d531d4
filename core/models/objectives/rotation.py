"""Rotation prediction (as used in DROC, arXiv 2011.02578): which of 4 quarter turns was applied?

Rotations are exact (``torch.rot90`` over the last two dimensions, counter-clockwise as seen
with the row index growing downwards) and need square images.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import DataError
from core.models.objectives import _sampling as sample
from core.models.objectives._base import Objective, check_dims, check_images, check_range, mlp_head
from core.models.objectives.views import image_view

QUARTER_TURNS = 4


def check_square(images: torch.Tensor) -> torch.Tensor:
    """``images`` if H == W, else DataError (a quarter turn would change the shape)."""
    height, width = images.shape[-2:]
    if height != width:
        raise DataError(f"rotations need square images; got {height}x{width} px, resize them to a square")
    return images


def rotate_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image in all four quarter turns.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, C, H, H)``.

    Returns
    -------
    rotated : torch.Tensor
        ``(4B, C, H, H)``: the B images turned 0, then 90, 180 and 270 degrees.
    labels : torch.Tensor
        ``(4B,)`` int64, the number of quarter turns (0-3) of each row of ``rotated``.
    """
    check_square(images)
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(QUARTER_TURNS)])
    labels = torch.arange(QUARTER_TURNS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


def rotate_each(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn each image by its own random number of quarter turns (distribution augmentation).

    Parameters
    ----------
    images : torch.Tensor
        ``(B, C, H, H)``.
    generator : torch.Generator
        Draws the turns.

    Returns
    -------
    rotated : torch.Tensor
        ``(B, C, H, H)``.
    turns : torch.Tensor
        ``(B,)`` int64 in 0-3.
    """
    check_square(images)
    turns = sample.integers(generator, 0, QUARTER_TURNS - 1, (images.shape[0],), images.device)
    rotated = images.clone()
    for k in range(1, QUARTER_TURNS):
        chosen = turns == k
        rotated[chosen] = torch.rot90(images[chosen], k, dims=(-2, -1))
    return rotated, turns


class RotationObjective(Objective):
    """Predict the quarter turn (0/90/180/270 degrees) applied to each image.

    Each batch of ``B`` images becomes ``4B`` encoder inputs; an MLP head gives 4 logits and
    the loss is their cross-entropy. With ``augment=True`` (DROC's recipe) each image is
    first replaced by a random crop/flip/colour view (:func:`~.views.image_view`).

    Parameters
    ----------
    embedding_dim : int
        Width of the encoder's output.
    head_dims : sequence of int, default=(512, 128)
        Widths of the Linear-BatchNorm-ReLU layers before the 4-way classifier.
    augment : bool, default=True
        Apply a random view before rotating.
    crop_scale : (float, float) or None, default=None
        Crop area share of that view; None picks it from the image size.
    """

    name = "rotation"
    kinds = ("images",)

    def __init__(self, embedding_dim: int, head_dims: Sequence[int] = (512, 128), augment: bool = True,
                 crop_scale: Sequence[float] | None = None) -> None:
        super().__init__(embedding_dim)
        head_dims = check_dims("head_dims", head_dims)
        self.augment = bool(augment)
        self.crop_scale = None if crop_scale is None else check_range("crop_scale", crop_scale, 1e-3, 1.0)
        self.options = {"head_dims": list(head_dims), "augment": self.augment,
                        "crop_scale": None if self.crop_scale is None else list(self.crop_scale)}
        self.head: nn.Module = mlp_head(embedding_dim, head_dims, QUARTER_TURNS)

    def loss(self, encoder: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = check_square(check_images(batch))
        if self.augment:
            images = image_view(images, generator, self.crop_scale)
        rotated, labels = rotate_batch(images)
        logits = self.head(self.embed(encoder, rotated))
        return F.cross_entropy(logits.float(), labels)
