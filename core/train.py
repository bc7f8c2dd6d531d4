"""One training loop for every self-supervised objective.

An objective is an ``nn.Module`` that owns its augmentations and heads and follows one contract::

    objective.loss(encoder, batch, generator) -> scalar tensor

``batch`` is ``(B, 3, H, W) float32`` RGB in [0, 1] (channels-last memory layout) for images, or
``(B, F) float32`` rows for tables, already on the training device. ``generator`` is a CPU
``torch.Generator``: draw the augmentation's random numbers with it on the CPU and move them to
``batch.device``, so the same seed gives the same augmentations on every device. The objective's
own parameters (heads) are trained together with the encoder's.

How a run goes, read top to bottom in :func:`train`:

- optimiser: SGD with Nesterov momentum 0.9 (the optimiser of the CutPaste, DROC, MoCo and
  rotation-prediction papers), weight decay on weights but not on biases and norm parameters;
- learning rate: per-step cosine decay to 0, after an optional linear warmup, computed once up front;
- device: ``auto`` picks CUDA when present; on CUDA the forward pass runs under
  ``torch.autocast`` in bfloat16 (same exponent range as float32, so no loss scaling; float16 with
  a ``GradScaler`` on GPUs without bfloat16) and batches travel from pinned memory; on the CPU
  everything is float32. Conv nets run in channels-last layout on both, the faster layout for
  convolutions on the CPU as on the GPU;
- randomness: the shuffle generator, the augmentation generator and torch's global generator
  (dropout) are re-seeded at the start of every epoch from ``(seed, epoch)``, so the random state
  of a run is a function of the epoch it is at: a resumed run equals an uninterrupted one;
  torch's global random state is restored when training returns;
- a non-finite loss stops training with :class:`~core.errors.TrainingError` before the step that
  would spread it into the weights;
- checkpoints: every ``checkpoint_every`` epochs and after the last, the encoder, objective and
  optimiser state are saved to the checkpoint folder (:mod:`core.checkpoints`: its layout, and what
  a checkpoint must match to be resumed);
- several processes (torch DDP, inside :func:`core.distributed.ddp.torchrun_process_group`):
  every process draws the same shuffle and takes its own equal slice of each batch, so the batch
  size, the steps and the learning-rate schedule stay those of one process; DDP averages the
  gradients; augmentations and dropout are seeded per process from ``(seed, epoch, rank)``; the
  step loss is averaged over the processes, so the progress, the loss history and the non-finite
  guard are the same everywhere. BatchNorm normalises with each process's own slice, and DDP copies
  rank 0's running statistics to the others before every step and once more at the end. Rank 0
  alone reads and writes checkpoints and sends a resumed state to the others.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from core.checkpoints import CheckpointFolder, training_identity
from core.config import DEVICES
from core.distributed import ddp
from core.errors import ConfigError, DataError, TrainingError
from core.models.backbones import image_batch
from core.models.device import resolve_device
from core.progress import QUIET, Monitor

log = logging.getLogger(__name__)

MOMENTUM = 0.9


class Objective(Protocol):
    """What :func:`train` needs from a self-supervised objective (an ``nn.Module``)."""

    def loss(self, encoder: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


@dataclass(frozen=True)
class TrainConfig:
    """How an encoder is trained.

    Attributes
    ----------
    epochs : int
        Passes over the data.
    batch_size : int
        Samples per step (over all processes under DDP, each taking an equal share). The last
        incomplete batch of an epoch is dropped when there are more samples than one batch; with
        fewer, every step uses all of them.
    learning_rate : float
        Peak learning rate of SGD (Nesterov momentum 0.9); it decays to 0 along a cosine. 0.03 at
        batch 64 suits training from scratch; use about 0.003-0.01 to fine-tune a pretrained backbone.
    weight_decay : float
        L2 penalty on weights (not on biases and normalisation parameters).
    warmup_epochs : int
        Epochs of linear warmup from ``learning_rate / warmup steps`` to ``learning_rate``; must be
        fewer than ``epochs``.
    seed : int
        Seeds shuffling, augmentation and dropout; same seed, same data, same device -> same weights.
    device : str
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    amp : bool
        Mixed precision on CUDA (bfloat16 autocast); ignored on the CPU.
    checkpoint_every : int
        Write a checkpoint after every this many epochs (and after the last) when :func:`train`
        is given a checkpoint folder.
    """

    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 0.03
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    checkpoint_every: int = 1

    def validate(self) -> "TrainConfig":
        """Return self, or raise ConfigError naming the bad value and the allowed ones."""
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2 (batch normalisation needs two samples), got {self.batch_size}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup_epochs must be in [0, epochs) = [0, {self.epochs}), got {self.warmup_epochs}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1 epoch, got {self.checkpoint_every}")
        return self


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did.

    Attributes
    ----------
    losses : list of float
        Mean loss of every epoch of the run, those before a resume included.
    epochs_run : int
        Epochs trained by this call (``len(losses) - (resumed_from or 0)``).
    seconds : float
        Wall time of this call.
    resumed_from : int or None
        Epochs already done by the checkpoint this call resumed from; None for a fresh start.
    device : str
        ``cpu`` or ``cuda``.
    """

    losses: list[float] = field(default_factory=list)
    epochs_run: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None
    device: str = "cpu"


