"""ShapesEval prompt grammar: GenEval's six task categories over the shapes world.

A ``PromptSpec`` is the prompt text plus the structured clauses the verifier checks.
Train and test sets are fixed by a seeded split of each category's combinations:
no test prompt string appears in the training set. Single-object prompts (one per
shape) are all needed for the test set, so training has none of them.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass

import numpy as np

from .world import COLORS, PLURALS, RELATIONS, SHAPES, SceneObject, place_objects

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
SPLIT_SEED = 20251009
# Fraction of each category's combinations held out for the test set.
TEST_FRACTION = {
    "single_object": 1.0,
    "two_object": 0.5,
    "counting": 0.5,
    "colors": 0.5,
    "position": 0.5,
    "color_attr": 0.25,
}
TEST_IMAGES_PER_CATEGORY = 96


@dataclass(frozen=True)
class ObjectClause:
    """Required object: its shape, optionally its colour, and how many (exact only for counting)."""

    shape: str
    color: str | None = None
    count: int = 1


@dataclass(frozen=True)
class PromptSpec:
    category: str
    prompt: str
    objects: tuple[ObjectClause, ...]
    relation: str | None = None

    def to_metadata(self) -> dict:
        return {"category": self.category, "objects": [asdict(o) for o in self.objects], "relation": self.relation}

    @staticmethod
    def from_metadata(prompt: str, meta: dict) -> "PromptSpec":
        objects = tuple(ObjectClause(**o) for o in meta["objects"])
        return PromptSpec(meta["category"], prompt, objects, meta.get("relation"))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(shape: str, color: str | None = None) -> str:
    """'a circle', 'an ... ', 'a red square': the grammar's noun phrase."""
    phrase = f"{color} {shape}" if color else shape
    return f"{_article(phrase)} {phrase}"


def all_specs(category: str) -> list[PromptSpec]:
    """Every prompt of one category, in a fixed order."""
    if category == "single_object":
        return [PromptSpec(category, f"a photo of {noun_phrase(s)}", (ObjectClause(s),)) for s in SHAPES]
    if category == "two_object":
        return [
            PromptSpec(category, f"a photo of {noun_phrase(a)} and {noun_phrase(b)}", (ObjectClause(a), ObjectClause(b)))
            for a, b in itertools.permutations(SHAPES, 2)
        ]
    if category == "counting":
        return [
            PromptSpec(category, f"a photo of {NUMBER_WORDS[n]} {PLURALS[s]}", (ObjectClause(s, count=n),))
            for s in SHAPES
            for n in NUMBER_WORDS
        ]
    if category == "colors":
        return [PromptSpec(category, f"a photo of {noun_phrase(s, c)}", (ObjectClause(s, c),)) for s in SHAPES for c in COLORS]
    if category == "position":
        return [
            PromptSpec(category, f"a photo of {noun_phrase(a)} {rel} {noun_phrase(b)}", (ObjectClause(a), ObjectClause(b)), rel)
            for a, b in itertools.permutations(SHAPES, 2)
            for rel in RELATIONS
        ]
    if category == "color_attr":
        return [
            PromptSpec(category, f"a photo of {noun_phrase(a, ca)} and {noun_phrase(b, cb)}", (ObjectClause(a, ca), ObjectClause(b, cb)))
            for a, b in itertools.permutations(SHAPES, 2)
            for ca, cb in itertools.permutations(COLORS, 2)
        ]
    raise ValueError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")


def _split(category: str) -> tuple[list[PromptSpec], list[PromptSpec]]:
    specs = all_specs(category)
    if category == "two_object":
        # One word order per shape pair goes to test, the other to train.
        test = [s for s in specs if SHAPES.index(s.objects[0].shape) < SHAPES.index(s.objects[1].shape)]
        train = [s for s in specs if s not in test]
        return train, test
    order = list(range(len(specs)))
    random.Random(f"{SPLIT_SEED}-{category}").shuffle(order)
    n_test = math.ceil(TEST_FRACTION[category] * len(specs))
    test_idx = set(order[:n_test])
    return [s for i, s in enumerate(specs) if i not in test_idx], [s for i, s in enumerate(specs) if i in test_idx]


def train_specs() -> list[PromptSpec]:
    return [spec for cat in CATEGORIES for spec in _split(cat)[0]]


def test_specs() -> list[PromptSpec]:
    return [spec for cat in CATEGORIES for spec in _split(cat)[1]]


def test_set(images_per_category: int = TEST_IMAGES_PER_CATEGORY) -> list[tuple[PromptSpec, int]]:
    """(spec, images for that prompt): every test prompt, each category about ``images_per_category`` images."""
    out = []
    for cat in CATEGORIES:
        specs = _split(cat)[1]
        per_prompt = max(1, math.ceil(images_per_category / len(specs)))
        out.extend((spec, per_prompt) for spec in specs)
    return out


def scene_for_spec(spec: PromptSpec, rng: np.random.Generator) -> list[SceneObject]:
    """A ground-truth scene satisfying ``spec``; unspecified colours are drawn at random."""
    items: list[tuple[str, str]] = []
    for clause in spec.objects:
        for _ in range(clause.count):
            items.append((clause.shape, clause.color or COLORS[int(rng.integers(len(COLORS)))]))
    return place_objects(items, rng, relation=spec.relation)


def vocabulary() -> list[str]:
    """Every word any prompt of the grammar can use, sorted."""
    words = set()
    for cat in CATEGORIES:
        for spec in all_specs(cat):
            words.update(spec.prompt.split())
    return sorted(words)
