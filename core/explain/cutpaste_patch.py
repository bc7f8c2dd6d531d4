"""CutPaste patch-level localization (arXiv 2104.04015, section 4.2).

A patch encoder is trained from scratch with the 3-way CutPaste objective (normal / cutpaste /
scar) on random patches of the normal training images; one Gaussian (GDE) is fitted to the
embeddings of a dense grid of their patches; a patch's anomaly score is its Mahalanobis distance
to that Gaussian, and the patch scores are spread back over each patch's pixels.

Training. Every training image is read at ``image_size x image_size``. At each step, each image of
the step contributes ``patches_per_image`` random ``patch_size`` crops (so every image gives that
many fresh patches per epoch); the CutPaste and scar augmentations are applied to the patches, as
in the paper. The encoder is ``small-cnn`` for patches under 64 px and ResNet-18 from 64 px
(``backbone="auto"``); :func:`core.train.train` trains it (SGD, cosine schedule, seeded).

Patch model. The ``patch_size`` patches at stride ``fit_stride`` of every training image (at most
``max_fit_patches`` in all, a seeded random share of each image's grid when there are more) are
embedded, and :class:`core.detectors.gde.GaussianDensity` (Ledoit-Wolf shrinkage) is fitted to
them: one Gaussian for every location, so the images need not be aligned.

Maps. The patches at stride ``stride`` tile the working image (the bottom and right edges are
reflected when ``image_size - patch_size`` is not a multiple of ``stride``, so every pixel is
covered); each gets its Mahalanobis distance. Receptive-field upsampling with Gaussian smoothing
(FCDD, as the paper does) turns the ``(h, w)`` patch scores into a pixel map: a pixel's value is
the mean of the scores of the patches that contain it, each weighted by a Gaussian of the pixel's
offset from that patch's centre (``sigma``, default ``patch_size / 4``). Patch grids are aligned
with their pixels exactly, which plain bilinear upsampling of the grid would not do (the patch
centres span ``[P/2, S - P/2]``, not the whole image). The map is then resized bilinearly to each
input image's own height and width: ``(H, W) float32``, finite, >= 0, higher = more anomalous,
unnormalised. ``display_scale_`` is the ``display_quantile`` of map values on a seeded held-out
share of the training images that neither the encoder nor the Gaussian saw, as in
:class:`core.explain.patch.PatchLocalizer`.

Cost. Scoring embeds ``ceil((image_size - patch_size) / stride + 1) ** 2`` patches per image:
625 at the CPU defaults (128 px images, 32 px patches, stride 4), about 30 GMAC with
``small-cnn``. The paper's setting (256 px images, 64 px patches, ResNet-18, stride 4: 2401
patches of 64 px per image) is for a GPU.

Example
-------
>>> localizer = CutPastePatchLocalizer(epochs=20).fit(kept_paths)                 # doctest: +SKIP
>>> anomaly_map = next(localizer.iter_anomaly_maps([test_path]))   # (H, W) float32  # doctest: +SKIP
>>> shown = localizer.normalize(anomaly_map)                                      # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
import time
from numbers import Real
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError
from torch import nn

from core.config import DEVICES
from core.data.images import image_shape, read_rgb
from core.detectors.gde import SHRINKAGE_METHODS, GaussianDensity
from core.errors import ConfigError, RunError
from core.explain.localizer import MapLocalizer
from core.models.backbones import IMAGE_SIZE_LIMITS, load_state, make_backbone, save_state
from core.models.device import resolve_device
from core.models.objectives import make_objective
from core.progress import CancelToken, ProgressCallback, ProgressEvent, ignore_progress
from core.store import read_arrays, write_arrays, write_json
from core.train import TrainConfig, train

log = logging.getLogger(__name__)

PATCH_BACKBONES = ("auto", "small-cnn", "resnet18")
RESNET_MIN_PATCH = 64
"""``backbone="auto"`` picks ResNet-18 for patches of this side and more, ``small-cnn`` below."""
STATE_FORMAT = 1
_STATE_FILE = "cutpaste_patch.json"
_ENCODER_FILE = "cutpaste_patch_encoder.safetensors"
_GAUSSIAN_FILE = "cutpaste_patch_gaussian.safetensors"
_MAX_IMAGE_SIZE = 1024


# ----------------------------------------------------------------------------- patches and maps

def patch_grid(size: int, patch_size: int, stride: int) -> tuple[int, int]:
    """Patches a side and the (reflect-padded) side they tile, for a ``size x size`` image.

    ``n = ceil((size - patch_size) / stride) + 1`` patches start at ``0, stride, ..., (n - 1) * stride``
    and cover ``(n - 1) * stride + patch_size >= size`` pixels.
    """
    count = math.ceil((size - patch_size) / stride) + 1
    return count, (count - 1) * stride + patch_size


def unfold_patches(images: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """Every ``patch_size`` patch at ``stride`` of square images, row by row.

    Parameters
    ----------
    images : (B, 3, S, S) float tensor
    patch_size, stride : int
        ``stride <= patch_size <= S``. When ``S - patch_size`` is not a multiple of ``stride``,
        the bottom and right edges are reflected so that the last patches end at the border.

    Returns
    -------
    (B, n * n, 3, patch_size, patch_size) tensor
        ``n`` from :func:`patch_grid`; patch ``i * n + j`` starts at row ``i * stride``, column
        ``j * stride``.
    """
    count, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    n, padded = patch_grid(size, patch_size, stride)
    if padded > size:
        images = F.pad(images, (0, padded - size, 0, padded - size), mode="reflect")
    columns = F.unfold(images, patch_size, stride=stride)            # (B, C * P * P, n * n)
    return columns.transpose(1, 2).reshape(count, n * n, channels, patch_size, patch_size)


def receptive_field_upsample(
    scores: torch.Tensor, patch_size: int, stride: int, sigma: float, size: int
) -> torch.Tensor:
    """Patch scores ``(B, h, w)`` -> pixel maps ``(B, size, size)`` (FCDD's receptive-field upsampling).

    A pixel's value is the weighted mean of the scores of the patches that contain it, the weight
    being ``exp(-(dy**2 + dx**2) / (2 sigma**2))`` for its offset ``(dy, dx)`` from the patch
    centre (``sigma = 0``: equal weights). Patch ``(i, j)`` covers rows ``i * stride`` to
    ``i * stride + patch_size - 1`` and the same columns; ``size`` must not exceed the covered side
    ``(h - 1) * stride + patch_size``. Non-negative scores give non-negative maps.
    """
    offsets = torch.arange(patch_size, dtype=torch.float64) - (patch_size - 1) / 2
    weights = torch.ones(patch_size, dtype=torch.float64) if sigma == 0 else torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = torch.outer(weights, weights).to(scores.device, scores.dtype)[None, None]
    total = F.conv_transpose2d(scores.unsqueeze(1), kernel, stride=stride)
    mass = F.conv_transpose2d(torch.ones_like(scores[:1]).unsqueeze(1), kernel, stride=stride)
    return (total / mass)[:, 0, :size, :size]


def mahalanobis_distance(embeddings: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance ``(N,) float64`` of ``(N, D)`` embeddings to one Gaussian (computed in float64)."""
    diff = embeddings.double() - mean
    return ((diff @ precision) * diff).sum(dim=1).clamp_min(0.0).sqrt()


class RandomPatchObjective(nn.Module):
    """An image objective applied to random patches: crops, then ``objective.loss`` on the crops.

    ``loss(encoder, images (B, 3, S, S), generator)`` crops ``patches_per_image`` patches of
    ``patch_size`` at random places of each image (drawn with ``generator``) and returns
    ``objective.loss(encoder, patches (B * patches_per_image, 3, P, P), generator)``.
    """

    def __init__(self, objective: nn.Module, patch_size: int, patches_per_image: int) -> None:
        super().__init__()
        self.objective = objective
        self.patch_size = patch_size
        self.patches_per_image = patches_per_image

    def loss(self, encoder: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, _, height, width = batch.shape
        side, shape = self.patch_size, (count, self.patches_per_image)
        tops = torch.randint(0, height - side + 1, shape, generator=generator).tolist()
        lefts = torch.randint(0, width - side + 1, shape, generator=generator).tolist()
        patches = torch.stack([batch[index, :, top:top + side, left:left + side]
                               for index in range(count) for top, left in zip(tops[index], lefts[index])])
        return self.objective.loss(encoder, patches.contiguous(memory_format=torch.channels_last), generator)


# ----------------------------------------------------------------------------- the localizer

class CutPastePatchLocalizer(MapLocalizer):
    """Defect localization maps from a CutPaste-trained patch encoder and a Gaussian of normal patches.

    Parameters
    ----------
    image_size : int
        Images are resized to ``image_size x image_size`` before patches are taken. With
        ``patch_size`` it sets what a patch sees: a 32 px patch of a 128 px image is a quarter of
        its side (the paper: 64 px of 256 px).
    patch_size : int
        Side of a patch in pixels at ``image_size``; the encoder's input size (28-64 for
        ``small-cnn``, 32-256 for ResNet-18). Larger patches see more context but blur the map.
    stride : int in [1, patch_size]
        Step between scored patches. Maps cost ``ceil((image_size - patch_size) / stride + 1) ** 2``
        patch embeddings per image: 4 (the paper's) gives 625 at the defaults; 8 gives 169.
    fit_stride : int in [1, patch_size]
        Step between the training patches the Gaussian is fitted on (8: a quarter of the patches
        of stride 4, which is plenty for one Gaussian and 4x cheaper to fit).
    backbone : {"auto", "small-cnn", "resnet18"}
        Patch encoder trained from scratch. ``auto``: ``small-cnn`` below 64 px patches, ResNet-18
        (the paper's) from 64 px; ResNet-18 is about 10x the compute of ``small-cnn`` at 32 px.
    epochs : int
        Training epochs; each epoch crops ``patches_per_image`` fresh patches from every image.
    patches_per_image : int
        Random patches cropped from each training image per epoch.
    batch_size : int
        Patches per training step (each step also encodes their cutpaste and scar versions, 3x
        as many); ``batch_size // patches_per_image`` images per step, at least 2.
    learning_rate : float
        Peak SGD learning rate (cosine decay to 0; see :class:`core.train.TrainConfig`).
    embed_batch_size : int
        Patches per forward pass when embedding (memory: ``embed_batch_size * 3 * patch_size**2``
        floats of input plus the encoder's activations).
    max_fit_patches : int
        Most training patches the Gaussian is fitted on; above it each image contributes the same
        number of seeded random grid patches.
    shrinkage : {"ledoit-wolf", "oas"} or float in [0, 1]
        Covariance shrinkage of the Gaussian (see :class:`core.detectors.gde.GaussianDensity`).
    sigma : float or None
        Gaussian weight of a pixel inside a patch by its offset from the patch centre, in pixels
        at ``image_size`` (see :func:`receptive_field_upsample`); None: ``patch_size / 4``;
        0: every patch containing the pixel weighs the same.
    display_quantile : float in (0, 1)
        Quantile of held-out normal map values that becomes ``display_scale_``.
    display_holdout : float in [0, 0.5]
        Share of the training images (at most 100, at least 1 when > 0 and 3+ images are given)
        held out of training and of the Gaussian, used only for ``display_scale_``.
    device : {"auto", "cpu", "cuda"}
        Where training, embedding and scoring run.
    seed : int
        Seeds the hold-out split, the encoder and head initialisation, training (patch places,
        augmentations, shuffling) and the choice of Gaussian training patches.

    Attributes
    ----------
    method : str
        ``"cutpaste"`` (the name of this localization, like ``PatchLocalizer.method``).
    backbone_ : str
        The encoder actually used (``auto`` resolved).
    encoder_ : nn.Module
        The trained patch encoder, in eval mode, on the device: ``(B, 3, P, P)`` -> ``(B, D)``.
    mean_ : (D,) float64 tensor
        Mean of the training patch embeddings.
    precision_ : (D, D) float64 tensor
        Inverse of their shrunk covariance.
    shrinkage_ : float
        Shrinkage the Gaussian used.
    grid_shape_ : (int, int)
        Patches per side of the scoring grid ``(n, n)``.
    n_features_ : int
        D, the embedding width (256 for ``small-cnn``, 512 for ResNet-18).
    n_train_images_, n_fit_patches_ : int
        Images the encoder and Gaussian were fitted on; patches the Gaussian was fitted on.
    train_losses_ : list of float
        Mean training loss of every epoch.
    display_scale_ : float
        Divide a map by this for display (see :meth:`normalize`).
    """

    method = "cutpaste"

    param_names = ("image_size", "patch_size", "stride", "fit_stride", "backbone", "epochs",
                   "patches_per_image", "batch_size", "learning_rate", "embed_batch_size", "max_fit_patches",
                   "shrinkage", "sigma", "display_quantile", "display_holdout", "device", "seed")

    def __init__(
        self,
        *,
        image_size: int = 128,
        patch_size: int = 32,
        stride: int = 4,
        fit_stride: int = 8,
        backbone: str = "auto",
        epochs: int = 20,
        patches_per_image: int = 8,
        batch_size: int = 64,
        learning_rate: float = 0.03,
        embed_batch_size: int = 512,
        max_fit_patches: int = 50000,
        shrinkage: str | float = "ledoit-wolf",
        sigma: float | None = None,
        display_quantile: float = 0.99,
        display_holdout: float = 0.1,
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        self.image_size = image_size
        self.patch_size = patch_size
        self.stride = stride
        self.fit_stride = fit_stride
        self.backbone = backbone
        self.epochs = epochs
        self.patches_per_image = patches_per_image
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.embed_batch_size = embed_batch_size
        self.max_fit_patches = max_fit_patches
        self.shrinkage = shrinkage
        self.sigma = sigma
        self.display_quantile = display_quantile
        self.display_holdout = display_holdout
        self.device = device
        self.seed = seed

    # ------------------------------------------------------------------ parameters

    def _validate(self) -> None:
        if self.backbone not in PATCH_BACKBONES:
            raise ConfigError(f"backbone must be one of {', '.join(PATCH_BACKBONES)}; got {self.backbone!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        shrinkage_ok = self.shrinkage in SHRINKAGE_METHODS or (
            isinstance(self.shrinkage, Real) and not isinstance(self.shrinkage, bool) and 0 <= self.shrinkage <= 1)
        if not shrinkage_ok:
            raise ConfigError(f"shrinkage must be one of {', '.join(SHRINKAGE_METHODS)} or a number in [0, 1]; "
                              f"got {self.shrinkage!r}")
        low, high = IMAGE_SIZE_LIMITS[self._backbone_name()]
        patch = self.patch_size
        checks = [
            ("patch_size", _is_int(patch) and low <= patch <= high,
             f"in [{low}, {high}] pixels for backbone {self._backbone_name()!r}"),
            ("image_size", _is_int(self.image_size) and patch <= self.image_size <= _MAX_IMAGE_SIZE,
             f"in [patch_size, {_MAX_IMAGE_SIZE}] = [{patch}, {_MAX_IMAGE_SIZE}] pixels"),
            ("stride", _is_int(self.stride) and 1 <= self.stride <= patch, f"in [1, patch_size] = [1, {patch}]"),
            ("fit_stride", _is_int(self.fit_stride) and 1 <= self.fit_stride <= patch,
             f"in [1, patch_size] = [1, {patch}]"),
            ("epochs", _is_int(self.epochs) and self.epochs >= 1, ">= 1"),
            ("patches_per_image", _is_int(self.patches_per_image) and self.patches_per_image >= 1, ">= 1"),
            ("batch_size", _is_int(self.batch_size) and self.batch_size >= 2, ">= 2"),
            ("learning_rate", isinstance(self.learning_rate, Real) and 0 < self.learning_rate < math.inf, "> 0"),
            ("embed_batch_size", _is_int(self.embed_batch_size) and self.embed_batch_size >= 1, ">= 1"),
            ("max_fit_patches", _is_int(self.max_fit_patches) and self.max_fit_patches >= 2, ">= 2"),
            ("sigma", self.sigma is None or (isinstance(self.sigma, Real) and self.sigma >= 0),
             "None (patch_size / 4) or >= 0 pixels"),
            ("display_quantile", 0.0 < self.display_quantile < 1.0, "in (0, 1)"),
            ("display_holdout", 0.0 <= self.display_holdout <= 0.5, "in [0, 0.5]"),
            ("seed", _is_int(self.seed) and self.seed >= 0, ">= 0"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{name} must be {allowed}; got {getattr(self, name)!r}")

    def _backbone_name(self) -> str:
        if self.backbone != "auto":
            return self.backbone
        return "resnet18" if self.patch_size >= RESNET_MIN_PATCH else "small-cnn"

    @property
    def _sigma(self) -> float:
        return self.patch_size / 4 if self.sigma is None else float(self.sigma)

    @property
    def _torch_device(self) -> torch.device:
        return resolve_device(self.device)

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        paths: Sequence[Path | str],
        on_progress: ProgressCallback = ignore_progress,
        cancel: CancelToken | None = None,
    ) -> "CutPastePatchLocalizer":
        """Train the patch encoder and fit the Gaussian on normal images (a run's kept training images).

        Parameters
        ----------
        paths : sequence of image paths
            At least 2 images. A seeded share (``display_holdout``) is held out of training and
            only sets ``display_scale_``.
        on_progress : callable
            Receives ``ProgressEvent`` s of the stages ``"patch_read"`` (images read),
            ``"patch_train"`` (training steps), ``"patch_fit"`` (images embedded for the Gaussian)
            and ``"display_scale"`` (held-out images mapped).
        cancel : CancelToken, optional
            Checked between batches and training steps.

        Returns
        -------
        self
        """
        rng, fitted, holdout = self._start_fit(paths)
        started = time.perf_counter()
        images = self._read(fitted, on_progress, cancel)
        self.backbone_ = self._backbone_name()
        self.encoder_ = self._train_encoder(images, on_progress, cancel)
        self._fit_gaussian(images, rng, on_progress, cancel)
        self.n_train_images_ = len(fitted)
        self.grid_shape_ = (patch_grid(self.image_size, self.patch_size, self.stride)[0],) * 2
        self.display_scale_ = self._display_scale(holdout or fitted, rng, on_progress, cancel)
        log.info("CutPaste patch model fitted on %d images (%d patches) in %.1f s; "
                 "display scale %.4g from %d %s images",
                 len(fitted), self.n_fit_patches_, time.perf_counter() - started, self.display_scale_,
                 len(holdout or fitted), "held-out" if holdout else "training")
        return self

    def _read(self, paths: list[Path], on_progress: ProgressCallback, cancel: CancelToken | None) -> np.ndarray:
        """The images as ``(N, S, S, 3) uint8`` at ``image_size``."""
        images = np.empty((len(paths), self.image_size, self.image_size, 3), dtype=np.uint8)
        for index, path in enumerate(paths):
            if cancel is not None and index % 16 == 0:
                cancel.raise_if_cancelled()
            images[index] = read_rgb(path, self.image_size)
            if index % 16 == 15 or index + 1 == len(paths):
                on_progress(ProgressEvent("patch_read", index + 1, len(paths)))
        return images

    def _train_encoder(
        self, images: np.ndarray, on_progress: ProgressCallback, cancel: CancelToken | None
    ) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            encoder = make_backbone(self.backbone_, image_size=self.patch_size)
            objective = RandomPatchObjective(make_objective("cutpaste", encoder.embedding_dim, "images"),
                                             self.patch_size, self.patches_per_image)
        config = TrainConfig(epochs=self.epochs, batch_size=max(2, self.batch_size // self.patches_per_image),
                             learning_rate=float(self.learning_rate), seed=self.seed, device=self.device)

        def relabel(event: ProgressEvent) -> None:
            on_progress(ProgressEvent("patch_train", event.done, event.total, event.message))

        result = train(encoder, objective, images, config, on_progress=relabel, cancel=cancel)
        self.train_losses_ = [float(loss) for loss in result.losses]
        log.info("patch encoder %s trained for %d epochs in %.1f s; last loss %.4f", self.backbone_,
                 self.epochs, result.seconds, self.train_losses_[-1])
        return self._ready(encoder)

    def _ready(self, encoder: nn.Module) -> nn.Module:
        """The encoder in eval mode on the device, channels-last (one layout after training and after
        loading, so both compute bit for bit the same)."""
        return encoder.to(self._torch_device).to(memory_format=torch.channels_last).eval()

    def _fit_gaussian(self, images: np.ndarray, rng: np.random.Generator, on_progress: ProgressCallback,
                      cancel: CancelToken | None) -> None:
        cells = patch_grid(self.image_size, self.patch_size, self.fit_stride)[0] ** 2
        per_image = min(cells, math.ceil(self.max_fit_patches / len(images)))
        per_batch = max(1, self.embed_batch_size // per_image)
        chunks = []
        for start in range(0, len(images), per_batch):
            pixels = self._to_tensor(images[start:start + per_batch])
            patches = unfold_patches(pixels, self.patch_size, self.fit_stride)
            if per_image < cells:
                keep = np.stack([np.sort(rng.choice(cells, per_image, replace=False)) for _ in range(len(patches))])
                rows = torch.arange(len(patches), device=patches.device)[:, None]
                patches = patches[rows, torch.from_numpy(keep).to(patches.device)]
            chunks.append(self._embed(patches.flatten(0, 1), cancel).cpu().double())
            done = min(start + per_batch, len(images))
            on_progress(ProgressEvent("patch_fit", done, len(images), f"{done * per_image} patches"))
        embeddings = torch.cat(chunks).numpy()
        gaussian = GaussianDensity(shrinkage=self.shrinkage).fit(embeddings)
        self.mean_ = torch.from_numpy(np.ascontiguousarray(gaussian.location_, dtype=np.float64))
        self.precision_ = torch.from_numpy(np.ascontiguousarray(gaussian.precision_, dtype=np.float64))
        self.shrinkage_ = float(gaussian.shrinkage_)
        self.n_features_ = int(embeddings.shape[1])
        self.n_fit_patches_ = int(embeddings.shape[0])

    # ------------------------------------------------------------------ maps

    def _map_batches(
        self, paths: list[Path], stage: str, on_progress: ProgressCallback, cancel: CancelToken | None
    ) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
        """Yield ``(original (H, W) sizes, (B, image_size, image_size) float32 maps)`` per batch of images."""
        cells = self.grid_shape_[0] * self.grid_shape_[1]
        per_batch = max(1, self.embed_batch_size // cells)
        started = time.perf_counter()
        for start in range(0, len(paths), per_batch):
            if cancel is not None:
                cancel.raise_if_cancelled()
            batch = paths[start:start + per_batch]
            pixels = self._to_tensor(np.stack([read_rgb(path, self.image_size) for path in batch]))
            maps = self._working_maps(pixels, cancel)
            yield [image_shape(path) for path in batch], maps
            done = start + len(batch)
            rate = done / max(time.perf_counter() - started, 1e-9)
            on_progress(ProgressEvent(stage, done, len(paths), f"{rate:.1f} images/s"))

    @torch.inference_mode()
    def _working_maps(self, pixels: torch.Tensor, cancel: CancelToken | None) -> torch.Tensor:
        """``(B, 3, S, S)`` images in [0, 1] -> ``(B, S, S) float32`` maps at ``image_size``."""
        patches = unfold_patches(pixels, self.patch_size, self.stride)
        device = patches.device
        distances = mahalanobis_distance(self._embed(patches.flatten(0, 1), cancel),
                                         self.mean_.to(device), self.precision_.to(device))
        scores = distances.float().reshape(len(pixels), *self.grid_shape_)
        return receptive_field_upsample(scores, self.patch_size, self.stride, self._sigma, self.image_size)

    @torch.inference_mode()
    def _embed(self, patches: torch.Tensor, cancel: CancelToken | None) -> torch.Tensor:
        """``(M, 3, P, P)`` patches in [0, 1] -> ``(M, D) float32`` embeddings, ``embed_batch_size`` at a time."""
        out = []
        for start in range(0, len(patches), self.embed_batch_size):
            if cancel is not None:
                cancel.raise_if_cancelled()
            chunk = patches[start:start + self.embed_batch_size].contiguous(memory_format=torch.channels_last)
            out.append(self.encoder_(chunk).float())
        return torch.cat(out)

    def _to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """``(B, S, S, 3) uint8`` -> ``(B, 3, S, S) float32`` in [0, 1] on the device."""
        return torch.from_numpy(images).to(self._torch_device).permute(0, 3, 1, 2).float().div_(255.0).contiguous()

    def _check_fitted(self) -> None:
        if not hasattr(self, "display_scale_"):
            raise NotFittedError(
                "this CutPastePatchLocalizer is not fitted yet; call fit(paths) with normal images first")

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path | str) -> None:
        """Write ``cutpaste_patch.json`` (parameters, grid, display scale, losses),
        ``cutpaste_patch_encoder.safetensors`` (encoder weights) and
        ``cutpaste_patch_gaussian.safetensors`` (Gaussian mean and precision) into ``directory``."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_state(self.encoder_, directory / _ENCODER_FILE)
        write_arrays(directory / _GAUSSIAN_FILE, {"mean": self.mean_.cpu().numpy(),
                                                  "precision": self.precision_.cpu().numpy()})
        write_json(directory / _STATE_FILE, {
            "format": STATE_FORMAT,
            "method": self.method,
            "params": self.get_params(),
            "backbone": self.backbone_,
            "grid_shape": list(self.grid_shape_),
            "n_features": self.n_features_,
            "n_train_images": self.n_train_images_,
            "n_fit_patches": self.n_fit_patches_,
            "shrinkage": self.shrinkage_,
            "train_losses": self.train_losses_,
            "display_scale": self.display_scale_,
        })

    @classmethod
    def load(cls, directory: Path | str, device: str | None = None) -> "CutPastePatchLocalizer":
        """Read a localizer written by :meth:`save` (no pickle); ``device`` overrides the saved one."""
        directory = Path(directory)
        state, localizer = cls._restore(directory, _STATE_FILE, STATE_FORMAT, device)
        localizer.backbone_ = state["backbone"]
        encoder = make_backbone(localizer.backbone_, image_size=localizer.patch_size)
        encoder = load_state(encoder, directory / _ENCODER_FILE)
        localizer.encoder_ = localizer._ready(encoder)
        arrays = read_arrays(directory / _GAUSSIAN_FILE)
        missing = [name for name in ("mean", "precision") if name not in arrays]
        if missing:
            raise RunError(f"{directory / _GAUSSIAN_FILE} lacks {', '.join(missing)}; fit and save again")
        localizer.mean_ = torch.from_numpy(arrays["mean"].copy())
        localizer.precision_ = torch.from_numpy(arrays["precision"].copy())
        localizer.grid_shape_ = tuple(state["grid_shape"])
        localizer.n_features_ = int(state["n_features"])
        localizer.n_train_images_ = int(state["n_train_images"])
        localizer.n_fit_patches_ = int(state["n_fit_patches"])
        localizer.shrinkage_ = float(state["shrinkage"])
        localizer.train_losses_ = [float(loss) for loss in state["train_losses"]]
        localizer.display_scale_ = float(state["display_scale"])
        return localizer


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