def train(
    encoder: nn.Module,
    objective: nn.Module,
    data: torch.Tensor | np.ndarray,
    config: TrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    monitor: Monitor = QUIET,
) -> TrainResult:
    """Train ``encoder`` (and the objective's heads) with ``objective.loss`` on ``data``.

    Both modules are trained in place, moved to the training device, and left in eval mode.

    Parameters
    ----------
    encoder : nn.Module
        Maps a batch to embeddings, e.g. from :func:`core.models.backbones.make_backbone`.
    objective : nn.Module
        Has ``loss(encoder, batch, generator) -> scalar tensor`` (see the module docstring).
    data : ndarray or Tensor
        Images ``(N, H, W, 3) uint8`` or table rows ``(N, F)`` float (already scaled), N >= 2.
    config : TrainConfig
        Epochs, batch size, learning rate, seed, device.
    checkpoint_dir : Path, optional
        Folder for checkpoints (:mod:`core.checkpoints`). When it holds one written with the same
        config, data and architectures, training resumes from it (a finished run is not trained
        again); a checkpoint of anything else is replaced. Under DDP, rank 0's folder is the one
        used (the other processes' value is ignored) and only rank 0 reads and writes it.
    monitor : Monitor
        Gets ``report("train", step, total_steps, "epoch e/E loss x")`` after every step and is
        checked before every step; :class:`~core.errors.Cancelled` propagates and the checkpoint
        of the last finished epoch stays.

    Returns
    -------
    TrainResult

    Raises
    ------
    TrainingError
        When the loss becomes NaN or infinite.
    DataError
        For data of another shape or type, or fewer than 2 samples.
    ConfigError
        Under DDP, when a batch leaves fewer than 2 samples per process.
    """
    config = config.validate()
    device = resolve_device(config.device)
    samples = _as_training_tensor(data)
    images = samples.dtype == torch.uint8
    n = len(samples)
    batch_size = min(config.batch_size, n)
    share = _batch_share(batch_size)
    steps_per_epoch = n // batch_size
    total_steps = config.epochs * steps_per_epoch
    learning_rates = cosine_schedule(config.learning_rate, total_steps, config.warmup_epochs * steps_per_epoch)

    encoder.to(device)
    objective.to(device)
    if images:
        encoder.to(memory_format=torch.channels_last)
        objective.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        _parameter_groups((encoder, objective), config.weight_decay),
        lr=float(learning_rates[0]), momentum=MOMENTUM, nesterov=True,
    )
    use_amp = config.amp and device.type == "cuda"
    amp_dtype = torch.float16 if use_amp and not torch.cuda.is_bf16_supported() else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    checkpoint_dir = ddp.from_main(checkpoint_dir)
    checkpoints = None
    losses: list[float] = []
    resumed_from = None
    if checkpoint_dir is not None:
        identity = training_identity(asdict(config), device, samples, encoder, objective)
        checkpoints = CheckpointFolder(checkpoint_dir, identity, encoder, objective, optimizer, scaler)
        resumed = checkpoints.resume(device)
        if resumed is not None:
            losses, resumed_from = resumed, len(resumed)
            log.info("resuming training from epoch %d/%d in %s", resumed_from, config.epochs, checkpoint_dir)
    saved_epoch = resumed_from  # the epoch the checkpoint on disk holds, for the error message
    step_loss = ddp.wrap(_StepLoss(encoder, objective), device)  # under DDP, also rank 0's weights to all

    started = time.perf_counter()
    step_loss.train()
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        for epoch in range(len(losses), config.epochs):
            shuffle, augment = _seed_epoch(config.seed, epoch, ddp.rank(), device)
            order = torch.randperm(n, generator=shuffle)[: steps_per_epoch * batch_size].view(steps_per_epoch, batch_size)
            order = order[:, share]  # this process's slice of every batch
            epoch_started, epoch_total = time.perf_counter(), 0.0
            for index, rows in enumerate(order):
                monitor.check()
                step = epoch * steps_per_epoch + index
                for group in optimizer.param_groups:
                    group["lr"] = float(learning_rates[step])
                batch = _to_device(samples, rows, device, images)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    loss = step_loss(batch, augment)
                value = ddp.mean_over_processes(loss.detach())
                if not math.isfinite(value):
                    where = f"epoch {epoch + 1}/{config.epochs}, step {index + 1}/{steps_per_epoch}"
                    raise TrainingError(
                        f"the training loss became {value} at {where} (learning rate {learning_rates[step]:.3g}); "
                        f"training stopped. Lower learning_rate (now {config.learning_rate:g}, try "
                        f"{config.learning_rate / 10:g}) or add warmup_epochs"
                        + (f"; {checkpoint_dir} keeps the checkpoint of epoch {saved_epoch}" if saved_epoch else "")
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                epoch_total += value
                message = f"epoch {epoch + 1}/{config.epochs} loss {value:.4f}"
                monitor.report("train", step + 1, total_steps, message)
            losses.append(epoch_total / steps_per_epoch)
            log.info("epoch %d/%d loss %.4f (%.1f s)", epoch + 1, config.epochs, losses[-1], time.perf_counter() - epoch_started)
            done = epoch + 1
            if checkpoints is not None and (done % config.checkpoint_every == 0 or done == config.epochs):
                if ddp.is_main():
                    checkpoints.save(losses)
                ddp.barrier()
                saved_epoch = done
    ddp.copy_buffers_from_main(encoder, objective)  # the last step updated each process's own statistics
    encoder.eval()
    objective.eval()
    return TrainResult(
        losses=losses,
        epochs_run=len(losses) - (resumed_from or 0),
        seconds=time.perf_counter() - started,
        resumed_from=resumed_from,
        device=device.type,
    )


def cosine_schedule(base_lr: float, total_steps: int, warmup_steps: int = 0) -> np.ndarray:
    """Per-step learning rates ``(total_steps,) float64``: linear warmup, then cosine decay to 0.

    Warmup rises from ``base_lr / warmup_steps`` to ``base_lr`` over ``warmup_steps`` steps; the
    remaining steps follow ``base_lr * (1 + cos(pi * t / T)) / 2`` for ``t = 0 .. T - 1``.
    """
    warmup = base_lr * np.arange(1, warmup_steps + 1) / max(warmup_steps, 1)
    decay_steps = total_steps - warmup_steps
    decay = 0.5 * base_lr * (1.0 + np.cos(np.pi * np.arange(decay_steps) / max(decay_steps, 1)))
    return np.concatenate([warmup, decay])


def _as_training_tensor(data: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Images as ``(N, H, W, 3) uint8`` or rows as ``(N, F) float32``, on the CPU (no copy when possible)."""
    tensor = data.detach().cpu() if isinstance(data, torch.Tensor) else torch.as_tensor(np.asarray(data))
    if tensor.ndim == 4 and tensor.shape[-1] == 3 and tensor.dtype == torch.uint8:
        tensor = tensor.contiguous()
    elif tensor.ndim == 2 and (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        tensor = tensor.to(torch.float32).contiguous()
        if not torch.isfinite(tensor).all():
            raise DataError("the training table holds NaN or infinite values; encode it with TableEncoder first")
    else:
        raise DataError(
            "training data must be images as (N, H, W, 3) uint8 or table rows as (N, F) float32; "
            f"got shape {tuple(tensor.shape)} of {tensor.dtype}"
        )
    if len(tensor) < 2:
        raise DataError(f"training needs at least 2 samples, got {len(tensor)}")
    return tensor


def _to_device(samples: torch.Tensor, rows: torch.Tensor, device: torch.device, images: bool) -> torch.Tensor:
    """Gather ``rows`` of ``samples`` onto ``device``; images become ``(B, 3, H, W)`` float in [0, 1]."""
    batch = samples.index_select(0, rows)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return image_batch(batch) if images else batch


class _StepLoss(nn.Module):
    """The encoder and the objective as one module whose forward pass is the objective's loss.

    DDP averages the gradients of the forward passes it runs, so the loss must be its module's output.
    """

    def __init__(self, encoder: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.objective = objective

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.objective.loss(self.encoder, batch, generator)


def _batch_share(batch_size: int) -> slice:
    """This process's columns of a ``(steps, batch_size)`` batch order: all of them in one process.

    Under DDP each process takes ``batch_size // world_size`` samples (the few left over are unused),
    so equal shares make the averaged gradient the gradient of the samples used.
    """
    processes = ddp.world_size()
    size = batch_size // processes
    if size < 2:
        raise ConfigError(
            f"a batch of {batch_size} over {processes} processes leaves {size} sample(s) per process; "
            f"batch normalisation and contrastive losses need at least 2: use batch_size >= {2 * processes} "
            "or fewer processes"
        )
    start = ddp.rank() * size
    return slice(start, start + size)


def _seed_epoch(seed: int, epoch: int, rank: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """Shuffle and augmentation generators for ``epoch``; torch's global generator re-seeded too.

    The shuffle depends on ``(seed, epoch)`` only, so every process of a DDP run draws the same
    batches; a process of rank > 0 draws its own augmentations and dropout from ``(seed, epoch, rank)``.
    """
    shuffle_seed, augment_seed, global_seed = _seeds(seed, epoch)
    if rank > 0:
        _, augment_seed, global_seed = _seeds(seed, epoch, rank)
    torch.default_generator.manual_seed(global_seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(global_seed)
    return torch.Generator().manual_seed(shuffle_seed), torch.Generator().manual_seed(augment_seed)


def _seeds(*entropy: int) -> tuple[int, int, int]:
    """Three independent seeds drawn from ``entropy``."""
    first, second, third = (int(s) for s in np.random.SeedSequence(list(entropy)).generate_state(3))
    return first, second, third


def _parameter_groups(modules: tuple[nn.Module, ...], weight_decay: float) -> list[dict]:
    """Trainable parameters of ``modules`` (each once): weights decayed, biases and norm parameters not."""
    seen: set[int] = set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad and id(parameter) not in seen:
                seen.add(id(parameter))
                (decay if parameter.ndim > 1 else no_decay).append(parameter)
    if not seen:
        raise ConfigError("the encoder and the objective have no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
