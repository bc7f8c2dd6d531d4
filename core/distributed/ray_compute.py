"""Embedding, detector fits and scoring on a Ray cluster: the :class:`~core.compute.Compute` of ``--engine ray``.

:class:`RayCompute` runs the steps that grow with the data on Ray and gives the results of
:class:`~core.compute.LocalCompute` to float rounding:

- **embedding** (frozen encoders: pretrained image backbone, table encoder): a Ray Dataset of
  ``(row, image path)`` rows (a table's own rows) goes through ``map_batches`` on a pool of actors
  that each build the encoder once, on a GPU when the cluster has one. The driver writes each
  returned batch into the output (often a memory-mapped file) at its rows, so it holds one batch.
- **detector fits**: the embeddings go into the object store once, in blocks of
  :data:`~core.compute.CHUNK_ROWS` rows, split into partitions of consecutive blocks. A Gaussian
  density estimator (GDE) needs only sums over its training rows: Ray tasks return each
  partition's ``(count, sum)`` per subset, then its :class:`~core.stats.GaussianMoments`
  about the subset's mean, added up in a tree of tasks, so only ``D x D`` matrices reach the
  driver. Other detectors keep their training rows anyway: one task per subset gathers the
  subset's rows from the partitions and fits it.
- **scoring**: one task per partition scores its rows under every detector; a transductive
  detector (its scores depend on the batch, e.g. ECOD) gets all rows in one task.
- **scoring new data**: one fused ``map_batches`` pass: actors embed a batch and score it, and
  only the scores come back.

The tasks and actors themselves are in :mod:`core.distributed.ray_tasks`; joining a cluster and
Ray's settings in :mod:`core.distributed.ray_runtime`.

Every node must read the data (image files) and the run folders at the same path as the driver
(shared storage such as NFS), and have Refinery and its dependencies installed, in the same
version; a local Ray instance (``address=None``) shares this machine's. See ``docs/ray.md``.

Examples
--------
>>> from core import engine
>>> with RayCompute() as compute:                                   # doctest: +SKIP
...     engine.fit(dataset, config, "runs/demo", compute=compute)
"""
from __future__ import annotations

import logging
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Callable

import numpy as np

from core.compute import CHUNK_ROWS, LocalCompute, check_finite, fitted_rows, row_chunks
from core.data.dataset import IMAGES, Dataset
from core.detectors.gde import GaussianDensity
from core.distributed.ray_runtime import check_reachable, configure_ray_data, import_ray, refinery_errors
from core.distributed.ray_tasks import (
    ROW,
    EmbedBatches,
    ScoreBatches,
    add_moments,
    fit_on,
    partition_moments,
    partition_sums,
    rows_frame,
    score_partition,
    take_rows,
)
from core.errors import ConfigError
from core.mapped import MappedPages
from core.models.image_encoder import ImageEncoder
from core.models.tabular import TableEncoder
from core.progress import QUIET, Monitor
from core.stats import sample_mean


