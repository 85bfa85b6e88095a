"""ShapesEval's verifier as rewards: shapes_partial, shapes_strict, shapes_focused.

Registered when the plugins load (``dgpo.shapes.plugin``), so the reward registry lists them without the
user importing anything."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..rewards import register_reward
from .prompts import PromptSpec
from .verifier import Verdict, focused_partial, verify


def _shapes_reward(score: Callable[[Verdict], float]):
    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> np.ndarray:
        scores = []
        for image, prompt, meta in zip(images, prompts, metadata):
            if not meta or "objects" not in meta:
                scores.append(np.nan)
                continue
            scores.append(score(verify(PromptSpec.from_metadata(prompt, meta), image)))
        return np.asarray(scores, dtype=np.float64)

    return reward


@register_reward("shapes_partial")
def shapes_partial():
    """ShapesEval partial credit: fraction of the prompt's clauses the image satisfies (dense)."""
    return _shapes_reward(lambda verdict: verdict.partial)


@register_reward("shapes_strict")
def shapes_strict():
    """ShapesEval strict pass/fail, GenEval's per-image rule."""
    return _shapes_reward(lambda verdict: float(verdict.passed))


@register_reward("shapes_focused")
def shapes_focused(focus: float = 2.0 / 3.0):
    """ShapesEval partial credit where the clauses a category tests (relation, colours, count) carry `focus` of it."""
    if not 0.0 < focus < 1.0:
        raise ValueError(f"shapes_focused: focus must be in (0, 1), got {focus}")
    return _shapes_reward(lambda verdict: focused_partial(verdict, focus))
