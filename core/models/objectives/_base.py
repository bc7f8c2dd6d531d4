"""The objective interface, the MLP heads and the checks every objective shares."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from core.errors import ConfigError, DataError

MIN_IMAGE_SIZE = 8


class Objective(nn.Module):
    """A self-supervised objective: its augmentation, its head(s) and its loss.

    The encoder is not part of the objective: :meth:`loss` receives it, so one training loop
    optimises ``encoder.parameters()`` and ``objective.parameters()`` together and keeps only
    the encoder once training is done.

    Parameters
    ----------
    embedding_dim : int
        Width ``D`` of the encoder's output ``(B, D)``; the heads are sized for it.
    """

    name: str = ""
    kinds: tuple[str, ...] = ()

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ConfigError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
        self.embedding_dim = embedding_dim
        self.options: dict[str, object] = {}

    def loss(self, encoder: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scalar loss for one batch.

        Parameters
        ----------
        encoder : torch.nn.Module
            Images: maps ``(B, 3, H, W)`` float32 in [0, 1] to ``(B, D)`` (it normalises
            internally). Tables: maps ``(B, F)`` float32 to ``(B, D)``.
        batch : torch.Tensor
            Images ``(B, 3, H, W)`` float32 in [0, 1], or table rows ``(B, F)`` float32
            (robust-scaled), on the training device.
        generator : torch.Generator
            Drives every random step of the augmentation (same seed, same loss).

        Returns
        -------
        loss : torch.Tensor
            Float32 scalar, differentiable with respect to encoder and head parameters.
        """
        raise NotImplementedError

    def embed(self, encoder: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """``encoder(inputs)``, checked to be ``(N, embedding_dim)``."""
        embeddings = encoder(inputs)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ConfigError(
                f"the encoder returned shape {tuple(embeddings.shape)}; objective {self.name!r} "
                f"was built for (N, {self.embedding_dim}) embeddings"
            )
        return embeddings

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embedding_dim={self.embedding_dim}"


def mlp_head(in_dim: int, hidden_dims: Sequence[int], out_dim: int) -> nn.Sequential:
    """Linear-BatchNorm-ReLU blocks of widths ``hidden_dims``, then a Linear layer to ``out_dim``.

    Maps ``(N, in_dim)`` to ``(N, out_dim)``. This is the projection head of SimCLR, DROC and
    CutPaste; for a classifier, ``out_dim`` is the number of classes and the output are logits.
    """
    layers: list[nn.Module] = []
    width = in_dim
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def check_dims(name: str, dims: Sequence[int]) -> tuple[int, ...]:
    """``dims`` as a tuple of positive ints (a list from JSON is fine), else ConfigError."""
    try:
        values = tuple(dims)
    except TypeError:
        values = None
    if values is None or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in values):
        raise ConfigError(f"{name} must be a sequence of positive integers, got {dims!r}")
    return values


def check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    """``value`` as a ``(lo, hi)`` pair with ``low <= lo <= hi <= high``, else ConfigError."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not low <= lo <= hi <= high:
        raise ConfigError(f"{name} must satisfy {low:g} <= low <= high <= {high:g}, got {value!r}")
    return lo, hi


def check_positive(name: str, value: float) -> float:
    """``value`` as a float > 0, else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_images(batch: torch.Tensor) -> torch.Tensor:
    """``batch`` if it is a float ``(B, 3, H, W)`` tensor with H, W >= 8, else DataError."""
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise DataError(f"expected images as a (B, 3, H, W) tensor, got {shape}")
    if not batch.is_floating_point():
        raise DataError(f"expected float images in [0, 1], got dtype {batch.dtype}")
    if min(batch.shape[-2:]) < MIN_IMAGE_SIZE:
        raise DataError(
            f"images of {batch.shape[-2]}x{batch.shape[-1]} px are too small; "
            f"self-supervised objectives need at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}"
        )
    return batch


def check_batch_size(batch: torch.Tensor, minimum: int, why: str) -> None:
    """DataError unless the batch holds at least ``minimum`` samples."""
    if batch.shape[0] < minimum:
        raise DataError(f"a batch of {batch.shape[0]} is too small: {why} needs at least {minimum}")
