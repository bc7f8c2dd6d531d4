"""Contrastive learning on table rows: views by feature masking and Gaussian noise (+ i-Mix).

Rows arrive robust-scaled (median 0, unit IQR per column), so setting a feature to 0 replaces
it by its training median. Each view masks a random share of the features, drawn per row
uniformly in ``mask_share``, then adds ``N(0, noise_std^2)`` noise to every feature.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from core.errors import DataError
from core.models.objectives import _sampling as sample
from core.models.objectives._base import check_positive, check_range
from core.models.objectives.contrastive import ContrastiveObjective

MASK_SHARE = (0.2, 0.4)
NOISE_STD = 0.1


def table_view(rows: torch.Tensor, generator: torch.Generator, mask_share: Sequence[float] = MASK_SHARE,
               noise_std: float = NOISE_STD) -> torch.Tensor:
    """One random view of each row: some features set to 0 (the median), Gaussian noise added.

    Parameters
    ----------
    rows : torch.Tensor
        ``(B, F)`` float, robust-scaled.
    generator : torch.Generator
        Draws the masked share per row, the masked features and the noise.
    mask_share : (float, float), default=(0.2, 0.4)
        Each row's expected share of masked features is uniform in this range (each feature
        is then masked independently with that probability).
    noise_std : float, default=0.1
        Standard deviation of the added noise, in robust-scaled units.

    Returns
    -------
    view : torch.Tensor
        ``(B, F)``, same dtype and device as ``rows``.
    """
    count, features = rows.shape
    share = sample.uniform(generator, (count, 1), mask_share[0], mask_share[1], rows.device)
    masked = sample.bernoulli(generator, (count, features), share, rows.device)
    noise = torch.randn((count, features), generator=generator, device=generator.device)
    return rows.masked_fill(masked, 0.0) + noise_std * noise.to(device=rows.device, dtype=rows.dtype)


class TableContrastiveObjective(ContrastiveObjective):
    """Contrastive learning (NT-Xent, optionally i-Mix) between two masked, noisy views of each row.

    Parameters
    ----------
    embedding_dim, imix, temperature, head_dims, projection_dim, imix_alpha
        As :class:`~.contrastive.ContrastiveObjective`.
    mask_share : (float, float), default=(0.2, 0.4)
        Range of the share of features set to 0 in a view.
    noise_std : float, default=0.1
        Standard deviation of the Gaussian noise added to a view.
    """

    kinds = ("table",)

    def __init__(self, embedding_dim: int, imix: bool = False, temperature: float = 0.2,
                 head_dims: Sequence[int] = (512,), projection_dim: int = 128, imix_alpha: float = 1.0,
                 mask_share: Sequence[float] = MASK_SHARE, noise_std: float = NOISE_STD) -> None:
        super().__init__(embedding_dim, imix, temperature, head_dims, projection_dim, imix_alpha)
        self.mask_share = check_range("mask_share", mask_share, 0.0, 1.0)
        self.noise_std = 0.0 if noise_std == 0 else check_positive("noise_std", noise_std)
        self.options.update(mask_share=list(self.mask_share), noise_std=self.noise_std)

    def check(self, batch: torch.Tensor) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 2 or batch.shape[1] < 1:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise DataError(f"expected table rows as a (B, F) tensor, got {shape}")
        if not batch.is_floating_point():
            raise DataError(f"expected float table rows, got dtype {batch.dtype}")
        return batch

    def views(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return (table_view(batch, generator, self.mask_share, self.noise_std),
                table_view(batch, generator, self.mask_share, self.noise_std))
