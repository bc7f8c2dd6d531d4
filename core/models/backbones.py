"""Trainable encoders for self-supervised representation learning, and their safe state files.

Every encoder is an ``nn.Module`` that maps a batch to pooled embeddings ``(B, D) float32`` and
has an ``embedding_dim`` attribute (D). Image encoders take ``(B, 3, H, W) float32`` RGB in
[0, 1] and normalise inside (mean = std = 0.5, as everywhere in the engine); the table encoder
takes ``(B, F) float32`` rows that are already robust-scaled (:class:`core.models.tabular.TableEncoder`).

- ``resnet18``: ResNet-18 from random init, D = 512, 32-256 px (a 3x3 stride-1 stem without
  max-pool up to 64 px, the ImageNet stem above);
- ``small-cnn``: four conv blocks, D = 256, 28-64 px (built for 28-32 px digits and CIFAR-sized
  images; its three 2x poolings leave a 3-8 px map before pooling);
- ``efficientnet-lite0-finetune`` (``-lite1``, ``-lite2``): the ImageNet-pretrained backbone of
  the frozen image encoder, trainable; D = sum of the channels of ``feature_layers``; 32-512 px;
- ``mlp``: for tables, D = 128, any number of features.

State is saved with safetensors (no pickle), atomically:

>>> encoder = make_backbone("small-cnn", image_size=32)
>>> save_state(encoder, path)                                        # doctest: +SKIP
>>> copy = load_state(make_backbone("small-cnn", image_size=32), path)  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn

from core.config import FEATURE_LAYERS
from core.errors import ConfigError, RunError
from core.files import atomic_write_bytes

FINETUNE_SUFFIX = "-finetune"
EFFICIENTNET_FINETUNE = tuple(f"efficientnet-lite{i}{FINETUNE_SUFFIX}" for i in range(3))
IMAGE_BACKBONES = ("resnet18", "small-cnn", *EFFICIENTNET_FINETUNE)
TABLE_BACKBONES = ("mlp",)
TRAINABLE_BACKBONES = IMAGE_BACKBONES + TABLE_BACKBONES
IMAGE_SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "resnet18": (32, 256),
    "small-cnn": (28, 64),
    **{name: (32, 512) for name in EFFICIENTNET_FINETUNE},
}
"""Smallest and largest square image side (pixels) each image backbone accepts."""
DEFAULT_FEATURE_LAYERS = ("stride16", "stride32")
SMALL_STEM_MAX_SIZE = 64
"""ResNet-18 uses a 3x3 stride-1 stem without max-pool up to this side, the ImageNet stem above."""


def image_batch(pixels: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3) uint8`` pixels -> ``(B, 3, H, W) float32`` in [0, 1], the input of an image encoder.

    The result is in channels-last memory layout (a permuted NHWC tensor already is; the conversion
    keeps it), the layout the conv nets train in.
    """
    return pixels.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)