class RayCompute:
    """Embedding, detector fits and scoring as Ray actors and tasks (see the module docstring).

    Parameters
    ----------
    address : str or None, default=None
        The Ray cluster: None or ``"local"`` starts a Ray instance on this machine, with all its
        CPUs (and GPUs), for as long as this object is open; ``"auto"`` joins the cluster this
        machine belongs to (``ray start``, or ``RAY_ADDRESS``); ``"HOST:PORT"`` joins the cluster
        whose head listens there; ``"ray://HOST:PORT"`` connects through Ray Client (needs
        ``ray[client]``). When this process is already connected to Ray (``ray.init`` was called),
        that connection is used and left open by :meth:`close`; ``address`` is then only checked.
    workers : int or None, default=None
        Embedding actors, and partitions of the embeddings for the fit and scoring tasks, at most.
        None: one per GPU of the cluster when it has GPUs and the encoder may use them, else one
        per CPU.

    Raises
    ------
    ConfigError
        Ray is not installed, ``address`` is malformed or unreachable, or ``workers`` < 1.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        if workers is not None and workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}")
        self._ray = import_ray()
        self.address = address
        self.workers = workers
        self._stored: _StoredRows | None = None
        check_reachable(address)
        self._owns_ray = not self._ray.is_initialized()
        if self._owns_ray:
            try:
                self._ray.init(address=address or "local", include_dashboard=False, logging_level=logging.ERROR)
            except (ConnectionError, ValueError, RuntimeError) as error:
                raise ConfigError(f"could not join the Ray cluster at {address}: {error}") from None
        configure_ray_data(self._ray)
        remote = self._ray.remote
        self._tasks = _Tasks(
            sums=remote(partition_sums), moments=remote(partition_moments), add=remote(add_moments),
            take=remote(take_rows), fit=remote(fit_on), score=remote(score_partition),
        )

    def __enter__(self) -> "RayCompute":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the embeddings held in the object store and leave the Ray instance this object started."""
        self._stored = None
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False

    # ------------------------------------------------------------------ Compute

    def embed(self, encoder, dataset, *, out=None, monitor=QUIET) -> np.ndarray:
        """``(N, D) float32`` embeddings by actors (see the module docstring), written into ``out`` when given.

        Raises
        ------
        ConfigError
            ``encoder`` is not a frozen encoder (self-supervised encoders embed in this process).
        """
        _check_frozen(encoder)
        n = len(dataset)
        if n == 0:
            return LocalCompute().embed(encoder, dataset, out=out)

        written = np.zeros(n, dtype=bool)
        frontier = 0  # rows [0, frontier) are all written
        pages = None if out is None else MappedPages.of(out)  # an array allocated below is not mapped

        def write(batch: dict) -> None:
            nonlocal out, frontier
            embedded = batch["embedding"]
            if out is None:
                out = np.empty((n, embedded.shape[1]), np.float32)
            if out.shape != (n, embedded.shape[1]):
                raise ValueError(f"out must be a ({n}, {embedded.shape[1]}) float32 array for this data and "
                                 f"encoder, got {out.shape}")
            out[batch[ROW]] = embedded
            # Batches may arrive out of order: hand back the pages below the first row still missing.
            written[batch[ROW]] = True
            while frontier < n and written[frontier]:
                frontier += 1
            if pages is not None:
                pages.release(frontier)

        self._stream(self._map(dataset, EmbedBatches, encoder), dataset, write, monitor)
        return out

    def fit_detectors(self, factory, features, subsets) -> list:
        stored = self._store(features)
        subsets = [np.asarray(rows, dtype=np.int64) for rows in subsets]
        if isinstance(factory(), GaussianDensity):
            return self._fit_gaussians(factory, features, stored, subsets)
        template = factory()
        return self._get([self._tasks.fit.remote(factory, *self._gathered(stored, fitted_rows(template, len(features), rows)))
                          for rows in subsets])

    def score(self, detectors, features, rows=None) -> np.ndarray:
        stored = self._store(features)
        rows = np.arange(len(features)) if rows is None else np.asarray(rows, dtype=np.int64)
        scores = np.empty((len(detectors), len(rows)), dtype=np.float64)
        if len(rows) == 0:
            return scores
        detectors_ref = self._ray.put(list(detectors))
        if any(getattr(detector, "transductive", False) for detector in detectors):  # one batch
            return self._get(self._tasks.score.remote(detectors_ref, rows, *stored.blocks))
        placed = self._placed(stored, rows)
        results = self._get([self._tasks.score.remote(detectors_ref, local, *blocks) for _, local, blocks in placed])
        for (positions, _, _), result in zip(placed, results):
            scores[:, positions] = result
        return scores

    def score_dataset(self, encoder, detector, dataset, *, monitor=QUIET) -> np.ndarray:
        """``(N,) float64`` ``score_samples`` of new data, embedded and scored by actors in one pass.

        A self-supervised encoder embeds in this process (:class:`~core.compute.LocalCompute`);
        a transductive detector scores the whole data set in one task after the actors embedded it.
        """
        if not _is_frozen(encoder) or len(dataset) == 0:
            return LocalCompute().score_dataset(encoder, detector, dataset, monitor=monitor)
        if getattr(detector, "transductive", False):
            embeddings = check_finite(self.embed(encoder, dataset, monitor=monitor))
            return self.score([detector], embeddings)[0]
        scores = np.empty(len(dataset), dtype=np.float64)

        def write(batch: dict) -> None:
            scores[batch[ROW]] = batch["score"]

        self._stream(self._map(dataset, ScoreBatches, encoder, detector), dataset, write, monitor)
        return scores

    # ------------------------------------------------------------------ embedding actors

    def _map(self, dataset: Dataset, actor: type, encoder, *actor_args):
        """``dataset`` as a Ray Dataset of one block per encoder batch, mapped by a pool of ``actor``."""
        batch_rows = encoder.config.batch_size if isinstance(encoder, ImageEncoder) else CHUNK_ROWS
        frame = rows_frame(dataset)
        blocks = [frame.iloc[start : start + batch_rows] for start in range(0, len(frame), batch_rows)]
        resources = self._actor_resources(encoder)
        actors = max(1, min(self.workers or self._cluster(resources), len(blocks)))
        return self._ray.data.from_pandas(blocks).map_batches(
            actor, fn_constructor_args=(dataset.kind, encoder, *actor_args), batch_size=None, batch_format="pandas",
            compute=self._ray.data.ActorPoolStrategy(size=actors), **resources,
        )

    def _actor_resources(self, encoder) -> dict[str, float]:
        """One GPU per actor when the cluster has GPUs and the encoder may use one, else one CPU."""
        wants_gpu = isinstance(encoder, ImageEncoder) and encoder.config.device != "cpu"
        return {"num_gpus": 1} if wants_gpu and self._cluster({"num_gpus": 1}) > 0 else {"num_cpus": 1}

    def _cluster(self, resources: dict[str, float]) -> int:
        """How many actors needing ``resources`` (one GPU or one CPU) the cluster holds at once."""
        name = "GPU" if "num_gpus" in resources else "CPU"
        return int(self._ray.cluster_resources().get(name, 0))

    def _stream(self, mapped, dataset: Dataset, write: Callable[[dict], None], monitor: Monitor) -> None:
        """Pull the actors' output batches one at a time into ``write``, reporting progress between batches."""
        n, unit = len(dataset), "images" if dataset.kind == IMAGES else "rows"
        started, done = time.perf_counter(), 0
        monitor.check()
        batches = iter(mapped.iter_batches(batch_size=None, batch_format="numpy"))
        # Closed on the way out, so that a cancel or an error stops the actors at once.
        with refinery_errors(self._ray), closing(batches):
            for batch in batches:
                write(batch)
                done += len(batch[ROW])
                rate = done / max(time.perf_counter() - started, 1e-9)
                monitor.report("embed", done, n, f"{rate:.1f} {unit}/s")
                monitor.check()

    # ------------------------------------------------------------------ tasks over stored rows

    def _store(self, features: np.ndarray) -> "_StoredRows":
        """``features`` in the object store, put there once per array (by its memory, see :func:`_array_key`)."""
        key = _array_key(features)
        if self._stored is None or self._stored.key != key:
            self._stored = None  # free the previous array's blocks first
            blocks = [self._ray.put(chunk) for chunk in row_chunks(features)]
            self._stored = _StoredRows(key, features, blocks)
        return self._stored

    def _partitions(self, stored: "_StoredRows") -> list["_Partition"]:
        """The stored blocks in one partition per worker (per CPU of the cluster by default)."""
        return stored.partitions(self.workers or self._cluster({"num_cpus": 1}))

    def _placed(self, stored: "_StoredRows", rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, list]]:
        """``(positions in rows, rows counted from the partition's first, its blocks)`` per partition holding any."""
        selected = [(*partition.select(rows), partition.blocks) for partition in self._partitions(stored)]
        return [(positions, local, blocks) for positions, local, blocks in selected if len(positions)]

    def _gathered(self, stored: "_StoredRows", rows: np.ndarray) -> list:
        """References to ``features[rows]``, gathered by one task per partition, in the order of ``rows``."""
        placed = self._placed(stored, rows)
        order = np.argsort(np.concatenate([positions for positions, _, _ in placed]), kind="stable")
        return [order, *(self._tasks.take.remote(local, *blocks) for _, local, blocks in placed)]

    def _fit_gaussians(self, factory, features, stored, subsets) -> list:
        """GDEs fitted from partition sums: two passes of tasks, the moments added in a tree of tasks."""
        by_partition = [(partition.blocks, [partition.select(rows)[1] for rows in subsets])
                        for partition in self._partitions(stored)]
        sums = self._get([self._tasks.sums.remote(locals_, *blocks) for blocks, locals_ in by_partition])
        means = [sample_mean(part for partition in sums for part in partition[k]) for k in range(len(subsets))]
        means_ref = self._ray.put(means)
        moments = [self._tasks.moments.remote(means_ref, locals_, *blocks) for blocks, locals_ in by_partition]
        while len(moments) > 1:
            pairs = [moments[i : i + 2] for i in range(0, len(moments), 2)]
            moments = [self._tasks.add.remote(*pair) if len(pair) == 2 else pair[0] for pair in pairs]
        totals = self._get(moments[0])
        return [
            factory().fit_moments(total, lambda fitted, rows=rows: self.score([fitted], features, rows)[0])
            for total, rows in zip(totals, subsets)
        ]

    def _get(self, refs):
        with refinery_errors(self._ray):
            return self._ray.get(refs)


