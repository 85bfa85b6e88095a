"""Which prompts a step draws: uniform shuffled passes, or more often the prompts whose groups still carry a preference.

A group whose rewards are all equal has zero advantages: it costs a rollout and teaches nothing (DAPO's dynamic
sampling filters such groups out and samples again). The ``preference`` sampler spends no extra rollouts: it keeps,
per prompt category, a moving share of the recent groups that had unequal rewards and draws categories in proportion
to it, with a floor of uniform draws so that no category is starved and a category that improves again is seen.

A sampler's ``draw`` is a pure function of (run seed, step) and its state; ``observe`` updates the state from the
step's groups, computed from the rewards every process holds (gathered), so 1 and N processes draw the same prompts.
The state goes into checkpoints (``state_dict``), so a resumed run draws what an uninterrupted one would.
Samplers register themselves in :data:`PROMPT_SAMPLERS` (``register_prompt_sampler``), from inside dgpo or outside.
"""
from __future__ import annotations

import bisect
import math
from collections import Counter

import torch

from ..registry import Registry
from ..seeding import keyed_uniform
from .data import Prompt, PromptSource, shuffled_index
from .sections import DataConfig

CATEGORY_KEY = "category"
LOGGED_CATEGORIES = 32
"""Per-category log keys are written for prompt sets of at most this many categories (a prompt file without
categories has one per distinct prompt); larger ones log the smallest and largest sampling weight instead."""


