"""Grad-CAM of the anomaly score: which image regions raised an image's anomaly score.

The explained quantity is not a class logit but the run's anomaly score itself: the squared
Mahalanobis distance of the image's pooled embedding to the Gaussian (GDE) fitted on the kept
training embeddings (:class:`MahalanobisTarget`, a callable target for pytorch-grad-cam). The CAM
model is a thin wrapper whose forward returns that pooled embedding (:class:`PooledEmbedding`).

Target layer (EfficientNet-Lite0/1/2, all through :func:`find_target_layer`): the output of the
block that ends the *deepest* stage in the run's ``feature_layers``: the last stride-32 block for the
default ``("stride16", "stride32")``, ``_bn1`` after the head convolution when ``head`` is pooled.
The other backbones name their own (``FeatureBackbone.cam_layer``): a torchvision ResNet's stage
(``layer3`` for stride16, ``layer4`` for stride32); DINOv2 has patch tokens, not a convolutional map,
and is refused with a ConfigError. Why (measured on EfficientNet-Lite0):

- the embedding global-average-pools that map, so Grad-CAM there is exactly CAM for the score: the
  map is ``relu(sum_k dS/dp_k A_k) / hw`` with ``p`` the pooled features (checked numerically);
- it localised best of the stride-8, -16 and -32 layers on Magnetic Tile Defects, and adding the
  stride-16 map (which also carries the score's direct stride-16 part) gained nothing beyond noise,
  so one layer is kept (docs/benchmarks.md, "Figures that left the docstrings").

The cost: 7 x 7 cells at 224 px, so small defects are blurred, and the part of the score that the
stride-16 features contribute directly is not seen. ``target_layer=`` picks another pooled layer.

Grad-CAM++ is given the *log* of the squared distance, then its map is multiplied by the image's
squared distance. Its closed-form weights were derived for an explained quantity ``exp(S)`` with
``S`` the differentiated score and are not scale invariant: fed the raw squared distance (~1e3 to
1e4) they degrade to chance, fed ``S = log(distance)`` they localise about as well as Grad-CAM
(same docs/benchmarks.md section). Grad-CAM itself is unchanged by that choice (only a positive
factor per image), so it explains the squared distance directly.

Maps are unnormalised: ``relu(sum_k w_k A_k)`` in the score's own units, bilinearly upsampled to each
input image's original size, higher = more anomalous (the convention of the localisation maps); a
run-level scale for display belongs to the caller.
"""
from __future__ import annotations

import threading
from functools import cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core.config import FEATURE_LAYERS
from core.data.decode import read_rgb
from core.errors import ConfigError
from core.models.feature_backbone import FeatureBackbone
from core.params import Interval, Options, check_params
from core.stats import squared_mahalanobis

METHODS = ("gradcam", "gradcam++")

# One explanation at a time per process: explain() flips the shared backbone's requires_grad flags,
# which two concurrent calls would restore in the wrong order.
_EXPLAIN_LOCK = threading.RLock()

_TINY = 1e-300  # keeps log() finite for an embedding exactly at the Gaussian's centre


