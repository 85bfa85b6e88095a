"""DiffusionNFT, AWM and Flow-GRPO-Fast: their losses against hand computations and the
reference code written out, their samplers and draws, and short training runs on the tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import AWM, FAST, NFT, tiny_overrides, trainable_state

from dgpo.losses import awm_loss, awm_matching_loss, diffusion_nft_loss, nft_optimality, per_sample_mse
from dgpo.sampling import euler_sample, flow_sigmas, sde_sample, sde_step, sde_window_starts, sde_window_steps
from dgpo.train.algorithms import stratified_grid_indices
from dgpo.train.config import ConfigError, load_config
from dgpo.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda *a: None}


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ----- DiffusionNFT ---------------------------------------------------------------------------------------------


def test_nft_optimality_is_the_clipped_rescaled_advantage():
    advantages = torch.tensor([-7.0, -5.0, -2.5, 0.0, 2.5, 5.0, 7.0])
    torch.testing.assert_close(nft_optimality(advantages, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    torch.testing.assert_close(nft_optimality(torch.tensor([-1.0, 0.5]), 1.0), torch.tensor([0.0, 0.75]))


def test_diffusion_nft_loss_hand_computation(float64_default):
    # Two samples of two dimensions, beta 0.5, A_max 5, N 4.
    x0 = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    eps = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    t = torch.tensor([0.5, 0.25])
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps  # [0.5, -0.5], [0.75, 0.5]
    v_old = torch.tensor([[1.2, -1.0], [-1.0, 2.0]])
    v_theta = torch.tensor([[1.0, -0.6], [-1.0, 2.4]], requires_grad=True)
    advantages = torch.tensor([2.5, -5.0])  # r = 0.75, 0
    loss, metrics = diffusion_nft_loss(v_theta, v_old, x_t, x0, t, advantages, 0.5, advantage_max=5.0, num_samples=4)
    # Sample 0: v+ = 0.5 v_theta + 0.5 v_old = [1.1, -0.8], v- = 1.5 v_old - 0.5 v_theta = [1.3, -1.2].
    #   e+ = x_t - t v+ - x0 = [-0.05, -0.1], w+ = 0.075, l+ = (0.0025 + 0.01) / 2 / 0.075 = 1/12
    #   e- = [-0.15, 0.1], w- = 0.125, l- = (0.0225 + 0.01) / 2 / 0.125 = 0.13;  r l+ + (1 - r) l- = 0.0625 + 0.0325 = 0.095
    # Sample 1: v+ = [-1, 2.2], v- = [-1, 1.8]; e+ = [0, -0.05], e- = [0, 0.05], w = 0.025, l+ = l- = 0.00125 / 0.025 = 0.05; r = 0
    expected = (5.0 / 0.5) * (0.095 + 0.05) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["positive_loss"].item() == pytest.approx((1 / 12 + 0.05) / 2, abs=1e-12)
    assert metrics["negative_loss"].item() == pytest.approx((0.13 + 0.05) / 2, abs=1e-12)
    assert metrics["old_deviation"].item() == pytest.approx((0.04 + 0.16 + 0 + 0.16) / 4, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, v_theta)
    # d l+/dv_theta = 2 e+ (-t beta) / (D w+), d l-/dv_theta = 2 e- (t beta) / (D w-), D = 2, t beta = 0.25 (sample 0), 0.125 (sample 1)
    grad_0 = [0.75 * (-0.05 * -0.25 / 0.075) + 0.25 * (-0.15 * 0.25 / 0.125), 0.75 * (-0.1 * -0.25 / 0.075) + 0.25 * (0.1 * 0.25 / 0.125)]
    grad_1 = [0.0, 1.0 * (0.05 * 0.125 / 0.025)]
    torch.testing.assert_close(grad, 2.5 * torch.tensor([grad_0, grad_1]))


def _nft_reference(v_theta, v_old, x_t, x0, t, advantages, beta, adv_clip_max=5.0):
    """scripts/train_nft_sd3.py's training loss, written out (policy part; its ``.mean()`` over the micro-batch)."""
    advantages_clip = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    r = torch.clamp((advantages_clip / adv_clip_max) / 2.0 + 0.5, 0, 1)
    t_expanded = t.view(-1, *([1] * (x0.ndim - 1)))
    positive_prediction = beta * v_theta + (1 - beta) * v_old.detach()
    implicit_negative_prediction = (1.0 + beta) * v_old.detach() - beta * v_theta
    x0_prediction = x_t - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = torch.abs(x0_prediction.double() - x0.double()).mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001)
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = x_t - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = torch.abs(negative_x0_prediction.double() - x0.double()).mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001)
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    return (ori_policy_loss * adv_clip_max).mean()


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_diffusion_nft_loss_is_the_reference_codes(beta):
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 2, 4, 4, generator=g)
    t = torch.rand(5, generator=g)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_old = eps - x0 + 0.3 * torch.randn(5, 2, 4, 4, generator=g)
    v_theta = (v_old + 0.1 * torch.randn(5, 2, 4, 4, generator=g)).requires_grad_()
    advantages = torch.tensor([-6.0, -1.0, 0.0, 2.0, 4.5])
    ours, _ = diffusion_nft_loss(v_theta, v_old, x_t, x0, t, advantages, beta)
    reference = _nft_reference(v_theta, v_old, x_t, x0, t, advantages, beta)
    torch.testing.assert_close(ours, reference.to(ours.dtype))
    torch.testing.assert_close(torch.autograd.grad(ours, v_theta)[0], torch.autograd.grad(reference, v_theta)[0].to(ours.dtype))


