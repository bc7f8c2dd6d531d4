"""Choosing the torch device a step runs on."""
from __future__ import annotations

import torch

from core.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """Map ``auto`` / ``cpu`` / ``cuda`` to a usable device.

    ``auto`` picks CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is an error
    rather than a silent fallback.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device must be one of auto, cpu, cuda; got {name!r}")
    return torch.device(name)