class MahalanobisTarget:
    """Squared Mahalanobis distance of a pooled embedding: the GDE anomaly score, differentiable.

    ``target(e) = (e - location)^T precision (e - location)``, computed in float64. Equal to
    ``-GaussianDensity.score_samples`` for the detector that owns ``location`` and ``precision``.

    Parameters
    ----------
    location : (D,) array-like of float
        ``GaussianDensity.location_``.
    precision : (D, D) array-like of float
        ``GaussianDensity.precision_``.
    log : bool
        Return the natural log of the squared distance instead (the form Grad-CAM++ assumes).

    Examples
    --------
    >>> target = MahalanobisTarget(np.zeros(2), np.eye(2))
    >>> float(target(torch.tensor([3.0, 4.0])))
    25.0
    """

    def __init__(self, location, precision, log: bool = False) -> None:
        with torch.inference_mode(False):  # built under inference mode, they could not join a backward pass
            location = torch.tensor(np.asarray(location, dtype=np.float64))
            precision = torch.tensor(np.asarray(precision, dtype=np.float64))
        if location.ndim != 1 or precision.shape != (location.shape[0], location.shape[0]):
            raise ValueError(
                f"location must be (D,) and precision (D, D); got {tuple(location.shape)} and {tuple(precision.shape)}"
            )
        self.location = location
        self.precision = precision
        self.log = log

    def __call__(self, embedding: torch.Tensor) -> torch.Tensor:
        """``(D,)`` -> scalar, or ``(B, D)`` -> ``(B,)``."""
        if self.location.device != embedding.device:
            self.location = self.location.to(embedding.device)
            self.precision = self.precision.to(embedding.device)
        squared = squared_mahalanobis(embedding.to(torch.float64), self.location, self.precision)
        return torch.log(squared.clamp_min(_TINY)) if self.log else squared


