"""Training across processes with torch DistributedDataParallel (DDP), launched by ``torchrun``.

torchrun starts one process per device and tells each its place through the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`torchrun_process_group` joins the process group they form; while it is open,
:func:`core.train.train` trains with DDP, each process on its own share of every batch:

>>> with torchrun_process_group("auto"):        # doctest: +SKIP
...     train(encoder, objective, data, config)

Rank 0 is the main process: it alone writes files, and what it decides (a checkpoint to
resume, the kept samples of a refinement round) is sent to the others with :func:`from_main`.
Every helper here is a no-op in a single process, so the same code runs with and without torchrun.
See ``docs/distributed-training.md``.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from core.errors import ConfigError
from core.models.device import resolve_device

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def torchrun_process_group(device: str = "auto") -> Iterator[None]:
    """Join the process group of a torchrun launch for the duration of the block, then leave it.

    Parameters
    ----------
    device : str
        The training device setting (``auto``, ``cpu``, ``cuda``). When it resolves to CUDA the
        processes talk through NCCL and each uses GPU ``cuda:LOCAL_RANK``; on the CPU through gloo.

    Without a torchrun launch (:func:`launched_by_torchrun` is false) nothing happens.
    """
    if not launched_by_torchrun():
        yield
        return
    if resolve_device(device).type == "cuda":
        if "LOCAL_RANK" not in os.environ:
            raise ConfigError("LOCAL_RANK is not set: start distributed training with torchrun")
        local_gpu = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(local_gpu)
        dist.init_process_group("nccl", device_id=local_gpu)
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def world_size() -> int:
    """Number of processes training together (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's place among them, 0 to ``world_size() - 1`` (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this is rank 0, the process that writes files and whose decisions the others follow."""
    return rank() == 0


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` when several processes train.

    Wrapping copies rank 0's parameters and buffers to every process. Then each forward pass first
    copies rank 0's buffers (BatchNorm running statistics) to the others, and each backward pass
    averages the gradients over the processes, so every optimiser step is the same everywhere.
    ``static_graph``: every step uses the same parameters, and parameters no step uses (an
    EfficientNet's head outside its ``feature_layers``) are allowed. In one process, ``module``.

    Parameters
    ----------
    module : nn.Module
        Already on ``device``; its forward pass returns the loss.
    device : torch.device
        The training device; on CUDA, this process's GPU.
    """
    if world_size() == 1:
        return module
    if device.type != "cuda":
        return DistributedDataParallel(module, static_graph=True)
    gpu = device.index if device.index is not None else torch.cuda.current_device()
    return DistributedDataParallel(module, device_ids=[gpu], static_graph=True)


def mean_over_processes(value: torch.Tensor) -> float:
    """The mean of a scalar tensor over all processes (its value in one process)."""
    if world_size() == 1:
        return float(value)
    total = value.detach().to(torch.float32, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return float(total)


def from_main(value: T) -> T:
    """Rank 0's ``value`` (any picklable object) on every process; ``value`` in one process.

    Every process must call it at the same point; the others' ``value`` is ignored.

    >>> kept = from_main(kept)  # every process retrains on rank 0's kept samples  # doctest: +SKIP
    """
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def copy_buffers_from_main(*modules: nn.Module) -> None:
    """Overwrite every process's buffers (BatchNorm running statistics) of ``modules`` with rank 0's."""
    if world_size() == 1:
        return
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    """Wait until every process gets here (no-op in one process)."""
    if world_size() > 1:
        dist.barrier()
