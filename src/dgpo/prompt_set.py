"""The prompt-set evaluator (``prompts``): any backend, on a held-out prompt file, scored with registered rewards.

It generates a few deterministic images per held-out prompt (``eval.prompts``) and scores them with the
run's training rewards (``reward.weights``, with ``reward.options``): each reward's mean is a score, and
``overall`` is their weighted sum, the training objective on prompts the run never trains on. A reward that a
benchmark reports per category (:func:`dgpo.rewards.register_categories`, e.g. GenEval per ``tag``) scores a
prompt file whose metadata names every prompt's category as that benchmark does: the unweighted mean of its
category means, with the categories in the benchmark's column order in `dgpo eval`'s table. Out of
domain it reports within-prompt diversity (mode collapse is what a reward scoring images one at a time
cannot see) and, given a second prompt file (``eval.ood_prompts``), the reward and diversity there.
Registered through :data:`dgpo.registry.CORE_REGISTRANTS`; the default evaluator of every backend without its own
when ``eval.prompts`` is set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .diversity import group_diversity
from .evaluators import PROMPT_SET, EvalResult, Evaluator, GridSelection, register_evaluator
from .generation import generate
from .models.common import check_prompt_lengths
from .rewards import REWARD_CATEGORIES, category_means, combine_rewards, get_reward, mean_over_categories, mean_score, score_batch
from .sampler_settings import SamplerSettings
from .train.data import Prompt, PromptSource

GRID_PROMPTS = 8
GRID_IMAGES_PER_PROMPT = 4
MIN_IMAGES_PER_PROMPT = 2  # diversity needs two images of a prompt


def images_per_prompt(images: int, prompts: int) -> int:
    """``images`` spread over the prompt file, at least ``MIN_IMAGES_PER_PROMPT`` each."""
    return max(MIN_IMAGES_PER_PROMPT, math.ceil(images / prompts))


@dataclass
class ScoredSet:
    images: torch.Tensor
    prompts: list[Prompt]
    scores: dict[str, np.ndarray]  # reward name -> per-image scores
    means: dict[str, float]  # reward name -> its score on the set
    categories: dict[str, dict[str, float]]  # reward name -> category label -> mean, for rewards reported per category
    overall: float
    diversity: float


def set_scores(scores: dict[str, np.ndarray], weights: dict[str, float], metadata: list[dict]) -> tuple[dict[str, float], dict[str, dict[str, float]], float]:
    """Each reward's score on a prompt set, the category means of the rewards reported per category, and overall.

    A reward's score is its mean over the images, or, where its benchmark reports it per category and the set's
    metadata names every image's category, the unweighted mean over categories (:func:`mean_over_categories`).
    Overall is the weighted sum of the rewards, per image then averaged (rewards applicable to different images
    combine per image); with a reward reported per category it is the weighted sum of the rewards' scores, so an
    evaluation with that reward alone reports the benchmark's own overall."""
    categories = {}
    for name in scores:
        if name in REWARD_CATEGORIES:
            means = category_means(scores[name], metadata, REWARD_CATEGORIES.get(name))
            if means is not None:
                categories[name] = means
    means = {name: mean_over_categories(categories[name]) if name in categories else mean_score(s) for name, s in scores.items()}
    if not categories:
        return means, categories, mean_score(combine_rewards(scores, weights))
    applicable = [weights[name] * means[name] for name in weights if np.isfinite(means[name])]  # as combine_rewards skips NaN
    return means, categories, float(sum(applicable)) if applicable else float("nan")


def category_table(categories: dict[str, dict[str, float]]) -> str:
    """Markdown, one table per reward reported per category: overall, then each category, in the benchmark's order
    (GenEval: overall, single, two, counting, colors, position, color attribution)."""
    tables = []
    for name, means in categories.items():
        header = ["reward", "overall", *means]
        row = [name, f"{mean_over_categories(means):.3f}", *(f"{value:.3f}" for value in means.values())]
        tables.append("\n".join("| " + " | ".join(cells) + " |" for cells in (header, ["---"] * len(header), row)))
    return "score per category (overall: their unweighted mean)\n" + "\n\n".join(tables)