class PooledEmbedding(nn.Module):
    """``(B, 3, H, W)`` normalised images -> ``(B, D)`` pooled embedding, as the image encoder makes it."""

    def __init__(self, backbone: FeatureBackbone, feature_layers: Sequence[str]) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_layers = tuple(feature_layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.pooled(images, self.feature_layers)


def find_target_layer(backbone: nn.Module, feature_layers: Sequence[str], layer: str | None = None) -> nn.Module:
    """The module whose activations and gradients Grad-CAM weighs (see the module docstring).

    Parameters
    ----------
    backbone : FeatureBackbone
    feature_layers : sequence of str
        The run's pooled layers; the deepest one is chosen unless ``layer`` is given.
    layer : str, optional
        One of ``feature_layers`` to use instead (the forward pass stops at the deepest pooled
        layer, so a deeper one would never run).
    """
    if not isinstance(backbone, FeatureBackbone):
        raise ConfigError(f"Grad-CAM has no target layer for a {type(backbone).__name__} backbone")
    if not feature_layers:
        raise ConfigError(f"feature_layers is empty; choose from {', '.join(FEATURE_LAYERS)}")
    for name in feature_layers:
        if name not in FEATURE_LAYERS:
            raise ConfigError(f"feature layer must be one of {', '.join(FEATURE_LAYERS)}; got {name!r}")
    if layer is not None and layer not in feature_layers:
        raise ConfigError(f"target_layer must be one of the pooled layers {', '.join(feature_layers)}; got {layer!r}")
    return backbone.cam_layer(layer or max(feature_layers, key=FEATURE_LAYERS.index))


class ScoreExplainer:
    """Grad-CAM (or Grad-CAM++) heatmaps of the anomaly score for images.

    Build once and call :meth:`explain` many times inside a ``with`` block: entering registers the
    CAM hooks on the backbone, leaving removes them and restores every module's train/eval mode.
    Each :meth:`explain` call enables gradients only for itself (it works inside
    ``torch.inference_mode``), freezes the backbone's parameters (gradients flow to the input, never
    into the parameters) and restores their ``requires_grad`` flags afterwards. Called outside a
    ``with`` block, :meth:`explain` opens and closes the hooks around itself.

    Parameters
    ----------
    backbone_model : FeatureBackbone
        The run's backbone, e.g. :func:`core.models.pretrained.load_backbone`'s shared instance.
    feature_layers : sequence of str
        The run's ``FitConfig.feature_layers`` (what the embedding pools).
    location, precision : arrays
        The run's GDE (``GaussianDensity.location_``, ``precision_``), fitted on the embeddings.
    method : {"gradcam", "gradcam++"}
        How activations are weighted: mean gradient (Grad-CAM, the default: it localised better in
        the measurement in the module docstring) or the positive-gradient weighting of Grad-CAM++,
        meant to credit several regions rather than the strongest one.
    device : str or torch.device, optional
        Where the inputs go; must be the device the backbone lives on (the default).
    target_layer : str, optional
        Feature-layer name to hook instead of the default (see :func:`find_target_layer`).
    batch_size : int
        Images per forward/backward pass.

    Examples
    --------
    >>> with ScoreExplainer(model, ("stride16", "stride32"), gde.location_, gde.precision_) as explainer:
    ...     maps = explainer.explain(paths, image_size=224)  # doctest: +SKIP
    """

    _param_constraints = {"method": [Options(*METHODS)], "batch_size": [Interval(int, 1, None)]}

    def __init__(
        self,
        backbone_model: FeatureBackbone,
        feature_layers: Sequence[str],
        location,
        precision,
        method: str = "gradcam",
        device: str | torch.device | None = None,
        target_layer: str | None = None,
        batch_size: int = 8,
    ) -> None:
        check_params(type(self).__name__, {"method": method, "batch_size": batch_size}, self._param_constraints)
        self.model = PooledEmbedding(backbone_model, feature_layers)
        self.layer = find_target_layer(backbone_model, feature_layers, target_layer)
        self.target = MahalanobisTarget(location, precision)
        # What the CAM differentiates (see the module docstring on Grad-CAM++).
        self._cam_target = self.target if method == "gradcam" else MahalanobisTarget(location, precision, log=True)
        self.method = method
        self.batch_size = batch_size
        model_device = next(backbone_model.parameters()).device
        self.device = torch.device(device) if device is not None else model_device
        if self.device.type != model_device.type or (self.device.index or 0) != (model_device.index or 0):
            raise ConfigError(f"the backbone is on {model_device}, not on the requested device {self.device}")
        self._channels_last = _prefers_channels_last(backbone_model)
        self._cam = None
        self._modes: dict[nn.Module, bool] = {}

    def __enter__(self) -> "ScoreExplainer":
        self.open()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def open(self) -> None:
        """Register the CAM hooks (remembering every module's mode first); idempotent."""
        if self._cam is not None:
            return
        self._modes = {module: module.training for module in self.model.modules()}
        self._cam = _cam_class(self.method)(self.model, [self.layer])  # BaseCAM puts the model in eval mode

    def close(self) -> None:
        """Remove the hooks and restore every module's train/eval mode; idempotent."""
        if self._cam is None:
            return
        self._cam.activations_and_grads.release()
        self._cam = None
        for module, training in self._modes.items():
            module.training = training
        self._modes = {}

    def explain(self, images, image_size: int) -> list[np.ndarray]:
        """Heatmaps of the anomaly score, one per image, at each image's original size.

        Parameters
        ----------
        images : sequence of paths, ``(B, H, W, 3) uint8`` array, or sequence of ``(H, W, 3)`` /
            ``(H, W)`` uint8 arrays
            Files are read like the image encoder reads them (:func:`core.data.images.read_rgb`).
        image_size : int
            The run's ``FitConfig.image_size``: the side images are resized to for the backbone.

        Returns
        -------
        list of ``(H, W) float32``
            Unnormalised, >= 0, higher = more anomalous; ``H, W`` of each input image.

        Raises
        ------
        DataError
            A file cannot be decoded.
        ValueError
            An array is not ``uint8`` RGB or grayscale.
        """
        items = list(images)
        if not items:
            return []
        if self._cam is None:
            with self:
                return self.explain(items, image_size)
        maps: list[np.ndarray] = []
        with _EXPLAIN_LOCK, torch.inference_mode(False), torch.enable_grad(), _frozen_parameters(self.model):
            self.model.eval()
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                pixels, sizes = zip(*(_load(item, image_size) for item in chunk))
                batch = self.model.backbone.normalize(torch.from_numpy(np.stack(pixels))).to(self.device)
                if self._channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                cams = self._cam(batch, targets=[self._cam_target] * len(chunk))
                if self._cam_target is not self.target:  # back from log units to the score's units
                    cams = cams * self.target(self._cam.outputs.detach()).cpu().numpy()[:, None, None]
                self._cam.outputs = None  # drop the retained graph before the next batch
                self._cam.activations_and_grads.clear()
                maps.extend(_upsample(cam, size) for cam, size in zip(cams, sizes))
        return maps


class _UnscaledCamMixin:
    """Keep the CAM in the score's units at feature resolution.

    pytorch-grad-cam min-max normalises every map to [0, 1] and resizes it to the network input;
    that erases how anomalous an image is and the original aspect ratio, so both steps are left to
    :meth:`ScoreExplainer.explain`.
    """

    hooks_class: type  # set by _cam_class

    def __init__(self, model: nn.Module, target_layers: list[nn.Module]) -> None:
        super().__init__(model, target_layers)
        self.activations_and_grads.release()
        self.activations_and_grads = self.hooks_class(model, target_layers, None)
        # Gradients reach the target layer through the input (parameters are frozen while explaining).
        self.compute_input_gradient = True

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
        hooks = self.activations_and_grads
        if len(hooks.activations) != len(self.target_layers) or len(hooks.gradients) != len(self.target_layers):
            raise RuntimeError("Grad-CAM recorded no gradient at the target layer")
        return [
            np.maximum(
                self.get_cam_image(input_tensor, layer, targets, acts.numpy(), grads.numpy(), eigen_smooth), 0
            )
            for layer, acts, grads in zip(self.target_layers, hooks.activations, hooks.gradients)
        ]

    def aggregate_multi_layers(self, cam_per_target_layer):
        return np.mean(np.stack(cam_per_target_layer), axis=0).astype(np.float32)


@cache
def _cam_class(method: str) -> type:
    """pytorch-grad-cam's class for ``method`` with :class:`_UnscaledCamMixin` and own-pass hooks.

    Imported on first use: the package pulls in torchvision, OpenCV and matplotlib, seconds of
    start-up that every importer of ``core.explain`` would pay otherwise.
    """
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

    class OwnPassesOnly(ActivationsAndGradients):
        """The package's hooks, recording only passes whose target activation requires grad.

        The backbone is cached and shared: another thread may embed with it (under inference mode)
        while an explainer is open. Those passes carry no gradient and are ignored here, instead of
        being mixed into this explainer's activations.
        """

        def save_activation(self, module, input, output):
            if getattr(output, "requires_grad", False):
                super().save_activation(module, input, output)

    base = GradCAM if method == "gradcam" else GradCAMPlusPlus
    return type(f"Unscaled{base.__name__}", (_UnscaledCamMixin, base), {"hooks_class": OwnPassesOnly})


class _frozen_parameters:
    """Context: ``requires_grad=False`` on every parameter, the previous flags restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.parameters = list(model.parameters())

    def __enter__(self) -> None:
        self.flags = [p.requires_grad for p in self.parameters]
        for p in self.parameters:
            p.requires_grad_(False)

    def __exit__(self, *exc_info) -> None:
        for p, flag in zip(self.parameters, self.flags):
            p.requires_grad_(flag)


def _prefers_channels_last(model: nn.Module) -> bool:
    """Whether the model's convolution weights are stored channels-last (then so should inputs be)."""
    return any(
        p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in model.parameters()
    )


def _load(item, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``(image_size, image_size, 3) uint8`` pixels and the original ``(H, W)`` of one input."""
    if isinstance(item, (str, Path)):
        pixels = read_rgb(item, image_size)  # first: it turns an unreadable file into a DataError
        with Image.open(item) as image:
            width, height = image.size
        return pixels, (height, width)
    pixels = np.asarray(item)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"images must be (H, W, 3) or (H, W) uint8 arrays; got {pixels.dtype} {pixels.shape}")
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    size = pixels.shape[:2]
    if size != (image_size, image_size):
        pixels = np.asarray(Image.fromarray(pixels).resize((image_size, image_size), Image.Resampling.BILINEAR))
    return pixels, size


def _upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` feature-resolution map -> ``(H, W) float32`` by bilinear interpolation."""
    tensor = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
