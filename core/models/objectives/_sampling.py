"""Random draws for augmentations, all taken from one ``torch.Generator``.

Values are drawn on the generator's device and then moved to the data's device, so a CPU
generator gives the same augmentations whether the batch lives on the CPU or a GPU.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float,
            device: torch.device) -> torch.Tensor:
    """``shape`` float32 values uniform in ``[low, high)``."""
    values = torch.rand(shape, generator=generator, device=generator.device)
    return (low + (high - low) * values).to(device)


def log_uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float,
                device: torch.device) -> torch.Tensor:
    """``shape`` float32 values whose logarithm is uniform in ``[log low, log high)``."""
    return uniform(generator, shape, math.log(low), math.log(high), device).exp()


def integers(generator: torch.Generator, low: torch.Tensor | int, high: torch.Tensor | int,
             shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``shape`` int64 values uniform in ``[low, high]`` (both inclusive, elementwise bounds)."""
    low = torch.as_tensor(low, device=device)
    high = torch.as_tensor(high, device=device)
    values = uniform(generator, shape, 0.0, 1.0, device)
    return (low + (values * (high - low + 1)).floor().long()).minimum(high)


def bernoulli(generator: torch.Generator, shape: tuple[int, ...], p: float | torch.Tensor,
              device: torch.device) -> torch.Tensor:
    """``shape`` booleans, each true with probability ``p`` (broadcast against ``shape``)."""
    return uniform(generator, shape, 0.0, 1.0, device) < torch.as_tensor(p, device=device)


def permutation(generator: torch.Generator, n: int, device: torch.device) -> torch.Tensor:
    """A random permutation of ``range(n)``, int64 ``(n,)``."""
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def beta(generator: torch.Generator, alpha: float) -> float:
    """One draw from Beta(alpha, alpha); alpha = 1 is the uniform distribution on [0, 1]."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))
