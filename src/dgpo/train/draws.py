"""Every random draw of a training step, keyed by what it is for (``dgpo.seeding``).

A draw is a function of (purpose, run seed, step, group or sample index, pass), never of the process
count, the micro-batch layout or what was drawn before, so 1 and 2 processes and a resumed run draw the
same numbers. ``pass key`` k is (update index, pass index) within the step.
"""
from __future__ import annotations

import torch

from ..sampling import sde_window_starts, sde_window_steps
from ..seeding import keyed_generator, keyed_randn, keyed_uniform
from .sections import LossConfig, RolloutConfig


class Draws:
    def __init__(self, seed: int, rollout: RolloutConfig, loss: LossConfig, max_steps: int, latent_shape: tuple[int, ...], device=None):
        self.seed, self.rollout, self.loss, self.max_steps = seed, rollout, loss, max_steps
        self.latent_shape, self.device = tuple(latent_shape), device
        self.sigmas = rollout.sampler_settings.sigmas(device)
        """The rollout grid, num_steps + 1 sigmas decreasing to 0."""

    def sample_keys(self, purpose: str, step: int, ids, *extra: object) -> list[tuple]:
        return [(purpose, self.seed, step, int(i), *extra) for i in ids]

    # ----- rollout ---------------------------------------------------------------------------------------------
    def rollout_noise(self, step: int, sample_ids) -> torch.Tensor:
        return keyed_randn(self.latent_shape, self.sample_keys("rollout", step, sample_ids), device=self.device)

    def sde_noise(self, step: int, sample_ids) -> torch.Tensor:
        """The SDE's per-step noise, (B, num_steps, ...)."""
        shape = (self.rollout.num_steps, *self.latent_shape)
        return keyed_randn(shape, self.sample_keys("sde-noise", step, sample_ids), device=self.device)

    def sde_window_starts(self, step: int, sample_ids) -> torch.Tensor:
        """Flow-GRPO-Fast: the first SDE step of each sample's window (rollout.sde_window), keyed per sample."""
        r = self.rollout
        return sde_window_starts(keyed_uniform(self.sample_keys("sde-window", step, sample_ids)), r.sde_window, tuple(r.sde_window_range))

    def sde_steps(self, step: int, sample_ids) -> torch.Tensor | None:
        """(B, num_steps) mask of the SDE steps of each sample's window; None without a window (SDE at every step)."""
        r = self.rollout
        return sde_window_steps(self.sde_window_starts(step, sample_ids), r.sde_window, r.num_steps) if r.sde_window > 0 else None

    def text_dropout(self, step: int, sample_ids, probability: float) -> list[bool]:
        return (keyed_uniform(self.sample_keys("text-dropout", step, sample_ids)) < probability).tolist()

    # ----- training --------------------------------------------------------------------------------------------
    def t_min(self, step: int) -> float:
        """Timestep clipping bound at ``step``: fixed, or moved linearly to loss.t_min_end over the run."""
        loss = self.loss
        if loss.t_min_end < 0:
            return loss.t_min
        progress = min(step / max(self.max_steps - 1, 1), 1.0)
        return loss.t_min + progress * (loss.t_min_end - loss.t_min)

    def training_sigmas(self, step: int, k: tuple[int, int], group_ids: torch.Tensor) -> torch.Tensor:
        """One training sigma per sample for pass ``k = (update_index, pass_index)``: timestep clipping to
        [t_min, t_max] (one draw per group), or one of the first grid points of the rollout schedule."""
        loss = self.loss
        grid = self.sigmas[: loss.grid_points]
        if loss.timestep_mode == "grid" and loss.grid_draw == "shared":
            update_index, pass_index = k
            point = self.shared_grid_points(step, update_index)[pass_index]
            return grid[point].expand(len(group_ids)).clone()
        u = keyed_uniform([("timestep", self.seed, step, int(g), k) for g in group_ids], device=self.device)
        if loss.timestep_mode == "continuous":
            t_min = self.t_min(step)
            return t_min + u * (loss.t_max - t_min)
        return grid[(u * loss.grid_points).long().clamp(max=loss.grid_points - 1)]

    def shared_grid_points(self, step: int, update_index: int = 0) -> torch.Tensor:
        """The reference code's grid draw: loss.timesteps distinct indices into the first loss.grid_points
        rollout sigmas, one set for the whole step (every group, micro-batch and process), pass k training
        entry k. Keyed by seed and step (and the update on this rollout, so that each of
        optim.updates_per_rollout draws afresh, as the reference's inner epochs do)."""
        order = torch.randperm(self.loss.grid_points, generator=keyed_generator("grid-timesteps", self.seed, step, update_index))
        return order[: self.loss.timesteps]

    def trajectory_steps(self, step: int, k: int, sample_ids: torch.Tensor, update_index: int = 0, n: int | None = None) -> torch.Tensor:
        """The step each sample trains in pass k: entry k of a keyed permutation of the rollout's steps
        (of range(n) when given, e.g. the steps of an SDE window)."""
        n = self.rollout.num_steps if n is None else n
        orders = [torch.randperm(n, generator=keyed_generator("sde-steps", self.seed, step, update_index, int(i))) for i in sample_ids]
        return torch.stack([order[k] for order in orders])

    def group_noise(self, step: int, k: object, group_ids: torch.Tensor) -> torch.Tensor:
        """Re-noising noise shared by all samples of a group (variance reduction)."""
        keys = [("renoise", self.seed, step, int(g), k) for g in group_ids]
        return keyed_randn(self.latent_shape, keys, device=self.device)

    def sample_noise(self, purpose: str, step: int, sample_ids, k: object) -> torch.Tensor:
        """Noise drawn independently for every sample, keyed by (purpose, seed, step, sample, pass)."""
        return keyed_randn(self.latent_shape, self.sample_keys(purpose, step, sample_ids, k), device=self.device)

    def sample_uniform(self, purpose: str, step: int, sample_ids, k: object) -> torch.Tensor:
        """One U[0, 1) number per sample, keyed by (purpose, seed, step, sample, pass); on the CPU."""
        return keyed_uniform(self.sample_keys(purpose, step, sample_ids, k))
