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
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from core.data.decode import image_shape, read_rgb
from core.detectors.gde import GaussianDensity
from core.errors import ConfigError
from core.explain.crops import RandomPatchObjective, patch_grid, unfold_patches
from core.explain.localizer import MapLocalizer
from core.explain.smoothing import receptive_field_upsample
from core.models.backbones import IMAGE_SIZE_LIMITS, load_state, make_backbone, save_state
from core.models.objectives import make_objective
from core.params import Interval, Options
from core.progress import QUIET, Monitor
from core.stats import mahalanobis
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
    _state_file, _arrays_file, _state_format = _STATE_FILE, _GAUSSIAN_FILE, STATE_FORMAT

    _param_constraints = {
        **MapLocalizer._param_constraints,
        "image_size": [Interval(int, 1, _MAX_IMAGE_SIZE)],
        "patch_size": [Interval(int, 1, None)],
        "stride": [Interval(int, 1, None)],
        "fit_stride": [Interval(int, 1, None)],
        "backbone": [Options(*PATCH_BACKBONES)],
        "epochs": [Interval(int, 1, None)],
        "patches_per_image": [Interval(int, 1, None)],
        "batch_size": [Interval(int, 2, None)],
        "learning_rate": [Interval(float, 0.0, math.inf, closed="neither")],
        "embed_batch_size": [Interval(int, 1, None)],
        "max_fit_patches": [Interval(int, 2, None)],
        "shrinkage": GaussianDensity._param_constraints["shrinkage"],
        "sigma": [None, Interval(float, 0.0, None)],
    }
    """Allowed values of each parameter; :meth:`_check_params` adds those that relate two parameters."""

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

    def _check_params(self) -> None:
        """The declared constraints, then the relations: a patch size the encoder takes, an image at
        least one patch wide, strides no longer than a patch."""
        super()._check_params()
        low, high = IMAGE_SIZE_LIMITS[self._backbone_name()]
        patch = self.patch_size
        relations = [
            ("patch_size", low <= patch <= high, f"in [{low}, {high}] pixels for backbone {self._backbone_name()!r}"),
            ("image_size", patch <= self.image_size,
             f"in [patch_size, {_MAX_IMAGE_SIZE}] = [{patch}, {_MAX_IMAGE_SIZE}] pixels"),
            ("stride", self.stride <= patch, f"in [1, patch_size] = [1, {patch}]"),
            ("fit_stride", self.fit_stride <= patch, f"in [1, patch_size] = [1, {patch}]"),
        ]
        for name, ok, allowed in relations:
            if not ok:
                raise ConfigError(f"{type(self).__name__}: {name} must be {allowed}; got {getattr(self, name)!r}")

    def _backbone_name(self) -> str:
        if self.backbone != "auto":
            return self.backbone
        return "resnet18" if self.patch_size >= RESNET_MIN_PATCH else "small-cnn"

    @property
    def _sigma(self) -> float:
        return self.patch_size / 4 if self.sigma is None else float(self.sigma)

    # ------------------------------------------------------------------ fit

    def fit(self, paths: Sequence[Path | str], monitor: Monitor = QUIET) -> "CutPastePatchLocalizer":
        """Train the patch encoder and fit the Gaussian on normal images (a run's kept training images).

        Parameters
        ----------
        paths : sequence of image paths
            At least 2 images. A seeded share (``display_holdout``) is held out of training and
            only sets ``display_scale_``.
        monitor : Monitor
            Reports the stages ``"patch_read"`` (images read), ``"patch_train"`` (training steps),
            ``"patch_fit"`` (images embedded for the Gaussian) and ``"display_scale"`` (held-out
            images mapped); checked for cancellation between batches and training steps.

        Returns
        -------
        self
        """
        rng, fitted, holdout = self._start_fit(paths)
        started = time.perf_counter()
        images = self._read(fitted, monitor)
        self.backbone_ = self._backbone_name()
        self.encoder_ = self._train_encoder(images, monitor)
        self._fit_gaussian(images, rng, monitor)
        self.n_train_images_ = len(fitted)
        self.grid_shape_ = (patch_grid(self.image_size, self.patch_size, self.stride)[0],) * 2
        self._calibrate(holdout or fitted, rng, monitor)
        log.info("CutPaste patch model fitted on %d images (%d patches) in %.1f s; "
                 "display scale %.4g from %d %s images",
                 len(fitted), self.n_fit_patches_, time.perf_counter() - started, self.display_scale_,
                 len(holdout or fitted), "held-out" if holdout else "training")
        return self

    def _read(self, paths: list[Path], monitor: Monitor) -> np.ndarray:
        """The images as ``(N, S, S, 3) uint8`` at ``image_size``."""
        images = np.empty((len(paths), self.image_size, self.image_size, 3), dtype=np.uint8)
        for index, path in enumerate(paths):
            if index % 16 == 0:
                monitor.check()
            images[index] = read_rgb(path, self.image_size)
            if index % 16 == 15 or index + 1 == len(paths):
                monitor.report("patch_read", index + 1, len(paths))
        return images

    def _train_encoder(self, images: np.ndarray, monitor: Monitor) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            encoder = make_backbone(self.backbone_, image_size=self.patch_size)
            objective = RandomPatchObjective(make_objective("cutpaste", encoder.embedding_dim, "images"),
                                             self.patch_size, self.patches_per_image)
        config = TrainConfig(epochs=self.epochs, batch_size=max(2, self.batch_size // self.patches_per_image),
                             learning_rate=float(self.learning_rate), seed=self.seed, device=self.device)
        result = train(encoder, objective, images, config, monitor=monitor.renamed("patch_train"))
        self.train_losses_ = [float(loss) for loss in result.losses]
        log.info("patch encoder %s trained for %d epochs in %.1f s; last loss %.4f", self.backbone_,
                 self.epochs, result.seconds, self.train_losses_[-1])
        return self._ready(encoder)

    def _ready(self, encoder: nn.Module) -> nn.Module:
        """The encoder in eval mode on the device, channels-last (one layout after training and after
        loading, so both compute bit for bit the same)."""
        return encoder.to(self._torch_device).to(memory_format=torch.channels_last).eval()

    def _fit_gaussian(self, images: np.ndarray, rng: np.random.Generator, monitor: Monitor) -> None:
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
            chunks.append(self._embed(patches.flatten(0, 1), monitor).cpu().double())
            done = min(start + per_batch, len(images))
            monitor.report("patch_fit", done, len(images), f"{done * per_image} patches")
        embeddings = torch.cat(chunks).numpy()
        gaussian = GaussianDensity(shrinkage=self.shrinkage).fit(embeddings)
        self.mean_ = torch.from_numpy(np.ascontiguousarray(gaussian.location_, dtype=np.float64))
        self.precision_ = torch.from_numpy(np.ascontiguousarray(gaussian.precision_, dtype=np.float64))
        self.shrinkage_ = float(gaussian.shrinkage_)
        self.n_features_ = int(embeddings.shape[1])
        self.n_fit_patches_ = int(embeddings.shape[0])

    # ------------------------------------------------------------------ maps

    def _map_batches(
        self, paths: list[Path], stage: str, monitor: Monitor
    ) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
        """Yield ``(original (H, W) sizes, (B, image_size, image_size) float32 maps)`` per batch of images."""
        cells = self.grid_shape_[0] * self.grid_shape_[1]
        per_batch = max(1, self.embed_batch_size // cells)
        started = time.perf_counter()
        for start in range(0, len(paths), per_batch):
            monitor.check()
            batch = paths[start:start + per_batch]
            pixels = self._to_tensor(np.stack([read_rgb(path, self.image_size) for path in batch]))
            maps = self._working_maps(pixels, monitor)
            yield [image_shape(path) for path in batch], maps
            done = start + len(batch)
            rate = done / max(time.perf_counter() - started, 1e-9)
            monitor.report(stage, done, len(paths), f"{rate:.1f} images/s")

    @torch.inference_mode()
    def _working_maps(self, pixels: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        """``(B, 3, S, S)`` images in [0, 1] -> ``(B, S, S) float32`` maps at ``image_size``."""
        patches = unfold_patches(pixels, self.patch_size, self.stride)
        device = patches.device
        embeddings = self._embed(patches.flatten(0, 1), monitor).double()     # measured in float64
        distances = mahalanobis(embeddings, self.mean_.to(device), self.precision_.to(device))
        scores = distances.float().reshape(len(pixels), *self.grid_shape_)
        return receptive_field_upsample(scores, self.patch_size, self.stride, self._sigma, self.image_size)

    @torch.inference_mode()
    def _embed(self, patches: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        """``(M, 3, P, P)`` patches in [0, 1] -> ``(M, D) float32`` embeddings, ``embed_batch_size`` at a time."""
        out = []
        for start in range(0, len(patches), self.embed_batch_size):
            monitor.check()
            chunk = patches[start:start + self.embed_batch_size].contiguous(memory_format=torch.channels_last)
            out.append(self.encoder_(chunk).float())
        return torch.cat(out)

    def _to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """``(B, S, S, 3) uint8`` -> ``(B, 3, S, S) float32`` in [0, 1] on the device."""
        pixels = torch.from_numpy(images).to(self._torch_device)
        return pixels.permute(0, 3, 1, 2).float().div_(255.0).contiguous()

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path | str) -> None:
        """Write ``cutpaste_patch.json`` (parameters, grid, display scale, losses),
        ``cutpaste_patch_encoder.safetensors`` (encoder weights) and
        ``cutpaste_patch_gaussian.safetensors`` (Gaussian mean and precision) into ``directory``."""
        self._check_fitted()
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_state(self.encoder_, Path(directory) / _ENCODER_FILE)
        self._save_state(directory, method=self.method, backbone=self.backbone_, n_fit_patches=self.n_fit_patches_,
                         shrinkage=self.shrinkage_, train_losses=self.train_losses_)

    @classmethod
    def load(cls, directory: Path | str, device: str | None = None) -> "CutPastePatchLocalizer":
        """Read a localizer written by :meth:`save` (no pickle); ``device`` overrides the saved one."""
        directory = Path(directory)
        localizer, state = cls._load_state(directory, device)
        localizer.backbone_ = state["backbone"]
        encoder = make_backbone(localizer.backbone_, image_size=localizer.patch_size)
        localizer.encoder_ = localizer._ready(load_state(encoder, directory / _ENCODER_FILE))
        localizer.n_fit_patches_ = int(state["n_fit_patches"])
        localizer.shrinkage_ = float(state["shrinkage"])
        localizer.train_losses_ = [float(loss) for loss in state["train_losses"]]
        return localizer

    def _array_names(self) -> tuple[str, ...]:
        return ("mean", "precision")