@register_evaluator(PROMPT_SET)
class PromptSetEvaluator(Evaluator):
    """Held-out prompts: each reward's mean, overall = their weighted sum; out of domain, within-prompt diversity
    (and the reward and diversity on a second prompt file)."""

    title = "held-out prompts (eval.prompts)"
    score_label = "reward"
    scores_key = "rewards"
    out_of_domain = {"diversity": "diversity within prompt", "ood_reward": "out-of-domain prompts: reward",
                     "ood_diversity": "out-of-domain prompts: diversity within prompt"}
    score_range = None  # rewards have their own units

    def __init__(self, prompts: PromptSource, rewards: dict, weights: dict[str, float], ood_prompts: PromptSource | None = None,
                 batch_size: int = 8):
        self.prompts, self.rewards, self.weights, self.ood_prompts, self.batch_size = prompts, rewards, weights, ood_prompts, batch_size

    @classmethod
    def from_config(cls, config, model, rewards: dict | None = None) -> PromptSetEvaluator:
        e, r = config.eval, config.reward
        # A run passes its training rewards: a reward model loads once.
        rewards = rewards if rewards is not None else {name: get_reward(name, **r.options.get(name, {})) for name in r.weights}
        sources = {field: PromptSource.load(spec) for field, spec in (("eval.prompts", e.prompts), ("eval.ood_prompts", e.ood_prompts)) if spec}
        for field, source in sources.items():
            check_prompt_lengths(model, [p.text for p in source.prompts], f"{field} {source.name}")
        # Rollouts of data.micro_batch images fit in memory, so evaluation batches of that size do.
        return cls(sources["eval.prompts"], rewards, dict(r.weights), sources.get("eval.ood_prompts"), config.data.micro_batch)

    @classmethod
    def reported_metrics(cls, eval_config) -> tuple[str, ...]:
        return tuple(cls.out_of_domain) if eval_config.ood_prompts else ("diversity",)

    def score_set(self, model, settings: SamplerSettings, source: PromptSource, images: int, seed: int, tag: str) -> ScoredSet:
        """Images of every prompt of ``source`` (keyed by ``tag``, seed, prompt and image), scored by each reward."""
        per_prompt = images_per_prompt(images, len(source.prompts))
        prompts = [p for p in source.prompts for _ in range(per_prompt)]
        keys = [(tag, seed, i // per_prompt, i % per_prompt) for i in range(len(prompts))]
        generated = generate(model, [p.text for p in prompts], keys, settings, self.batch_size)
        chunk_scores = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            chunk_scores.append(score_batch(self.rewards, generated[start : start + len(chunk)], [p.text for p in chunk], [p.metadata for p in chunk]))
        scores = {name: np.concatenate([c[name] for c in chunk_scores]) for name in self.rewards}
        means, categories, overall = set_scores(scores, self.weights, [p.metadata for p in prompts])
        return ScoredSet(generated, prompts, scores, means, categories, overall, group_diversity(generated, [i // per_prompt for i in range(len(prompts))]))

    def evaluate(self, model, settings: SamplerSettings, images_per_category: int, seed: int = 0) -> EvalResult:
        held_out = self.score_set(model, settings, self.prompts, images_per_category, seed, "eval")
        out_of_domain = {"diversity": held_out.diversity}
        if self.ood_prompts is not None:
            ood = self.score_set(model, settings, self.ood_prompts, images_per_category, seed, "eval-ood")
            out_of_domain.update(ood_reward=ood.overall, ood_diversity=ood.diversity)
        texts = [p.text for p in held_out.prompts]
        return EvalResult(
            overall=held_out.overall,
            scores=held_out.means,
            out_of_domain=out_of_domain,
            images=held_out.images,
            prompts=texts,
            metadata=[p.metadata for p in held_out.prompts],
            grid=grid_selection(held_out.images, texts),
            scores_key=self.scores_key,
            state={"categories": held_out.categories},
        )

    def diagnostics(self, result: EvalResult, seed: int = 0) -> tuple[dict, str]:
        """The rewards reported per category: their category means (JSON ``categories``) and table."""
        categories = result.state.get("categories", {})
        return ({"categories": categories}, category_table(categories)) if categories else ({}, "")


def grid_selection(images: torch.Tensor, prompts: list[str]) -> GridSelection:
    """Up to ``GRID_IMAGES_PER_PROMPT`` images of each of the first ``GRID_PROMPTS`` prompts."""
    chosen, counts = [], {}
    for index, prompt in enumerate(prompts):
        if prompt not in counts and len(counts) == GRID_PROMPTS:
            break
        counts[prompt] = counts.get(prompt, 0) + 1
        if counts[prompt] <= GRID_IMAGES_PER_PROMPT:
            chosen.append(index)
    return GridSelection(images[chosen], [prompts[i] for i in chosen])
