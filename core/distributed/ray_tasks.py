"""The work :class:`~core.distributed.ray_compute.RayCompute` sends to a Ray cluster: tasks and actors.

Tasks work on stored blocks of embeddings (:class:`BlockRows` reads consecutive blocks as one array):
partition sums and moments for Gaussian fits, gathering a subset's rows, fitting and scoring.
Actors (:class:`EmbedBatches`, :class:`ScoreBatches`) build an encoder once and embed (and score)
one batch of samples per call; a batch travels as rows of :func:`rows_frame` and becomes a
:class:`~core.data.dataset.Dataset` again on the actor (:func:`batch_dataset`).
"""
from __future__ import annotations

import operator
from functools import reduce
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from core.compute import check_finite, row_chunks, score_rows
from core.data.dataset import IMAGES, Dataset
from core.models.image_encoder import ImageEncoder
from core.stats import GaussianMoments

ROW = "__refinery_row"
"""Column of a Ray Dataset with each sample's 0-based position in the data set."""
PATH = "__refinery_path"
"""Column of a Ray Dataset of images with each image's file path."""


class BlockRows:
    """Consecutive blocks of rows read as one ``(N, D)`` array, indexed by arrays of row numbers (as
    :func:`~core.compute.row_chunks` and :func:`~core.compute.score_rows` index it when given rows)."""

    def __init__(self, blocks: Sequence[np.ndarray]) -> None:
        self.blocks = blocks
        self.starts = np.cumsum([0, *(len(block) for block in blocks)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        taken = np.empty((len(rows), *self.blocks[0].shape[1:]), dtype=self.blocks[0].dtype)
        for block in np.unique(which):
            selected = which == block
            taken[selected] = self.blocks[block][rows[selected] - self.starts[block]]
        return taken


def partition_sums(subsets: list[np.ndarray], *blocks: np.ndarray) -> list[list[tuple[int, np.ndarray]]]:
    """Per subset, ``(count, (D,) float64 sum)`` of each chunk of its rows in these blocks."""
    features = BlockRows(blocks)
    return [[(len(chunk), chunk.sum(axis=0, dtype=np.float64)) for chunk in row_chunks(features, rows)]
            for rows in subsets]


def partition_moments(means: list[np.ndarray], subsets: list[np.ndarray], *blocks: np.ndarray) -> list:
    """Per subset, the :class:`GaussianMoments` of its rows in these blocks about its mean (count 0 without rows)."""
    features = BlockRows(blocks)
    nothing = np.empty((0, blocks[0].shape[1]))
    return [reduce(operator.add, (GaussianMoments.of(chunk, mean) for chunk in row_chunks(features, rows)),
                   GaussianMoments.of(nothing, mean))
            for mean, rows in zip(means, subsets)]


def add_moments(first: list, second: list) -> list:
    """Two partitions' moments added subset by subset."""
    return [a + b for a, b in zip(first, second)]


def take_rows(rows: np.ndarray, *blocks: np.ndarray) -> np.ndarray:
    return BlockRows(blocks)[rows]


def fit_on(factory, order: np.ndarray, *parts: np.ndarray):
    """``factory()`` fitted on the rows gathered by partition, put back in the order of the subset."""
    return factory().fit(np.concatenate(parts)[order])


def score_partition(detectors: list, rows: np.ndarray, *blocks: np.ndarray) -> np.ndarray:
    return score_rows(detectors, BlockRows(blocks), rows)


class EmbedBatches:
    """A Ray Data actor: builds the encoder once, then embeds one batch of rows per call."""

    def __init__(self, kind: str, encoder) -> None:
        self.kind = kind
        # An image encoder is rebuilt here so that its device (auto: CUDA when present) is this node's.
        self.encoder = ImageEncoder(encoder.config) if isinstance(encoder, ImageEncoder) else encoder

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        return {ROW: batch[ROW].to_numpy(), "embedding": self.encoder.embed(batch_dataset(self.kind, batch))}


class ScoreBatches(EmbedBatches):
    """A Ray Data actor: embeds one batch of rows per call and scores it under ``detector``."""

    def __init__(self, kind: str, encoder, detector) -> None:
        super().__init__(kind, encoder)
        self.detector = detector

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        embedded = super().__call__(batch)
        return {ROW: embedded[ROW], "score": self.detector.score_samples(check_finite(embedded["embedding"]))}


def rows_frame(dataset: Dataset) -> pd.DataFrame:
    """The samples as a table with their positions: ``(row, path)`` for images, the table's rows otherwise."""
    if dataset.kind == IMAGES:
        return pd.DataFrame({ROW: np.arange(len(dataset)), PATH: [str(path) for path in dataset.paths or []]})
    frame = dataset.table.copy()
    frame.columns = [str(column) for column in frame.columns]  # as the table encoder reads them; Ray Data needs str
    frame[ROW] = np.arange(len(frame))
    return frame


def batch_dataset(kind: str, batch: pd.DataFrame) -> Dataset:
    """The :class:`Dataset` of one batch of :func:`rows_frame` rows: what an encoder embeds."""
    ids = [str(row) for row in batch[ROW]]
    if kind == IMAGES:
        return Dataset(kind, ids, Path(), "", paths=[Path(path) for path in batch[PATH]])
    return Dataset(kind, ids, Path(), "", table=batch.drop(columns=ROW).reset_index(drop=True))
