"""Leaving the process group at exit; kept apart from ``collectives`` so that every CLI command,
however light, can call it without importing accelerate."""
from __future__ import annotations

import torch.distributed as dist


def leave_process_group() -> None:
    """Destroy this process's default process group, if one was started (torchrun, accelerate launch).

    A process that exits with a gloo group alive can abort in interpreter teardown (SIGABRT,
    "terminate called without an active exception") after a run that finished well."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
