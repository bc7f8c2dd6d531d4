"""Where the heavy arithmetic of a fit and of scoring runs: embedding, detector fits, scoring.

The engine asks a :class:`Compute` for four steps and never does them itself.
:class:`LocalCompute` runs them in this process and streams: embeddings (often a memory-mapped
file) are read in chunks of :data:`CHUNK_ROWS` rows, a Gaussian density estimator is fitted from
sums over those chunks (:class:`~core.stats.GaussianMoments`), and new data is embedded
and scored chunk by chunk, so memory does not grow with the number of samples.
:class:`core.distributed.ray_compute.RayCompute` runs the same steps on a Ray cluster. Both give
the same results to float rounding.
"""
from __future__ import annotations

import operator
from functools import reduce
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from core.data.dataset import Dataset
from core.detectors._base import sample_of_rows
from core.detectors.gde import GaussianDensity
from core.errors import DataError
from core.mapped import MappedPages
from core.progress import QUIET, Monitor
from core.stats import GaussianMoments, sample_mean

CHUNK_ROWS = 1024
"""Rows of embeddings read at once. A chunk and its scoring temporaries are a few N-independent
tens of MiB (1024 x 1280 float64 values are 10 MiB); larger chunks were slower and used more memory
(docs/benchmarks.md, "Figures that left the docstrings")."""

DetectorFactory = Callable[[], object]


class Compute(Protocol):
    """The steps of a fit and of scoring that grow with the data; see the module docstring."""

    name: str

    def embed(
        self, encoder, dataset: Dataset, *, out: np.ndarray | None = None, monitor: Monitor = QUIET,
    ) -> np.ndarray:
        """``(N, D) float32`` embeddings of ``dataset`` by ``encoder``, written into ``out`` when given."""

    def fit_detectors(self, factory: DetectorFactory, features: np.ndarray, subsets: Sequence[np.ndarray]) -> list:
        """One fitted detector per subset: ``factory()`` fitted on ``features[subset]``."""

    def score(self, detectors: Sequence, features: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """``(K, M) float64``: ``score_samples`` of ``features[rows]`` (all rows when None) under each detector."""

    def score_dataset(
        self, encoder, detector, dataset: Dataset, *, monitor: Monitor = QUIET,
    ) -> np.ndarray:
        """``(N,) float64`` ``score_samples`` of new data: embedded by ``encoder``, scored by ``detector``."""


class LocalCompute:
    """Every step in this process, streaming in chunks of rows (see the module docstring)."""

    name = "local"

    def embed(self, encoder, dataset, *, out=None, monitor=QUIET) -> np.ndarray:
        if out is None:
            return encoder.embed(dataset, monitor=monitor)
        return encoder.embed(dataset, monitor=monitor, out=out)

    def fit_detectors(self, factory, features, subsets) -> list:
        return [fit_rows(factory(), features, rows) for rows in subsets]

    def score(self, detectors, features, rows=None) -> np.ndarray:
        return score_rows(detectors, features, rows)

    def score_dataset(self, encoder, detector, dataset, *, monitor=QUIET) -> np.ndarray:
        n = len(dataset)
        scores = np.empty(n, dtype=np.float64)
        step = chunk_rows_for([detector], n)
        for start in range(0, n, step):
            stop = min(start + step, n)
            part = dataset.subset(np.arange(start, stop))
            embeddings = encoder.embed(part, monitor=monitor.offset(start, n))
            scores[start:stop] = detector.score_samples(check_finite(embeddings))
        return scores


def row_chunks(features: np.ndarray, rows: np.ndarray | None = None, chunk_rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """``features[rows]`` (all rows when None) in consecutive chunks of at most ``chunk_rows`` rows, read one at a time.

    On a memory-mapped ``features`` the pages below the rows read so far are dropped from resident
    memory after each chunk (:class:`~core.mapped.MappedPages`), so a pass does not grow it by the
    file; rows in increasing order (as refinement passes them) make that release complete.
    """
    total = len(features) if rows is None else len(rows)
    pages = MappedPages.of(features) if isinstance(features, np.ndarray) else None
    read_up_to = 0
    for start in range(0, total, chunk_rows):
        stop = min(start + chunk_rows, total)
        yield np.array(features[start:stop] if rows is None else features[rows[start:stop]])
        if pages is not None:
            read_up_to = max(read_up_to, stop if rows is None else int(rows[start:stop].max()) + 1)
            pages.release(read_up_to)


def fitted_rows(detector, n_rows: int, rows: np.ndarray | None = None) -> np.ndarray:
    """The rows ``detector`` is fitted on: ``rows`` (all ``n_rows`` when None), or a seeded sample of
    ``detector.max_samples`` of them (sorted) for a detector that declares such a bound."""
    rows = np.arange(n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
    return sample_of_rows(rows, getattr(detector, "max_samples", None), getattr(detector, "random_state", None))


def fit_rows(detector, features: np.ndarray, rows: np.ndarray | None = None):
    """``detector`` fitted on ``features[rows]`` (all rows when None); returns it.

    A :class:`~core.detectors.gde.GaussianDensity` is fitted from sums over chunks of rows (two
    passes, then one to score its training rows), so memory does not depend on the number of
    rows. A detector with a ``max_samples`` bound gets a seeded sample of that many rows
    (:func:`fitted_rows`); other detectors keep their training samples anyway and get them as one array.
    """
    if not isinstance(detector, GaussianDensity):
        return detector.fit(np.asarray(features[fitted_rows(detector, len(features), rows)]))
    mean = sample_mean((len(chunk), chunk.sum(axis=0, dtype=np.float64)) for chunk in row_chunks(features, rows))
    moments = reduce(operator.add, (GaussianMoments.of(chunk, mean) for chunk in row_chunks(features, rows)))
    return detector.fit_moments(moments, lambda fitted: score_rows([fitted], features, rows)[0])


def score_rows(detectors: Sequence, features: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """``(K, M) float64``: ``score_samples`` of ``features[rows]`` under each detector, chunk by chunk.

    Rows go to a detector marked ``transductive`` (its scores depend on the batch) in one batch.
    """
    chunk_rows = chunk_rows_for(detectors, len(features))
    chunks = [np.stack([d.score_samples(chunk) for d in detectors]) for chunk in row_chunks(features, rows, chunk_rows)]
    return np.concatenate(chunks, axis=1) if chunks else np.empty((len(detectors), 0))


def chunk_rows_for(detectors: Sequence, total: int) -> int:
    """Rows to score at once: :data:`CHUNK_ROWS`, or all ``total`` rows when a detector is
    ``transductive`` (its scores depend on the batch, e.g. PyOD's ECOD)."""
    return max(total, 1) if any(getattr(d, "transductive", False) for d in detectors) else CHUNK_ROWS


def check_finite(embeddings: np.ndarray) -> np.ndarray:
    """``embeddings`` itself, once every value is checked finite (chunk by chunk); DataError otherwise."""
    if not all(np.isfinite(chunk).all() for chunk in row_chunks(embeddings)):
        raise DataError("the representation produced NaN or infinite values; check the input data")
    return embeddings

