"""Deterministic generation, velocity drift and grids shared by `dgpo eval`, evaluators, periodic evaluation in training
and benchmarks. The evaluators themselves (what a run scores) are in ``dgpo.evaluators``."""
from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .models.base import FlowModelAdapter, PromptEmbeddings, cat_embeddings
from .rollout import SamplerSettings, sample
from .sampling import sampler_check
from .seeding import keyed_randn


@torch.no_grad()
def generate(
    model: FlowModelAdapter,
    prompts: list[str],
    noise_keys: list[tuple],
    settings: SamplerSettings,
    batch_size: int = 256,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for prompts[i] from the noise keyed by noise_keys[i] (deterministic):
    ``dgpo.rollout.sample`` in batches, with an ODE sampler."""
    message = sampler_check("sampler", settings.sampler, deterministic=True)
    if message:
        raise ValueError(message)
    uncond_single = model.encode_prompts([""])
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        noise = keyed_randn(model.latent_shape, noise_keys[start : start + batch_size], device=model.device)
        uncond = cat_embeddings([uncond_single] * len(chunk))
        images.append(sample(model, model.encode_prompts(chunk), uncond, noise, settings).images.cpu())
    return torch.cat(images)


DRIFT_SIGMAS = (0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def velocity_drift(
    velocity: Callable[[torch.Tensor, torch.Tensor, PromptEmbeddings], torch.Tensor],
    reference_velocity: Callable[[torch.Tensor, torch.Tensor, PromptEmbeddings], torch.Tensor],
    latents: torch.Tensor,
    embeddings: PromptEmbeddings,
    noise_keys: list[tuple],
    sigmas: tuple[float, ...] = DRIFT_SIGMAS,
) -> float:
    """Velocity-norm drift, mean ||v_theta(x_s)|| / mean ||v_ref(x_s)||, over x_s = (1 - s) x + s eps of the given latents.

    1 at the start of training; a policy whose velocities grow or shrink against the reference's (which
    over-saturated or washed-out images show) moves it away from 1, whatever the algorithm, so it warns of
    reward hacking without a log-probability.
    """
    policy_norm = reference_norm = 0.0
    for sigma in sigmas:
        noise = keyed_randn(tuple(latents.shape[1:]), [(*key, "drift", sigma) for key in noise_keys], device=latents.device)
        s = torch.full((latents.shape[0],), sigma, device=latents.device, dtype=latents.dtype)
        x = (1 - sigma) * latents + sigma * noise.to(latents.dtype)
        policy_norm += velocity(x, s, embeddings).flatten(1).norm(dim=1).sum().item()
        reference_norm += reference_velocity(x, s, embeddings).flatten(1).norm(dim=1).sum().item()
    return policy_norm / reference_norm


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

