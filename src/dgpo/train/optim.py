"""The optimizer named by ``optim.optimizer`` (torch's AdamW, or bitsandbytes' 8-bit AdamW where installed) and the
learning-rate schedules named by ``optim.lr_schedule``."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..registry import Registry

OptimizerFactory = Callable[[], type[torch.optim.Optimizer]]
"""Returns the optimizer class, importing what it needs only when a run asks for it. Every class takes
``(params, lr=, betas=, weight_decay=)``."""


@dataclass(frozen=True)
class Optimizer:
    """A registered optimizer: its class's factory, whether it steps FSDP2's sharded (DTensor) parameters, which
    ``model.sharding`` needs, and the bytes of state it keeps per parameter (the memory estimate of ``dgpo check``)."""

    factory: OptimizerFactory
    takes_sharded_parameters: bool
    state_bytes: float = 8


OPTIMIZERS: Registry[Optimizer] = Registry("optimizer")


def register_optimizer(name: str, takes_sharded_parameters: bool = True, state_bytes: float = 8) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Register ``factory`` as ``optim.optimizer=name``; ``takes_sharded_parameters=False`` keeps it out of sharded runs;
    ``state_bytes``: its state per parameter (AdamW: two float32 moments, 8)."""
    def decorator(factory: OptimizerFactory) -> OptimizerFactory:
        OPTIMIZERS.register(name)(Optimizer(factory, takes_sharded_parameters, state_bytes))
        return factory

    return decorator


@register_optimizer("adamw")
def adamw() -> type[torch.optim.Optimizer]:
    return torch.optim.AdamW


@register_optimizer("adamw8bit", takes_sharded_parameters=False, state_bytes=2)
def adamw8bit() -> type[torch.optim.Optimizer]:
    """bitsandbytes' AdamW8bit: the moments of tensors with 4096+ elements in 8 bits (block-wise quantised, state
    ``uint8``), smaller tensors' in 32 bits; a one-line error naming the install line when bitsandbytes is missing.
    Its quantised state does not take sharded DTensor parameters."""
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("optim.optimizer=adamw8bit needs bitsandbytes, which is not installed (pip install bitsandbytes)") from None
    return bitsandbytes.optim.AdamW8bit


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class registered as ``name`` (``optim.optimizer``)."""
    return OPTIMIZERS.get(name).factory()


LrSchedule = Callable[[float], float]
"""The multiplier of optim.lr at a run's progress p in [0, 1] (the warm-up is applied on top of it)."""
LR_SCHEDULES: Registry[LrSchedule] = Registry("learning-rate schedule")


@LR_SCHEDULES.register("constant")
def constant_schedule(progress: float) -> float:
    return 1.0


@LR_SCHEDULES.register("cosine")
def cosine_schedule(progress: float) -> float:
    """1 -> 0 along half a cosine."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@LR_SCHEDULES.register("linear")
def linear_schedule(progress: float) -> float:
    """1 -> 0 in a straight line."""
    return 1.0 - progress


def learning_rate(step: int, lr: float, schedule: str, warmup_steps: int, max_steps: int, decay_steps: int = 0) -> float:
    """optim.lr at 0-based ``step``: a linear warm-up over the first ``warmup_steps`` steps, then ``schedule`` over the rest of
    run.max_steps, or with ``decay_steps`` > 0 over its last ``decay_steps`` steps only, the rate held at optim.lr before
    them (warm-up, stable, decay). A function of the step alone, so a resumed run follows the uninterrupted one's rates."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    start = max(warmup_steps, max_steps - decay_steps) if decay_steps > 0 else warmup_steps
    progress = min(1.0, max(0.0, (step - start) / max(1, max_steps - start)))
    return lr * warmup * LR_SCHEDULES.get(schedule)(progress)
