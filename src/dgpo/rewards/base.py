"""The reward contract and registry: ``register_reward``, ``get_reward``, and the scoring every caller shares
(``score_batch``, ``combine_rewards``). ``dgpo.rewards`` re-exports all of it; the reward modules import it from
here, so that the package can import them without a circle."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..registry import Registry
from ..requirements import Requirement


class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> np.ndarray | list: ...


REWARDS: Registry[Callable[..., RewardFn]] = Registry("reward", plugins=True)


def register_reward(name: str, requires: tuple[Requirement, ...] = ()):
    """Register a reward factory: a callable returning the reward function.

    Factories must work with no arguments; rewards that need a model path take it as a keyword
    argument whose default comes from an environment variable, and recipes can pass options
    per reward (``reward.options``), so ``get_reward(name, model=...)`` works in code and config.
    ``requires``: the packages, binaries and settings the factory needs (``dgpo.requirements``), which
    ``dgpo check`` checks without building the reward.
    """
    return REWARDS.register(name, requires)


def available_rewards() -> list[str]:
    return REWARDS.names()


def registered_factory(registry: Registry, name: str, options: dict):
    """The factory ``name`` of ``registry``, once ``options`` are known to fit it; an option it does not take is a
    one-line error naming the factory and the options it takes."""
    factory = registry.get(name)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        takes = ", ".join(p.name for p in inspect.signature(factory).parameters.values() if p.kind is not p.VAR_KEYWORD)
        raise ValueError(f"{registry.kind} {name!r}: {exc} (it takes {takes or 'no options'})") from None
    return factory


def build_registered(registry: Registry, name: str, **options):
    """The factory ``name`` of ``registry`` called with ``options`` (checked by ``registered_factory``)."""
    return registered_factory(registry, name, options)(**options)


def reward_problems(name: str, options: dict, options_key: str) -> list[str]:
    """Why reward ``name`` with factory ``options`` (set under ``options_key``) would not build, one line each,
    without building it: an unknown name or option, then its unmet requirements."""
    try:
        registered_factory(REWARDS, name, options)
    except ValueError as exc:
        return [str(exc)]
    return [line for requirement in REWARDS.requirements(name) for line in requirement.problems(f"reward {name!r}", options, options_key)]


def get_reward(name: str, **options) -> RewardFn:
    """Build the reward ``name``; ``options`` go to its factory (e.g. ``model=``, ``url=``)."""
    return build_registered(REWARDS, name, **options)


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


@dataclass(frozen=True)
class RewardCategories:
    """How a benchmark reports a reward: per category of prompt, named by the metadata field ``field``, in its column
    order (``columns``: metadata value -> column label), with overall the unweighted mean over the categories."""

    field: str
    columns: dict[str, str]


REWARD_CATEGORIES: Registry[RewardCategories] = Registry("reward categories")


def register_categories(reward: str, categories: RewardCategories) -> RewardCategories:
    """Declare that the registered reward ``reward`` is reported per category (e.g. GenEval per ``tag``)."""
    return REWARD_CATEGORIES.register(reward)(categories)


def category_means(scores: np.ndarray, metadata: list[dict], categories: RewardCategories) -> dict[str, float] | None:
    """Per category, the mean score of its images (NaN skipped), keyed by column label in the declared order; categories
    absent from the declaration follow under their own value, in the order they first appear. None unless every
    image's metadata names its category in ``categories.field``: a set without categories is reported as one mean."""
    values = [meta.get(categories.field) for meta in metadata]
    if not values or any(not isinstance(value, str) for value in values):
        return None
    order = [v for v in categories.columns if v in values] + list(dict.fromkeys(v for v in values if v not in categories.columns))
    chosen = np.array(values)
    return {categories.columns.get(value, value): mean_score(scores[chosen == value]) for value in order}


def mean_over_categories(means: dict[str, float]) -> float:
    """A benchmark's overall: the unweighted mean of its category means (GenEval: each category counts once, whatever
    its number of prompts), over the categories scored."""
    return mean_score(np.array(list(means.values()), dtype=np.float64))