def test_diffusion_nft_gradient_at_the_old_policy_is_advantage_weighted_matching(float64_default):
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    t = torch.tensor([0.2, 0.5, 0.7, 0.95])
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * eps
    v_old = eps - x0 + 0.2 * torch.randn(4, 3, 5, generator=g)
    advantages = torch.tensor([1.5, -0.5, -3.0, 2.0])
    for beta in (1.0, 0.3):
        v_theta = v_old.clone().requires_grad_()
        loss, _ = diffusion_nft_loss(v_theta, v_old, x_t, x0, t, advantages, beta, num_samples=4)
        # A_i t_i^2 mean((v_theta - v)^2) / w_i with w_i = t_i mean|v_old - v|: whatever beta, the first step is weighted flow matching.
        target = eps - x0
        w = t * (v_old - target).abs().mean(dim=(1, 2))
        weighted = (advantages * t**2 * (v_theta - target).square().mean(dim=(1, 2)) / w).sum() / 4
        torch.testing.assert_close(torch.autograd.grad(loss, v_theta)[0], torch.autograd.grad(weighted, v_theta)[0])


# ----- AWM --------------------------------------------------------------------------------------------------------


def test_awm_loss_hand_computation(float64_default):
    err = torch.tensor([0.04, 0.01], requires_grad=True)
    t = torch.tensor([0.5, 0.8])
    advantages = torch.tensor([2.5, -7.0])  # A / A_max = 0.5, and -7 is clipped to -5: -1
    loss, metrics = awm_loss(advantages, err, t, advantage_max=5.0, weighting="ghuber", power=0.25, num_samples=4)
    m0 = 0.5 * ((0.04 + 1e-10) ** 0.25 - 1e-10**0.25) / 0.25  # 0.5 * (0.4472 - 0.0032) / 0.25 = 0.888
    m1 = 0.8 * ((0.01 + 1e-10) ** 0.25 - 1e-10**0.25) / 0.25  # 0.8 * (0.3162 - 0.0032) / 0.25 = 1.002
    assert loss.item() == pytest.approx((0.5 * m0 - 1.0 * m1) / 4, abs=1e-12)
    assert metrics["matching_loss"].item() == pytest.approx((m0 + m1) / 2, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, err)
    # dm/dl = t (l + 1e-10)^(p - 1)
    torch.testing.assert_close(grad, torch.tensor([0.5 * 0.5 * (0.04 + 1e-10) ** -0.75, -1.0 * 0.8 * (0.01 + 1e-10) ** -0.75]) / 4)
    uniform, _ = awm_loss(advantages, err, t, weighting="uniform", num_samples=4)
    assert uniform.item() == pytest.approx((0.5 * 0.04 - 1.0 * 0.01) / 4, abs=1e-12)


