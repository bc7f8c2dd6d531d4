"""Batched embedding of image datasets with a frozen pretrained backbone."""
from __future__ import annotations

import errno
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from core.config import FitConfig
from core.data.dataset import Dataset
from core.data.decode import read_rgb
from core.files import disk_errors
from core.mapped import MappedPages
from core.models.device import resolve_device
from core.models.pretrained import load_backbone
from core.progress import QUIET, Monitor

log = logging.getLogger(__name__)


def embedding_memmap(path: Path | str, n: int, dim: int) -> np.memmap:
    """A new ``(n, dim) float32`` ``.npy`` file at ``path``, memory-mapped for writing.

    Pass it as ``out`` to :meth:`ImageEncoder.embed` to keep embeddings on disk; the file is a plain
    ``.npy``, so ``np.load(path, mmap_mode="r")`` maps it again without reading it into memory.
    """
    path = Path(path)
    with disk_errors(path):
        rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(int(n), int(dim)))
        # Reserve the blocks now: on a full disk this is a clear error, where writing into a sparse
        # mapping later would kill the process (SIGBUS) in the middle of extraction.
        with open(path, "r+b") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, path.stat().st_size)
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without fallocate
                    raise
    return rows


class ImageEncoder:
    """Embeds images as pooled multi-scale features of a pretrained backbone (:mod:`core.models.pretrained`).

    When a core is free for it (on a GPU, or when torch uses fewer threads than there are cores),
    decoding of the next batch overlaps with the forward pass of the current one in a reader
    thread (PIL releases the GIL while decoding). When torch already occupies every core, the
    reader would only compete with it and slow the forward pass down, so batches are then decoded
    in turn (docs/benchmarks.md, "Targets of issue 2 at a glance", the speed row). On the CPU the
    network runs in ``channels_last`` layout, the faster one there.

    Parameters
    ----------
    config : FitConfig
        Uses ``backbone``, ``weights``, ``image_size``, ``feature_layers``, ``device`` and ``batch_size``.
    """

    kind = "images"

    def __init__(self, config: FitConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)

    @property
    def model(self):
        return load_backbone(self.config.backbone, self.config.image_size, self.device.type, self.config.weights)

    def fit(self, dataset: Dataset, monitor: Monitor = QUIET) -> "ImageEncoder":
        """Nothing to learn for a frozen backbone; present for the encoder interface."""
        return self

    @property
    def embedding_dim(self) -> int:
        """D, the width of one embedding: the channels of ``feature_layers``, summed."""
        model = self.model
        return sum(model.channels(layer) for layer in self.config.feature_layers)

    def embed(
        self,
        dataset: Dataset,
        monitor: Monitor = QUIET,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Return ``(N, D) float32`` embeddings, one row per image of ``dataset``.

        Each batch's rows are written into the output as soon as they are computed, so memory is
        one batch of pixels and features plus the output itself, never a second copy of it.

        Parameters
        ----------
        dataset : Dataset
            Images (``paths``), embedded in order.
        monitor : Monitor
            Gets ``report("embed", images_done, images_total)`` after every batch and is checked
            between batches.
        out : (N, D) float32 array, optional
            Where to write the rows (``D`` is :attr:`embedding_dim`); default: a new array. A
            writable ``np.memmap`` on a file (e.g. from :func:`embedding_memmap`) keeps the
            embeddings on disk: the pages of finished batches are handed back to the operating
            system as the rows are written, so resident memory stays flat however large N is.

        Returns
        -------
        (N, D) float32 array
            ``out`` itself when given.

        Examples
        --------
        >>> rows = embedding_memmap(staging / "embeddings.npy", len(dataset), encoder.embedding_dim)  # doctest: +SKIP
        >>> encoder.embed(dataset, out=rows)                                                          # doctest: +SKIP
        """
        paths = dataset.paths or []
        n, width = len(paths), self.embedding_dim
        if out is None:
            out = np.empty((n, width), np.float32)
        elif out.shape != (n, width) or out.dtype != np.float32:
            raise ValueError(f"out must be a ({n}, {width}) float32 array for this data and feature_layers, "
                             f"got {out.shape} {out.dtype}")
        size, batch_size = self.config.image_size, self.config.batch_size
        starts = range(0, n, batch_size)
        model, layers = self.model, self.config.feature_layers
        pages = MappedPages.of(out)
        started = time.perf_counter()

        def read_batch(start: int) -> np.ndarray:
            return np.stack([read_rgb(path, size) for path in paths[start : start + batch_size]])

        with ThreadPoolExecutor(max_workers=1) as reader, torch.inference_mode():
            pending = reader.submit(read_batch, starts[0]) if starts and self._overlap else None
            for index, start in enumerate(starts):
                monitor.check()
                if self._overlap:
                    pixels = pending.result()
                    if index + 1 < len(starts):
                        pending = reader.submit(read_batch, starts[index + 1])
                else:
                    pixels = read_batch(start)
                done = min(start + batch_size, n)
                out[start:done] = self._forward(model, pixels, layers)
                if pages is not None:
                    pages.release(done)
                rate = done / max(time.perf_counter() - started, 1e-9)
                monitor.report("embed", done, n, f"{rate:.1f} images/s")
        return out

    @property
    def _overlap(self) -> bool:
        """Decode in a reader thread only when a core is free for it (see the class docstring)."""
        return self.device.type == "cuda" or torch.get_num_threads() < (os.cpu_count() or 1)

    def _forward(self, model, pixels: np.ndarray, layers: tuple[str, ...]) -> np.ndarray:
        batch = model.normalize(torch.from_numpy(pixels)).to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            batch = batch.contiguous(memory_format=torch.channels_last)
        return model.pooled(batch, layers).float().cpu().numpy()
