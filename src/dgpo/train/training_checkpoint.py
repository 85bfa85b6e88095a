"""What a training run saves at a step and loads to resume: the trainable weights, the optimizer state, the EMAs and
the run's JSON state, written whole by the main process or, with model.sharding=fsdp2, as every process's shards
(``sharding.py``). The file format (atomic, verified, rotated) is ``checkpoint.py``'s."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, commit_checkpoint, load_checkpoint, load_state, save_checkpoint, start_checkpoint, write_state
from .collectives import Collectives
from .ema import ParameterEMA
from .policy import Policy
from .sharding import SHARDED_FOLDER, load_sharded, save_sharded


def save_training_checkpoint(root: Path, step: int, state: dict, policy: Policy, optimizer: torch.optim.Optimizer, emas: dict[str, ParameterEMA],
                             sharded: bool, collectives: Collectives, is_main: bool, keep: int) -> Path | None:
    """Checkpoint ``step`` under ``root`` (every process calls it; the main process returns the path). Unsharded the
    main process writes whole tensors; sharded every process writes its shards into the main process's temporary
    folder, which the main process commits."""
    if sharded:
        tmp = collectives.broadcast(start_checkpoint(root, step) if is_main else None)
        save_sharded(tmp / SHARDED_FOLDER, policy.model.transformer, optimizer, emas)
        if not is_main:
            return None
        write_state(tmp, state)
        return commit_checkpoint(root, step, tmp, keep)
    if not is_main:
        return None
    tensors = {"trainable": dict(policy.trainable), **{name: ema.state_dict() for name, ema in emas.items()}}
    return save_checkpoint(root, step, tensors, optimizer.state_dict(), state, keep)


def load_training_checkpoint(path: Path, policy: Policy, optimizer: torch.optim.Optimizer, emas: dict[str, ParameterEMA], sharded: bool,
                             sharding: str) -> dict:
    """Load weights, optimizer state and EMAs from the checkpoint at ``path`` in place; returns its JSON state. A checkpoint
    is resumed with the model.sharding it was written with (``sharded``, ``sharding``: this run's)."""
    written_sharded = (path / SHARDED_FOLDER).is_dir()
    if written_sharded != sharded:
        raise CheckpointError(f"checkpoint {path} was written with model.sharding={'fsdp2' if written_sharded else 'none'}; "
                              f"resume it with that setting (this run has model.sharding={sharding})")
    if written_sharded:
        state = load_state(path)
        load_sharded(path / SHARDED_FOLDER, policy.model.transformer, optimizer, emas)
        return state
    tensors, optimizer_state, state = load_checkpoint(path)
    with torch.no_grad():
        for name, param in policy.trainable:
            param.copy_(tensors["trainable"][name].to(param.device, param.dtype))
    for name, ema in emas.items():
        ema.load_state_dict(tensors[name])
    optimizer.load_state_dict(optimizer_state)
    return state