def test_awm_gradient_is_the_reference_codes_on_policy_ratio_surrogate(float64_default):
    g = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(6, 2, 3, 3, generator=g), torch.randn(6, 2, 3, 3, generator=g)
    t = torch.rand(6, generator=g)
    v_theta = (eps - x0 + 0.3 * torch.randn(6, 2, 3, 3, generator=g)).requires_grad_()
    advantages = torch.tensor([-6.0, -1.0, 0.0, 0.5, 2.0, 5.5])
    ours, _ = awm_loss(advantages, per_sample_mse(v_theta, eps - x0), t)
    # scripts/train_sd3_awm.py written out: compute_log_prob_awm (ghuber, p 0.25), advantage_max 1 / adv_clip_max 5,
    # exp_first, clip_range 1, old_log_probs the current model's own detached log_prob (on-policy).
    log_prob = -((v_theta - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    log_prob = -(torch.pow(-log_prob + 1e-10, 0.25) - torch.pow(torch.tensor(1e-10), 0.25)) * t / 0.25
    a = torch.clamp(advantages, -5, 5) / 5 * 1
    ratio = torch.exp(log_prob - log_prob.detach())
    reference = torch.mean(torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1.0 - 1, 1.0 + 1)))
    torch.testing.assert_close(torch.autograd.grad(ours, v_theta)[0], torch.autograd.grad(reference, v_theta)[0])


def test_awm_matching_loss_rejects_unknown_weighting():
    with pytest.raises(ValueError, match="weighting"):
        awm_matching_loss(torch.ones(2), torch.ones(2), "elbo")


def test_stratified_grid_indices_are_the_reference_discrete_wo_init_draw():
    # train_sd3_awm.py, time_type "discrete_wo_init", 14 steps, timestep_fraction 0.9, train_timesteps 6, written out:
    boundaries = torch.linspace(1, int(14 * 0.9), steps=6 + 1)
    lower_bounds, upper_bounds = boundaries[:-1].long(), boundaries[1:].long()
    assert lower_bounds.tolist() == [1, 2, 4, 6, 8, 10] and upper_bounds.tolist() == [2, 4, 6, 8, 10, 12]
    u = torch.tensor([0.0, 0.3, 0.49, 0.5, 0.77, 0.999])
    for k in range(6):
        reference = lower_bounds[k] + (u * (upper_bounds[k] - lower_bounds[k])).long()
        assert torch.equal(stratified_grid_indices(u, k, 6, int(14 * 0.9)), reference)
    assert stratified_grid_indices(u, 5, 6, 12).tolist() == [10, 10, 10, 11, 11, 11]


# ----- Flow-GRPO-Fast: the windowed SDE rollout ---------------------------------------------------------------------


def test_sde_window_starts_cover_randint_range_uniformly():
    # random.randint(0, 5 - 2): starts 0..3, each for a quarter of U[0, 1)
    u = (torch.arange(8, dtype=torch.float64) + 0.5) / 8
    assert sde_window_starts(u, 2, (0, 5)).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sde_window_starts(torch.tensor([0.0, 0.9999]), 3, (2, 10)).tolist() == [2, 7]
    with pytest.raises(ValueError):
        sde_window_starts(u, 3, (0, 2))
    assert sde_window_steps(torch.tensor([0, 2]), 2, 5).tolist() == [[True, True, False, False, False], [False, False, True, True, False]]


def _velocity(x, sigma):
    return torch.tanh(x) * (1 + sigma.view(-1, 1, 1))


