"""Prompts and the group layout of a step: which process holds which samples of which group.

A step draws ``groups_per_step`` prompts (by default a shuffled pass over the prompt set, keyed by the
run seed, so the draw depends only on the step number; ``prompt_sampling.py`` has the samplers). Sample
``n`` of the step belongs to group ``n // G``. Micro-step ``m`` covers whole groups; each process holds a contiguous
slice of every micro-step, so a group may span processes but never micro-steps, and the
cross-process group sum of one micro-step completes every group in it.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..registry import Registry
from ..seeding import keyed_generator


@dataclass(frozen=True)
class Prompt:
    text: str
    metadata: dict


def balance_categories(prompts: list[Prompt]) -> list[Prompt]:
    """Each category's prompts repeated (cyclically) to the size of the largest, so training draws
    every category equally often. ShapesEval's train split is 85% colour attribution (its grammar
    has far more two-colour combinations than counts or relations), and GenEval scores the six
    categories with equal weight."""
    by_category: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        by_category.setdefault(prompt.metadata["category"], []).append(prompt)
    size = max(len(group) for group in by_category.values())
    return [group[i % len(group)] for group in by_category.values() for i in range(size)]


PROMPT_SOURCES: Registry[Callable[[], list[Prompt]]] = Registry("prompt source", plugins=True)


def register_prompt_source(name: str):
    """Register a named prompt set (e.g. ``shapes:train``): a callable returning its prompts."""
    return PROMPT_SOURCES.register(name)


def _prompt_from_row(row, where: str) -> Prompt:
    if isinstance(row, str):
        return Prompt(row, {})
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise ValueError(f"{where}: expected a JSON object with a text 'prompt' field")
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: 'metadata' must be a JSON object")
    return Prompt(row["prompt"], metadata)


def _json_prompt(line: str, where: str) -> Prompt:
    """One JSON-lines row: a {prompt, metadata} object. Broken JSON is named as such, with the parser's column."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON at column {exc.colno}: {exc.msg}") from None
    return _prompt_from_row(row if isinstance(row, dict) else None, where)


def _json_list_prompts(text: str, spec: str) -> list[Prompt]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{spec}: starts with '[' but is not a JSON list: {exc}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{spec}: expected a JSON list of prompts")
    return [_prompt_from_row(row, f"{spec}[{i}]") for i, row in enumerate(rows)]


class PromptSource:
    def __init__(self, prompts: list[Prompt], name: str):
        if not prompts:
            raise ValueError(f"prompt source {name} is empty")
        self.prompts = prompts
        self.name = name

    @classmethod
    def load(cls, spec: str) -> "PromptSource":
        """A registered prompt source ('shapes:train', 'shapes:test') or a prompt file, whose format is read from its
        content, not its name: a JSON list (of prompts or {prompt, metadata} objects), JSON lines (a first line
        starting with '{': one {prompt, metadata} object per line), or else text, one prompt per line."""
        if spec in PROMPT_SOURCES:
            return cls(PROMPT_SOURCES.get(spec)(), spec)
        path = Path(spec)
        if not path.is_file():
            from ..prompt_catalog import fetch_hint  # the paper's prompt sets are fetched, not shipped

            hint = fetch_hint(spec) or f"or use a registered prompt source: {' / '.join(PROMPT_SOURCES.names())}"
            raise FileNotFoundError(f"prompt file not found: {spec} ({hint})")
        text = path.read_text()
        lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
        if text.lstrip().startswith("["):
            return cls(_json_list_prompts(text, spec), spec)
        if lines and lines[0][1].lstrip().startswith("{"):
            return cls([_json_prompt(line, f"{spec}:{number}") for number, line in lines], spec)
        if lines and path.suffix in (".json", ".jsonl"):
            raise ValueError(f"{spec} is named {path.suffix} but holds no JSON (its first line does not start with '{{' or '['); "
                             "rename a text file of prompts to .txt")
        return cls([Prompt(line.strip(), {}) for _, line in lines], spec)

    def for_step(self, seed: int, step: int, count: int) -> list[Prompt]:
        """The ``count`` prompts of ``step``: consecutive slices of seeded per-epoch permutations."""
        n = len(self.prompts)
        return [self.prompts[shuffled_index(n, position, "prompts", seed)] for position in range(step * count, (step + 1) * count)]


def shuffled_index(size: int, position: int, *keys: object) -> int:
    """Element ``position`` of consecutive shuffled passes over ``range(size)``: pass ``e = position // size`` is the
    permutation keyed by ``(*keys, e)``, so every index comes once per pass and any position is found without the others."""
    epoch, offset = divmod(position, size)
    return int(torch.randperm(size, generator=keyed_generator(*keys, epoch))[offset])


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class GroupLayout:
    group_size: int
    groups_per_step: int
    micro_batch: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self):
        per_micro = self.micro_batch * self.world_size
        if per_micro % self.group_size:
            raise LayoutError(
                f"{self.world_size} process(es) x micro_batch {self.micro_batch} = {per_micro} images per micro-step, "
                f"which does not hold whole groups of {self.group_size}; choose micro_batch so that "
                f"world_size * micro_batch is a multiple of group_size"
            )
        if self.groups_per_step % self.groups_per_micro:
            raise LayoutError(
                f"groups_per_step {self.groups_per_step} is not a multiple of the {self.groups_per_micro} groups "
                f"each micro-step holds ({self.world_size} x {self.micro_batch} images / group of {self.group_size})"
            )

    @property
    def groups_per_micro(self) -> int:
        return self.micro_batch * self.world_size // self.group_size

    @property
    def micro_steps(self) -> int:
        return self.groups_per_step // self.groups_per_micro

    @property
    def samples_per_step(self) -> int:
        return self.group_size * self.groups_per_step

    def local_samples(self) -> list[list[int]]:
        """Global sample indices this process holds, one list per micro-step."""
        out = []
        for m in range(self.micro_steps):
            start = m * self.groups_per_micro * self.group_size + self.rank * self.micro_batch
            out.append(list(range(start, start + self.micro_batch)))
        return out
