"""Built-in rewards that need no weights: the ShapesEval verifier and JPEG compressibility."""
from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ..shapes.prompts import PromptSpec
from ..shapes.verifier import Verdict, focused_partial, verify
from . import register_reward


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


def _jpeg_kilobytes(image: torch.Tensor) -> float:
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.tell() / 1000.0


@register_reward("jpeg_compressibility")
def jpeg_compressibility():
    """DDPO's classic reward: minus the JPEG size in kB (smaller files score higher)."""
    return lambda images, prompts, metadata: np.asarray([-_jpeg_kilobytes(im) for im in images])


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility():
    """The JPEG size in kB: rewards detail and noise."""
    return lambda images, prompts, metadata: np.asarray([_jpeg_kilobytes(im) for im in images])
