"""Built-in rewards that need no weights: JPEG compressibility."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .base import register_reward


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
