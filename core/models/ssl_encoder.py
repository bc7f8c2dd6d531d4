"""A representation learned self-supervised on the training data, and re-learned on the kept data.

:class:`SelfSupervisedEncoder` trains a backbone (:mod:`core.models.backbones`) with an objective
(:mod:`core.models.objectives`) through the one training loop (:func:`core.train.train`). STOC
self-training calls :meth:`SelfSupervisedEncoder.retrain` after each refinement round: the same
weights keep training, on the kept samples only, so anomalies stop shaping the features meant
to expose them. Images are decoded once at ``image_size`` and held in memory as uint8
(``N x S x S x 3`` bytes: 150 MB for 1,000 images at 224 px); tables are robust-scaled by a
:class:`~core.models.tabular.TableEncoder` first.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from core.config import FitConfig
from core.data.dataset import IMAGES, Dataset
from core.data.decode import read_rgb
from core.distributed import ddp
from core.files import atomic_write_text
from core.models.backbones import FINETUNE_SUFFIX, image_batch, load_state, make_backbone, save_state
from core.models.device import resolve_device
from core.models.objectives import make_objective
from core.models.tabular import TableEncoder
from core.progress import QUIET, Monitor
from core.train import TrainConfig, train

log = logging.getLogger(__name__)

WEIGHTS_FILE = "ssl_encoder.safetensors"
INFO_FILE = "ssl_encoder.json"
NORMALISED_OBJECTIVES = ("contrastive", "contrastive-imix")
"""Objectives whose image embedding is compared by angle: the detectors see it L2-normalised (as in
DROC). Table embeddings are not normalised: an outlying row maps to a large embedding along a
normal row's direction, and normalising it away put outliers in the dense part of the data
(docs/benchmarks.md, "Targets of issue 5 (self-supervised representations, STOC self-training) at a
glance")."""


class SelfSupervisedEncoder:
    """Encoder of a run whose ``config.objective`` is not ``none`` (config resolved by ``for_data``).

    With a ``checkpoint_dir``, every training stage (``initial``, then ``round-<r>`` for each
    :meth:`retrain`) checkpoints into its own subfolder after every epoch and resumes from it
    (:func:`core.train.train`), so a fit restarted after a crash skips the epochs already done.
    """

    def __init__(self, config: FitConfig, kind: str, checkpoint_dir: Path | None = None) -> None:
        self.config = config
        self.kind = kind
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.device = resolve_device(config.device)
        self.table = TableEncoder() if kind != IMAGES else None
        self.model: torch.nn.Module | None = None
        self.objective: torch.nn.Module | None = None
        self._train_inputs: np.ndarray | None = None
        self.rounds_trained = 0

    @property
    def backbone_name(self) -> str:
        if self.config.encoder == "pretrained-finetune":
            return f"{self.config.backbone}{FINETUNE_SUFFIX}"
        return self.config.encoder

    # ------------------------------------------------------------------ training

    def fit(self, dataset: Dataset, monitor: Monitor = QUIET) -> "SelfSupervisedEncoder":
        """Train the backbone and the objective's heads on every sample of ``dataset`` (labels unused)."""
        if self.table is not None:
            self.table.fit(dataset)
        self._train_inputs = self._inputs(dataset, monitor)
        self.model = self._new_model(self._train_inputs)
        self.objective = make_objective(self.config.objective, self.model.embedding_dim, self.kind).to(self.device)
        self._train(self._train_inputs, self.config.epochs, "train", monitor)
        return self

    def retrain(self, kept: np.ndarray, monitor: Monitor = QUIET) -> None:
        """Keep training on the kept training samples only (``kept``: (N,) bool over the fit's data).

        Under DDP (:mod:`core.distributed.ddp`) every process retrains on rank 0's ``kept``, so
        the processes train on the same samples even if their refinement rounds disagreed.
        """
        if self._train_inputs is None:
            raise RuntimeError("retrain() needs fit() first")
        kept = ddp.from_main(np.asarray(kept, bool))
        self.rounds_trained += 1
        stage = f"retrain round {self.rounds_trained}"
        self._train(self._train_inputs[kept], self.config.retrain_epochs, stage, monitor)

    def _train(self, inputs: np.ndarray, epochs: int, stage: str, monitor: Monitor) -> None:
        config = TrainConfig(
            epochs=epochs, batch_size=min(self.config.batch_size * 2, max(len(inputs) // 2, 2)),
            seed=self.config.seed + self.rounds_trained, device=self.config.device,
            **({"learning_rate": self.config.learning_rate} if self.config.learning_rate else {}),
        ).validate()
        stage_dir = None
        if self.checkpoint_dir is not None:
            stage_dir = self.checkpoint_dir / (f"round-{self.rounds_trained}" if self.rounds_trained else "initial")
        result = train(self.model, self.objective, inputs, config, checkpoint_dir=stage_dir,
                       monitor=monitor.renamed(stage))
        log.info("%s: %d epochs, loss %.4f -> %.4f in %.1f s", stage, result.epochs_run,
                 result.losses[0], result.losses[-1], result.seconds)

    def _new_model(self, inputs: np.ndarray) -> torch.nn.Module:
        torch.manual_seed(self.config.seed)
        return self._backbone(self.backbone_name, n_features=inputs.shape[1] if self.kind != IMAGES else None)

    def _backbone(self, name: str, n_features: int | None) -> torch.nn.Module:
        """Backbone ``name`` for this kind of data, on the device (``n_features``: the row width of a table)."""
        image_size = self.config.image_size if self.kind == IMAGES else None
        return make_backbone(
            name, image_size=image_size, n_features=n_features, feature_layers=self.config.feature_layers,
        ).to(self.device)

    # ------------------------------------------------------------------ embedding

    def embed(self, dataset: Dataset, monitor: Monitor = QUIET) -> np.ndarray:
        """``(N, D) float32`` embeddings of ``dataset`` under the current weights."""
        return self.embed_inputs(self._inputs(dataset, monitor), monitor)

    def embed_training_data(self, monitor: Monitor = QUIET) -> np.ndarray:
        """Embeddings of the data :meth:`fit` saw, without decoding it again."""
        return self.embed_inputs(self._train_inputs, monitor)

    def embed_inputs(self, inputs: np.ndarray, monitor: Monitor = QUIET) -> np.ndarray:
        """``(N, D) float32`` embeddings of decoded images ``(N, S, S, 3) uint8`` or scaled rows ``(N, F)``."""
        self.model.eval()
        rows = []
        batch = self.config.batch_size
        with torch.inference_mode():
            for start in range(0, len(inputs), batch):
                monitor.check()
                rows.append(self.model(self._to_tensor(inputs[start : start + batch])).float().cpu().numpy())
                monitor.report("embed", min(start + batch, len(inputs)), len(inputs))
        embeddings = np.concatenate(rows).astype(np.float32)
        if self.kind == IMAGES and self.config.objective in NORMALISED_OBJECTIVES:
            embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        return embeddings

    def _to_tensor(self, chunk: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device)
        return image_batch(tensor) if self.kind == IMAGES else tensor.float()

    def _inputs(self, dataset: Dataset, monitor: Monitor) -> np.ndarray:
        """Images as ``(N, S, S, 3) uint8``, tables as ``(N, F) float32`` robust-scaled rows."""
        if self.table is not None:
            return self.table.embed(dataset, monitor)
        size = self.config.image_size
        images = np.empty((len(dataset), size, size, 3), dtype=np.uint8)
        for index, path in enumerate(dataset.paths or []):
            if index % 256 == 0:
                monitor.check()
                monitor.report("decode", index, len(dataset), "reading images for training")
            images[index] = read_rgb(path, size)
        return images

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path, suffix: str = "") -> None:
        """Write the backbone weights (safetensors) and what is needed to rebuild it."""
        directory = Path(directory)
        save_state(self.model, directory / WEIGHTS_FILE.replace(".safetensors", f"{suffix}.safetensors"))
        if suffix:
            return
        info = {"backbone": self.backbone_name, "n_features": None}
        if self.table is not None:
            self.table.save(directory)
            info["n_features"] = len(self.table.feature_names)
        atomic_write_text(directory / INFO_FILE, json.dumps(info, indent=1))

    @classmethod
    def load(cls, config: FitConfig, kind: str, directory: Path) -> "SelfSupervisedEncoder":
        directory = Path(directory)
        encoder = cls(config, kind)
        info = json.loads((directory / INFO_FILE).read_text())
        if encoder.table is not None:
            encoder.table = TableEncoder.load(directory)
        encoder.model = encoder._backbone(info["backbone"], info["n_features"])
        load_state(encoder.model, directory / WEIGHTS_FILE)
        return encoder
