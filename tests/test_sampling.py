import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from dgpo.sampling import (
    SAMPLERS,
    cfg_velocity,
    dpm_solver_sample,
    euler_sample,
    flow_sigmas,
    get_sampler,
    sde_sample,
    sde_step,
    sde_step_log_prob,
)

DATA_MEAN, DATA_STD = 1.5, 0.3


def make_flow_dpm_scheduler(shift: float = 3.0) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=shift,
        algorithm_type="dpmsolver++",
        solver_order=2,
    )


def gaussian_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact marginal velocity E[eps - x0 | x_t] for x0 ~ N(m, s^2), eps ~ N(0, 1), x_t = (1-t) x0 + t eps.

    Gaussian conditioning: E[u | x_t] = E[u] + Cov(u, x_t) / Var(x_t) * (x_t - E[x_t]) with u = eps - x0,
    E[u] = -m, Cov(u, x_t) = t - (1-t) s^2, Var(x_t) = (1-t)^2 s^2 + t^2, E[x_t] = (1-t) m.
    """
    t = sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    variance = (1 - t) ** 2 * DATA_STD**2 + t**2
    covariance = t - (1 - t) * DATA_STD**2
    return -DATA_MEAN + covariance / variance * (x - (1 - t) * DATA_MEAN)


def test_gaussian_velocity_transports_noise_to_data_quantile():
    # Sanity check of the analytic flow itself: a fine Euler solve from t = 1 maps eps to m + s * eps.
    eps = torch.linspace(-2, 2, 5, dtype=torch.float64).view(-1, 1)
    sigmas = torch.linspace(1, 0, 4001, dtype=torch.float64)
    sample = euler_sample(gaussian_velocity, eps, sigmas).sample
    torch.testing.assert_close(sample, DATA_MEAN + DATA_STD * eps, atol=1e-3, rtol=0)


def test_flow_sigmas_match_diffusers_flow_dpm_grid():
    scheduler = make_flow_dpm_scheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sigmas = flow_sigmas(10, shift=3.0)
    assert sigmas.shape == (11,) and sigmas.dtype == torch.float32
    torch.testing.assert_close(sigmas, scheduler.sigmas, atol=1e-7, rtol=0)
    quoted = torch.tensor([1.0, 0.964, 0.923, 0.875, 0.818, 0.75, 0.666, 0.562, 0.428, 0.25, 0.0])
    torch.testing.assert_close(sigmas, quoted, atol=1.5e-3, rtol=0)
    assert sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())


def test_flow_sigmas_unshifted_is_scaled_linspace():
    sigmas = flow_sigmas(4, dtype=torch.float64)
    torch.testing.assert_close(sigmas, torch.linspace(1, 0, 5, dtype=torch.float64) * 0.999)


def test_dpm_solver_matches_diffusers_step_for_step():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 16, generator=generator) / 4
    bias = torch.randn(16, generator=generator)

    def linear_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma.view(-1, 1)
        return (x @ weight) * t + bias * (1 - t) - x

    noise = torch.randn(3, 16, generator=generator)
    num_steps = 10
    scheduler = make_flow_dpm_scheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    reference = [noise]
    x = noise
    for i, timestep in enumerate(scheduler.timesteps):
        v = linear_velocity(x, scheduler.sigmas[i].expand(x.shape[0]))
        x = scheduler.step(v, timestep, x).prev_sample
        reference.append(x)

    output = dpm_solver_sample(linear_velocity, noise, flow_sigmas(num_steps, shift=3.0), return_trajectory=True)
    assert len(output.trajectory) == num_steps + 1
    for step, (ours, theirs) in enumerate(zip(output.trajectory, reference)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    assert output.sample is output.trajectory[-1]
    torch.testing.assert_close(output.sigmas, scheduler.sigmas)


def test_dpm_solver_finite_when_grid_starts_at_one():
    sigmas = torch.linspace(1, 0, 9)
    output = dpm_solver_sample(gaussian_velocity, torch.randn(4, 1), sigmas, return_trajectory=True)
    assert all(torch.isfinite(x).all() for x in output.trajectory)


def exact_gaussian_flow(x_start: torch.Tensor, t_start: float, t_end: float) -> torch.Tensor:
    """Exact ODE solution x_t = (1-t) m + sqrt((1-t)^2 s^2 + t^2) * eps, from t_start to t_end (x_0 = m + s * eps)."""

    def marginal_std(t):
        return math.sqrt((1 - t) ** 2 * DATA_STD**2 + t**2)

    eps = (x_start - (1 - t_start) * DATA_MEAN) / marginal_std(t_start)
    return (1 - t_end) * DATA_MEAN + marginal_std(t_end) * eps


def observed_orders(sampler, grids):
    """log2 of successive error ratios over grids with doubling step counts (error ratio 2: order 1, 4: order 2)."""
    eps = torch.linspace(-2, 2, 9, dtype=torch.float64).view(-1, 1)
    errors = []
    for sigmas in grids:
        sample = sampler(gaussian_velocity, eps, sigmas).sample
        exact = exact_gaussian_flow(eps, sigmas[0].item(), sigmas[-1].item())
        errors.append((sample - exact).abs().max().item())
    return [math.log2(coarse / fine) for coarse, fine in zip(errors[:-1], errors[1:])]


def log_snr_uniform_sigmas(num_steps, sigma_start, sigma_end):
    """Grid uniform in lambda = log((1 - sigma) / sigma), the variable DPM-Solver's order is stated in."""
    log_snr = torch.linspace(
        math.log((1 - sigma_start) / sigma_start), math.log((1 - sigma_end) / sigma_end), num_steps + 1, dtype=torch.float64
    )
    return torch.sigmoid(-log_snr)