# ---------------------------------------------------------------------- the driver's view of stored rows


@dataclass(frozen=True)


class _Partition:
    """Consecutive stored blocks, holding rows ``first`` to ``stop - 1``."""

    first: int
    stop: int
    blocks: list

    def select(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where in ``rows`` this partition's rows are, and those rows counted from ``first``."""
        positions = np.flatnonzero((rows >= self.first) & (rows < self.stop))
        return positions, rows[positions] - self.first


@dataclass


class _StoredRows:
    """An ``(N, D)`` array in the object store as blocks of :data:`CHUNK_ROWS` rows.

    ``features`` is kept so that its memory, whose address is part of ``key``, stays allocated
    (another array cannot take the address while it is cached).
    """

    key: tuple
    features: np.ndarray
    blocks: list

    def partitions(self, count: int) -> list[_Partition]:
        """The blocks in ``count`` partitions of consecutive blocks, as even as possible (fewer with fewer blocks)."""
        count = max(1, min(count, len(self.blocks)))
        bounds = np.linspace(0, len(self.blocks), count + 1).round().astype(int)
        return [_Partition(a * CHUNK_ROWS, b * CHUNK_ROWS, self.blocks[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass(frozen=True)


class _Tasks:
    """The functions of :mod:`core.distributed.ray_tasks` as Ray remote functions (registered once per
    :class:`RayCompute`)."""

    sums: object
    moments: object
    add: object
    take: object
    fit: object
    score: object


def _array_key(features: np.ndarray) -> tuple:
    """What identifies an array's content while it is alive: its memory address, shape, strides, dtype."""
    array = np.asarray(features)
    return array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str


def _is_frozen(encoder) -> bool:
    return isinstance(encoder, (ImageEncoder, TableEncoder))


def _check_frozen(encoder) -> None:
    if not _is_frozen(encoder):
        raise ConfigError(f"the Ray engine embeds with frozen encoders only (objective 'none'); "
                          f"{type(encoder).__name__} embeds in this process")
