"""Pretraining captions that describe a scene loosely, as web alt-text describes a photo.

The base model of a text-to-image RL paper (SD3.5-M on GenEval) draws well and follows
prompts loosely: it was pretrained on captions that name the main objects but often skip
or get wrong the count, the layout and which colour goes with which object. Evaluation
and RL prompts stay exact (``prompts.py``); only pretraining captions come from here.

A caption is drawn for a rendered scene (its ``SceneObject`` list), each attribute
mentioned with its own probability and, when mentioned, sometimes wrong. Every word a
caption uses is in the prompt grammar's vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .prompts import NUMBER_WORDS, noun_phrase
from .world import COLORS, PLURALS, RELATION_RENDER_MARGIN, RELATIONS, SceneObject, relation_holds

OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class CaptionModel:
    """How often a pretraining caption mentions each attribute of its scene, and how often it gets it wrong."""

    name_second_object: float = 0.9
    """two-object scenes: probability that both objects are named (else only one, chosen at random)"""
    mention_color: float = 0.7
    """probability that the caption names the objects' colours"""
    wrong_color: float = 0.1
    """a named colour is replaced by another palette colour (per object)"""
    swap_colors: float = 0.4
    """two coloured objects: their colours are bound to the wrong objects"""
    mention_count: float = 0.6
    """several objects of one shape: probability that the number is given (else just the plural)"""
    count_off_by_one: float = 0.4
    """a given number is one too many or one too few (staying within two to four)"""
    mention_relation: float = 0.5
    """two objects in a clear relation: probability that it is stated (else joined by "and")"""
    swap_relation: float = 0.4
    """a stated relation is the opposite of the true one"""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"caption model: {field.name} must be a probability in [0, 1], got {value}")


EXACT_CAPTIONS = CaptionModel(
    name_second_object=1.0,
    mention_color=1.0,
    wrong_color=0.0,
    swap_colors=0.0,
    mention_count=1.0,
    count_off_by_one=0.0,
    mention_relation=1.0,
    swap_relation=0.0,
)
"""Captions that state everything and never err (for tests, and to measure what looseness costs)."""


def _chance(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def _other(rng: np.random.Generator, options: tuple[str, ...], exclude: str) -> str:
    rest = [o for o in options if o != exclude]
    return rest[int(rng.integers(len(rest)))]


def _count_caption(objects: list[SceneObject], model: CaptionModel, rng: np.random.Generator) -> str:
    n, plural = len(objects), PLURALS[objects[0].shape]
    if not _chance(rng, model.mention_count):
        return f"a photo of {plural}"
    if _chance(rng, model.count_off_by_one):
        n = n + 1 if n == min(NUMBER_WORDS) or (n < max(NUMBER_WORDS) and _chance(rng, 0.5)) else n - 1
    return f"a photo of {NUMBER_WORDS[n]} {plural}"


def _colors(objects: list[SceneObject], model: CaptionModel, rng: np.random.Generator) -> list[str | None]:
    if not _chance(rng, model.mention_color):
        return [None] * len(objects)
    colors = [_other(rng, COLORS, o.color) if _chance(rng, model.wrong_color) else o.color for o in objects]
    if len(colors) == 2 and _chance(rng, model.swap_colors):
        colors.reverse()
    return colors


def caption_scene(objects: list[SceneObject], model: CaptionModel, rng: np.random.Generator) -> str:
    """A loose caption of ``objects``: one object, several of one shape, or two different shapes."""
    if len(objects) > 1 and len({o.shape for o in objects}) == 1:
        return _count_caption(objects, model, rng)
    if len(objects) > 2:
        raise ValueError(f"caption_scene describes one object, two different shapes or a count, got {len(objects)} mixed objects")
    objects = list(objects)
    if len(objects) == 2:
        if _chance(rng, 0.5):
            objects.reverse()
        if not _chance(rng, model.name_second_object):
            objects = objects[:1]
    colors = _colors(objects, model, rng)
    nouns = [noun_phrase(o.shape, c) for o, c in zip(objects, colors)]
    if len(objects) == 1:
        return f"a photo of {nouns[0]}"
    holding = [r for r in RELATIONS if relation_holds(r, objects[0].center, objects[1].center, RELATION_RENDER_MARGIN)]
    if holding and _chance(rng, model.mention_relation):
        relation = holding[int(rng.integers(len(holding)))]
        if _chance(rng, model.swap_relation):
            relation = OPPOSITE_RELATION[relation]
        return f"a photo of {nouns[0]} {relation} {nouns[1]}"
    return f"a photo of {nouns[0]} and {nouns[1]}"
