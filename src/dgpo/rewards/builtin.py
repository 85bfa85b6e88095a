"""Built-in rewards that need no weights: the ShapesEval verifier and JPEG compressibility."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from ..shapes.prompts import PromptSpec
from ..shapes.verifier import verify
from . import register_reward


def _shapes_reward(strict: bool):
    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> np.ndarray:
        scores = []
        for image, prompt, meta in zip(images, prompts, metadata):
            if not meta or "objects" not in meta:
                scores.append(np.nan)
                continue
            verdict = verify(PromptSpec.from_metadata(prompt, meta), image)
            scores.append(float(verdict.passed) if strict else verdict.partial)
        return np.asarray(scores, dtype=np.float64)

    return reward


@register_reward("shapes_partial")
def shapes_partial():
    """ShapesEval partial credit: fraction of the prompt's clauses the image satisfies (dense)."""
    return _shapes_reward(strict=False)


@register_reward("shapes_strict")
def shapes_strict():
    """ShapesEval strict pass/fail, GenEval's per-image rule."""
    return _shapes_reward(strict=True)


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
