"""Training algorithms as registered functions: one micro-step's loss from an ``UpdateContext``.

The trainer owns rollouts, rewards, advantages and the optimizer; an algorithm only turns
a micro-batch of final samples and advantages into a loss (plus detached metrics).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..losses import apply_clip, dgpo_loss, per_sample_mse, ppo_clip_mask, velocity_kl
from ..models.base import PromptEmbeddings
from ..registry import Registry

if TYPE_CHECKING:
    from .loop import Trainer


@dataclass
class UpdateContext:
    trainer: "Trainer"
    step: int
    timestep_index: int
    sample_ids: torch.Tensor
    group_ids: torch.Tensor
    x0: torch.Tensor
    embeddings: PromptEmbeddings
    advantages: torch.Tensor


Algorithm = Callable[[UpdateContext], tuple[torch.Tensor, dict[str, float]]]
ALGORITHMS: Registry[Algorithm] = Registry("algorithm")
register_algorithm = ALGORITHMS.register
get_algorithm = ALGORITHMS.get


def renoise(ctx: UpdateContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t = (1 - t) x0 + t eps with a per-group t and per-group shared eps; returns (x_t, t, v target)."""
    tr = ctx.trainer
    sigma = tr.training_sigmas(ctx.step, ctx.timestep_index, ctx.group_ids)
    eps = tr.group_noise(ctx.step, ctx.timestep_index, ctx.group_ids)
    s = sigma.view(-1, *([1] * (ctx.x0.dim() - 1)))
    return (1 - s) * ctx.x0 + s * eps, sigma, eps - ctx.x0


@register_algorithm("dgpo")
def dgpo_update(ctx: UpdateContext) -> tuple[torch.Tensor, dict[str, float]]:
    """DGPO (paper Eq. 17): group preference between the positive and negative halves of each group."""
    tr, loss_cfg = ctx.trainer, ctx.trainer.config.loss
    xt, sigma, target = renoise(ctx)
    v_ref = tr.reference_velocity(xt, sigma, ctx.embeddings)
    if loss_cfg.ppo_clip_eps > 0:
        # Before the policy forward: swapping EMA weights in place would invalidate its autograd graph.
        with torch.no_grad(), tr.rollout_ema.swapped_in():
            err_old = per_sample_mse(tr.model.velocity(xt, sigma, ctx.embeddings).float(), target)
    v_theta = tr.model.velocity(xt, sigma, ctx.embeddings)
    err_theta = per_sample_mse(v_theta.float(), target)
    err_ref = per_sample_mse(v_ref.float(), target)
    extra = {}
    if loss_cfg.ppo_clip_eps > 0:
        clipped = ppo_clip_mask(ctx.advantages, err_theta, err_old, loss_cfg.ppo_clip_eps)
        err_theta = apply_clip(err_theta, clipped)
        extra["clipped_fraction"] = clipped.float().mean()
    loss, metrics = dgpo_loss(
        ctx.advantages, err_theta, err_ref, ctx.group_ids.to(err_theta.device), loss_cfg.beta,
        group_sum=tr.group_sum, num_groups=tr.layout.groups_per_step,
    )
    metrics.update(extra)
    if loss_cfg.kl_beta > 0:
        kl = velocity_kl(v_theta.float(), v_ref.float())
        loss = loss + loss_cfg.kl_beta * kl.sum() / tr.layout.samples_per_step
        metrics["kl"] = kl.mean().detach()
    ref_forwards = (2 if loss_cfg.reference_guidance_scale != 1 else 1) + (1 if loss_cfg.ppo_clip_eps > 0 else 0)
    tr.counters.forward_equivalents += len(ctx.sample_ids) * tr.acc.num_processes * (3 + ref_forwards)
    return loss, {k: float(v) for k, v in metrics.items()}
