"""The one interface of a pretrained image backbone, and the safe reading of its weight file.

A :class:`FeatureBackbone` turns normalised images into named feature maps. Whatever the network
(EfficientNet-Lite, a torchvision ResNet, DINOv2), its consumers go through the same four calls:

- the image embedding (:class:`core.models.image_encoder.ImageEncoder`) is
  ``backbone.pooled(backbone.normalize(pixels), feature_layers)``;
- the patch maps (:func:`core.explain.patch.patch_features`) read the layers their localizer names (``stride8`` to ``stride32``);
- Grad-CAM (:func:`core.explain.gradcam.find_target_layer`) hooks ``backbone.cam_layer(name)``;
- widths come from ``backbone.channels(name)``.

The layer names are ``core.config.FEATURE_LAYERS`` (``stride8``, ``stride16``, ``stride32``, ``head``);
each backbone offers those of them it has (:attr:`FeatureBackbone.layers`) and says what they are in its
docstring. :func:`read_state_dict` and :func:`load_state_dict` are the only way a weight file is read:
tensors only (``torch.load(..., weights_only=True)``), never an unpickled Python object.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

from core.errors import ConfigError


class FeatureBackbone(nn.Module):
    """Base class of the pretrained backbones: named feature maps, their widths, their input scaling.

    A subclass sets :attr:`layers` and implements :meth:`normalize`, :meth:`channels`, :meth:`forward`
    and :meth:`cam_layer`; :meth:`pooled` and :meth:`check_layers` are shared.

    Attributes
    ----------
    name : str
        The backbone's name (``core.config.BACKBONES``), for messages.
    layers : tuple of str
        The feature layers this backbone offers, shallow to deep (a subset of ``core.config.FEATURE_LAYERS``).
    """

    name: str = "backbone"
    layers: tuple[str, ...] = ()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, 3) uint8`` pixels -> ``(B, 3, H, W) float32``, scaled as the weights were trained."""
        raise NotImplementedError

    def channels(self, layer: str) -> int:
        """Number of channels of the named feature map."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Feature maps ``(B, C, h, w)`` for each of ``layers`` of normalised ``(B, 3, H, W)`` images."""
        raise NotImplementedError

    def cam_layer(self, layer: str) -> nn.Module:
        """The module whose output is the named feature map: Grad-CAM's target layer."""
        raise NotImplementedError

    def pooled(self, images: torch.Tensor, layers: tuple[str, ...]) -> torch.Tensor:
        """Global-average-pooled features of ``layers``, concatenated in order: ``(B, sum C)``."""
        maps = self.forward(images, layers)
        return torch.cat([maps[name].mean(dim=(2, 3)) for name in layers], dim=1)

    def check_layers(self, layers: tuple[str, ...]) -> None:
        """Raise ConfigError naming the offered layers when one of ``layers`` is not among them."""
        missing = [name for name in layers if name not in self.layers]
        if missing:
            raise ConfigError(f"feature layer {missing[0]!r} is not offered by the {self.name} backbone; "
                              f"choose from {', '.join(self.layers)}")


def read_state_dict(path: Path | str, backbone: str) -> dict[str, torch.Tensor]:
    """The tensors of a weight file (a ``state_dict`` saved with ``torch.save``), on the CPU.

    Only tensors and plain containers are read (``weights_only=True``): a file that holds any other
    Python object is refused, so a weight file from an untrusted source cannot run code.

    Raises
    ------
    ConfigError
        The file is missing, is not a torch weight file, is damaged, holds Python objects beside
        tensors, or is not a mapping of parameter names to tensors; the message names the file and ``backbone``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"the {backbone} weight file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # the tensors-only reader met something else
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"a Python object ({found.group(1)})" if found else "Python objects or damaged bytes"
        raise ConfigError(f"{path} is refused: it holds {what} beside tensors, and weight files are never "
                          f"unpickled; save the model's state_dict() with torch.save") from None
    except Exception as error:  # torch raises RuntimeError, EOFError, ... for a file that is not its format
        detail = str(error).strip().splitlines()
        raise ConfigError(f"{path} is not a torch weight file or is damaged "
                          f"({type(error).__name__}{': ' + detail[0] if detail else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ConfigError(f"{path} does not hold a state_dict (parameter names mapped to tensors); "
                          f"save the {backbone} model's state_dict() with torch.save")
    return state


def load_state_dict(module: nn.Module, state: dict[str, torch.Tensor], path: Path | str, backbone: str) -> None:
    """Load ``state`` into ``module`` strictly; a state of another architecture is a ConfigError naming ``path``."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])
        raise ConfigError(f"{path} holds the weights of another architecture than {backbone} ({detail[:300]}); "
                          f"give the {backbone} weight file") from None
