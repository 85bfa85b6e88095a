"""Exponential moving averages of the trainable parameters (rollout EMA and evaluation EMA)."""
from __future__ import annotations

import contextlib

import torch


def ramped_decay(step: int, decay: float, ramp: float) -> float:
    """Decay of the rollout EMA's update after optimizer step ``step`` (0-based), DGPO reference code:

        decay_step = min(decay, ramp * step)        (ramp 0: the fixed ``decay``)

    The reference (train_sd3_dgpo.py) ramps with 0.001 to 0.3, so the EMA follows the policy
    exactly at the first step and averages fully from step 300 on.
    """
    return decay if ramp <= 0 else min(decay, ramp * step)


def eval_ema_decay(completed_steps: int, decay: float, every: int) -> float | None:
    """Decay of the evaluation EMA's update once ``completed_steps`` optimizer steps are done, or None
    when it does not update then. DGPO's reference code keeps EMAModuleWrapper(decay=0.9,
    update_step_interval=8) and steps it with the optimizer step count n:

        update when (n + 1) % every == 0,   with decay min(decay, (1 + n) / (10 + n))
    """
    n = completed_steps
    if (n + 1) % every:
        return None
    return min(decay, (1 + n) / (10 + n))


def eval_ema_updates(completed_steps: int, every: int) -> int:
    """How many updates the evaluation EMA has had once ``completed_steps`` optimizer steps are done: the n in
    1..completed_steps with (n + 1) % every == 0 (``eval_ema_decay``'s rule), that is

        floor((completed_steps + 1) / every) - floor(1 / every)

    so none before step max(1, every - 1): with the reference code's every = 8, none in a run of fewer than 7 steps."""
    return (completed_steps + 1) // every - 1 // every


class ParameterEMA:
    """shadow <- decay * shadow + (1 - decay) * param, over a fixed list of named parameters."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """One EMA step with ``decay`` (default: the decay given at construction)."""
        weight = 1.0 - (self.decay if decay is None else decay)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), weight)

    @contextlib.contextmanager
    def swapped_in(self):
        """Run the model with the EMA weights, restoring the live weights afterwards."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, p in zip(live, self.params):
                    p.copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.clone() for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        self.shadow = [state[n].clone().to(s.device, s.dtype) for n, s in zip(self.names, self.shadow)]
