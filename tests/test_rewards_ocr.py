"""OCR reward: the Flow-GRPO scoring rule, and real Tesseract OCR on text rendered with PIL."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from dgpo.rewards import get_reward
from dgpo.rewards.ocr import levenshtein, ocr_score, quoted_target

needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None, reason="needs the tesseract binary (apt-get install tesseract-ocr)")


@pytest.mark.parametrize(
    "a, b, distance",
    [("kitten", "sitting", 3), ("sitting", "kitten", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3), ("abc", "abc", 0), ("ab", "ba", 2)],
)
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance


@pytest.mark.parametrize(
    "prompt, target",
    [
        ('A neon sign that says "Open 24 Hours" above a door', "open24hours"),
        ('Two signs: "Left" and "Right"', "left"),
        ("a photo of a cat", None),
        ('an unmatched " quote', None),
        ('an empty "" quote', None),
    ],
)
def test_quoted_target(prompt, target):
    assert quoted_target(prompt) == target


def test_ocr_score_rule():
    assert ocr_score("Hello World\n", "helloworld") == 1.0
    assert ocr_score("SALE! Hello World today", "helloworld") == 1.0, "target inside the recognised text scores 1"
    assert ocr_score("helo world", "helloworld") == pytest.approx(0.9)
    assert ocr_score("a completely different and much longer text", "hi") == 0.0, "clipped at zero"
    assert ocr_score("", "hello") == 0.0


def _font(size: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)  # Pillow searches the system font folders
    except OSError:
        return ImageFont.load_default(size=size)


def _render(texts: list[str], size: tuple[int, int] = (320, 160)) -> torch.Tensor:
    images = []
    for text in texts:
        image = Image.new("RGB", size, (250, 248, 240))
        ImageDraw.Draw(image).text((16, size[1] // 2 - 20), text, fill=(20, 20, 30), font=_font(32))
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0)
    return torch.stack(images)


@needs_tesseract
def test_ocr_reward_reads_rendered_text():
    pytest.importorskip("pytesseract")
    reward = get_reward("ocr")
    images = _render(["Hello World", "Hello World", "", "Hello World", "Hello Word"])
    prompts = [
        'a sign that says "Hello World"',
        'a sign that says "Goodbye Moon"',
        'a sign that says "Hello World"',
        "a sign with no quoted text",
        'a sign that says "Hello World"',
    ]
    scores = reward(images, prompts, [{}] * len(prompts))
    assert scores.shape == (5,) and scores.dtype == np.float64
    assert scores[0] == 1.0, "the right text is read exactly"
    assert scores[1] < 0.5, "wrong text scores low"
    assert scores[2] == 0.0, "an image without text scores 0"
    assert np.isnan(scores[3]), "no quoted text: not applicable"
    assert scores[4] == pytest.approx(0.9), "one missing letter of ten costs 0.1"


def test_ocr_reward_names_the_missing_binary(monkeypatch, tmp_path):
    pytest.importorskip("pytesseract")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"'tesseract' binary on PATH: apt-get install tesseract-ocr"):
        get_reward("ocr")