def test_euler_converges_first_order():
    grids = [flow_sigmas(n, shift=1.0, dtype=torch.float64) for n in (8, 16, 32, 64)]
    orders = observed_orders(euler_sample, grids)
    assert all(0.85 < order < 1.15 for order in orders), orders


def test_dpm_solver_converges_second_order_in_log_snr():
    grids = [log_snr_uniform_sigmas(n, 0.99, 0.01) for n in (64, 128, 256, 512)]
    orders = observed_orders(dpm_solver_sample, grids)
    assert all(1.8 < order < 2.3 for order in orders), orders


def test_dpm_solver_beats_first_order_on_flow_grid_to_zero():
    # On the uniform-t grid down to sigma = 0 the steps next to sigma = 0 stay O(1) in log-SNR, so the
    # observed order only creeps up to 2 (about 1.56, 1.70 here; 1.83 at 1024 -> 2048), and at 8-32
    # steps the error changes sign, which makes ratios there meaningless. Euler stays at 1.0.
    grids = [flow_sigmas(n, shift=1.0, dtype=torch.float64) for n in (64, 128, 256)]
    orders = observed_orders(dpm_solver_sample, grids)
    assert all(1.4 < order < 2.3 for order in orders), orders


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_are_deterministic(name):
    sampler = get_sampler(name)
    noise = torch.randn(4, 2, 3)
    sigmas = flow_sigmas(6, shift=3.0)
    first = sampler(gaussian_velocity, noise, sigmas, return_trajectory=True)
    second = sampler(gaussian_velocity, noise.clone(), sigmas)
    assert torch.equal(first.sample, second.sample)
    assert second.trajectory is None and first.log_probs is None
    assert len(first.trajectory) == 7


def test_get_sampler_rejects_unknown_names():
    assert get_sampler("dpm2m") is dpm_solver_sample
    with pytest.raises(ValueError, match="dpm2m.*euler"):
        get_sampler("ddim")


