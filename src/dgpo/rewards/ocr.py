"""OCR reward (the DGPO / Flow-GRPO text-rendering task) with the Tesseract engine.

Flow-GRPO (and the DGPO reference code, which copies it) score text rendering with PaddleOCR;
PaddleOCR pulls in a second deep-learning framework and downloads weights, so this uses
Tesseract, a system binary with packaged weights. The scoring rule is Flow-GRPO's
``OcrScorer``: the target is the text between the first pair of double quotes, both strings
are lower-cased with spaces removed, a target found inside the recognised text scores 1,
otherwise ``1 - min(levenshtein, len(target)) / len(target)``.
"""
from __future__ import annotations

import shutil

import numpy as np
import torch

from ..errors import UserError
from ..requirements import Binary, Package
from .base import register_reward, to_pil_images


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), two-row dynamic programme."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def quoted_target(prompt: str) -> str | None:
    """The text between the first pair of double quotes, normalised; None if there is none."""
    parts = prompt.split('"')
    if len(parts) < 3:
        return None
    target = parts[1].replace(" ", "").lower()
    return target or None


def ocr_score(recognised: str, target: str) -> float:
    """Flow-GRPO's rule: 1 if the target appears in the recognised text, else 1 - clipped distance / length."""
    recognised = "".join(recognised.split()).lower()  # Tesseract separates lines with newlines
    if target in recognised:
        return 1.0
    return 1.0 - min(levenshtein(recognised, target), len(target)) / len(target)


@register_reward("ocr", requires=(Package("pytesseract", "pip install 'dgpo[ocr]'"), Binary("tesseract", "apt-get install tesseract-ocr")))
def ocr(psm: int = 11):
    """Text rendering: 1 - edit distance / length of the quoted prompt text, read with Tesseract OCR."""
    try:
        import pytesseract
    except ImportError:
        raise UserError("the ocr reward needs pytesseract: pip install 'dgpo[ocr]'") from None
    binary = pytesseract.pytesseract.tesseract_cmd
    if shutil.which(binary) is None:
        raise UserError(f"the ocr reward needs the {binary!r} binary on PATH: apt-get install tesseract-ocr")
    # psm 11 (sparse text) finds words anywhere in a picture; the default assumes a page layout.
    config = f"--psm {psm}"

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> np.ndarray:
        scores = []
        for image, prompt in zip(to_pil_images(images), prompts):
            target = quoted_target(prompt)
            scores.append(np.nan if target is None else ocr_score(pytesseract.image_to_string(image, config=config), target))
        return np.asarray(scores, dtype=np.float64)

    return reward
