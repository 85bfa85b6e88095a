"""Rewards: plain callables ``(images, prompts, metadata) -> scores``, registered by name.

``images`` is a float tensor (B, 3, H, W) in [0, 1]; ``metadata`` is one dict per prompt
(may be empty). A reward returns one float per image; NaN (or None) means "not
applicable to this sample". Weighted combination happens outside the reward
(:func:`combine_rewards`), as in TRL.
"""
from __future__ import annotations

import difflib
from typing import Callable, Protocol

import numpy as np
import torch


class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> np.ndarray | list: ...


_REGISTRY: dict[str, Callable[[], RewardFn]] = {}


def register_reward(name: str):
    """Register a reward factory (a zero-argument callable returning the reward function)."""

    def decorator(factory: Callable[[], RewardFn]):
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFn:
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(name, _REGISTRY, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown reward {name!r}{suggestion}; available: {', '.join(available_rewards())}")
    return _REGISTRY[name]()


def as_scores(raw, batch_size: int, name: str) -> np.ndarray:
    """Scores as float64 (B,), None -> NaN; a wrong length is an error naming the reward."""
    scores = np.array([np.nan if s is None else float(s) for s in raw], dtype=np.float64)
    if scores.shape != (batch_size,):
        raise ValueError(f"reward {name!r} returned {scores.shape[0]} scores for {batch_size} images")
    return scores


def combine_rewards(scores: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted sum over the rewards applicable to each sample; NaN where none applies."""
    stacked = np.stack([weights[name] * scores[name] for name in weights])
    applicable = ~np.isnan(stacked)
    total = np.where(applicable, stacked, 0.0).sum(axis=0)
    return np.where(applicable.any(axis=0), total, np.nan)


from . import builtin  # noqa: E402,F401  (registers the built-in rewards)
