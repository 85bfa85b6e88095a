"""Evaluators: what periodic evaluation, ``eval.metrics``, the reward-hacking guard and the report ask of an evaluation.

An evaluator is a class registered by name (``register_evaluator``), built from the run's config and
model (``from_config``), whose ``evaluate(model, settings, images_per_category, seed)`` generates
deterministic images and returns an :class:`EvalResult`: ``overall`` (the number curves, thresholds
and ``dgpo compare`` use), ``scores`` per category or prompt set, out-of-domain metrics (watched by the
guard), the images with their prompts and metadata (``eval.metrics`` rewards score them, velocity
drift uses them) and a grid selection for the report.

``eval.evaluator`` picks one; empty picks the evaluator registered as the default for
``model.backend`` (``register_evaluator(name, default_for=(backend,))``), else the prompt-set evaluator
(``prompts``, ``dgpo.prompt_set``) when ``eval.prompts`` names a held-out prompt file, else none (no evaluation).
Evaluators register themselves from the plugin modules (``dgpo.registry.load_plugins``), loaded on the
registry's first lookup, so general code never imports them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .registry import Registry
from .rewards import mean_score, score_batch
from .sampler_settings import SamplerSettings

NONE = "none"
PROMPT_SET = "prompts"  # the backend-agnostic evaluator of a held-out prompt file (dgpo.prompt_set)


@dataclass
class GridSelection:
    """Images for the report's grid, each with its caption and (where the evaluator has one) its pass/fail."""

    images: torch.Tensor
    labels: list[str]
    passed: list[bool] | None = None


@dataclass
class EvalResult:
    overall: float
    scores: dict[str, float]
    out_of_domain: dict[str, float]
    images: torch.Tensor
    prompts: list[str]
    metadata: list[dict]
    passed: list[bool] | None = None
    grid: GridSelection | None = None
    scores_key: str = "scores"
    state: dict = field(default_factory=dict)  # the evaluator's own data for ``diagnostics`` (not saved)

    @property
    def num_images(self) -> int:
        return len(self.prompts)

    def to_dict(self) -> dict:
        """The JSON form (evals.json, results.json): overall, the scores under ``scores_key``, the
        out-of-domain metrics as top-level keys, and num_images."""
        return {"overall": self.overall, self.scores_key: dict(self.scores), **self.out_of_domain, "num_images": self.num_images}


class Evaluator:
    """Base class; subclasses set the class attributes and implement ``evaluate``."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = "evaluation"
    score_label: ClassVar[str] = "set"
    scores_key: ClassVar[str] = "scores"
    out_of_domain: ClassVar[dict[str, str]] = {}
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    score_range: ClassVar[tuple[float, float] | None] = (0.0, 1.0)  # the curves' y-axis; None: the scores' own range
    default_thresholds: ClassVar[tuple[float, ...]] = ()  # `dgpo compare`'s overall scores to time without --threshold

    @classmethod
    def from_config(cls, config, model, rewards: dict | None = None) -> "Evaluator":
        """The evaluator for a run's ``config`` and ``model``. ``rewards``: the run's training rewards, already
        built (name -> callable), for an evaluator that scores with them; None builds nothing."""
        return cls()

    @classmethod
    def reported_metrics(cls, eval_config) -> tuple[str, ...]:
        """The out-of-domain metrics an evaluation under ``eval_config`` (an ``EvalConfig``) reports: what
        ``eval.guard_metric`` may watch. All of ``out_of_domain`` unless a subclass needs a setting for some."""
        return tuple(cls.out_of_domain)

    def evaluate(self, model, settings: SamplerSettings, images_per_category: int, seed: int = 0) -> EvalResult:
        raise NotImplementedError

    def diagnostics(self, result: EvalResult, seed: int = 0) -> tuple[dict, str]:
        """Extra JSON fields and text for `dgpo eval` (e.g. failure breakdowns); none by default."""
        return {}, ""


EVALUATORS: Registry[type[Evaluator]] = Registry("evaluator", plugins=True)
DEFAULT_FOR_BACKEND: dict[str, str] = {}


def register_evaluator(name: str, default_for: tuple[str, ...] = ()):
    """Register an evaluator class under ``name``; ``default_for`` lists the backends it evaluates by default."""

    def decorator(cls: type[Evaluator]) -> type[Evaluator]:
        EVALUATORS.register(name)(cls)
        cls.name = name
        for backend in default_for:
            DEFAULT_FOR_BACKEND[backend] = name
        return cls

    return decorator


def get_evaluator(name: str) -> type[Evaluator]:
    return EVALUATORS.get(name)


def available_evaluators() -> list[str]:
    return EVALUATORS.names()


def resolve_evaluator(name: str, backend: str, prompts: str = "") -> tuple[str, str]:
    """The evaluator a run uses (``"none"`` = no evaluation) and why; ``prompts``: ``eval.prompts``."""
    if name:
        if name != NONE:
            EVALUATORS.get(name)
        return name, f"eval.evaluator={name}"
    EVALUATORS.names()  # load the plugins, which fill DEFAULT_FOR_BACKEND
    if backend in DEFAULT_FOR_BACKEND:
        return DEFAULT_FOR_BACKEND[backend], f"the default evaluator of model.backend {backend}"
    if prompts:
        return PROMPT_SET, f"eval.prompts={prompts}"
    return NONE, (f"no evaluator is registered as the default for model.backend {backend}, eval.prompts is empty "
                  "and eval.evaluator is empty")


def metric_means(rewards: dict, result: EvalResult) -> dict[str, float]:
    """Each reward's mean over the evaluation's images (NaN where it applies to none): ``eval.metrics``. A
    reward the evaluator already scored (one of ``result.scores``) is taken from there, not scored twice."""
    means = {}
    for name, reward in rewards.items():
        if name in result.scores:
            means[name] = result.scores[name]
            continue
        scores = score_batch({name: reward}, result.images, result.prompts, result.metadata)[name]
        means[name] = mean_score(scores)
    return means


def evaluator_of(entry: dict) -> type[Evaluator] | None:
    """The evaluator class that wrote an evaluation entry (evals.json): the one it names, or for an entry written
    before the ``evaluator`` key the one registered evaluator whose ``scores_key`` it holds; None if unknown."""
    if "evaluator" in entry:
        return EVALUATORS.get(entry["evaluator"]) if entry["evaluator"] in EVALUATORS else None
    holders = [EVALUATORS.get(name) for name in EVALUATORS.names() if EVALUATORS.get(name).scores_key in entry]
    return holders[0] if len(holders) == 1 else None


def scores_of(entry: dict) -> dict[str, float]:
    cls = evaluator_of(entry)
    key = cls.scores_key if cls is not None else ("categories" if "categories" in entry else "scores")
    return entry.get(key, {})


def out_of_domain_of(entry: dict) -> dict[str, float]:
    cls = evaluator_of(entry)
    names = cls.out_of_domain if cls is not None else {}
    return {name: entry[name] for name in names if name in entry}
