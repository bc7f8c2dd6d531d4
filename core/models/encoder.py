"""The encoder interface and the choice of encoder for a data set."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from core.config import FitConfig
from core.data.dataset import IMAGES, Dataset
from core.progress import QUIET, Monitor


class Encoder(Protocol):
    """Turns a Dataset into ``(N, D) float32`` embeddings.

    ``fit`` learns from the training data only (a no-op for frozen backbones); long work reports
    its progress to ``monitor`` and checks it between batches (:class:`~core.errors.Cancelled`).
    """

    kind: str

    def fit(self, dataset: Dataset, monitor: Monitor = QUIET) -> "Encoder": ...

    def embed(self, dataset: Dataset, monitor: Monitor = QUIET) -> np.ndarray: ...


def make_encoder(config: FitConfig, dataset: Dataset, *, checkpoint_dir: Path | None = None) -> Encoder:
    """The unfitted encoder the config asks for, for this kind of data (``config`` resolved by ``for_data``).

    ``checkpoint_dir``: where a self-supervised encoder keeps its training checkpoints and resumes
    from them (see :class:`~core.models.ssl_encoder.SelfSupervisedEncoder`); unused by frozen encoders.
    """
    if config.objective != "none":
        from core.models.ssl_encoder import SelfSupervisedEncoder

        return SelfSupervisedEncoder(config, dataset.kind, checkpoint_dir=checkpoint_dir)
    if dataset.kind == IMAGES:
        from core.models.image_encoder import ImageEncoder

        return ImageEncoder(config)
    from core.models.tabular import TableEncoder

    return TableEncoder()


def save_encoder(encoder: Encoder, directory: Path) -> None:
    """Persist what the encoder learned (frozen backbones have nothing to save)."""
    if hasattr(encoder, "save"):
        encoder.save(directory)


def load_encoder(config: FitConfig, kind: str, directory: Path) -> Encoder:
    """Rebuild the encoder of a saved run."""
    if config.objective != "none":
        from core.models.ssl_encoder import SelfSupervisedEncoder

        return SelfSupervisedEncoder.load(config, kind, directory)
    if kind == IMAGES:
        from core.models.image_encoder import ImageEncoder

        return ImageEncoder(config)
    from core.models.tabular import TableEncoder

    return TableEncoder.load(directory)
