"""Velocity-norm drift of a policy against its reference: a reward-hacking warning that needs no log-probability
(periodic evaluation in training, docs/method.md)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .models.base import PromptEmbeddings
from .seeding import keyed_randn

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