def test_windowed_sde_sample_is_euler_outside_the_window_and_the_sde_inside():
    g = torch.Generator().manual_seed(6)
    noise, step_noise = torch.randn(3, 2, 4, generator=g), torch.randn(3, 5, 2, 4, generator=g)
    sigmas = flow_sigmas(5, 3.0)
    full = sde_sample(_velocity, noise, sigmas, 0.8, step_noise=step_noise)
    every = sde_sample(_velocity, noise, sigmas, 0.8, step_noise=step_noise, sde_steps=torch.ones(3, 5, dtype=torch.bool))
    torch.testing.assert_close(every.sample, full.sample)
    torch.testing.assert_close(every.log_probs, full.log_probs)
    none = sde_sample(_velocity, noise, sigmas, 0.8, step_noise=step_noise, sde_steps=torch.zeros(3, 5, dtype=torch.bool))
    torch.testing.assert_close(none.sample, euler_sample(_velocity, noise, sigmas).sample)
    assert torch.isnan(none.log_probs).all()

    starts = torch.tensor([0, 1, 3])
    windowed = sde_sample(_velocity, noise, sigmas, 0.8, step_noise=step_noise, sde_steps=sde_window_steps(starts, 2, 5))
    assert torch.isfinite(windowed.log_probs).tolist() == sde_window_steps(starts, 2, 5).tolist()
    ode = euler_sample(_velocity, noise, sigmas, return_trajectory=True)
    for n, start in enumerate(starts.tolist()):
        # before the window the trajectory is the ODE's; the window's steps are SDE steps with that step's noise
        for i in range(start + 1):
            torch.testing.assert_close(windowed.trajectory[i][n], ode.trajectory[i][n])
        x = windowed.trajectory[start][n : n + 1]
        for i in range(start, start + 2):
            x, _, _ = sde_step(x, _velocity(x, sigmas[i].expand(1)), sigmas[i].item(), sigmas[i + 1].item(), 0.8,
                               noise=step_noise[n : n + 1, i], sigma_max=sigmas[1].item())
            torch.testing.assert_close(windowed.trajectory[i + 1][n : n + 1], x)
        # after the window, the ODE again
        for i in range(start + 2, 5):
            x = x + (sigmas[i + 1] - sigmas[i]) * _velocity(x, sigmas[i].expand(1))
            torch.testing.assert_close(windowed.trajectory[i + 1][n : n + 1], x)


# ----- configuration --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({**NFT, "rollout.ema_after": 5}, "ema_after=0"),
        ({**NFT, "reward.advantage_clip": 0}, "advantage_clip"),
        ({**NFT, "rollout.offline_pool": 2}, "online rollouts"),
        ({**AWM, "loss.timesteps": 4}, "stratum"),
        ({"rollout.sde_window": 2}, "sampler=sde"),
        ({**FAST, "rollout.sde_window_range": "[3, 4]"}, "sde_window_range"),
        ({**FAST, "loss.timesteps": 3}, "sde_window=2"),
        ({**AWM, "loss.awm_weighting": "elbo"}, "awm_weighting"),
    ],
    ids=["nft-needs-ema-rollouts", "nft-needs-advantage-clip", "nft-online", "awm-strata", "window-needs-sde", "window-range", "fast-timesteps",
         "awm-weighting"],
)
def test_baseline_algorithm_configs_are_checked(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **overrides))


def test_shapes_recipes_carry_the_reference_defaults():
    nft = load_config(REPO / "configs" / "shapes" / "diffusionnft.yaml")
    # config/nft.py: beta 1.0, train.beta (KL) 1e-4, decay_type 1 (min(0.001 k, 0.5)), CFG-free; timestep_fraction 0.99
    assert (nft.loss.algorithm, nft.loss.nft_beta, nft.loss.kl_beta) == ("diffusionnft", 1.0, 1e-4)
    assert (nft.rollout.ema_after, nft.rollout.ema_decay, nft.rollout.ema_ramp, nft.rollout.guidance_scale) == (0, 0.5, 0.001, 1.0)
    assert nft.loss.timesteps == int(nft.rollout.num_steps * 0.99)
    awm = load_config(REPO / "configs" / "shapes" / "awm.yaml")
    # config/dgx_awm.py geneval: beta 1e-3, ema_beta 1, kl_ema_decay 0.3 linear, ghuber 0.25, no CFG, timestep_fraction 0.9
    assert (awm.loss.algorithm, awm.loss.kl_beta, awm.loss.ema_kl_beta, awm.loss.awm_weighting, awm.loss.awm_ghuber_power) == ("awm", 1e-3, 1.0, "ghuber", 0.25)
    assert (awm.rollout.ema_after, awm.rollout.ema_decay, awm.rollout.ema_ramp, awm.rollout.guidance_scale) == (0, 0.3, 0.001, 1.0)
    assert awm.loss.grid_points == int(awm.rollout.num_steps * 0.9)
    fast = load_config(REPO / "configs" / "shapes" / "flow_grpo_fast.yaml")
    # config/grpo.py fast configs: clip 1e-5, beta 0, noise 0.8, window range (0, num_steps // 2); base window size 2
    assert (fast.loss.algorithm, fast.loss.ppo_clip_eps, fast.loss.kl_beta, fast.rollout.noise_level) == ("flow_grpo", 1e-5, 0.0, 0.8)
    assert (fast.rollout.sde_window, tuple(fast.rollout.sde_window_range), fast.loss.timesteps) == (2, (0, fast.rollout.num_steps // 2), 2)


# ----- training on the tiny model -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [NFT, AWM, FAST], ids=["diffusionnft", "awm", "flow-grpo-fast"])
def test_baseline_algorithms_train(tiny_model_dir, tmp_path, variant):
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **variant)), **QUIET)
    before = trainable_state(trainer)
    trainer.train()
    after = trainable_state(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(p).all() for p in after.values())
    history = trainer.counters.history
    assert history[-1]["forward_equivalents"] > history[0]["forward_equivalents"] > 0
    assert all(torch.isfinite(torch.tensor(h["grad_norm"])) for h in history)
    expected = {"diffusionnft": "old_deviation", "awm": "ema_kl", "flow_grpo": "approx_kl"}[variant["loss.algorithm"]]
    assert all(expected in h for h in history)


