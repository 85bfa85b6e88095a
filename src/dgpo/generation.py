"""Generating images with a flow model: the one rollout used by training, evaluation and benchmarks.

``sample`` turns noise and prompt embeddings into latents and decoded images with a registered sampler
(``dgpo.sampling.SAMPLER_REGISTRY``: an ODE solver, or the SDE with its per-step noise, trajectory and
log-probs) under classifier-free guidance; what to draw (keyed noise) and what to embed is the caller's.
``generate`` is its deterministic batched form for prompts and noise keys (`dgpo sample`, evaluators, probes).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .models.base import FlowModelAdapter, PromptEmbeddings, cat_embeddings
from .models.lora_fold import lora_folded
from .sampler_settings import SamplerSettings
from .sampling import SAMPLER_REGISTRY, cfg_velocity, sampler_check
from .seeding import keyed_randn


@dataclass
class Samples:
    """latents x0 (B, ...) and images (B, 3, H, W) in float32; for a stochastic sampler asked for them, the
    trajectory (B, num_steps + 1, ...) and per-step log-probs (B, num_steps)."""

    latents: torch.Tensor
    images: torch.Tensor
    trajectory: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None


@torch.no_grad()
def sample(
    model: FlowModelAdapter,
    cond: PromptEmbeddings,
    uncond: PromptEmbeddings,
    noise: torch.Tensor,
    settings: SamplerSettings,
    *,
    step_noise: torch.Tensor | None = None,
    sde_steps: torch.Tensor | None = None,
    return_trajectory: bool = False,
    start_step: int = 0,
    fold_lora: bool = True,
) -> Samples:
    """Integrate from ``noise`` over ``settings.sigmas()`` with the guided velocity

        v = v(x, uncond) + guidance_scale * (v(x, cond) - v(x, uncond))      (one batched forward; plain v(x, cond) at scale 1)

    and decode. With ``fold_lora``, the transformer's LoRA, if any is active, is folded into its weights for the solve
    (``lora_folded``: the same velocities up to float rounding, without the LoRA path at every forward).
    ``step_noise`` (B, num_steps, ...) and ``sde_steps`` (B, num_steps) go to a stochastic sampler only.
    With ``start_step`` k, ``noise`` is a latent already at the grid's sigma_k (a re-noised image, say) and the
    solver takes the grid's remaining num_steps - k steps (the per-step inputs then have num_steps - k entries).
    """
    if not 0 <= start_step < settings.num_steps:
        raise ValueError(f"start_step must be in [0, {settings.num_steps}), got {start_step}")
    sigmas = settings.sigmas(noise.device)[start_step:]
    velocity_fn = cfg_velocity(model.velocity, cond, uncond, settings.guidance_scale)
    with lora_folded(model.transformer) if fold_lora else contextlib.nullcontext():
        out = SAMPLER_REGISTRY.get(settings.sampler).sample(
            velocity_fn, noise, sigmas, noise_level=settings.noise_level, step_noise=step_noise, sde_steps=sde_steps, return_trajectory=return_trajectory,
        )
    latents = out.sample.float()
    images = model.decode(latents).float()
    trajectory = torch.stack(out.trajectory, dim=1).float() if out.trajectory is not None else None
    log_probs = out.log_probs.float() if out.log_probs is not None else None
    return Samples(latents, images, trajectory, log_probs)


@torch.no_grad()
def generate(
    model: FlowModelAdapter,
    prompts: list[str],
    noise_keys: list[tuple],
    settings: SamplerSettings,
    batch_size: int = 256,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for prompts[i] from the noise keyed by noise_keys[i] (deterministic):
    ``sample`` in batches, with an ODE sampler."""
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
