"""Contrastive learning with distribution augmentation (DROC, arXiv 2011.02578), optionally i-Mix.

Images: each image is first turned by a random quarter turn, so its four rotations act as
four different samples ("distribution augmentation": the rotated copies push the
contrastive representation away from uniformity on the normal data); then two random views
(:func:`~.views.image_view`) are encoded, projected by an MLP head and compared with NT-Xent
(temperature 0.2). With i-Mix (arXiv 2010.08887) the first views are mixed between samples
of the batch with ``lam ~ Beta(alpha, alpha)`` and the loss uses the matching mixed virtual
labels (:func:`~.losses.imix_nt_xent`).

Tables use the same objective with other views (:mod:`.tabular`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from core.models.objectives import _sampling as sample
from core.models.objectives._base import (
    Objective,
    check_batch_size,
    check_dims,
    check_images,
    check_positive,
    check_range,
    mlp_head,
)
from core.models.objectives.losses import imix_nt_xent, nt_xent
from core.models.objectives.rotation import check_square, rotate_each
from core.models.objectives.views import image_view


def mix_inputs(inputs: torch.Tensor, generator: torch.Generator,
               alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """i-Mix inputs: ``lam * x + (1 - lam) * x[permutation]`` with one ``lam ~ Beta(alpha, alpha)``.

    Parameters
    ----------
    inputs : torch.Tensor
        ``(N, ...)`` images or table rows.
    generator : torch.Generator
        Draws ``lam`` and the permutation.
    alpha : float, default=1
        Beta parameter; 1 draws ``lam`` uniformly from [0, 1].

    Returns
    -------
    mixed : torch.Tensor
        ``(N, ...)``, same dtype and device as ``inputs``.
    permutation : torch.Tensor
        ``(N,)`` int64, the partner of each sample.
    lam : float
    """
    lam = sample.beta(generator, alpha)
    permutation = sample.permutation(generator, inputs.shape[0], inputs.device)
    return lam * inputs + (1.0 - lam) * inputs[permutation], permutation, lam


class ContrastiveObjective(Objective):
    """NT-Xent (or i-Mix) between two random views of each sample; subclasses define the views.

    Parameters
    ----------
    embedding_dim : int
        Width of the encoder's output.
    imix : bool, default=False
        Mix the first views between samples and use i-Mix's mixed virtual labels.
    temperature : float, default=0.2
        Softmax temperature of the contrastive loss.
    head_dims : sequence of int, default=(512,)
        Widths of the Linear-BatchNorm-ReLU layers of the projection head.
    projection_dim : int, default=128
        Width of the projection the loss compares.
    imix_alpha : float, default=1.0
        i-Mix draws ``lam ~ Beta(imix_alpha, imix_alpha)``.
    """

    def __init__(self, embedding_dim: int, imix: bool = False, temperature: float = 0.2,
                 head_dims: Sequence[int] = (512,), projection_dim: int = 128, imix_alpha: float = 1.0) -> None:
        super().__init__(embedding_dim)
        self.imix = bool(imix)
        self.name = "contrastive-imix" if self.imix else "contrastive"
        self.temperature = check_positive("temperature", temperature)
        self.imix_alpha = check_positive("imix_alpha", imix_alpha)
        head_dims = check_dims("head_dims", head_dims)
        (projection_dim,) = check_dims("projection_dim", (projection_dim,))
        self.options = {"temperature": self.temperature, "head_dims": list(head_dims),
                        "projection_dim": projection_dim, "imix_alpha": self.imix_alpha}
        self.head: nn.Module = mlp_head(embedding_dim, head_dims, projection_dim)

    def views(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Two random views of every sample of a checked batch, each shaped like the batch."""
        raise NotImplementedError

    def check(self, batch: torch.Tensor) -> torch.Tensor:
        """The batch if it has the right form for this kind of data, else DataError."""
        raise NotImplementedError

    def loss(self, encoder: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = self.check(batch)
        check_batch_size(batch, 2, "contrastive learning (negatives come from the batch)")
        first, second = self.views(batch, generator)
        if self.imix:
            first, permutation, lam = mix_inputs(first, generator, self.imix_alpha)
        projections = self.head(self.embed(encoder, torch.cat((first, second))))
        anchors, positives = projections.chunk(2)
        if self.imix:
            return imix_nt_xent(anchors, positives, permutation, lam, self.temperature)
        return nt_xent(anchors, positives, self.temperature)


class ImageContrastiveObjective(ContrastiveObjective):
    """DROC's contrastive learning with distribution augmentation, on images.

    Parameters
    ----------
    embedding_dim, imix, temperature, head_dims, projection_dim, imix_alpha
        As :class:`ContrastiveObjective`.
    distribution_augmentation : bool, default=True
        Turn each image by a random quarter turn before taking its views (needs square
        images); False gives plain SimCLR.
    crop_scale : (float, float) or None, default=None
        Area share of the random crops; None picks (0.08, 1), or (0.5, 1) below 96 px.
    """

    kinds = ("images",)

    def __init__(self, embedding_dim: int, imix: bool = False, temperature: float = 0.2,
                 head_dims: Sequence[int] = (512,), projection_dim: int = 128, imix_alpha: float = 1.0,
                 distribution_augmentation: bool = True, crop_scale: Sequence[float] | None = None) -> None:
        super().__init__(embedding_dim, imix, temperature, head_dims, projection_dim, imix_alpha)
        self.distribution_augmentation = bool(distribution_augmentation)
        self.crop_scale = None if crop_scale is None else check_range("crop_scale", crop_scale, 1e-3, 1.0)
        self.options.update(distribution_augmentation=self.distribution_augmentation,
                            crop_scale=None if self.crop_scale is None else list(self.crop_scale))

    def check(self, batch: torch.Tensor) -> torch.Tensor:
        images = check_images(batch)
        return check_square(images) if self.distribution_augmentation else images

    def views(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.distribution_augmentation:
            batch, _ = rotate_each(batch, generator)
        return image_view(batch, generator, self.crop_scale), image_view(batch, generator, self.crop_scale)
