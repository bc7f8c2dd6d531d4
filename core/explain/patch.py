"""Patch-level defect localization maps (PaDiM / PatchCore style, as in CutPaste's localization).

Features. The pretrained backbone's stride-8 and stride-16 feature maps, each averaged over its 3x3
neighbourhood (stride 1, borders averaged over the cells that exist), the stride-16 map upsampled
bilinearly to the stride-8 grid, concatenated: ``(B, 152, S/8, S/8)`` on EfficientNet-Lite0 at
``image_size = S``. Each grid cell is one *patch*.

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
  isolated patches first, would otherwise put exactly those defect patches in the memory. Magnetic
  tiles with 10% planted defects (bench/localization.py, 2 seeds): after STOC refinement, pixel
  AUROC / AUPRO lose 0.013 / 0.007 against clean training with the guard and 0.031 / 0.059 without;
  with no refinement at all 0.018 / 0.010 vs 0.124 / 0.160. It costs 0.015 / 0.006 on clean data.
- ``gaussian`` (PaDiM): one Gaussian per grid cell (mean and covariance of that cell over the
  training images, Oracle-Approximating-Shrinkage towards a scaled identity); a patch's score is its
  Mahalanobis distance. Suits aligned objects; memory is ``8 * cells * 152**2`` bytes while fitting
  (145 MB at 224 px).

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
from sklearn.exceptions import NotFittedError

from core.config import BACKBONES, DEVICES
from core.data.images import image_shape, read_rgb
from core.errors import ConfigError, DataError, RunError
from core.explain.localizer import MapLocalizer
from core.explain.smoothing import DEFAULT_SIGMA, upsample_and_smooth
from core.models.device import resolve_device
from core.models.efficientnet import load_backbone, normalize_images
from core.progress import CancelToken, ProgressCallback, ProgressEvent, ignore_progress
from core.store import read_arrays, write_arrays, write_json

log = logging.getLogger(__name__)

METHODS = ("memory", "gaussian")
REDUCTIONS = ("max", "topk_mean")
PATCH_LAYERS = ("stride8", "stride16")
STATE_FORMAT = 1
_ARRAYS_FILE = "patch_localizer.safetensors"
_STATE_FILE = "patch_localizer.json"
_QUERY_CHUNK = 4096
_MEMORY_CHUNK = 8192
_CANDIDATES = 16


# ----------------------------------------------------------------------------- features

def patch_features(model, images: torch.Tensor) -> torch.Tensor:
    """Locally aggregated multi-scale patch features of normalised images.

    Parameters
    ----------
    model : EfficientNetFeatures
        The pretrained backbone (:func:`core.models.efficientnet.load_backbone`).
    images : (B, 3, S, S) float32 tensor
        Images normalised with :func:`core.models.efficientnet.normalize_images`.

    Returns
    -------
    (B, C8 + C16, h, w) float32 tensor
        ``h = w = ceil(S / 8)``; ``C8 + C16 = 40 + 112 = 152`` on EfficientNet-Lite0.
    """
    maps = model(images, PATCH_LAYERS)
    fine = F.avg_pool2d(maps["stride8"], 3, stride=1, padding=1, count_include_pad=False)
    coarse = F.avg_pool2d(maps["stride16"], 3, stride=1, padding=1, count_include_pad=False)
    coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([fine, coarse], dim=1).float()


# ----------------------------------------------------------------------------- patch models

class GaussianAccumulator:
    """Streaming per-cell mean and covariance of ``(B, L, D)`` patch features (float64 sums)."""

    def __init__(self, n_cells: int, n_features: int) -> None:
        self.n = 0
        self.sum = torch.zeros(n_cells, n_features, dtype=torch.float64)
        self.outer = torch.zeros(n_cells, n_features, n_features, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        x = features.detach().to("cpu", torch.float64)
        self.n += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer += torch.einsum("bld,ble->lde", x, x)

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``mean (L, D)``, ``precision (L, D, D)`` float32 and the OAS ``shrinkage (L,)``."""
        mean = self.sum / self.n
        covariance = self.outer.div_(self.n).sub_(torch.einsum("ld,le->lde", mean, mean))  # in place
        self.outer = None
        shrunk, shrinkage = oas_shrinkage(covariance, self.n)
        del covariance
        diagonal = torch.diagonal(shrunk, dim1=-2, dim2=-1)
        diagonal += 1e-6 * diagonal.mean() + 1e-12
        precision = torch.linalg.inv(shrunk)
        del shrunk
        return mean.float().contiguous(), precision.float().contiguous(), shrinkage.float()


