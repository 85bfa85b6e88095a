"""The reward contract and registry: ``register_reward``, ``get_reward``, and the scoring every caller shares
(``score_batch``, ``combine_rewards``). ``dgpo.rewards`` re-exports all of it; the reward modules import it from
here, so that the package can import them without a circle."""
from __future__ import annotations

import inspect
from typing import Callable, Protocol

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..registry import Registry


class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> np.ndarray | list: ...


REWARDS: Registry[Callable[..., RewardFn]] = Registry("reward", plugins=True)


def register_reward(name: str):
    """Register a reward factory: a callable returning the reward function.

    Factories must work with no arguments; rewards that need a model path take it as a keyword
    argument whose default comes from an environment variable, and recipes can pass options
    per reward (``reward.options``), so ``get_reward(name, model=...)`` works in code and config.
    """
    return REWARDS.register(name)


def available_rewards() -> list[str]:
    return REWARDS.names()


def get_reward(name: str, **options) -> RewardFn:
    """Build the reward ``name``; ``options`` go to its factory (e.g. ``model=``, ``url=``)."""
    factory = REWARDS.get(name)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise ValueError(f"reward {name!r}: {exc}") from None
    return factory(**options)


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] -> 8-bit RGB images, for rewards and transports that need files."""
    arrays = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in arrays]


def as_scores(raw, batch_size: int, name: str) -> np.ndarray:
    """Scores as float64 (B,), None -> NaN; a wrong length is an error naming the reward."""
    scores = np.array([np.nan if s is None else float(s) for s in raw], dtype=np.float64)
    if scores.shape != (batch_size,):
        raise ValueError(f"reward {name!r} returned {scores.shape[0]} scores for {batch_size} images")
    return scores


class RewardFailure(UserError):
    """A reward raised; the message names it."""


def score_batch(rewards: dict[str, RewardFn], images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, np.ndarray]:
    """Each reward's scores of one batch of images: NaN where a reward does not apply or returned NaN/inf.

    Training, evaluation and ``eval.metrics`` all score through here: a reward that raises (or returns
    the wrong number of scores) is a :class:`RewardFailure` naming it, never a poisoned advantage."""
    per_reward = {}
    for name, reward in rewards.items():
        try:
            scores = as_scores(reward(images, prompts, metadata), len(prompts), name)
        except Exception as exc:
            raise RewardFailure(f"reward {name!r} failed: {type(exc).__name__}: {exc}") from exc
        per_reward[name] = np.where(np.isfinite(scores), scores, np.nan)
    return per_reward


def mean_score(scores: np.ndarray) -> float:
    """The mean over the scored images (NaN entries skipped); NaN when none was scored, without numpy's warning."""
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")


def combine_rewards(scores: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted sum over the rewards applicable to each sample; NaN where none applies."""
    stacked = np.stack([weights[name] * scores[name] for name in weights])
    applicable = ~np.isnan(stacked)
    total = np.where(applicable, stacked, 0.0).sum(axis=0)
    return np.where(applicable.any(axis=0), total, np.nan)