class RecordingBatchedVelocity:
    """v(x, sigma, (hidden, pooled)) = x * hidden.mean + pooled.sum + sigma, recording every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, conditioning):
        hidden, pooled = conditioning
        self.calls.append((x.shape[0], sigma.clone(), hidden.clone()))
        return x * hidden.mean(dim=(1, 2)).view(-1, 1) + pooled.sum(dim=1, keepdim=True) + sigma.view(-1, 1)


def test_cfg_velocity_single_batched_forward_and_guidance_combination():
    batch = 3
    cond = (torch.randn(batch, 5, 4), torch.randn(batch, 2))
    uncond = (torch.randn(batch, 5, 4), torch.randn(batch, 2))
    x, sigma = torch.randn(batch, 6), torch.full((batch,), 0.7)
    model = RecordingBatchedVelocity()

    guided = cfg_velocity(model, cond, uncond, guidance_scale=4.5)(x, sigma)

    assert len(model.calls) == 1
    batch_size, sigma_seen, hidden_seen = model.calls[0]
    assert batch_size == 2 * batch
    torch.testing.assert_close(sigma_seen, torch.full((2 * batch,), 0.7))
    torch.testing.assert_close(hidden_seen, torch.cat([uncond[0], cond[0]]))
    v_cond = RecordingBatchedVelocity()(x, sigma, cond)
    v_uncond = RecordingBatchedVelocity()(x, sigma, uncond)
    torch.testing.assert_close(guided, v_uncond + 4.5 * (v_cond - v_uncond))


@pytest.mark.parametrize("guidance_scale, with_uncond", [(1.0, True), (4.5, False)])
def test_cfg_velocity_without_guidance_runs_conditional_half_only(guidance_scale, with_uncond):
    batch = 2
    cond = (torch.randn(batch, 5, 4), torch.randn(batch, 2))
    uncond = (torch.randn(batch, 5, 4), torch.randn(batch, 2)) if with_uncond else None
    x, sigma = torch.randn(batch, 6), torch.full((batch,), 0.3)
    model = RecordingBatchedVelocity()

    v = cfg_velocity(model, cond, uncond, guidance_scale)(x, sigma)

    assert len(model.calls) == 1 and model.calls[0][0] == batch
    torch.testing.assert_close(v, RecordingBatchedVelocity()(x, sigma, cond))


def test_cfg_velocity_accepts_plain_tensor_conditioning():
    cond, uncond = torch.ones(2, 1), torch.zeros(2, 1)
    calls = []

    def model(x, sigma, conditioning):
        calls.append(conditioning)
        return x + conditioning

    v = cfg_velocity(model, cond, uncond, guidance_scale=3.0)(torch.zeros(2, 1), torch.ones(2))
    assert len(calls) == 1
    torch.testing.assert_close(v, torch.full((2, 1), 3.0))


def test_sde_step_log_prob_matches_torch_normal():
    generator = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 3, 5, generator=generator), torch.randn(4, 3, 5, generator=generator)
    x_next, mean, std = sde_step(x, v, torch.full((4,), 0.8), torch.full((4,), 0.7), 0.7, generator=generator)
    log_prob = sde_step_log_prob(x_next, mean, std)
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).mean(dim=(1, 2))
    assert log_prob.shape == (4,)
    torch.testing.assert_close(log_prob, expected)


def test_sde_step_matches_flow_grpo_formula():
    # Flow-GRPO (sd3_sde_with_logprob): std_dev_t = sqrt(sigma / (1 - where(sigma == 1, sigmas[1], sigma))) * a,
    # mean = x (1 + std_dev_t^2 / (2 sigma) dt) + v (1 + std_dev_t^2 (1 - sigma) / (2 sigma)) dt.
    sigmas = torch.linspace(1, 0, 6, dtype=torch.float64)
    x, v, noise = (torch.randn(2, 3, dtype=torch.float64) for _ in range(3))
    for i in range(5):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        dt = sigma_next - sigma
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigmas[1], sigma))) * 0.7
        mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        x_next, our_mean, our_std = sde_step(x, v, sigma, sigma_next, 0.7, noise, sigma_max=sigmas[1])
        torch.testing.assert_close(our_mean, mean)
        torch.testing.assert_close(our_std, std_dev_t * torch.sqrt(-dt))
        torch.testing.assert_close(x_next, mean + std_dev_t * torch.sqrt(-dt) * noise)
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step(x, v, 1.0, 0.8, 0.7, noise)


def test_sde_sample_with_tiny_noise_approaches_ode_sample():
    noise = torch.randn(16, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sigmas = flow_sigmas(10, shift=3.0, dtype=torch.float64)
    ode = euler_sample(gaussian_velocity, noise, sigmas).sample
    generator = torch.Generator().manual_seed(3)
    tiny = sde_sample(gaussian_velocity, noise, sigmas, noise_level=1e-4, generator=generator)
    noisy = sde_sample(gaussian_velocity, noise, sigmas, noise_level=0.7, generator=generator)
    assert (tiny.sample - ode).abs().max() < 1e-3
    assert (noisy.sample - ode).abs().max() > 1e-2
    assert tiny.log_probs.shape == (16, 10) and torch.isfinite(tiny.log_probs).all()
    assert len(tiny.trajectory) == 11 and tiny.sample is tiny.trajectory[-1]


def test_sde_sample_preserves_data_marginal():
    # The SDE has the ODE's marginals: noise ~ N(0, 1) must end as N(m, s^2) (with the sigma_max cap too).
    generator = torch.Generator().manual_seed(4)
    noise = torch.randn(20000, 1, dtype=torch.float64, generator=generator)
    sigmas = flow_sigmas(100, shift=3.0, dtype=torch.float64)
    sample = sde_sample(gaussian_velocity, noise, sigmas, 0.7, generator, return_trajectory=False).sample
    assert abs(sample.mean().item() - DATA_MEAN) < 0.02
    assert abs(sample.std().item() - DATA_STD) < 0.02
