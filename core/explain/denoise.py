"""Patch-level denoising of a patch memory's candidates before the coreset (after SoftPatch).

A defective image left in the training set (refinement is never perfect) brings a few hundred
defective patches into the candidate pool. Greedy k-center selection picks isolated points first, so
exactly those patches would enter the memory and make the same kind of defect look normal. SoftPatch
(Jiang et al., 2022; SoftPatch+, 2024) scores every candidate patch for being an outlier among the
candidates *of the other images* and drops the most outlying share before the coreset.

Here a candidate's outlier score is its distance to the ``support``-th nearest *other* image, an
image's distance being that of its nearest patch in a seeded random sample of the candidates. A
normal patch has close matches in many images; a defect patch, in at most the few images that share
that defect. Unlike SoftPatch, which compares the patches at one grid location (aligned objects), a
match may sit anywhere, which suits textures.
"""
from __future__ import annotations

import math

import numpy as np
import torch

REFERENCE_PATCHES = 16384
"""Most candidate patches the outlier scores are measured against (a seeded random sample)."""
_QUERY_CHUNK = 1024


def patch_outlier_scores(
    pool: torch.Tensor, owners: torch.Tensor, support: int, rng: np.random.Generator
) -> torch.Tensor:
    """Outlier score ``(N,) float32`` of each candidate patch: its distance to the ``support``-th
    nearest other image (higher = fewer other images hold a similar patch).

    Parameters
    ----------
    pool : (N, D) float32 tensor
        Candidate patches.
    owners : (N,) int64 tensor
        Index (0 to I - 1) of the image each candidate came from; at least 2 images.
    support : int
        How many other images must hold a similar patch for a small score (at most ``I - 1`` are
        asked for).
    rng : numpy Generator
        Draws the reference sample (all candidates when there are at most ``REFERENCE_PATCHES``).
    """
    n = pool.shape[0]
    reference = (torch.arange(n) if n <= REFERENCE_PATCHES
                 else torch.from_numpy(np.sort(rng.choice(n, REFERENCE_PATCHES, replace=False))))
    reference = reference.to(pool.device)
    memory, memory_owners = pool[reference], owners[reference]
    n_images = int(owners.max()) + 1
    scores = torch.empty(n, dtype=pool.dtype, device=pool.device)
    for start in range(0, n, _QUERY_CHUNK):
        block = pool[start:start + _QUERY_CHUNK]
        distances = torch.cdist(block, memory, compute_mode="use_mm_for_euclid_dist")
        per_image = torch.full((block.shape[0], n_images), float("inf"), dtype=pool.dtype, device=pool.device)
        per_image.scatter_reduce_(1, memory_owners.expand_as(distances), distances, "amin")
        per_image.scatter_(1, owners[start:start + _QUERY_CHUNK, None], float("inf"))
        scores[start:start + block.shape[0]] = per_image.kthvalue(min(support, n_images - 1), dim=1).values
    return scores.clamp_min(0.0)


def denoised_candidates(
    pool: torch.Tensor, owners: torch.Tensor, share: float, support: int, rng: np.random.Generator
) -> torch.Tensor:
    """Indices ``(K,) int64`` (ascending) of the candidates kept after dropping the ``share`` most
    outlying ones (:func:`patch_outlier_scores`); ``share = 0`` keeps every candidate.

    >>> pool = torch.cat([torch.zeros(30, 2), torch.full((3, 2), 9.0)])        # three far patches
    >>> owners = torch.cat([torch.arange(30) % 10, torch.tensor([10, 10, 10])])
    >>> denoised_candidates(pool, owners, 0.1, 1, np.random.default_rng(0)).tolist() == list(range(30))
    True
    """
    if share == 0:
        return torch.arange(pool.shape[0], device=pool.device)
    scores = patch_outlier_scores(pool, owners, support, rng)
    n_keep = pool.shape[0] - math.floor(share * pool.shape[0])
    return torch.sort(torch.topk(scores, n_keep, largest=False).indices).values
