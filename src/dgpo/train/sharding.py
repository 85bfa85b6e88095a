"""model.sharding: how the transformer's weights are spread over the processes, and what that changes.

``none``: every process holds the whole transformer; the trainer sums the trainable parameters' gradients
itself after the micro-steps (``Collectives.sum_gradients``).

``fsdp2``: every transformer block and then the root are wrapped with FSDP2's ``fully_shard`` over a mesh
of all processes. Each process keeps 1/N of every weight (frozen base weights and trainable ones alike, as
DTensor shards), of the trainable weights' gradients and of the optimizer state; a block's weights are
all-gathered for its forward and its gradients reduce-scattered in the backward. So every forward is a
collective: all processes run the same forwards in the same order (rollouts, updates and evaluation).

The trainer's loss is normalised by the global group count and gradients are *summed* over processes; FSDP2
averages by default, so its divide factor is set to 1 and the gradients equal the ``none`` run's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate.utils import parse_flag_from_env
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..errors import UserError
from ..registry import Registry

__all__ = ["SHARDINGS", "Sharding", "clip_grad_norm", "full_trainable_state", "load_sharded", "local_bytes", "process_mesh",
           "refuse_sharded_launch", "save_sharded", "shard_transformer"]


def refuse_sharded_launch() -> None:
    """The trainer never hands its model to ``accelerator.prepare``, so under an FSDP or DeepSpeed launch config
    (``accelerate launch`` sets these flags from its distributed_type) it would train unsharded without a word: refuse,
    naming the trainer's own sharding (model.sharding: fsdp2, ``sharding.py``)."""
    for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if parse_flag_from_env(flag):
            raise UserError(f"the accelerate launch config asks for {name}, which dgpo does not take from accelerate (it would train "
                            "unsharded); launch with a MULTI_GPU config such as configs/accelerate/multi_gpu.yaml and set "
                            "model.sharding: fsdp2 to shard the model")


def process_mesh(device: torch.device) -> DeviceMesh:
    """A 1-D mesh of every process. A single process launched without torchrun has no process group yet:
    it gets a one-member group (FSDP2 needs one), so a sharded run and its checkpoints work on 1 process too."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def mixed_precision_policy(device: torch.device, mixed_precision: str) -> MixedPrecisionPolicy:
    """bf16 weights in the forward with fp32 gradient reduction on a GPU with model.mixed_precision bf16;
    otherwise the weights' own dtype (CPU bf16 matmuls are slow, and the 1-process run is the reference)."""
    if device.type == "cuda" and mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of the transformer's block lists (SD3 and SANA: transformer_blocks; FLUX also
    single_transformer_blocks): the units FSDP2 gathers one at a time."""
    return [block for child in transformer.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def shard_transformer(transformer: torch.nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None,
                      offload: bool = False) -> torch.nn.Module:
    """Wrap each block, then the root (the embeddings and output layers), with ``fully_shard``, in place.
    ``offload``: keep the shards and optimizer state in CPU memory, copied to the device per block."""
    # Pinned host memory needs an accelerator; on a CPU mesh the shards stay where they are anyway.
    offload_policy = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if offload else OffloadPolicy()
    mp_policy = mp_policy or MixedPrecisionPolicy()
    for block in transformer_blocks(transformer):
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    fully_shard(transformer, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    for module in transformer.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            # Sum, not average (the trainer's loss is normalised globally). A factor alone would reduce with
            # PREMUL_SUM(1/factor), which gloo lacks; forced SUM with factor 1 is a plain sum and divides nothing.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return transformer


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip to ``max_norm`` by the global gradient norm; returns the norm before clipping. With sharded
    parameters each process holds part of each gradient: the DTensor norm is a partial one until
    ``full_tensor`` reduces it over the mesh, so every process clips by the same global norm."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def local_bytes(tensors) -> int:
    """Bytes this process holds for ``tensors`` (a DTensor's local shard only)."""
    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def full_trainable_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights (the LoRA, or every weight in full fine-tuning) as whole CPU tensors on the main
    process (empty elsewhere): a collective under fsdp2, a copy otherwise."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(transformer, options=options)


SHARDED_FOLDER = "sharded"


def sharded_state(transformer: torch.nn.Module, optimizer: torch.optim.Optimizer, emas: dict) -> dict:
    """What a sharded checkpoint holds, as this process's shards keyed by parameter name (so it loads on any
    process count): the trainable weights (not the frozen base weights, which come from model.path), the
    optimizer state and each EMA's (``emas``: name -> ParameterEMA)."""
    weights, optimizer_state = get_state_dict(transformer, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"trainable": weights, "optimizer": optimizer_state, **{name: ema.state_dict() for name, ema in emas.items()}}


def save_sharded(folder: Path, transformer: torch.nn.Module, optimizer: torch.optim.Optimizer, emas: dict) -> None:
    """Every process writes its shards into ``folder`` (a collective; ``folder`` on a file system all processes share)."""
    dcp.save(sharded_state(transformer, optimizer, emas), checkpoint_id=str(folder))


def load_sharded(folder: Path, transformer: torch.nn.Module, optimizer: torch.optim.Optimizer, emas: dict) -> None:
    """Load ``save_sharded``'s ``folder`` into this run's shards, resharded to this run's process count. Every
    trainable weight must be in the checkpoint (``dcp.load`` raises on a missing one); the frozen ones are not."""
    state = sharded_state(transformer, optimizer, emas)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(transformer, optimizer, model_state_dict=state["trainable"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    for name, ema in emas.items():
        ema.load_state_dict(state[name])


@dataclass(frozen=True)
class Sharding:
    """A model.sharding variant. ``sharded``: weights, optimizer state and checkpoints are per-process shards
    (checkpoints then written by every process with torch.distributed.checkpoint) and the backward sums the
    gradients over processes."""

    name: str
    sharded: bool

    def wrapper(self, device: torch.device, mixed_precision: str, offload: bool = False):
        """The function that shards a transformer (``Policy``'s ``shard``), or None when unsharded."""
        if not self.sharded:
            return None
        mesh, mp_policy = process_mesh(device), mixed_precision_policy(device, mixed_precision)
        return lambda transformer: shard_transformer(transformer, mesh, mp_policy, offload)

    def reduce_gradients(self, collectives, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients over processes, unless FSDP2's reduce-scatter already did (no second reduction)."""
        if not self.sharded:
            collectives.sum_gradients(params)


SHARDINGS: Registry[Sharding] = Registry("sharding")
for _variant in (Sharding("none", sharded=False), Sharding("fsdp2", sharded=True)):
    SHARDINGS.register(_variant.name)(_variant)
