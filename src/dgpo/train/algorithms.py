"""Training algorithms and advantage functions as registered variants.

The trainer owns rollouts, rewards and the optimizer. An algorithm turns one micro-batch
of a step (final samples, and for SDE algorithms the trajectory with its log-probs) plus
advantages into a loss and detached metrics; an advantage function turns a step's rewards
into per-sample advantages. Adding a variant is one decorated function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..losses import (
    apply_clip,
    awm_loss,
    best_worst_advantages,
    dgpo_kl_term,
    dgpo_loss,
    diffusion_nft_loss,
    flow_grpo_kl,
    flow_grpo_loss,
    group_advantages,
    per_sample_mse,
    ppo_clip_mask,
    rank_advantages,
    velocity_kl,
)
from ..models.base import PromptEmbeddings
from ..registry import Registry
from ..sampling import cfg_velocity, sde_step_log_prob, sde_step_mean_std
from ..seeding import keyed_randn, keyed_uniform

if TYPE_CHECKING:
    from .config import Config, RewardConfig
    from .loop import Trainer


@dataclass
class UpdateContext:
    """One micro-batch of one loss pass (DGPO: a training timestep; Flow-GRPO: a trajectory step)."""

    trainer: "Trainer"
    step: int
    pass_index: int
    sample_ids: torch.Tensor
    group_ids: torch.Tensor
    x0: torch.Tensor
    embeddings: PromptEmbeddings
    advantages: torch.Tensor
    trajectory: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    update_index: int = 0
    """Which of the optim.updates_per_rollout optimizer steps on this rollout."""

    @property
    def draw_key(self) -> tuple[int, int]:
        """Keys this pass's random draws (timesteps, noise, trajectory steps) within the step."""
        return (self.update_index, self.pass_index)