def category_of(prompt: Prompt) -> str:
    """The key a sampler weighs a prompt by: its ``category`` metadata, or else the prompt text itself."""
    category = prompt.metadata.get(CATEGORY_KEY)
    return prompt.text if category is None else str(category)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Per group (row of ``rewards``, shape (groups, G)): whether it carries a preference, i.e. holds at least two
    finite rewards that are not all equal. A group of equal rewards has zero advantage for every sample (DAPO's
    zero-variance groups); NaN marks a reward that failed or does not apply."""
    finite = torch.isfinite(rewards)
    highest = torch.where(finite, rewards, -math.inf).amax(dim=1)
    lowest = torch.where(finite, rewards, math.inf).amin(dim=1)
    return (finite.sum(dim=1) >= 2) & (highest > lowest)


def sampling_metrics(categories: list[str], informative: list[bool], weights: dict[str, float]) -> dict[str, float]:
    """The step's log: per category drawn, the share of its groups with equal rewards (``prompts/zero_variance/<c>``),
    and per category the probability it was drawn with (``prompts/weight/<c>``); for more than
    :data:`LOGGED_CATEGORIES` categories only ``prompts/weight_min`` and ``prompts/weight_max``."""
    if len(weights) > LOGGED_CATEGORIES:
        return {"prompts/weight_min": min(weights.values()), "prompts/weight_max": max(weights.values())}
    out = {}
    for category in sorted(set(categories)):
        flags = [flag for c, flag in zip(categories, informative) if c == category]
        out[f"prompts/zero_variance/{category}"] = 1 - sum(flags) / len(flags)
    out.update({f"prompts/weight/{category}": weight for category, weight in weights.items()})
    return out


class PromptSampler:
    """Draws each step's prompts from ``source``; ``config`` is the run's ``data`` section (a sampler's knobs).

    A subclass implements ``draw``; an adaptive one also ``weights``, ``observe`` and its state."""

    def __init__(self, source: PromptSource, config: DataConfig):
        self.source, self.config = source, config
        self.members: dict[str, list[Prompt]] = {}
        for prompt in source.prompts:
            self.members.setdefault(category_of(prompt), []).append(prompt)
        total = len(source.prompts)
        self._uniform = {category: len(prompts) / total for category, prompts in sorted(self.members.items())}

    @classmethod
    def checks(cls, config) -> list[tuple[bool, str]]:
        """(condition, message) pairs ``Config.validate`` raises the first failing one of."""
        return []

    def draw(self, seed: int, step: int, count: int) -> list[Prompt]:
        """The ``count`` prompts (one per group) of ``step``: a pure function of (seed, step) and the state."""
        raise NotImplementedError

    def uniform_weights(self) -> dict[str, float]:
        """Each category's share of the prompts: the probability a uniform draw picks it."""
        return dict(self._uniform)

    def weights(self) -> dict[str, float]:
        """The probability that a draw of the next step picks each category (logged)."""
        return self.uniform_weights()

    def observe(self, categories: list[str], informative: list[bool]) -> None:
        """Learn from a step's groups: each one's category and whether its rewards carried a preference
        (``informative_groups``). Every process calls it with the same values."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s output (an empty dict: a checkpoint written without this sampler's state)."""


PROMPT_SAMPLERS: Registry[type[PromptSampler]] = Registry("prompt sampler")


def register_prompt_sampler(name: str):
    """Register a ``PromptSampler`` subclass as ``data.prompt_sampling: <name>``."""
    return PROMPT_SAMPLERS.register(name)


@register_prompt_sampler("uniform")
class UniformSampler(PromptSampler):
    """Consecutive slices of seeded shuffled passes over the prompts (``PromptSource.for_step``): every prompt once per pass."""

    def draw(self, seed: int, step: int, count: int) -> list[Prompt]:
        return self.source.for_step(seed, step, count)


@register_prompt_sampler("preference")
class PreferenceSampler(PromptSampler):
    """Categories drawn by how often their recent groups carried a preference.

    With ``n_c`` prompts in category c (``N`` in all) and ``s_c`` its moving share of groups with unequal rewards,
    a draw picks c with probability ``w_c = f n_c / N + (1 - f) n_c s_c / sum_k n_k s_k`` (f: data.prompt_sampling_floor;
    all ``s`` equal gives the uniform draw's probabilities). After a step with ``k`` groups of c, ``i`` of them
    informative, ``s_c <- d^k s_c + (1 - d^k) i / k`` (d: data.prompt_sampling_decay; before c's first group,
    ``s_c`` = data.prompt_sampling_prior). Within a category prompts come in seeded shuffled passes, continuing
    from the number drawn from it so far."""

    def __init__(self, source: PromptSource, config: DataConfig):
        super().__init__(source, config)
        self.informative_share: dict[str, float] = {}
        self.drawn: dict[str, int] = {}

    @classmethod
    def checks(cls, config) -> list[tuple[bool, str]]:
        d = config.data
        return [
            (0 < d.prompt_sampling_floor <= 1, f"data.prompt_sampling_floor must be in (0, 1] (above 0 so no category is starved), "
                                               f"got {d.prompt_sampling_floor}"),
            (0 <= d.prompt_sampling_decay < 1, f"data.prompt_sampling_decay must be in [0, 1), got {d.prompt_sampling_decay}"),
            (0 <= d.prompt_sampling_prior <= 1, f"data.prompt_sampling_prior must be in [0, 1], got {d.prompt_sampling_prior}"),
            (config.rollout.offline_pool == 0, f"data.prompt_sampling={d.prompt_sampling} adapts the prompts to the rewards, but "
                                               "rollout.offline_pool fixes them when the pool is generated: use one of the two"),
        ]

    def weights(self) -> dict[str, float]:
        uniform = self.uniform_weights()
        prior = self.config.prompt_sampling_prior
        preferred = {category: share * self.informative_share.get(category, prior) for category, share in uniform.items()}
        total = sum(preferred.values())
        if total == 0:
            return uniform
        floor = self.config.prompt_sampling_floor
        return {category: floor * uniform[category] + (1 - floor) * preferred[category] / total for category in uniform}

    def draw(self, seed: int, step: int, count: int) -> list[Prompt]:
        weights = self.weights()
        categories = list(weights)
        bounds = [0.0]
        for category in categories:
            bounds.append(bounds[-1] + weights[category])
        taken: Counter[str] = Counter()
        out = []
        for u in keyed_uniform([("prompt_sampling", seed, step, slot) for slot in range(count)]).tolist():
            category = categories[min(bisect.bisect_right(bounds, u * bounds[-1]) - 1, len(categories) - 1)]
            members = self.members[category]
            position = self.drawn.get(category, 0) + taken[category]
            taken[category] += 1
            out.append(members[shuffled_index(len(members), position, "prompts", seed, category)])
        return out

    def observe(self, categories: list[str], informative: list[bool]) -> None:
        decay, prior = self.config.prompt_sampling_decay, self.config.prompt_sampling_prior
        for category in sorted(set(categories)):
            flags = [flag for c, flag in zip(categories, informative) if c == category]
            kept = decay ** len(flags)
            self.informative_share[category] = kept * self.informative_share.get(category, prior) + (1 - kept) * sum(flags) / len(flags)
            self.drawn[category] = self.drawn.get(category, 0) + len(flags)

    def state_dict(self) -> dict:
        return {"informative_share": dict(self.informative_share), "drawn": dict(self.drawn)}

    def load_state_dict(self, state: dict) -> None:
        self.informative_share = {str(k): float(v) for k, v in state.get("informative_share", {}).items()}
        self.drawn = {str(k): int(v) for k, v in state.get("drawn", {}).items()}