def test_diffusion_nft_old_policy_is_the_rollout_ema(tiny_model_dir, tmp_path):
    """At step 0 the rollout EMA is the policy, so v_old = v_theta; with a fixed decay the EMA lags from then on."""
    overrides = {**NFT, "rollout.ema_decay": 0.5, "rollout.ema_ramp": 0.0}
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **overrides)), **QUIET)
    trainer.train()
    first, second = trainer.counters.history
    assert first["old_deviation"] == 0.0 and first["optimality_mean"] == pytest.approx(0.5, abs=1e-6)
    assert second["old_deviation"] > 0.0


def test_flow_grpo_fast_trains_the_window_steps_with_the_rollouts_log_probs(tiny_model_dir, tmp_path):
    """Before any update every recomputed log-prob equals the rollout's: the trained steps are the window's (a step
    outside it has a NaN log-prob and would make approx_kl NaN)."""
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **FAST, **{"run.max_steps": 1})), **QUIET)
    trainer.train()
    metrics = trainer.counters.history[0]
    assert metrics["approx_kl"] < 1e-8 and metrics["clipped_fraction"] == 0.0
    ids = torch.arange(8)
    starts = trainer.draws.sde_window_starts(0, ids)
    trained = torch.stack([starts + trainer.draws.trajectory_steps(0, k, ids, n=2) for k in range(2)])
    assert (trained.sort(dim=0).values == torch.stack([starts, starts + 1])).all()
    assert len(set(starts.tolist())) > 1  # each sample draws its own window


@pytest.mark.parametrize("variant", [NFT, AWM, FAST], ids=["diffusionnft", "awm", "flow-grpo-fast"])
def test_baseline_algorithms_resume_exactly(tiny_model_dir, tmp_path, variant):
    straight = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "a", **variant, **{"run.max_steps": 3})), **QUIET)
    straight.train()
    Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "b", **variant, **{"run.max_steps": 2})), **QUIET).train()
    resumed = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "b", **variant, **{"run.max_steps": 3})), **QUIET)
    resumed.train(resume=True)
    for name, value in trainable_state(straight).items():
        assert torch.equal(value, trainable_state(resumed)[name]), name
    for a, b in zip(straight.policy.rollout_ema.shadow, resumed.policy.rollout_ema.shadow):
        assert torch.equal(a, b)
    logged = [json.loads(line)["reward_mean"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [h["reward_mean"] for h in straight.counters.history]


@pytest.mark.parametrize("ema_reference", [False, True])
def test_dgpo_ema_reference_trails_the_policy_and_the_kl_stays_to_the_base(tiny_model_dir, tmp_path, ema_reference):
    """With rollout.ema_decay 0 the rollout EMA is the policy itself, so against it DGPO's margin is exactly 0 at every
    step (sigmoid weight 1/2); against the frozen base it is 0 at step 0 only. The KL is to the base either way."""
    overrides = {"rollout.ema_decay": 0.0, "rollout.ema_ramp": 0.0, "loss.ema_reference": ema_reference, "run.max_steps": 3}
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **overrides)), **QUIET)
    trainer.train()
    history = trainer.counters.history
    assert history[0]["margin_mean"] == 0.0 and history[0]["kl"] == 0.0
    later = history[1:]
    assert all(h["kl"] > 0.0 for h in later)
    if ema_reference:
        assert all(h["margin_mean"] == 0.0 and h["sigmoid_weight_mean"] == 0.5 for h in later)
    else:
        assert all(h["margin_mean"] != 0.0 for h in later)
