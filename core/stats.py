"""Statistics shared by the detectors, the localizers and Grad-CAM.

- Gaussian moments: :class:`GaussianMoments` (exact sums over rows that add up across partitions,
  for the GDE) and :class:`CellMoments` (one streaming Gaussian per patch-grid cell);
- covariance shrinkage toward a scaled identity: :func:`oas_amount`, :func:`ledoit_wolf_amount`,
  :func:`shrink_covariance`;
- Mahalanobis distance: :func:`mahalanobis_terms`, :func:`squared_mahalanobis`, :func:`mahalanobis`;
- nearest-neighbour distance to a memory of rows (:func:`nearest_distance`) and the greedy k-center
  coreset that builds such a memory (:func:`greedy_coreset`).

Functions documented as "numpy or torch" compute in the library and dtype of their input, so a
detector on float64 arrays and a localizer on float32 tensors share one formula without converting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from core.progress import QUIET, Monitor

_QUERY_CHUNK = 4096
_MEMORY_CHUNK = 8192
_CANDIDATES = 16
_COVER_BATCH = 64
"""Candidates :func:`greedy_coreset` picks among in one round (one pass over the points)."""
_COVER_ELEMENTS = 1 << 22
"""Most point-to-centre distances :func:`greedy_coreset` holds at once."""


# ----------------------------------------------------------------------------- Gaussian moments

@dataclass(frozen=True)
class GaussianMoments:
    """Sums over samples about a fixed centre: everything a Gaussian fit (the GDE) reads from the data.

    The sums over disjoint partitions of the samples add up exactly (``a + b``) when every part
    was summed about the same centre. The fit needs that centre to be the mean of all the samples,
    so fitting from partitions takes two passes: the partitions' ``(count, sum)`` give the mean
    (:func:`sample_mean`), then each partition sums about it (:meth:`of`).

    Attributes
    ----------
    count : int
        N, the number of samples summed.
    centre : (D,) float64
        The point the sums are taken about.
    scatter : (D, D) float64
        ``sum_n (x_n - centre)(x_n - centre)^T``.
    fourth : float
        ``sum_n ||x_n - centre||^4``, which Ledoit-Wolf shrinkage needs.
    """

    count: int
    centre: np.ndarray
    scatter: np.ndarray
    fourth: float

    @classmethod
    def of(cls, X: np.ndarray, centre: np.ndarray) -> "GaussianMoments":
        """The sums over the rows of ``X (N, D)`` (any float dtype; summed in float64) about ``centre``."""
        diff = np.asarray(X, dtype=np.float64) - centre
        squared_norms = np.einsum("ij,ij->i", diff, diff)
        return cls(len(diff), centre, diff.T @ diff, float(squared_norms @ squared_norms))

    def __add__(self, other: "GaussianMoments") -> "GaussianMoments":
        if not np.array_equal(self.centre, other.centre):
            raise ValueError("moments summed about different centres do not add up")
        return GaussianMoments(self.count + other.count, self.centre, self.scatter + other.scatter,
                               self.fourth + other.fourth)


def sample_mean(parts) -> np.ndarray:
    """The mean ``(D,) float64`` of all samples from each part's ``(count, (D,) sum)``: the first pass
    of a fit from partitions."""
    parts = list(parts)
    count = sum(n for n, _ in parts)
    return np.sum([np.asarray(total, dtype=np.float64) for _, total in parts], axis=0) / count


class CellMoments:
    """Streaming mean and covariance of one Gaussian per cell, from ``(B, L, D)`` batches of features.

    One pass: per cell the count, the sum and the sum of outer products (float64, on the CPU), so
    each batch of images goes through the backbone once. Memory: ``8 * L * D**2`` bytes.
    """

    def __init__(self, n_cells: int, n_features: int) -> None:
        self.n = 0
        self.sum = torch.zeros(n_cells, n_features, dtype=torch.float64)
        self.outer = torch.zeros(n_cells, n_features, n_features, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch ``(B, L, D)`` of features (any float dtype and device)."""
        x = features.detach().to("cpu", torch.float64)
        self.n += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer += torch.einsum("bld,ble->lde", x, x)

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean (L, D)`` and empirical covariance ``(L, D, D)`` (divided by N), float64.

        The covariance is computed in the memory of the sums, which are released: call once.
        """
        mean = self.sum / self.n
        covariance = self.outer.div_(self.n).sub_(torch.einsum("ld,le->lde", mean, mean))  # in place
        self.outer = None
        return mean, covariance


# ----------------------------------------------------------------------------- shrinkage

def oas_amount(covariance, n_samples: int):
    """Oracle Approximating Shrinkage amount (scikit-learn's ``sklearn.covariance.oas`` formula).

    Parameters
    ----------
    covariance : (..., D, D) float array or tensor (numpy or torch)
        Empirical covariances of ``n_samples`` samples (divided by N, not N - 1).
    n_samples : int

    Returns
    -------
    (...) amount in [0, 1], same library and dtype
        0 when D == 1 (as scikit-learn); 1 where the formula's denominator is not positive (all
        variances equal and no correlation, e.g. constant data).
    """
    dim = covariance.shape[-1]
    mu = covariance.diagonal(0, -2, -1).mean(-1)
    alpha = (covariance ** 2).mean((-2, -1))
    numerator = alpha + mu ** 2
    denominator = (n_samples + 1) * (alpha - mu ** 2 / dim)
    if isinstance(covariance, torch.Tensor):
        amount = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300),
                             torch.ones_like(denominator)).clamp(max=1.0)
        return amount if dim > 1 else torch.zeros_like(amount)
    positive = denominator > 0
    amount = np.minimum(np.where(positive, numerator / np.where(positive, denominator, 1.0), 1.0), 1.0)
    return amount if dim > 1 else np.zeros_like(amount)


def ledoit_wolf_amount(covariance: np.ndarray, fourth: float, n_samples: int) -> float:
    """Ledoit-Wolf shrinkage amount (scikit-learn's ``sklearn.covariance.ledoit_wolf``) from sums.

    Parameters
    ----------
    covariance : (D, D) float64
        Empirical covariance of ``n_samples`` samples about their mean (divided by N).
    fourth : float
        ``sum_n ||x_n - mean||^4`` (:attr:`GaussianMoments.fourth`).
    n_samples : int
    """
    n, p = n_samples, len(covariance)
    mu = covariance.diagonal(0, -2, -1).mean(-1)
    delta_ = float(np.sum((covariance * n) ** 2)) / n**2
    beta = (fourth / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * float(np.trace(covariance)) + p * mu**2) / p
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def shrink_covariance(covariance, amount):
    """``(1 - a) S + a mu I``: covariances ``S`` pulled toward ``mu I``, ``mu`` each one's mean variance.

    Parameters
    ----------
    covariance : (..., D, D) float array or tensor (numpy or torch)
    amount : float or (...) array or tensor of floats in [0, 1]

    Returns
    -------
    (..., D, D) new array or tensor, same library and dtype.
    """
    mu = covariance.diagonal(0, -2, -1).mean(-1)
    if isinstance(covariance, torch.Tensor):
        amount = torch.as_tensor(amount, dtype=covariance.dtype, device=covariance.device)
        shrunk = covariance * (1.0 - amount)[..., None, None]
        torch.diagonal(shrunk, dim1=-2, dim2=-1).add_((amount * mu)[..., None])
        return shrunk
    amount = np.asarray(amount, dtype=covariance.dtype)
    shrunk = covariance * (1.0 - amount)[..., None, None]
    diagonal = np.arange(covariance.shape[-1])
    shrunk[..., diagonal, diagonal] += np.asarray(amount * mu)[..., None]
    return shrunk


# ----------------------------------------------------------------------------- Mahalanobis distance

def mahalanobis_terms(x, mean, precision):
    """Each feature's term of the squared Mahalanobis distance: ``diff * (diff @ precision)``, ``diff = x - mean``.

    Parameters
    ----------
    x : (..., D) array or tensor (numpy or torch)
        Rows to measure. Computed in the promoted dtype of ``x`` and ``mean`` (float32 rows
        against a float64 Gaussian are measured in float64).
    mean, precision : (D,) and (D, D)
        One Gaussian: its mean and inverse covariance. Or, for a Gaussian per cell (torch):
        ``(L, D)`` and ``(L, D, D)`` with ``x`` of shape ``(B, L, D)``.

    Returns
    -------
    (..., D) terms; a row's terms sum to its squared distance. A term can be negative when
    correlated features partly cancel.
    """
    diff = x - mean
    projected = torch.einsum("bld,lde->ble", diff, precision) if precision.ndim == 3 else diff @ precision
    return diff * projected


def squared_mahalanobis(x, mean, precision):
    """Squared Mahalanobis distance ``(...)`` of ``x (..., D)`` (see :func:`mahalanobis_terms`); numpy or torch."""
    return mahalanobis_terms(x, mean, precision).sum(-1)


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance ``(...)`` of ``x (..., D)``, >= 0 (see :func:`mahalanobis_terms`); torch."""
    return squared_mahalanobis(x, mean, precision).clamp_min(0.0).sqrt()


# ----------------------------------------------------------------------------- nearest neighbours

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
    at once is at most 4096 x 8192 floats (128 MB). Same dtype and device as ``queries``.
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


def _distinct_owner_distance(
    distances: torch.Tensor, owners: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
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
    points: torch.Tensor, size: int, *, projection_dim: int = 64, seed: int = 0, monitor: Monitor = QUIET
) -> torch.Tensor:
    """Indices ``(size,) int64`` of a greedy k-center coreset of ``points (N, D)``, in selection order.

    Starts at a seeded random point, then repeatedly adds the point farthest from everything
    selected so far (PatchCore's coreset), so every point lies within the final covering radius of
    a selected one. Distances are measured after a seeded Gaussian random projection to
    ``projection_dim`` dimensions (Johnson-Lindenstrauss). ``size >= N`` selects every point, in order.

    The points are selected in rounds, so that they are read once per round rather than once per
    selected point: a round (:func:`_farthest_round`) picks among the :data:`_COVER_BATCH` points
    farthest from the selection for as long as its next pick is provably the one that
    one-point-at-a-time greedy would make; then one matrix product lowers every point's distance to
    the selection by the round's picks (:func:`_lower_distances`). The result is that of
    one-point-at-a-time greedy, up to ties and floating-point rounding.

    Computed in the dtype of ``points`` (at least float32), on their device. ``monitor`` gets a
    ``"coreset"`` report (points selected of ``size``) at the start and after every round, and is checked
    for cancellation before the next; a round's cost is about proportional to the points it selects, so
    the stage's ETA is paced by rounds from the start (the random first point is not reported alone).
    """
    n = points.shape[0]
    if size >= n:
        return torch.arange(n)
    note = f"{n} candidate patches"
    monitor.report("coreset", 0, size, note)
    generator = torch.Generator().manual_seed(seed)
    x = points.to(torch.promote_types(points.dtype, torch.float32))
    if x.shape[1] > projection_dim:
        projection = torch.randn(x.shape[1], projection_dim, generator=generator).to(x)
        x = x @ (projection / math.sqrt(projection_dim))
    squared = (x * x).sum(dim=1)
    min_distance = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    selected = torch.empty(size, dtype=torch.int64)
    picked = torch.randint(n, (1,), generator=generator).to(x.device)
    done = 0
    while True:
        selected[done:done + len(picked)] = picked.cpu()
        done += len(picked)
        if done > 1 or done == size:  # the random first point alone would pace the stage by its set-up
            monitor.report("coreset", done, size, note)
        if done == size:
            return selected
        monitor.check()
        _lower_distances(min_distance, x, squared, picked)
        picked = _farthest_round(x, squared, min_distance, size - done)


def _lower_distances(min_distance: torch.Tensor, x: torch.Tensor, squared: torch.Tensor, picked: torch.Tensor) -> None:
    """Lower ``min_distance (N,)``, each point's squared distance to the selection, in place to its
    distance to the newly ``picked`` rows of ``x (N, d)`` (``squared``: their squared norms), and mark
    those rows selected (``-inf``). Rows are taken in blocks of at most :data:`_COVER_ELEMENTS` distances."""
    centres, centre_squared = x[picked], squared[picked]
    rows = max(1, _COVER_ELEMENTS // len(picked))
    for start in range(0, x.shape[0], rows):
        block = slice(start, start + rows)
        distances = torch.addmm(centre_squared, x[block], centres.T, alpha=-2.0).amin(dim=1) + squared[block]
        min_distance[block] = torch.minimum(min_distance[block], distances)
    min_distance[picked] = float("-inf")


def _farthest_round(x: torch.Tensor, squared: torch.Tensor, min_distance: torch.Tensor, most: int) -> torch.Tensor:
    """The next picks ``(k,) int64`` (1 <= k <= ``most``) of greedy k-center selection, in order.

    The candidates are the :data:`_COVER_BATCH` unselected points farthest from the selection. The
    first is greedy's next pick. Each later pick is the candidate farthest from the selection and
    this round's picks, taken only while it is strictly farther than the next-farthest point outside
    the candidates was before the round: such a point can only have come closer since, so the
    candidate is greedy's pick too.
    """
    k = min(_COVER_BATCH + 1, len(min_distance))
    values, candidates = min_distance.topk(k)
    outside = float(values[-1]) if k > _COVER_BATCH else -math.inf
    values, candidates = values[:_COVER_BATCH], candidates[:_COVER_BATCH]
    rows = x[candidates]
    pairwise = squared[candidates][:, None] + squared[candidates][None, :] - 2.0 * (rows @ rows.T)
    pairwise, remaining = pairwise.cpu().numpy(), values.cpu().numpy().copy()
    picks: list[int] = []
    while len(picks) < most:
        best = int(np.argmax(remaining))
        if remaining[best] == -np.inf or (picks and not remaining[best] > outside):
            break
        picks.append(best)
        np.minimum(remaining, pairwise[best], out=remaining)
        remaining[best] = -np.inf
    return candidates[torch.tensor(picks, device=candidates.device)]
