"""Training algorithms and advantage functions as registered variants.

The trainer owns rollouts, rewards and the optimizer. An algorithm turns one micro-batch of a step (final
samples, and for SDE algorithms the trajectory with its log-probs) plus advantages into a loss and detached
metrics; an advantage function turns a step's rewards into per-sample advantages. An algorithm receives what
it computes with explicitly (``UpdateContext``: velocities, keyed draws, the cross-process group sum, its
config sections), and registers what the rest of the package asks of it: its rollout sampler's kind, its
config checks, its loss curves. Adding a variant is one decorated function.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
from .draws import Draws
from .sections import LossConfig, RewardConfig, RolloutConfig

ModelVelocity = Callable[[torch.Tensor, torch.Tensor, PromptEmbeddings], torch.Tensor]


@dataclass
class UpdateContext:
    """One micro-batch of one loss pass (DGPO: a training timestep; Flow-GRPO: a trajectory step), and what
    the algorithm computes with."""

    step: int
    pass_index: int
    sample_ids: torch.Tensor
    group_ids: torch.Tensor
    x0: torch.Tensor
    embeddings: PromptEmbeddings
    advantages: torch.Tensor
    loss: LossConfig
    """The loss settings, with the KL weight in effect (the guard may have raised it: ``RunState.kl_beta``)."""
    rollout: RolloutConfig
    reward: RewardConfig
    draws: Draws
    velocity: ModelVelocity
    """The policy's velocity v(x, sigma, embeddings), with gradients."""
    old_velocity: ModelVelocity
    """The rollout EMA's (the old policy), without gradients; call it before ``velocity`` (it swaps weights in place)."""
    reference_velocity: ModelVelocity
    """The frozen reference model's, without gradients and without CFG."""
    empty_embeddings: Callable[[int], PromptEmbeddings]
    group_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """Per-sample group totals over every process holding the group."""
    groups_per_step: int
    samples_per_step: int
    count_forwards: Callable[[float], None]
    """Adds model forward-equivalents done on this process (a backward counts as two)."""
    trajectory: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    update_index: int = 0
    """Which of the optim.updates_per_rollout optimizer steps on this rollout."""

    @property
    def draw_key(self) -> tuple[int, int]:
        """Keys this pass's random draws (timesteps, noise, trajectory steps) within the step."""
        return (self.update_index, self.pass_index)

    def guided_reference_velocity(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The reference's velocity on this micro-batch's prompts with CFG at loss.reference_guidance_scale."""
        scale = self.loss.reference_guidance_scale
        uncond = None if scale == 1 else self.empty_embeddings(x.shape[0])
        return cfg_velocity(self.reference_velocity, self.embeddings, uncond, scale)(x, sigma)


UpdateFn = Callable[[UpdateContext], tuple[torch.Tensor, dict[str, float]]]
ConfigChecks = Callable[[Any], list[tuple[bool, str]]]
"""(ok, one-line message) pairs on a Config (``dgpo.train.config.Config``), checked by ``Config.validate``."""


def no_checks(config) -> list[tuple[bool, str]]:
    return []


@dataclass(frozen=True)
class Algorithm:
    """A registered training algorithm.

    update: the loss of one micro-batch of one pass. passes: loss passes per optimizer step.
    needs_trajectory: rollouts must record the SDE trajectory and per-step log-probs.
    text_dropout: train on the empty prompt with probability data.text_dropout (a
    likelihood-ratio method must score the rollout's own conditioning, so it sets False).
    advantages: an advantage function this algorithm always uses, else reward.advantage.
    rollout_sampler: the kind of rollout.sampler it trains on: "sde" (a stochastic sampler), "ode" or "any".
    checks: its own config checks (``ConfigChecks``).
    curves: (metric, label) of the loss metrics plotted and shown; the first is shown in the progress bar.
    """

    update: UpdateFn
    passes: Callable[[Any], int]
    needs_trajectory: bool = False
    text_dropout: bool = True
    advantages: str | None = None
    rollout_sampler: str = "any"
    checks: ConfigChecks = no_checks
    curves: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.rollout_sampler not in ("sde", "ode", "any"):
            raise ValueError(f"rollout_sampler must be sde, ode or any, got {self.rollout_sampler!r}")
        if self.needs_trajectory and self.rollout_sampler != "sde":
            raise ValueError("an algorithm that needs the SDE trajectory must set rollout_sampler='sde'")


ALGORITHMS: Registry[Algorithm] = Registry("algorithm")
get_algorithm = ALGORITHMS.get


def register_algorithm(name: str, passes: Callable[[Any], int], **options) -> Callable[[UpdateFn], UpdateFn]:
    """Register ``update`` as algorithm ``name``; ``options`` are the other fields of ``Algorithm``."""

    def decorator(update: UpdateFn) -> UpdateFn:
        ALGORITHMS.register(name)(Algorithm(update, passes, **options))
        return update

    return decorator


AdvantageFn = Callable[[torch.Tensor, torch.Tensor, RewardConfig], torch.Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage function")
register_advantage = ADVANTAGES.register
get_advantage = ADVANTAGES.get


@register_advantage("normalized")
def normalized_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """(r - group mean) / std, clipped: the paper's A_i (weights w = |A|)."""
    clip = cfg.advantage_clip if cfg.advantage_clip > 0 else None
    return group_advantages(rewards, group_ids, std_mode=cfg.std_mode, clip=clip)


@register_advantage("best_worst")
def best_worst(rewards: torch.Tensor, group_ids: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """+1 / -1 for each group's best / worst sample: Diffusion-DPO's pair."""
    return best_worst_advantages(rewards, group_ids)


@register_advantage("rank")
def rank(rewards: torch.Tensor, group_ids: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """Centred ranks in [-1, 1]: a weighting that ignores the reward's scale."""
    return rank_advantages(rewards, group_ids)


def renoise(ctx: UpdateContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t = (1 - t) x0 + t eps with a per-group t and per-group shared eps; returns (x_t, t, v target)."""
    sigma = ctx.draws.training_sigmas(ctx.step, ctx.draw_key, ctx.group_ids)
    eps = ctx.draws.group_noise(ctx.step, ctx.draw_key, ctx.group_ids)
    s = sigma.view(-1, *([1] * (ctx.x0.dim() - 1)))
    return (1 - s) * ctx.x0 + s * eps, sigma, eps - ctx.x0


def preference_update(ctx: UpdateContext) -> tuple[torch.Tensor, dict[str, float]]:
    """The group preference loss of DGPO (paper Eq. 17) on re-noised final samples. Its reference is the frozen
    base, or with ``loss.ema_reference`` the rollout EMA, a reference that trails the policy; the KL is to the base."""
    loss_cfg = ctx.loss
    xt, sigma, target = renoise(ctx)
    needs_old = loss_cfg.ppo_clip_eps > 0 or loss_cfg.ema_reference
    needs_base = loss_cfg.kl_beta > 0 or not loss_cfg.ema_reference
    v_base = ctx.guided_reference_velocity(xt, sigma) if needs_base else None
    if needs_old:
        # Before the policy forward: swapping EMA weights in place would invalidate its autograd graph.
        err_old = per_sample_mse(ctx.old_velocity(xt, sigma, ctx.embeddings).float(), target)
    v_theta = ctx.velocity(xt, sigma, ctx.embeddings)
    err_theta = per_sample_mse(v_theta.float(), target)
    err_ref = err_old if loss_cfg.ema_reference else per_sample_mse(v_base.float(), target)
    extra = {}
    if loss_cfg.ppo_clip_eps > 0:
        clipped = ppo_clip_mask(ctx.advantages, err_theta, err_old, loss_cfg.ppo_clip_eps)
        err_theta = apply_clip(err_theta, clipped)
        extra["clipped_fraction"] = clipped.float().mean()
    loss, metrics = dgpo_loss(
        ctx.advantages, err_theta, err_ref, ctx.group_ids.to(err_theta.device), loss_cfg.beta,
        group_sum=ctx.group_sum, num_groups=ctx.groups_per_step,
    )
    metrics.update(extra)
    if loss_cfg.kl_beta > 0:
        kl = velocity_kl(v_theta.float(), v_base.float())
        # kl_beta is the reference code's beta_kl: the KL is weighted on the preference loss's scale.
        loss = loss + dgpo_kl_term(kl, loss_cfg.beta, loss_cfg.kl_beta, ctx.groups_per_step)
        metrics["kl"] = kl.mean().detach()
    base_forwards = (2 if loss_cfg.reference_guidance_scale != 1 else 1) if needs_base else 0
    ctx.count_forwards(len(ctx.sample_ids) * (3 + base_forwards + (1 if needs_old else 0)))
    return loss, {k: float(v) for k, v in metrics.items()}


def preference_checks(c) -> list[tuple[bool, str]]:
    loss = c.loss
    return [
        (loss.timestep_mode != "grid" or loss.grid_draw != "shared" or loss.timesteps <= loss.grid_points,
         f"loss.grid_draw=shared trains loss.timesteps={loss.timesteps} distinct grid points; loss.grid_points={loss.grid_points} "
         "has fewer (raise grid_points or use grid_draw=per_group)"),
    ]


PREFERENCE_CURVES = (("preference_loss", "preference loss"), ("implicit_accuracy", "implicit accuracy"))
register_algorithm("dgpo", passes=lambda c: c.loss.timesteps, checks=preference_checks, curves=PREFERENCE_CURVES)(preference_update)
# Online Diffusion-DPO is the same loss on each group's best/worst pair (see best_worst_advantages).
register_algorithm("diffusion_dpo", passes=lambda c: c.loss.timesteps, advantages="best_worst", checks=preference_checks,
                   curves=PREFERENCE_CURVES)(preference_update)


def flow_grpo_checks(c) -> list[tuple[bool, str]]:
    loss, r = c.loss, c.rollout
    return [
        (loss.ppo_clip_eps > 0, "loss.algorithm=flow_grpo needs loss.ppo_clip_eps > 0 (its ratio clip; Flow-GRPO uses 1e-4)"),
        (loss.timesteps <= r.num_steps,
         f"flow_grpo trains loss.timesteps={loss.timesteps} of the rollout.num_steps={r.num_steps} SDE steps; it cannot exceed them"),
        (r.sde_window == 0 or loss.timesteps <= r.sde_window,
         f"flow_grpo trains loss.timesteps={loss.timesteps} of the rollout.sde_window={r.sde_window} SDE steps; it cannot exceed them"),
    ]


@register_algorithm("flow_grpo", passes=lambda c: c.loss.timesteps, needs_trajectory=True, text_dropout=False, rollout_sampler="sde",
                    checks=flow_grpo_checks, curves=(("approx_kl", "approx. KL to the rollout policy"), ("clipped_fraction", "clipped fraction")))
def flow_grpo_update(ctx: UpdateContext) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-GRPO: clipped likelihood ratio of one SDE transition per sample, plus KL to the reference.

    Pass k trains, for each sample, the k-th entry of a keyed permutation of the rollout's steps,
    so ``loss.timesteps`` of the ``rollout.num_steps`` transitions are trained (paper: 9 of 10).
    The policy's transition is recomputed with the rollout's CFG, as Flow-GRPO does.

    Flow-GRPO-Fast (``rollout.sde_window`` > 0): the rollout follows the ODE except for a window of
    ``sde_window`` consecutive SDE steps starting at a keyed step of ``rollout.sde_window_range``
    (``Draws.sde_window_starts``), and pass k trains the k-th entry of a keyed permutation of the window's
    steps; with ``loss.timesteps = sde_window`` every window step is trained once, as in Flow-GRPO's
    train_sd3_fast.py. Flow-GRPO draws one window per sampling batch; here each sample draws its own, so that
    the draw does not depend on how samples are batched over processes.
    """
    r, loss_cfg, draws = ctx.rollout, ctx.loss, ctx.draws
    rows = torch.arange(len(ctx.sample_ids))
    if r.sde_window > 0:
        offset = draws.trajectory_steps(ctx.step, ctx.pass_index, ctx.sample_ids, ctx.update_index, n=r.sde_window)
        index = (draws.sde_window_starts(ctx.step, ctx.sample_ids) + offset).to(rows.device)
    else:
        index = draws.trajectory_steps(ctx.step, ctx.pass_index, ctx.sample_ids, ctx.update_index).to(rows.device)
    sigmas = draws.sigmas
    x, x_next = ctx.trajectory[rows, index], ctx.trajectory[rows, index + 1]
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    uncond = ctx.empty_embeddings(len(rows))

    def transition(velocity_fn):
        v = cfg_velocity(velocity_fn, ctx.embeddings, uncond, r.guidance_scale)(x, sigma)
        return sde_step_mean_std(x, v.float(), sigma, sigma_next, r.noise_level, sigma_max=sigmas[1])

    mean, std = transition(ctx.velocity)
    log_prob = sde_step_log_prob(x_next, mean, std)
    loss, metrics = flow_grpo_loss(log_prob, ctx.log_probs[rows, index], ctx.advantages, loss_cfg.ppo_clip_eps, ctx.samples_per_step)
    cfg_factor = 2 if r.guidance_scale != 1 else 1
    forwards = 3 * cfg_factor
    if loss_cfg.kl_beta > 0:
        with torch.no_grad():
            mean_ref, _ = transition(ctx.reference_velocity)
        # Flow-GRPO's code form: |dt| times the exact per-step KL, so kl_beta 0.04 means what it means there.
        kl = flow_grpo_kl(mean.float(), mean_ref.float(), std, sigma_next - sigma)
        loss = loss + loss_cfg.kl_beta * kl.sum() / ctx.samples_per_step
        metrics["kl"] = kl.mean().detach()
        forwards += cfg_factor
    ctx.count_forwards(len(rows) * forwards)
    return loss, {k: float(v) for k, v in metrics.items()}


# ----- log-prob-free algorithms on forward-noised final samples (DiffusionNFT, AWM) ---------------------------


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


def advantage_clip_check(c) -> tuple[bool, str]:
    return (c.reward.advantage_clip > 0, f"loss.algorithm={c.loss.algorithm} normalises advantages by reward.advantage_clip; it must be > 0")


def diffusion_nft_checks(c) -> list[tuple[bool, str]]:
    loss, r = c.loss, c.rollout
    return [
        (r.ema_after == 0, "loss.algorithm=diffusionnft needs rollout.ema_after=0 (its old policy is the rollout model, an EMA of the "
         f"policy; rollout.ema_decay 0 is on-policy), got {r.ema_after}"),
        (r.offline_pool == 0, "loss.algorithm=diffusionnft needs online rollouts: its old policy is the rollout EMA, not the reference "
         "model of rollout.offline_pool"),
        (loss.timesteps <= r.num_steps,
         f"diffusionnft trains loss.timesteps={loss.timesteps} of the rollout.num_steps={r.num_steps} grid points; it cannot exceed them"),
        advantage_clip_check(c),
    ]


def add_reference_kl(loss: torch.Tensor, metrics: dict, v_theta: torch.Tensor, v_ref: torch.Tensor | None, ctx: UpdateContext) -> tuple[torch.Tensor, int]:
    """``loss`` plus loss.kl_beta x the per-sample mean (v_theta - v_ref)^2 summed over the step's samples (the log-prob-free
    methods' KL, in their reference codes' form), logged as ``kl``; also the reference forwards it cost per sample."""
    if v_ref is None:
        return loss, 0
    kl = velocity_kl(v_theta, v_ref.float())
    metrics["kl"] = kl.mean().detach()
    return loss + ctx.loss.kl_beta * kl.sum() / ctx.samples_per_step, 2 if ctx.loss.reference_guidance_scale != 1 else 1


@register_algorithm("diffusionnft", passes=lambda c: c.loss.timesteps, checks=diffusion_nft_checks,
                    curves=(("positive_loss", "positive loss"), ("negative_loss", "negative loss"), ("old_deviation", "deviation from the old policy")))
def diffusion_nft_update(ctx: UpdateContext) -> tuple[torch.Tensor, dict[str, float]]:
    """DiffusionNFT (arXiv 2509.16117): negative-aware flow matching on forward-noised final samples.

    The old policy is the rollout model, the rollout EMA (``rollout.ema_after`` 0; the reference's "old" adapter,
    soft-updated after each epoch with decay min(0.001 k, 0.5): ``rollout.ema_decay`` 0.5, ``rollout.ema_ramp``
    0.001). Pass k trains each sample at the k-th entry of a keyed permutation of the rollout grid (the reference
    trains int(0.99 num_steps) of the grid's timesteps per sample, in a per-sample random order), on independent noise
    per sample. The old, policy and reference velocities are conditional only (DiffusionNFT is CFG-free).
    """
    loss_cfg, draws = ctx.loss, ctx.draws
    index = draws.trajectory_steps(ctx.step, ctx.pass_index, ctx.sample_ids, ctx.update_index)
    sigma = draws.sigmas[index.to(draws.sigmas.device)]
    eps = draws.sample_noise("nft-noise", ctx.step, ctx.sample_ids, ctx.draw_key)
    xt = _noised(ctx.x0, sigma, eps)
    v_ref = ctx.guided_reference_velocity(xt, sigma) if loss_cfg.kl_beta > 0 else None
    # Before the policy forward: swapping EMA weights in place would invalidate its autograd graph.
    v_old = ctx.old_velocity(xt, sigma, ctx.embeddings).float()
    v_theta = ctx.velocity(xt, sigma, ctx.embeddings).float()
    loss, metrics = diffusion_nft_loss(
        v_theta, v_old, xt.float(), ctx.x0.float(), sigma.float(), ctx.advantages, loss_cfg.nft_beta,
        advantage_max=ctx.reward.advantage_clip, num_samples=ctx.samples_per_step,
    )
    loss, ref_forwards = add_reference_kl(loss, metrics, v_theta, v_ref, ctx)
    ctx.count_forwards(len(ctx.sample_ids) * (4 + ref_forwards))
    return loss, {k: float(v) for k, v in metrics.items()}


def awm_checks(c) -> list[tuple[bool, str]]:
    loss = c.loss
    return [
        (loss.timesteps <= loss.grid_points - 1, f"awm draws one timestep per stratum of the rollout grid points "
         f"1..loss.grid_points-1 ({loss.grid_points - 1} points); loss.timesteps={loss.timesteps} is more"),
        advantage_clip_check(c),
    ]


@register_algorithm("awm", passes=lambda c: c.loss.timesteps, checks=awm_checks,
                    curves=(("matching_loss", "matching loss"), ("velocity_error", "velocity error")))
def awm_update(ctx: UpdateContext) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantage Weighted Matching (arXiv 2509.25050): the flow-matching loss on the rollout samples, weighted by
    the advantage, plus a KL to the reference (``loss.kl_beta``) and to the rollout EMA (``loss.ema_kl_beta``).

    Pass k draws each sample's timestep from stratum k of the rollout grid points 1..``loss.grid_points``-1
    (:func:`stratified_grid_indices`), on independent noise per sample. The reference samples rollouts with its
    KL-EMA adapter, soft-updated after each epoch with decay min(0.3, 0.001 k): the rollout EMA here
    (``rollout.ema_after`` 0, ``rollout.ema_decay`` 0.3, ``rollout.ema_ramp`` 0.001). Conditional velocities only
    (the reference's train.cfg False).
    """
    loss_cfg, draws = ctx.loss, ctx.draws
    u = draws.sample_uniform("awm-timestep", ctx.step, ctx.sample_ids, ctx.draw_key)
    index = stratified_grid_indices(u, ctx.pass_index, loss_cfg.timesteps, loss_cfg.grid_points)
    sigma = draws.sigmas[index.to(draws.sigmas.device)]
    eps = draws.sample_noise("awm-noise", ctx.step, ctx.sample_ids, ctx.draw_key)
    xt = _noised(ctx.x0, sigma, eps)
    target = eps - ctx.x0
    v_ref = ctx.guided_reference_velocity(xt, sigma) if loss_cfg.kl_beta > 0 else None
    v_ema = None
    if loss_cfg.ema_kl_beta > 0:
        # Before the policy forward: swapping EMA weights in place would invalidate its autograd graph.
        v_ema = ctx.old_velocity(xt, sigma, ctx.embeddings).float()
    v_theta = ctx.velocity(xt, sigma, ctx.embeddings).float()
    err_theta = per_sample_mse(v_theta, target.float())
    loss, metrics = awm_loss(
        ctx.advantages, err_theta, sigma.float(), advantage_max=ctx.reward.advantage_clip,
        weighting=loss_cfg.awm_weighting, power=loss_cfg.awm_ghuber_power, num_samples=ctx.samples_per_step,
    )
    loss, ref_forwards = add_reference_kl(loss, metrics, v_theta, v_ref, ctx)
    forwards = 3 + ref_forwards
    if v_ema is not None:
        ema_kl = velocity_kl(v_theta, v_ema)
        loss = loss + loss_cfg.ema_kl_beta * ema_kl.sum() / ctx.samples_per_step
        metrics["ema_kl"] = ema_kl.mean().detach()
        forwards += 1
    ctx.count_forwards(len(ctx.sample_ids) * forwards)
    return loss, {k: float(v) for k, v in metrics.items()}
