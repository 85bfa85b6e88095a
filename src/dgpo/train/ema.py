"""Exponential moving averages of the trainable parameters (rollout EMA and evaluation EMA)."""
from __future__ import annotations

import contextlib

import torch


class ParameterEMA:
    """shadow <- decay * shadow + (1 - decay) * param, over a fixed list of named parameters."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - self.decay)

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
                for l, p in zip(live, self.params):
                    p.copy_(l)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.clone() for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        self.shadow = [state[n].clone().to(s.device, s.dtype) for n, s in zip(self.names, self.shadow)]