UpdateFn = Callable[[UpdateContext], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Algorithm:
    """A registered training algorithm.

    update: the loss of one micro-batch of one pass. passes: loss passes per optimizer step.
    needs_trajectory: rollouts must record the SDE trajectory and per-step log-probs.
    text_dropout: train on the empty prompt with probability data.text_dropout (a
    likelihood-ratio method must score the rollout's own conditioning, so it sets False).
    advantages: an advantage function this algorithm always uses, else reward.advantage.
    """

    update: UpdateFn
    passes: Callable[["Config"], int]
    needs_trajectory: bool = False
    text_dropout: bool = True
    advantages: str | None = None


ALGORITHMS: Registry[Algorithm] = Registry("algorithm")
get_algorithm = ALGORITHMS.get


def register_algorithm(name: str, passes: Callable[["Config"], int], **options) -> Callable[[UpdateFn], UpdateFn]:
    def decorator(update: UpdateFn) -> UpdateFn:
        ALGORITHMS.register(name)(Algorithm(update, passes, **options))
        return update

    return decorator


AdvantageFn = Callable[[torch.Tensor, torch.Tensor, "RewardConfig"], torch.Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage function")
register_advantage = ADVANTAGES.register
get_advantage = ADVANTAGES.get


@register_advantage("normalized")
def normalized_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, cfg: "RewardConfig") -> torch.Tensor:
    """(r - group mean) / std, clipped: the paper's A_i (weights w = |A|)."""
    clip = cfg.advantage_clip if cfg.advantage_clip > 0 else None
    return group_advantages(rewards, group_ids, std_mode=cfg.std_mode, clip=clip)


@register_advantage("best_worst")
def best_worst(rewards: torch.Tensor, group_ids: torch.Tensor, cfg: "RewardConfig") -> torch.Tensor:
    """+1 / -1 for each group's best / worst sample: Diffusion-DPO's pair."""
    return best_worst_advantages(rewards, group_ids)


@register_advantage("rank")
def rank(rewards: torch.Tensor, group_ids: torch.Tensor, cfg: "RewardConfig") -> torch.Tensor:
    """Centred ranks in [-1, 1]: a weighting that ignores the reward's scale."""
    return rank_advantages(rewards, group_ids)


def renoise(ctx: UpdateContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t = (1 - t) x0 + t eps with a per-group t and per-group shared eps; returns (x_t, t, v target)."""
    tr = ctx.trainer
    sigma = tr.training_sigmas(ctx.step, ctx.draw_key, ctx.group_ids)
    eps = tr.group_noise(ctx.step, ctx.draw_key, ctx.group_ids)
    s = sigma.view(-1, *([1] * (ctx.x0.dim() - 1)))
    return (1 - s) * ctx.x0 + s * eps, sigma, eps - ctx.x0


def preference_update(ctx: UpdateContext) -> tuple[torch.Tensor, dict[str, float]]:
    """The group preference loss of DGPO (paper Eq. 17) on re-noised final samples."""
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
        # kl_beta is the reference code's beta_kl: the KL is weighted on the preference loss's scale.
        loss = loss + dgpo_kl_term(kl, loss_cfg.beta, loss_cfg.kl_beta, tr.layout.groups_per_step)
        metrics["kl"] = kl.mean().detach()
    ref_forwards = (2 if loss_cfg.reference_guidance_scale != 1 else 1) + (1 if loss_cfg.ppo_clip_eps > 0 else 0)
    tr.count_forwards(len(ctx.sample_ids) * (3 + ref_forwards))
    return loss, {k: float(v) for k, v in metrics.items()}


register_algorithm("dgpo", passes=lambda c: c.loss.timesteps)(preference_update)
# Online Diffusion-DPO is the same loss on each group's best/worst pair (see best_worst_advantages).
register_algorithm("diffusion_dpo", passes=lambda c: c.loss.timesteps, advantages="best_worst")(preference_update)


@register_algorithm("flow_grpo", passes=lambda c: c.loss.timesteps, needs_trajectory=True, text_dropout=False)
def flow_grpo_update(ctx: UpdateContext) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-GRPO: clipped likelihood ratio of one SDE transition per sample, plus KL to the reference.

    Pass k trains, for each sample, the k-th entry of a keyed permutation of the rollout's steps,
    so ``loss.timesteps`` of the ``rollout.num_steps`` transitions are trained (paper: 9 of 10).
    The policy's transition is recomputed with the rollout's CFG, as Flow-GRPO does.

    Flow-GRPO-Fast (``rollout.sde_window`` > 0): the rollout follows the ODE except for a window of
    ``sde_window`` consecutive SDE steps starting at a keyed step of ``rollout.sde_window_range``
    (``Trainer.sde_window_starts``), and pass k trains the k-th entry of a keyed permutation of the window's
    steps; with ``loss.timesteps = sde_window`` every window step is trained once, as in Flow-GRPO's
    train_sd3_fast.py. Flow-GRPO draws one window per sampling batch; here each sample draws its own, so that
    the draw does not depend on how samples are batched over processes.
    """
    tr, c = ctx.trainer, ctx.trainer.config
    r, loss_cfg = c.rollout, c.loss
    rows = torch.arange(len(ctx.sample_ids))
    if r.sde_window > 0:
        offset = tr.trajectory_steps(ctx.step, ctx.pass_index, ctx.sample_ids, ctx.update_index, n=r.sde_window)
        index = (tr.sde_window_starts(ctx.step, ctx.sample_ids) + offset).to(rows.device)
    else:
        index = tr.trajectory_steps(ctx.step, ctx.pass_index, ctx.sample_ids, ctx.update_index).to(rows.device)
    sigmas = tr.rollout_sigmas()
    x, x_next = ctx.trajectory[rows, index], ctx.trajectory[rows, index + 1]
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    uncond = tr.empty_embeddings(len(rows))

    def transition(velocity_fn):
        v = cfg_velocity(velocity_fn, ctx.embeddings, uncond, r.guidance_scale)(x, sigma)
        return sde_step_mean_std(x, v.float(), sigma, sigma_next, r.noise_level, sigma_max=sigmas[1])

    mean, std = transition(tr.model.velocity)
    log_prob = sde_step_log_prob(x_next, mean, std)
    loss, metrics = flow_grpo_loss(log_prob, ctx.log_probs[rows, index], ctx.advantages, loss_cfg.ppo_clip_eps, tr.layout.samples_per_step)
    cfg_factor = 2 if r.guidance_scale != 1 else 1
    forwards = 3 * cfg_factor
    if loss_cfg.kl_beta > 0:
        with torch.no_grad(), tr.reference_model():
            mean_ref, _ = transition(tr.model.velocity)
        # Flow-GRPO's code form: |dt| times the exact per-step KL, so kl_beta 0.04 means what it means there.
        kl = flow_grpo_kl(mean.float(), mean_ref.float(), std, sigma_next - sigma)
        loss = loss + loss_cfg.kl_beta * kl.sum() / tr.layout.samples_per_step
        metrics["kl"] = kl.mean().detach()
        forwards += cfg_factor
    tr.count_forwards(len(rows) * forwards)
    return loss, {k: float(v) for k, v in metrics.items()}


# ----- log-prob-free algorithms on forward-noised final samples (DiffusionNFT, AWM) ---------------------------


def sample_noise(ctx: UpdateContext, purpose: str) -> torch.Tensor:
    """Re-noising noise drawn independently for every sample (as DiffusionNFT's and AWM's code do), keyed by
    (purpose, seed, step, sample, pass)."""
    tr = ctx.trainer
    keys = [(purpose, tr.config.run.seed, ctx.step, int(i), ctx.draw_key) for i in ctx.sample_ids]
    return keyed_randn(tr.model.latent_shape, keys, device=tr.acc.device)


def _noised(x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * eps


def stratified_grid_indices(u: torch.Tensor, k: int, strata: int, stop: int, start: int = 1) -> torch.Tensor:
    """AWM's timestep draw ("discrete_wo_init"): grid indices start..stop-1 split into ``strata`` strata by

        bounds = long(linspace(start, stop, strata + 1)),     index = bounds[k] + long(u * (bounds[k+1] - bounds[k]))

    and stratum k drawn with the U[0, 1) numbers ``u`` (one per sample), as scripts/train_sd3_awm.py does with
    stop = int(num_steps * timestep_fraction) (14 steps x 0.9: 12) and strata = train_timesteps (6). The reference
    draws one index per stratum per micro-batch; the trainer draws one per sample (keyed), which has the same
    distribution and does not depend on the batch layout.
    """
    bounds = torch.linspace(start, stop, strata + 1, dtype=torch.float32).long()
    low, high = bounds[k], bounds[k + 1]
    return low + (u * (high - low).to(u.dtype)).long()


@register_algorithm("diffusionnft", passes=lambda c: c.loss.timesteps)
def diffusion_nft_update(ctx: UpdateContext) -> tuple[torch.Tensor, dict[str, float]]:
    """DiffusionNFT (arXiv 2509.16117): negative-aware flow matching on forward-noised final samples.

    The old policy is the rollout model, the rollout EMA (``rollout.ema_after`` 0; the reference's "old" adapter,
    soft-updated after each epoch with decay min(0.001 k, 0.5): ``rollout.ema_decay`` 0.5, ``rollout.ema_ramp``
    0.001). Pass k trains each sample at the k-th entry of a keyed permutation of the rollout grid (the reference
    trains int(0.99 num_steps) of the grid's timesteps per sample, in a per-sample random order), on independent noise
    per sample. The old, policy and reference velocities are conditional only (DiffusionNFT is CFG-free).
    """
    tr, c = ctx.trainer, ctx.trainer.config
    loss_cfg = c.loss
    index = tr.trajectory_steps(ctx.step, ctx.pass_index, ctx.sample_ids, ctx.update_index)
    sigma = tr.rollout_sigmas()[index.to(tr.acc.device)]
    eps = sample_noise(ctx, "nft-noise")
    xt = _noised(ctx.x0, sigma, eps)
    v_ref = tr.reference_velocity(xt, sigma, ctx.embeddings) if loss_cfg.kl_beta > 0 else None
    # Before the policy forward: swapping EMA weights in place would invalidate its autograd graph.
    with torch.no_grad(), tr.rollout_ema.swapped_in():
        v_old = tr.model.velocity(xt, sigma, ctx.embeddings).float()
    v_theta = tr.model.velocity(xt, sigma, ctx.embeddings).float()
    loss, metrics = diffusion_nft_loss(
        v_theta, v_old, xt.float(), ctx.x0.float(), sigma.float(), ctx.advantages, loss_cfg.nft_beta,
        advantage_max=c.reward.advantage_clip, num_samples=tr.layout.samples_per_step,
    )
    forwards = 4
    if v_ref is not None:
        kl = velocity_kl(v_theta, v_ref.float())
        loss = loss + loss_cfg.kl_beta * kl.sum() / tr.layout.samples_per_step
        metrics["kl"] = kl.mean().detach()
        forwards += 2 if loss_cfg.reference_guidance_scale != 1 else 1
    tr.count_forwards(len(ctx.sample_ids) * forwards)
    return loss, {k: float(v) for k, v in metrics.items()}


@register_algorithm("awm", passes=lambda c: c.loss.timesteps)
def awm_update(ctx: UpdateContext) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantage Weighted Matching (arXiv 2509.25050): the flow-matching loss on the rollout samples, weighted by
    the advantage, plus a KL to the reference (``loss.kl_beta``) and to the rollout EMA (``loss.ema_kl_beta``).

    Pass k draws each sample's timestep from stratum k of the rollout grid points 1..``loss.grid_points``-1
    (:func:`stratified_grid_indices`), on independent noise per sample. The reference samples rollouts with its
    KL-EMA adapter, soft-updated after each epoch with decay min(0.3, 0.001 k): the rollout EMA here
    (``rollout.ema_after`` 0, ``rollout.ema_decay`` 0.3, ``rollout.ema_ramp`` 0.001). Conditional velocities only
    (the reference's train.cfg False).
    """
    tr, c = ctx.trainer, ctx.trainer.config
    loss_cfg = c.loss
    keys = [("awm-timestep", c.run.seed, ctx.step, int(i), ctx.draw_key) for i in ctx.sample_ids]
    index = stratified_grid_indices(keyed_uniform(keys), ctx.pass_index, loss_cfg.timesteps, loss_cfg.grid_points)
    sigma = tr.rollout_sigmas()[index.to(tr.acc.device)]
    eps = sample_noise(ctx, "awm-noise")
    xt = _noised(ctx.x0, sigma, eps)
    target = eps - ctx.x0
    v_ref = tr.reference_velocity(xt, sigma, ctx.embeddings) if loss_cfg.kl_beta > 0 else None
    v_ema = None
    if loss_cfg.ema_kl_beta > 0:
        # Before the policy forward: swapping EMA weights in place would invalidate its autograd graph.
        with torch.no_grad(), tr.rollout_ema.swapped_in():
            v_ema = tr.model.velocity(xt, sigma, ctx.embeddings).float()
    v_theta = tr.model.velocity(xt, sigma, ctx.embeddings).float()
    err_theta = per_sample_mse(v_theta, target.float())
    loss, metrics = awm_loss(
        ctx.advantages, err_theta, sigma.float(), advantage_max=c.reward.advantage_clip,
        weighting=loss_cfg.awm_weighting, power=loss_cfg.awm_ghuber_power, num_samples=tr.layout.samples_per_step,
    )
    forwards = 3
    if v_ref is not None:
        kl = velocity_kl(v_theta, v_ref.float())
        loss = loss + loss_cfg.kl_beta * kl.sum() / tr.layout.samples_per_step
        metrics["kl"] = kl.mean().detach()
        forwards += 2 if loss_cfg.reference_guidance_scale != 1 else 1
    if v_ema is not None:
        ema_kl = velocity_kl(v_theta, v_ema)
        loss = loss + loss_cfg.ema_kl_beta * ema_kl.sum() / tr.layout.samples_per_step
        metrics["ema_kl"] = ema_kl.mean().detach()
        forwards += 1
    tr.count_forwards(len(ctx.sample_ids) * forwards)
    return loss, {k: float(v) for k, v in metrics.items()}