def _normalize(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> [-1, 1] (mean = std = 0.5)."""
    return images.sub(0.5).div(0.5)


def _check_size(name: str, image_size: int | None) -> int:
    low, high = IMAGE_SIZE_LIMITS[name]
    if image_size is None:
        raise ConfigError(f"backbone {name!r} needs an image_size in [{low}, {high}] pixels")
    if not low <= int(image_size) <= high:
        raise ConfigError(f"backbone {name!r} takes images of {low}-{high} pixels, got image_size {image_size}")
    return int(image_size)


class ResNet18Encoder(nn.Module):
    """ResNet-18 from scratch (random init), globally average-pooled: ``(B, 3, S, S)`` -> ``(B, 512)``.

    Up to 64 px the stem is a 3x3 stride-1 convolution without max-pool (the usual CIFAR
    variant, so 32 px images keep a 4x4 map at the last stage); above, the ImageNet stem.

    Parameters
    ----------
    image_size : int
        Square input side, 32-256 pixels.
    """

    def __init__(self, image_size: int) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.image_size = _check_size("resnet18", image_size)
        net = resnet18(weights=None)
        if self.image_size <= SMALL_STEM_MAX_SIZE:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        self.embedding_dim = 512

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float in [0, 1] -> ``(B, 512)`` pooled features."""
        return self.net(_normalize(images))


class SmallCNN(nn.Module):
    """A small conv net for 28-64 px images: ``(B, 3, S, S)`` -> ``(B, 256)``.

    Four 3x3 conv + BatchNorm + ReLU blocks with 64, 128, 256 and 256 channels, a 2x max-pool
    after each of the first three, then global average pooling. About 1 M parameters and a
    tenth of the compute of the small-image ResNet-18 at 32 px.

    Parameters
    ----------
    image_size : int
        Square input side, 28-64 pixels.
    """

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = _check_size("small-cnn", image_size)
        widths = (3, 64, 128, 256, 256)
        layers: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if index < 3:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        for module in self.net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.embedding_dim = widths[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float in [0, 1] -> ``(B, 256)`` pooled features."""
        return self.net(_normalize(images))


class EfficientNetFinetune(nn.Module):
    """A fresh, trainable copy of a pretrained EfficientNet-Lite with the frozen encoder's embedding.

    Before training it computes exactly what the frozen image encoder computes
    (:meth:`core.models.efficientnet.EfficientNetFeatures.pooled` of ``feature_layers``); it is
    built from the weight file, never shared with the cached :func:`~core.models.efficientnet.load_backbone`
    instance, so training it leaves that instance untouched. The unused ImageNet classifier is dropped.

    Parameters
    ----------
    name : str
        ``efficientnet-lite0``, ``-lite1`` or ``-lite2`` (with or without the ``-finetune`` suffix).
    image_size : int
        Square input side, 32-512 pixels; sets the network's static "same" padding.
    feature_layers : tuple of str
        Stage ends pooled and concatenated (``stride8``, ``stride16``, ``stride32``, ``head``).
    """

    def __init__(self, name: str, image_size: int, feature_layers: tuple[str, ...] = DEFAULT_FEATURE_LAYERS) -> None:
        super().__init__()
        from core.models.efficientnet import EfficientNetFeatures

        base = name.removesuffix(FINETUNE_SUFFIX)
        if base + FINETUNE_SUFFIX not in EFFICIENTNET_FINETUNE:
            raise ConfigError(f"EfficientNetFinetune name must be one of {', '.join(EFFICIENTNET_FINETUNE)}; got {name!r}")
        self.image_size = _check_size(base + FINETUNE_SUFFIX, image_size)
        self.feature_layers = _check_layers(feature_layers)
        self.features = EfficientNetFeatures(base, self.image_size)
        self.features.net._fc = nn.Identity()
        self.embedding_dim = sum(self.features.channels(layer) for layer in self.feature_layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float in [0, 1] -> ``(B, embedding_dim)`` pooled multi-scale features."""
        return self.features.pooled(_normalize(images), self.feature_layers)


class MLPEncoder(nn.Module):
    """A multilayer perceptron for table rows: ``(B, F)`` -> ``(B, embedding_dim)``.

    Two hidden layers (Linear + BatchNorm + ReLU) and a linear output layer. Rows must already
    be robust-scaled, as :class:`core.models.tabular.TableEncoder` leaves them.

    Parameters
    ----------
    n_features : int
        F, the width of an input row.
    hidden : int
        Width of the two hidden layers.
    embedding_dim : int
        D, the width of the embedding.
    """

    def __init__(self, n_features: int, hidden: int = 256, embedding_dim: int = 128) -> None:
        super().__init__()
        for label, value in (("n_features", n_features), ("hidden", hidden), ("embedding_dim", embedding_dim)):
            if value is None or int(value) < 1:
                raise ConfigError(f"the mlp backbone needs {label} >= 1, got {value}")
        self.n_features = int(n_features)
        self.net = nn.Sequential(
            nn.Linear(self.n_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, embedding_dim),
        )
        self.embedding_dim = int(embedding_dim)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` float32 -> ``(B, embedding_dim)``."""
        return self.net(rows)


def make_backbone(
    name: str,
    *,
    image_size: int | None = None,
    n_features: int | None = None,
    feature_layers: tuple[str, ...] | None = None,
) -> nn.Module:
    """Build a trainable encoder by name (see the module docstring for names and sizes).

    Parameters
    ----------
    name : str
        One of ``TRAINABLE_BACKBONES``.
    image_size : int, optional
        Square input side in pixels; required for image backbones.
    n_features : int, optional
        Row width; required for ``mlp``.
    feature_layers : tuple of str, optional
        For the EfficientNet-Lite backbones; default ``("stride16", "stride32")``.

    Raises
    ------
    ConfigError
        For an unknown name, a missing or out-of-range size, or unknown feature layers.
    """
    if name == "resnet18":
        return ResNet18Encoder(image_size)
    if name == "small-cnn":
        return SmallCNN(image_size)
    if name in EFFICIENTNET_FINETUNE:
        return EfficientNetFinetune(name, image_size, feature_layers or DEFAULT_FEATURE_LAYERS)
    if name == "mlp":
        return MLPEncoder(n_features)
    raise ConfigError(f"trainable backbone must be one of {', '.join(TRAINABLE_BACKBONES)}; got {name!r}")


def save_state(module: nn.Module, path: Path) -> None:
    """Write ``module.state_dict()`` to ``path`` as safetensors (no pickle), atomically."""
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in module.state_dict().items()}
    atomic_write_bytes(Path(path), save_tensors(tensors))


def load_state(module: nn.Module, path: Path) -> nn.Module:
    """Load a state written by :func:`save_state` into ``module`` (on its device); returns ``module``.

    Raises
    ------
    RunError
        When the file is missing, damaged, or holds the state of a different architecture.
    """
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise RunError(f"{path} is missing: the run is incomplete") from None
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise RunError(f"{path} is damaged or was tampered with ({error}); train again") from None
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise RunError(f"{path} holds weights of another architecture than {type(module).__name__} ({first})") from None
    return module


def _check_layers(layers: tuple[str, ...]) -> tuple[str, ...]:
    layers = tuple(layers)
    if not layers or any(layer not in FEATURE_LAYERS for layer in layers):
        raise ConfigError(f"feature_layers must be a non-empty subset of {', '.join(FEATURE_LAYERS)}; got {layers}")
    return layers
