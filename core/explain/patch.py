"""Patch-level defect localization maps (PaDiM / PatchCore style, as in CutPaste's localization).

Features. The pretrained backbone's feature maps named by ``layers`` (``auto``: stride 8, 16 and 32
for ``memory``, stride 8 and 16 for ``gaussian``), each averaged over its 3x3 neighbourhood (stride 1,
borders averaged over the cells that exist), the coarser ones upsampled bilinearly to the stride-8
grid, concatenated: ``(B, D, S/8, S/8)`` at ``image_size = S``, ``D = 40 + 112 + 320 = 472`` or
``40 + 112 = 152`` on EfficientNet-Lite0. Each grid cell is one *patch*. The stride-32 map adds a
wider context, which helps find large, faint defects; the per-cell covariances of ``gaussian``
grow with ``D ** 2``, so it keeps 152. What each choice gains is measured in
docs/benchmarks.md, "Issue 18: sharper maps and contamination on textures".

Patch models, fitted on normal images only (the caller passes the run's **kept** training images,
so refinement has already removed what it could of the contamination):

- ``memory`` (PatchCore): every patch of every training image is a candidate normal patch; a patch's
  score is the Euclidean distance to its nearest neighbour in a *memory* of normal patches. The memory
  is bounded twice: at most ``max_pool_patches`` candidates are kept while reading (the same number of
  random patches from each image), then greedy k-center selection on a random projection keeps a
  coreset of ``min(coreset_size, coreset_ratio * candidates)`` patches that covers the candidates.
  Suits objects and textures that are not aligned: any patch may match any location.
  Contamination guard (``support_images = m``, default 2): the neighbour must come from the m-th
  distinct training image, i.e. a patch counts as normal only when patches of at least m different
  training images resemble it. A defect left in one training image (refinement is never perfect)
  then cannot make the same kind of defect look normal; greedy k-center selection, which picks
  isolated patches first, would otherwise put exactly those defect patches in the memory. What the
  guard gains under contamination and costs on clean data is measured in docs/benchmarks.md,
  "Localization: patch maps vs Grad-CAM on Magnetic Tile Defects" (rows "support_images=1").
- ``gaussian`` (PaDiM): one Gaussian per grid cell (mean and covariance of that cell over the
  training images, Oracle-Approximating-Shrinkage towards a scaled identity, :mod:`core.stats`); a
  patch's score is its Mahalanobis distance. Suits aligned objects; memory is
  ``8 * cells * 152**2`` bytes while fitting (145 MB at 224 px).

Maps. Patch scores are upsampled to ``image_size``, smoothed with a Gaussian (``sigma`` = 4 px at
that resolution) and resized to each input image's own height and width: ``(H, W) float32``,
higher = more anomalous, unnormalised (a distance in feature space). For display,
``normalize(map) = map / display_scale_`` where ``display_scale_`` is the ``display_quantile``
(99th percentile) of map values on a seeded held-out share (``display_holdout``) of the training
images, which the patch model never saw; so 1.0 means "as high as the top 1 % of normal pixels",
and colours mean the same across images of a run.

Example
-------
>>> localizer = PatchLocalizer("memory", image_size=224).fit(kept_paths)      # doctest: +SKIP
>>> maps = localizer.anomaly_maps(test_paths)       # list of (H_i, W_i) float32  # doctest: +SKIP
>>> shown = localizer.normalize(maps[0])                                         # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.config import BACKBONES
from core.data.decode import image_shape, read_rgb
from core.errors import ConfigError, DataError, RunError
from core.explain.denoise import denoised_candidates
from core.explain.localizer import MapLocalizer
from core.explain.smoothing import DEFAULT_SIGMA, upsample_and_smooth
from core.models.device import available_memory_bytes
from core.models.pretrained import load_backbone
from core.params import Interval, Options, TupleOf
from core.progress import QUIET, Monitor
from core.stats import CellMoments, greedy_coreset, mahalanobis, nearest_distance, oas_amount, shrink_covariance

log = logging.getLogger(__name__)

METHODS = ("memory", "gaussian")
FEATURE_MAPS = ("stride8", "stride16", "stride32")
PATCH_LAYERS = ("stride8", "stride16")
STATE_FORMAT = 1
_ARRAYS_FILE = "patch_localizer.safetensors"
_STATE_FILE = "patch_localizer.json"


# ----------------------------------------------------------------------------- features

def patch_features(model, images: torch.Tensor, layers: Sequence[str] = PATCH_LAYERS,
                   neighbourhood: int = 3) -> torch.Tensor:
    """Locally aggregated multi-scale patch features of normalised images.

    Each layer's map is averaged over its ``neighbourhood x neighbourhood`` cells (stride 1, borders
    averaged over the cells that exist), upsampled bilinearly to the grid of the finest layer, and the
    layers are concatenated along the channels.

    Parameters
    ----------
    model : FeatureBackbone
        The pretrained backbone (:func:`core.models.pretrained.load_backbone`).
    images : (B, 3, S, S) float32 tensor
        Images normalised with the backbone's own ``model.normalize``.
    layers : sequence of str
        Backbone feature maps (``stride8``, ``stride16``, ``stride32``), concatenated in this order.
    neighbourhood : int
        Odd side of the averaging window, in cells of each layer's own grid (1: no aggregation).

    Returns
    -------
    (B, D, h, w) float32 tensor
        ``h = w = ceil(S / s)`` for the smallest stride ``s`` among the layers; ``D`` is the sum of the
        layers' channels (``stride8`` 40, ``stride16`` 112, ``stride32`` 320 on EfficientNet-Lite0).
    """
    maps = model(images, tuple(layers))
    pooled = [F.avg_pool2d(maps[name], neighbourhood, stride=1, padding=neighbourhood // 2,
                           count_include_pad=False) for name in layers]
    grid = max((m.shape[-2:] for m in pooled), key=lambda shape: shape[0])
    pooled = [m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
              for m in pooled]
    return torch.cat(pooled, dim=1).float()


GAUSSIAN_PEAK_COPIES = 3
"""Float64 ``(L, D, D)`` arrays a ``gaussian`` fit holds at once at its peak (sums, shrunk covariance, inverse)."""


def check_gaussian_memory(n_cells: int, n_features: int) -> None:
    """Refuse, before allocating, a ``gaussian`` fit (one ``D x D`` covariance per grid cell) that would not fit
    in the memory the machine has free, with what to change instead of an out-of-memory kill."""
    needed = GAUSSIAN_PEAK_COPIES * 8 * n_cells * n_features ** 2
    free = available_memory_bytes()
    if free is not None and needed > free:
        raise ConfigError(
            f"localization 'gaussian' needs about {needed / 2**30:.1f} GiB here ({n_cells} patch locations, each with "
            f"a {n_features} x {n_features} covariance) but {free / 2**30:.1f} GiB is free; use localization "
            "'memory', a smaller image size, or a backbone with fewer channels")


# ----------------------------------------------------------------------------- the localizer

class PatchLocalizer(MapLocalizer):
    """Defect localization maps from a patch-level one-class model on pretrained features.

    Parameters
    ----------
    method : {"memory", "gaussian"}
        ``memory``: nearest-neighbour distance to a coreset of normal patches (any location;
        the default: no alignment needed, and the smaller loss under contamination).
        ``gaussian``: per-location Mahalanobis distance (aligned objects only; better image
        scores from its maps and faster maps, but more hurt by contamination). Both are compared
        in docs/benchmarks.md, "Localization: patch maps vs Grad-CAM on Magnetic Tile Defects".
    image_size : int
        Images are resized to ``image_size x image_size`` before the backbone; the patch grid is
        ``ceil(image_size / 8)`` cells a side. Larger finds smaller defects, at quadratic cost.
    backbone : str
        Pretrained backbone (``core.config.BACKBONES``, built by :func:`core.models.pretrained.load_backbone`).
    weights : str, optional
        Its weight file, for the torchvision and DINOv2 backbones (``FitConfig.weights``); None: the
        torch hub cache's.
    device : {"auto", "cpu", "cuda"}
        Where the backbone and the patch model run.
    batch_size : int
        Images per forward pass.
    coreset_size : int
        ``memory`` only: most patches kept in the memory (bounds memory and scoring time:
        scoring costs ``cells * coreset_size * D`` multiply-adds per image).
    coreset_ratio : float in (0, 1]
        ``memory`` only: share of the candidate patches kept in the coreset (capped by
        ``coreset_size``).
    max_pool_patches : int
        ``memory`` only: most candidate patches held while reading the training images; each
        image contributes ``min(cells, ceil(max_pool_patches / n_images))`` random patches. The
        coreset's cost grows with the pool times the memory; the default was chosen on the dev half
        of ``bench/localizer_speed.py`` (docs/benchmarks.md, "Issue 18: localizer fit speed").
    projection_dim : int
        ``memory`` only: dimensions of the random projection the coreset selection measures in.
    support_images : int
        ``memory`` only: a patch's neighbour must come from the ``support_images``-th distinct
        training image (1: plain nearest neighbour; 2, the default, guards against defects left in
        single training images; see the module docstring).
    sigma : float
        Gaussian smoothing of the upsampled map, in pixels at ``image_size`` (0: none).
    layers : "auto" or tuple of str
        Backbone feature maps a patch is described by (of ``stride8``, ``stride16``, ``stride32``),
        concatenated on the grid of the finest; finer layers see smaller details, coarser ones
        larger context. ``auto``: all three for ``memory``, ``("stride8", "stride16")`` for
        ``gaussian`` (whose covariances grow with the square of the feature dimension).
    neighbourhood : {1, 3, 5, 7}
        Side of the window, in cells of each layer's grid, a patch's features are averaged over
        (PatchCore's local aggregation): larger is smoother and more tolerant of small shifts.
    denoise : float in [0, 0.5)
        ``memory`` only: share of the candidate patches dropped before the coreset as the most
        outlying among the other images' patches (:mod:`core.explain.denoise`, after SoftPatch);
        removes defect patches of contaminated training images that refinement kept. 0: none.
    display_quantile : float in (0, 1)
        Quantile of held-out normal map values that becomes ``display_scale_``.
    display_holdout : float in [0, 0.5]
        Share of the training images (at most 100, at least 1 when > 0 and 3+ images are given)
        held out of the patch model to measure ``display_scale_`` without in-sample bias. 0 uses
        the training images themselves (biased low, most of all for ``memory``).
    seed : int
        Seeds the hold-out split, the patch sampling, the projection and the coreset start.

    Attributes
    ----------
    grid_shape_ : (int, int)
        Patch grid ``(h, w)``.
    n_features_ : int
        Feature dimension D of a patch (on Lite0: 472 for ``memory``, 152 for ``gaussian`` by default).
    n_train_images_ : int
        Images the patch model was fitted on (the held-out ones excluded).
    memory_bank_ : (M, D) float32 tensor
        ``memory``: the coreset of normal patches.
    memory_owner_ : (M,) int32 tensor
        ``memory``: index (among the fitted images) of the image each memory patch came from.
    mean_, precision_ : (L, D) and (L, D, D) float32 tensors
        ``gaussian``: per-cell mean and inverse shrunk covariance (L = h * w cells).
    shrinkage_ : (L,) float32 tensor
        ``gaussian``: OAS shrinkage coefficient per cell.
    display_scale_ : float
        Divide a map by this for display (see :meth:`normalize`).
    """

    _state_file, _arrays_file, _state_format = _STATE_FILE, _ARRAYS_FILE, STATE_FORMAT

    _param_constraints = {
        **MapLocalizer._param_constraints,
        "method": [Options(*METHODS)],
        "image_size": [Interval(int, 32, 1024)],
        "backbone": [Options(*BACKBONES)],
        "weights": [str, None],
        "batch_size": [Interval(int, 1, None)],
        "coreset_size": [Interval(int, 1, None)],
        "coreset_ratio": [Interval(float, 0.0, 1.0, closed="right")],
        "max_pool_patches": [Interval(int, 1, None)],
        "projection_dim": [Interval(int, 1, None)],
        "support_images": [Interval(int, 1, None)],
        "sigma": [Interval(float, 0.0, None)],
        "layers": [Options("auto"), TupleOf(Options(*FEATURE_MAPS), min_len=1)],
        "neighbourhood": [Options(1, 3, 5, 7)],
        "denoise": [Interval(float, 0.0, 0.5, closed="left")],
    }

    def __init__(
        self,
        method: str = "memory",
        *,
        image_size: int = 224,
        backbone: str = "efficientnet-lite0",
        weights: str | None = None,
        device: str = "auto",
        batch_size: int = 16,
        coreset_size: int = 8192,
        coreset_ratio: float = 0.1,
        max_pool_patches: int = 32768,
        projection_dim: int = 64,
        support_images: int = 2,
        sigma: float = DEFAULT_SIGMA,
        layers: str | tuple[str, ...] = "auto",
        neighbourhood: int = 3,
        denoise: float = 0.0,
        display_quantile: float = 0.99,
        display_holdout: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.method = method
        self.image_size = image_size
        self.backbone = backbone
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.coreset_size = coreset_size
        self.coreset_ratio = coreset_ratio
        self.max_pool_patches = max_pool_patches
        self.projection_dim = projection_dim
        self.support_images = support_images
        self.sigma = sigma
        self.layers = layers
        self.neighbourhood = neighbourhood
        self.denoise = denoise
        self.display_quantile = display_quantile
        self.display_holdout = display_holdout
        self.seed = seed

    @property
    def _layers(self) -> tuple[str, ...]:
        """The feature maps ``layers`` names, ``auto`` resolved for the method."""
        if self.layers != "auto":
            return self.layers
        return FEATURE_MAPS if self.method == "memory" else PATCH_LAYERS

    def _model(self):
        return load_backbone(self.backbone, self.image_size, self._torch_device.type, self.weights)

    # ------------------------------------------------------------------ fit

    def fit(self, paths: Sequence[Path | str], monitor: Monitor = QUIET) -> "PatchLocalizer":
        """Fit the patch model on normal images (a run's kept training images).

        Parameters
        ----------
        paths : sequence of image paths
            At least 2 images. A seeded share (``display_holdout``) is held out of the model and
            only sets ``display_scale_``.
        monitor : Monitor
            Reports ``"patch_fit"`` (images done of all) per batch, then ``"coreset"`` (``memory``:
            patches selected of all, after each round of :func:`core.stats.greedy_coreset`) and
            ``"display_scale"``; checked for cancellation between batches and between coreset rounds.

        Returns
        -------
        self
        """
        rng, train, holdout = self._start_fit(paths)
        started = time.perf_counter()
        if self.method == "gaussian":
            self._fit_gaussian(train, monitor)
        else:
            self._fit_memory(train, rng, monitor)
        self.n_train_images_ = len(train)
        self._calibrate(holdout or train, rng, monitor)
        log.info("patch model (%s) fitted on %d images in %.1f s; display scale %.4g from %d %s images",
                 self.method, len(train), time.perf_counter() - started, self.display_scale_,
                 len(holdout or train), "held-out" if holdout else "training")
        return self

    @torch.inference_mode()
    def _fit_gaussian(self, paths: list[Path], monitor: Monitor) -> None:
        moments = None
        for _, features in self._feature_batches(paths, "patch_fit", monitor):
            if moments is None:
                check_gaussian_memory(features.shape[1], features.shape[2])
                moments = CellMoments(features.shape[1], features.shape[2])
            moments.update(features)
        mean, covariance = moments.mean_and_covariance()
        shrinkage = oas_amount(covariance, moments.n)
        shrunk = shrink_covariance(covariance, shrinkage)
        del covariance
        diagonal = torch.diagonal(shrunk, dim1=-2, dim2=-1)
        diagonal += 1e-6 * diagonal.mean() + 1e-12        # a ridge: the inverse exists for constant cells
        precision = torch.linalg.inv(shrunk)
        del shrunk
        self.mean_, self.precision_ = mean.float().contiguous(), precision.float().contiguous()
        self.shrinkage_ = shrinkage.float()
        self.n_features_ = int(self.mean_.shape[1])

    @torch.inference_mode()
    def _fit_memory(self, paths: list[Path], rng: np.random.Generator, monitor: Monitor) -> None:
        if len(paths) < self.support_images:
            raise DataError(f"support_images={self.support_images} needs at least that many fitted images; "
                            f"got {len(paths)}")
        pool, filled = None, 0
        for _, features in self._feature_batches(paths, "patch_fit", monitor):
            n_cells = features.shape[1]
            if pool is None:  # the candidates are written in place: memory is the pool plus one batch
                per_image = min(n_cells, math.ceil(self.max_pool_patches / len(paths)))
                pool = torch.empty(len(paths) * per_image, features.shape[2])
            for image in features.cpu():
                keep = np.sort(rng.choice(n_cells, per_image, replace=False))
                pool[filled:filled + per_image] = image[torch.from_numpy(keep)]
                filled += per_image
        owners = torch.div(torch.arange(len(pool)), per_image, rounding_mode="floor")
        kept = denoised_candidates(pool.to(self._torch_device), owners.to(self._torch_device), self.denoise,
                                   self.support_images, rng).cpu()
        pool, owners = pool[kept], owners[kept]
        size = min(self.coreset_size, max(1, math.ceil(self.coreset_ratio * len(pool))))
        selected = greedy_coreset(pool.to(self._torch_device), size, projection_dim=self.projection_dim,
                                  seed=self.seed, monitor=monitor).cpu()
        self.memory_bank_ = pool[selected].contiguous()
        self.memory_owner_ = owners[selected].to(torch.int32)
        self.n_features_ = int(pool.shape[1])
        log.info("memory bank: %d of %d candidate patches (%d per image)", size, len(pool), per_image)

    # ------------------------------------------------------------------ maps

    def _map_batches(
        self, paths: list[Path], stage: str, monitor: Monitor
    ) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
        """Yield ``(original (H, W) sizes, (B, image_size, image_size) maps)`` per batch of images."""
        for sizes, features in self._feature_batches(paths, stage, monitor):
            yield sizes, self._working_maps(features)

    @torch.inference_mode()
    def _working_maps(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, L, D)`` patch features -> ``(B, image_size, image_size)`` smoothed maps."""
        scores = self._patch_scores(features)
        grid = scores.reshape(scores.shape[0], *self.grid_shape_)
        return upsample_and_smooth(grid, self.image_size, self.sigma)

    def _patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Anomaly score ``(B, L)`` of every patch of ``(B, L, D)`` features."""
        device = features.device
        if self.method == "gaussian":
            return mahalanobis(features, self.mean_.to(device), self.precision_.to(device))
        flat = features.reshape(-1, features.shape[-1])
        distances = nearest_distance(flat, self.memory_bank_.to(device), self.memory_owner_.to(device),
                                     self.support_images)
        return distances.reshape(features.shape[:2])

    def _feature_batches(
        self, paths: list[Path], stage: str, monitor: Monitor
    ) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
        """Yield ``(original (H, W) sizes, (B, L, D) features)`` per batch; decoding runs one batch ahead."""
        size, device, model = self.image_size, self._torch_device, self._model()
        batches = [paths[start:start + self.batch_size] for start in range(0, len(paths), self.batch_size)]

        def read(batch_paths):
            pixels = np.stack([read_rgb(path, size) for path in batch_paths])
            return pixels, [image_shape(path) for path in batch_paths]

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1) as reader:
            pending = reader.submit(read, batches[0]) if batches else None
            for index in range(len(batches)):
                monitor.check()
                pixels, sizes = pending.result()
                if index + 1 < len(batches):
                    pending = reader.submit(read, batches[index + 1])
                with torch.inference_mode():
                    images = model.normalize(torch.from_numpy(pixels)).to(device)
                    if device.type == "cpu":
                        images = images.contiguous(memory_format=torch.channels_last)
                    features = patch_features(model, images, self._layers, self.neighbourhood)
                grid = tuple(features.shape[-2:])
                if getattr(self, "grid_shape_", grid) != grid:
                    raise RunError(f"patch grid {grid} differs from the fitted {self.grid_shape_}")
                self.grid_shape_ = grid
                features = features.flatten(2).transpose(1, 2).contiguous()
                yield sizes, features
                done = min((index + 1) * self.batch_size, len(paths))
                rate = done / max(time.perf_counter() - started, 1e-9)
                monitor.report(stage, done, len(paths), f"{rate:.1f} images/s")

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path | str) -> None:
        """Write ``patch_localizer.json`` (parameters, grid, display scale) and
        ``patch_localizer.safetensors`` (the patch model) into ``directory`` (created if needed)."""
        self._save_state(directory)

    @classmethod
    def load(cls, directory: Path | str, device: str | None = None) -> "PatchLocalizer":
        """Read a localizer written by :meth:`save` (no pickle); ``device`` overrides the saved one."""
        return cls._load_state(Path(directory), device)[0]

    def _array_names(self) -> tuple[str, ...]:
        return ("mean", "precision", "shrinkage") if self.method == "gaussian" else ("memory_bank", "memory_owner")
