"""Image grids for a person to look at: samples under their captions, framed by the verifier's call where there is one."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw


def save_grid(
    images: torch.Tensor,
    labels: list[str],
    path: str | Path,
    columns: int = 8,
    scale: int = 3,
    passed: list[bool] | None = None,
) -> None:
    """A PNG of images (upscaled, nearest) each under its caption, wrapped to the tile width.

    With ``passed``, each tile gets a green (pass) or red (fail) frame: the verifier's call,
    for a person to check.
    """
    n = len(images)
    rows = math.ceil(n / columns)
    size = images.shape[-1] * scale
    chars_per_line = size // 6
    caption_h = 2 * 11
    sheet = Image.new("RGB", (columns * (size + 2), rows * (size + caption_h + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels)):
        r, c = divmod(i, columns)
        array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        tile = Image.fromarray(array).resize((size, size), Image.NEAREST)
        x, y = c * (size + 2), r * (size + caption_h + 2)
        sheet.paste(tile, (x, y + caption_h))
        if passed is not None:
            colour = (0, 170, 0) if passed[i] else (220, 0, 0)
            draw.rectangle([x, y + caption_h, x + size - 1, y + caption_h + size - 1], outline=colour, width=2)
        lines = textwrap.wrap(label, chars_per_line)[:2]
        draw.multiline_text((x + 1, y), "\n".join(lines), fill=(0, 0, 0), spacing=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)