def oas_shrinkage(covariance: torch.Tensor, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle Approximating Shrinkage of ``(L, D, D)`` empirical covariances (scikit-learn's formula).

    Returns the shrunk covariances ``(1 - a) S + a (tr S / D) I`` and the coefficients ``a (L,)``.
    """
    dim = covariance.shape[-1]
    mu = torch.diagonal(covariance, dim1=-2, dim2=-1).mean(dim=-1)
    alpha = (covariance ** 2).mean(dim=(-2, -1))
    numerator = alpha + mu ** 2
    denominator = (n_samples + 1) * (alpha - mu ** 2 / dim)
    shrinkage = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300),
                            torch.ones_like(denominator)).clamp(max=1.0)
    shrunk = covariance * (1.0 - shrinkage)[:, None, None]
    torch.diagonal(shrunk, dim1=-2, dim2=-1).add_((shrinkage * mu)[:, None])
    return shrunk, shrinkage


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Per-cell Mahalanobis distance ``(B, L)`` of ``(B, L, D)`` features to per-cell Gaussians."""
    diff = features - mean
    projected = torch.einsum("bld,lde->ble", diff, precision)
    return (projected * diff).sum(dim=-1).clamp_min(0.0).sqrt()


def nearest_distance(
    queries: torch.Tensor, memory: torch.Tensor, owners: torch.Tensor | None = None, support_images: int = 1
) -> torch.Tensor:
    """Euclidean distance ``(Q,)`` from each query ``(Q, D)`` to its nearest row of ``memory (M, D)``.

    With ``support_images = m > 1`` and ``owners (M,)`` (the training image each memory row came
    from): the distance to the nearest row whose image is the m-th distinct image met in order of
    distance (m = 2: the nearest row from another image than the nearest row's). It is looked up
    among the 16 nearest rows, and computed exactly over all rows for the queries whose 16 nearest
    rows come from fewer than m images.

    Computed with ``torch.cdist`` in chunks of queries and memory rows, so the distance matrix held
    at once is at most 4096 x 8192 floats (128 MB).
    """
    if support_images > 1 and owners is None:
        raise ValueError("support_images > 1 needs the owner image of every memory row")
    k = 1 if support_images == 1 else min(_CANDIDATES, memory.shape[0])
    out = torch.empty(queries.shape[0], dtype=queries.dtype, device=queries.device)
    for start in range(0, queries.shape[0], _QUERY_CHUNK):
        block = queries[start:start + _QUERY_CHUNK]
        best_distance = best_index = None
        for m_start in range(0, memory.shape[0], _MEMORY_CHUNK):
            distances = torch.cdist(block, memory[m_start:m_start + _MEMORY_CHUNK],
                                    compute_mode="use_mm_for_euclid_dist")
            values, index = distances.topk(min(k, distances.shape[1]), dim=1, largest=False)
            if best_distance is not None:
                values, order = torch.cat([best_distance, values], dim=1).topk(k, dim=1, largest=False)
                index = torch.cat([best_index, index + m_start], dim=1).gather(1, order)
            best_distance, best_index = values, index
        if support_images == 1:
            out[start:start + block.shape[0]] = best_distance[:, 0]
            continue
        result, found = _distinct_owner_distance(best_distance, owners[best_index], support_images)
        missing = torch.nonzero(~found).flatten()
        for sub in range(0, len(missing), 512):
            rows = missing[sub:sub + 512]
            result[rows] = _exact_owner_distance(block[rows], memory, owners, support_images)
        out[start:start + block.shape[0]] = result
    return out.clamp_min(0.0)


def _distinct_owner_distance(distances: torch.Tensor, owners: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ascending ``(Q, K)`` candidate distances: the distance where the m-th distinct owner
    first appears ``(Q,)``, and whether it appears at all ``(Q,) bool``."""
    k = distances.shape[1]
    same = owners[:, :, None] == owners[:, None, :]
    earlier = torch.ones(k, k, dtype=torch.bool, device=owners.device).tril(-1)
    new_owner = ~(same & earlier).any(dim=2)
    reached = new_owner.cumsum(dim=1) >= m
    first = reached.int().argmax(dim=1)             # the first True (argmax returns the first maximum)
    return distances.gather(1, first[:, None])[:, 0], reached.any(dim=1)


def _exact_owner_distance(queries: torch.Tensor, memory: torch.Tensor, owners: torch.Tensor, m: int) -> torch.Tensor:
    """The m-th distinct-owner distance over every memory row: take the nearest row, rule out its
    owner's rows, repeat."""
    distances = torch.cdist(queries, memory, compute_mode="use_mm_for_euclid_dist")
    for _ in range(m - 1):
        nearest_owner = owners[distances.argmin(dim=1)]
        distances = distances.masked_fill(owners[None, :] == nearest_owner[:, None], float("inf"))
    return distances.min(dim=1).values


def greedy_coreset(
    points: torch.Tensor,
    size: int,
    *,
    projection_dim: int = 64,
    seed: int = 0,
    on_progress: ProgressCallback = ignore_progress,
    cancel: CancelToken | None = None,
) -> torch.Tensor:
    """Indices ``(size,) int64`` of a greedy k-center coreset of ``points (N, D)``.

    Starts at a seeded random point, then repeatedly adds the point farthest from everything
    selected so far (PatchCore's coreset). Distances are measured after a seeded Gaussian random
    projection to ``projection_dim`` dimensions (Johnson-Lindenstrauss), which makes each step
    ``O(N * projection_dim)``.
    """
    n = points.shape[0]
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    x = points.float()
    if x.shape[1] > projection_dim:
        projection = torch.randn(x.shape[1], projection_dim, generator=generator).to(x.device)
        x = x @ (projection / math.sqrt(projection_dim))
    squared = (x * x).sum(dim=1)
    min_distance = torch.full((n,), float("inf"), device=x.device)
    selected = torch.empty(size, dtype=torch.int64)
    index = int(torch.randint(n, (1,), generator=generator))
    for step in range(size):
        selected[step] = index
        distance = squared + squared[index] - 2.0 * (x @ x[index])
        min_distance = torch.minimum(min_distance, distance)
        min_distance[index] = -1.0
        index = int(torch.argmax(min_distance))
        if step % 512 == 511:
            if cancel is not None:
                cancel.raise_if_cancelled()
            on_progress(ProgressEvent("coreset", step + 1, size, f"{n} candidate patches"))
    on_progress(ProgressEvent("coreset", size, size, f"{n} candidate patches"))
    return selected


# ----------------------------------------------------------------------------- the localizer

class PatchLocalizer(MapLocalizer):
    """Defect localization maps from a patch-level one-class model on pretrained features.

    Parameters
    ----------
    method : {"memory", "gaussian"}
        ``memory``: nearest-neighbour distance to a coreset of normal patches (any location;
        the default: no alignment needed, the better AUPRO and the smaller loss under
        contamination on the magnetic tiles, see bench/localization.py).
        ``gaussian``: per-location Mahalanobis distance (aligned objects only; on the magnetic
        tiles +0.02 pixel AUROC and much better image scores from its maps, but -0.03 AUPRO under
        contamination; 3x faster maps).
    image_size : int
        Images are resized to ``image_size x image_size`` before the backbone; the patch grid is
        ``ceil(image_size / 8)`` cells a side. Larger finds smaller defects, at quadratic cost.
    backbone : str
        Pretrained EfficientNet-Lite (``core.config.BACKBONES``).
    device : {"auto", "cpu", "cuda"}
        Where the backbone and the patch model run.
    batch_size : int
        Images per forward pass.
    coreset_size : int
        ``memory`` only: most patches kept in the memory (bounds memory and scoring time:
        scoring costs ``cells * coreset_size * 152`` multiply-adds per image).
    coreset_ratio : float in (0, 1]
        ``memory`` only: share of the candidate patches kept in the coreset (capped by
        ``coreset_size``).
    max_pool_patches : int
        ``memory`` only: most candidate patches held while reading the training images; each
        image contributes ``min(cells, ceil(max_pool_patches / n_images))`` random patches.
    projection_dim : int
        ``memory`` only: dimensions of the random projection the coreset selection measures in.
    support_images : int
        ``memory`` only: a patch's neighbour must come from the ``support_images``-th distinct
        training image (1: plain nearest neighbour; 2, the default, guards against defects left in
        single training images; see the module docstring).
    sigma : float
        Gaussian smoothing of the upsampled map, in pixels at ``image_size`` (0: none).
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
        Feature dimension D of a patch (152 on Lite0).
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

    param_names = ("method", "image_size", "backbone", "device", "batch_size", "coreset_size", "coreset_ratio",
                   "max_pool_patches", "projection_dim", "support_images", "sigma", "display_quantile",
                   "display_holdout", "seed")

    def __init__(
        self,
        method: str = "memory",
        *,
        image_size: int = 224,
        backbone: str = "efficientnet-lite0",
        device: str = "auto",
        batch_size: int = 16,
        coreset_size: int = 8192,
        coreset_ratio: float = 0.1,
        max_pool_patches: int = 65536,
        projection_dim: int = 64,
        support_images: int = 2,
        sigma: float = DEFAULT_SIGMA,
        display_quantile: float = 0.99,
        display_holdout: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.method = method
        self.image_size = image_size
        self.backbone = backbone
        self.device = device
        self.batch_size = batch_size
        self.coreset_size = coreset_size
        self.coreset_ratio = coreset_ratio
        self.max_pool_patches = max_pool_patches
        self.projection_dim = projection_dim
        self.support_images = support_images
        self.sigma = sigma
        self.display_quantile = display_quantile
        self.display_holdout = display_holdout
        self.seed = seed

    # ------------------------------------------------------------------ parameters

    def _validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone must be one of {', '.join(BACKBONES)}; got {self.backbone!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        checks = [
            ("image_size", 32 <= self.image_size <= 1024, "in [32, 1024] pixels"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("coreset_size", self.coreset_size >= 1, ">= 1"),
            ("coreset_ratio", 0.0 < self.coreset_ratio <= 1.0, "in (0, 1]"),
            ("max_pool_patches", self.max_pool_patches >= 1, ">= 1"),
            ("projection_dim", self.projection_dim >= 1, ">= 1"),
            ("support_images", self.support_images >= 1, ">= 1"),
            ("sigma", self.sigma >= 0.0, ">= 0 pixels"),
            ("display_quantile", 0.0 < self.display_quantile < 1.0, "in (0, 1)"),
            ("display_holdout", 0.0 <= self.display_holdout <= 0.5, "in [0, 0.5]"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{name} must be {allowed}; got {getattr(self, name)!r}")

    @property
    def _torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def _model(self):
        return load_backbone(self.backbone, self.image_size, self._torch_device.type)

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        paths: Sequence[Path | str],
        on_progress: ProgressCallback = ignore_progress,
        cancel: CancelToken | None = None,
    ) -> "PatchLocalizer":
        """Fit the patch model on normal images (a run's kept training images).

        Parameters
        ----------
        paths : sequence of image paths
            At least 2 images. A seeded share (``display_holdout``) is held out of the model and
            only sets ``display_scale_``.
        on_progress : callable
            Receives ``ProgressEvent("patch_fit", images_done, images_total)`` per batch, then
            ``"coreset"`` events (``memory``) and ``"display_scale"`` events.
        cancel : CancelToken, optional
            Checked between batches (and every 512 coreset steps).

        Returns
        -------
        self
        """
        rng, train, holdout = self._start_fit(paths)
        started = time.perf_counter()
        if self.method == "gaussian":
            self._fit_gaussian(train, on_progress, cancel)
        else:
            self._fit_memory(train, rng, on_progress, cancel)
        self.n_train_images_ = len(train)
        self.display_scale_ = self._display_scale(holdout or train, rng, on_progress, cancel)
        log.info("patch model (%s) fitted on %d images in %.1f s; display scale %.4g from %d %s images",
                 self.method, len(train), time.perf_counter() - started, self.display_scale_,
                 len(holdout or train), "held-out" if holdout else "training")
        return self

    @torch.inference_mode()
    def _fit_gaussian(self, paths, on_progress, cancel) -> None:
        accumulator = None
        for _, features in self._feature_batches(paths, "patch_fit", on_progress, cancel):
            if accumulator is None:
                accumulator = GaussianAccumulator(features.shape[1], features.shape[2])
            accumulator.update(features)
        self.mean_, self.precision_, self.shrinkage_ = accumulator.finalize()
        self.n_features_ = int(self.mean_.shape[1])

    @torch.inference_mode()
    def _fit_memory(self, paths, rng, on_progress, cancel) -> None:
        if len(paths) < self.support_images:
            raise DataError(f"support_images={self.support_images} needs at least that many fitted images; "
                            f"got {len(paths)}")
        per_image = None
        chunks: list[torch.Tensor] = []
        for _, features in self._feature_batches(paths, "patch_fit", on_progress, cancel):
            n_cells = features.shape[1]
            if per_image is None:
                per_image = min(n_cells, math.ceil(self.max_pool_patches / len(paths)))
            for image in features.cpu():
                keep = np.sort(rng.choice(n_cells, per_image, replace=False))
                chunks.append(image[torch.from_numpy(keep)].clone())
        pool = torch.cat(chunks)
        del chunks
        size = min(self.coreset_size, max(1, math.ceil(self.coreset_ratio * len(pool))))
        selected = greedy_coreset(pool.to(self._torch_device), size, projection_dim=self.projection_dim,
                                  seed=self.seed, on_progress=on_progress, cancel=cancel).cpu()
        self.memory_bank_ = pool[selected].contiguous()
        self.memory_owner_ = torch.div(selected, per_image, rounding_mode="floor").to(torch.int32)
        self.n_features_ = int(pool.shape[1])
        log.info("memory bank: %d of %d candidate patches (%d per image)", size, len(pool), per_image)

    # ------------------------------------------------------------------ maps

    def _map_batches(
        self, paths: list[Path], stage: str, on_progress: ProgressCallback, cancel: CancelToken | None
    ) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
        """Yield ``(original (H, W) sizes, (B, image_size, image_size) maps)`` per batch of images."""
        for sizes, features in self._feature_batches(paths, stage, on_progress, cancel):
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
        self, paths: list[Path], stage: str, on_progress: ProgressCallback, cancel: CancelToken | None
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
                if cancel is not None:
                    cancel.raise_if_cancelled()
                pixels, sizes = pending.result()
                if index + 1 < len(batches):
                    pending = reader.submit(read, batches[index + 1])
                with torch.inference_mode():
                    images = normalize_images(torch.from_numpy(pixels)).to(device)
                    if device.type == "cpu":
                        images = images.contiguous(memory_format=torch.channels_last)
                    features = patch_features(model, images)
                grid = tuple(features.shape[-2:])
                if getattr(self, "grid_shape_", grid) != grid:
                    raise RunError(f"patch grid {grid} differs from the fitted {self.grid_shape_}")
                self.grid_shape_ = grid
                features = features.flatten(2).transpose(1, 2).contiguous()
                yield sizes, features
                done = min((index + 1) * self.batch_size, len(paths))
                rate = done / max(time.perf_counter() - started, 1e-9)
                on_progress(ProgressEvent(stage, done, len(paths), f"{rate:.1f} images/s"))

    def _check_fitted(self) -> None:
        if not hasattr(self, "display_scale_"):
            raise NotFittedError("this PatchLocalizer is not fitted yet; call fit(paths) with normal images first")

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path | str) -> None:
        """Write ``patch_localizer.json`` (parameters, grid, display scale) and
        ``patch_localizer.safetensors`` (the patch model) into ``directory`` (created if needed)."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.method == "gaussian":
            arrays = {"mean": self.mean_, "precision": self.precision_, "shrinkage": self.shrinkage_}
        else:
            arrays = {"memory_bank": self.memory_bank_, "memory_owner": self.memory_owner_}
        write_arrays(directory / _ARRAYS_FILE, {k: v.cpu().numpy() for k, v in arrays.items()})
        write_json(directory / _STATE_FILE, {
            "format": STATE_FORMAT,
            "params": self.get_params(),
            "grid_shape": list(self.grid_shape_),
            "n_features": self.n_features_,
            "n_train_images": self.n_train_images_,
            "display_scale": self.display_scale_,
        })

    @classmethod
    def load(cls, directory: Path | str, device: str | None = None) -> "PatchLocalizer":
        """Read a localizer written by :meth:`save` (no pickle); ``device`` overrides the saved one."""
        directory = Path(directory)
        state, localizer = cls._restore(directory, _STATE_FILE, STATE_FORMAT, device)
        arrays = {k: torch.from_numpy(v.copy()) for k, v in read_arrays(directory / _ARRAYS_FILE).items()}
        needed = ("mean", "precision", "shrinkage") if localizer.method == "gaussian" else ("memory_bank",
                                                                                           "memory_owner")
        missing = [name for name in needed if name not in arrays]
        if missing:
            raise RunError(f"{directory / _ARRAYS_FILE} lacks {', '.join(missing)}; fit and save again")
        for name in needed:
            setattr(localizer, f"{name}_", arrays[name])
        localizer.grid_shape_ = tuple(state["grid_shape"])
        localizer.n_features_ = int(state["n_features"])
        localizer.n_train_images_ = int(state["n_train_images"])
        localizer.display_scale_ = float(state["display_scale"])
        return localizer


def image_scores_from_maps(
    maps: Sequence[np.ndarray], reduce: str = "max", topk_fraction: float = 0.01
) -> np.ndarray:
    """Image-level ``anomaly_score (N,) float64`` from anomaly maps.

    Parameters
    ----------
    maps : sequence of (H, W) arrays
    reduce : {"max", "topk_mean"}
        ``max``: the map's largest value. ``topk_mean``: the mean of its largest
        ``ceil(topk_fraction * H * W)`` values (less sensitive to one hot pixel).
    topk_fraction : float in (0, 1]
        Share of pixels averaged by ``topk_mean``.
    """
    if reduce not in REDUCTIONS:
        raise ConfigError(f"reduce must be one of {', '.join(REDUCTIONS)}; got {reduce!r}")
    if not 0.0 < topk_fraction <= 1.0:
        raise ConfigError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    scores = np.empty(len(maps), dtype=np.float64)
    for index, anomaly_map in enumerate(maps):
        values = np.asarray(anomaly_map, dtype=np.float64).ravel()
        if reduce == "max":
            scores[index] = values.max()
        else:
            k = max(1, math.ceil(topk_fraction * values.size))
            scores[index] = np.partition(values, values.size - k)[values.size - k:].mean()
    return scores
