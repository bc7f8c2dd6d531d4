"""Training and inference across processes and machines on existing distributed engines.

:mod:`core.distributed.ddp`: self-supervised encoder training with torch DDP under ``torchrun``.
"""
from core.distributed.ddp import (
    from_main,
    is_main,
    launched_by_torchrun,
    rank,
    torchrun_process_group,
    world_size,
)

__all__ = ["from_main", "is_main", "launched_by_torchrun", "rank", "torchrun_process_group", "world_size"]
