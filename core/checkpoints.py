"""Training checkpoints: the folder :func:`core.train.train` writes after an epoch and resumes from.

A checkpoint folder holds the state of one finished epoch and the file that points at it::

    checkpoint.json        identity, epoch, losses, folder, scaler (replaced atomically, last)
    epoch-NNNN/            encoder.safetensors, objective.safetensors, optimizer.pt

``checkpoint.json`` is written after the epoch's folder and names it, so a crash mid-write leaves the
previous checkpoint valid; older ``epoch-*`` folders are deleted once it points elsewhere. A checkpoint
is resumed only when its *identity* (:func:`training_identity`: the config, device, data, architectures
and number of processes) matches the run's; anything else is replaced.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from core.distributed import ddp
from core.errors import RunError
from core.files import atomic_write_bytes, read_json, write_json
from core.models.backbones import load_state, save_state

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_FORMAT = 1


def training_identity(
    config: dict, device: torch.device, samples: torch.Tensor, encoder: nn.Module, objective: nn.Module,
) -> dict:
    """What a checkpoint must match to be resumed: config, device, data, architectures, and the
    number of processes of a DDP run (absent for one process, so its checkpoints stay as they were).

    ``config``: the training loop's settings as a dict (``asdict(TrainConfig)``); ``samples``: the
    contiguous training tensor. ``checkpoint_every`` is left out: it does not change the result.
    """
    settings = {key: value for key, value in config.items() if key != "checkpoint_every"}
    data_hash = hashlib.blake2b(samples.numpy(), digest_size=16)
    architectures = []
    for module in (encoder, objective):
        layout = ";".join(f"{name}:{tuple(value.shape)}" for name, value in module.state_dict().items())
        architectures.append(f"{type(module).__qualname__}:{hashlib.blake2b(layout.encode(), digest_size=8).hexdigest()}")
    identity = {
        "format": CHECKPOINT_FORMAT,
        "config": settings,
        "device": device.type,
        "data": {"shape": list(samples.shape), "dtype": str(samples.dtype), "blake2b": data_hash.hexdigest()},
        "encoder": architectures[0],
        "objective": architectures[1],
    }
    if ddp.world_size() > 1:
        identity["processes"] = ddp.world_size()
    return json.loads(json.dumps(identity))


class CheckpointFolder:
    """The checkpoint folder of one training run and the state it saves and restores.

    Parameters
    ----------
    directory : Path
        The folder (created on the first save).
    identity : dict
        From :func:`training_identity`.
    encoder, objective : nn.Module
        Trained together; their states are saved as safetensors.
    optimizer : torch.optim.Optimizer
    scaler : torch.amp.GradScaler
        Saved with the optimiser so that a resumed run equals an uninterrupted one.
    """

    def __init__(
        self, directory: Path, identity: dict, encoder: nn.Module, objective: nn.Module,
        optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    ) -> None:
        self.directory = Path(directory)
        self.identity = identity
        self.encoder = encoder
        self.objective = objective
        self.optimizer = optimizer
        self.scaler = scaler

    def save(self, losses: list[float]) -> None:
        """Write the state of the finished epoch ``len(losses)`` and point ``checkpoint.json`` at it."""
        folder = f"epoch-{len(losses):04d}"
        target = self.directory / folder
        save_state(self.encoder, target / "encoder.safetensors")
        save_state(self.objective, target / "objective.safetensors")
        atomic_write_bytes(target / "optimizer.pt", _optimizer_bytes(self.optimizer))
        write_json(self.directory / CHECKPOINT_FILE, {
            "identity": self.identity, "epoch": len(losses), "losses": losses, "folder": folder,
            "scaler": self.scaler.state_dict(),
        })
        for old in self.directory.glob("epoch-*"):
            if old.is_dir() and old.name != folder:
                shutil.rmtree(old, ignore_errors=True)

    def resume(self, device: torch.device) -> list[float] | None:
        """The epoch losses of a matching checkpoint, its state restored; None for none.

        Under DDP only rank 0 reads the folder and sends the losses and the optimiser and scaler state
        to the other processes (the model's state follows when DDP wraps it), so the folder need only
        be on rank 0's disk.
        """
        resumed = self._load(device) if ddp.is_main() else None
        if ddp.world_size() == 1:
            return resumed
        state = (resumed, _optimizer_bytes(self.optimizer), self.scaler.state_dict()) if resumed is not None else None
        shared = ddp.from_main(state)
        if shared is None:
            return None
        resumed, optimizer_state, scaler_state = shared
        if not ddp.is_main():
            self.optimizer.load_state_dict(torch.load(io.BytesIO(optimizer_state), map_location=device, weights_only=True))
            self.scaler.load_state_dict(scaler_state)
        return resumed

    def _load(self, device: torch.device) -> list[float] | None:
        """Restore a matching checkpoint into the modules and optimiser; its epoch losses, or None."""
        path = self.directory / CHECKPOINT_FILE
        if not path.exists():
            return None
        try:
            saved = read_json(path)
        except (OSError, ValueError) as error:
            log.warning("ignoring the unreadable checkpoint %s (%s); training from the start", path, error)
            return None
        if saved.get("identity") != self.identity:
            log.warning(
                "the checkpoint in %s is of another config, data or model; training from the start and replacing it",
                self.directory,
            )
            return None
        folder = self.directory / saved["folder"]
        try:
            load_state(self.encoder, folder / "encoder.safetensors")
            load_state(self.objective, folder / "objective.safetensors")
            self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
            self.scaler.load_state_dict(saved["scaler"])
        except Exception as error:  # RunError from load_state, OSError, or torch.load refusing the file
            reason = str(error) if isinstance(error, RunError) else f"{type(error).__name__} reading {folder.name}"
            raise RunError(
                f"the checkpoint in {self.directory} is incomplete or damaged ({reason}); "
                "delete that folder to train from the start"
            ) from None
        return [float(loss) for loss in saved["losses"]]


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> bytes:
    """The optimiser's state as ``torch.save`` writes it."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    return buffer.getvalue()
