"""Batched embedding of image datasets with a frozen pretrained backbone."""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from core.config import FitConfig
from core.data.dataset import Dataset
from core.data.images import read_rgb
from core.models.device import resolve_device
from core.models.efficientnet import load_backbone, normalize_images
from core.progress import CancelToken, ProgressCallback, ProgressEvent, ignore_progress

log = logging.getLogger(__name__)


class ImageEncoder:
    """Embeds images as pooled multi-scale features of a pretrained EfficientNet-Lite.

    When a core is free for it (on a GPU, or when torch uses fewer threads than there are cores),
    decoding of the next batch overlaps with the forward pass of the current one in a reader
    thread (PIL releases the GIL while decoding). When torch already occupies every core, the
    reader would only compete with it: measured on 2 cores at 224 px, overlapped decoding ran at
    0.83x of a bare forward pass, so batches are then decoded in turn (bench/speed.py). On the CPU
    the network runs in ``channels_last`` layout, which is 2-4x faster there than the default.

    Parameters
    ----------
    config : FitConfig
        Uses ``backbone``, ``image_size``, ``feature_layers``, ``device`` and ``batch_size``.
    """

    kind = "images"

    def __init__(self, config: FitConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)

    @property
    def model(self):
        return load_backbone(self.config.backbone, self.config.image_size, self.device.type)

    def fit(self, dataset: Dataset) -> "ImageEncoder":
        """Nothing to learn for a frozen backbone; present for the encoder interface."""
        return self

    def embed(
        self,
        dataset: Dataset,
        on_progress: ProgressCallback = ignore_progress,
        cancel: CancelToken | None = None,
    ) -> np.ndarray:
        """Return ``(N, D) float32`` embeddings, one row per image of ``dataset``."""
        paths = dataset.paths or []
        size, batch_size = self.config.image_size, self.config.batch_size
        batches = [paths[start : start + batch_size] for start in range(0, len(paths), batch_size)]
        model, layers = self.model, self.config.feature_layers
        rows: list[np.ndarray] = []
        started = time.perf_counter()

        def read_batch(batch_paths):
            return np.stack([read_rgb(path, size) for path in batch_paths])

        with ThreadPoolExecutor(max_workers=1) as reader, torch.inference_mode():
            pending = reader.submit(read_batch, batches[0]) if batches and self._overlap else None
            for index in range(len(batches)):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                if self._overlap:
                    pixels = pending.result()
                    if index + 1 < len(batches):
                        pending = reader.submit(read_batch, batches[index + 1])
                else:
                    pixels = read_batch(batches[index])
                rows.append(self._forward(model, pixels, layers))
                done = min((index + 1) * batch_size, len(paths))
                rate = done / max(time.perf_counter() - started, 1e-9)
                on_progress(ProgressEvent("embed", done, len(paths), f"{rate:.1f} images/s"))
        width = sum(model.channels(layer) for layer in layers)
        return np.concatenate(rows) if rows else np.zeros((0, width), np.float32)

    @property
    def _overlap(self) -> bool:
        """Decode in a reader thread only when a core is free for it (see the class docstring)."""
        return self.device.type == "cuda" or torch.get_num_threads() < (os.cpu_count() or 1)

    def _forward(self, model, pixels: np.ndarray, layers: tuple[str, ...]) -> np.ndarray:
        batch = normalize_images(torch.from_numpy(pixels)).to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            batch = batch.contiguous(memory_format=torch.channels_last)
        return model.pooled(batch, layers).float().cpu().numpy()
