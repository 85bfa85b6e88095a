"""Samplers for rectified-flow models: ODE rollouts (Euler, Flow-DPM-Solver) and the Flow-GRPO SDE.

Convention (SD3 / diffusers flow matching):

    x_sigma = (1 - sigma) * x0 + sigma * eps,    sigma = 1: pure noise, sigma = 0: data
    v(x_sigma, sigma) = eps - x0                 (the model predicts this velocity)

so the data and noise predictions are x0 = x - sigma * v and eps = x + (1 - sigma) * v.
A velocity function has the signature ``velocity_fn(x, sigma) -> v`` where ``sigma`` is a
(B,) tensor holding the same value for every sample of the step.

Samplers are stateless functions of (velocity_fn, noise, sigmas): ``sigmas`` is a decreasing
1-D grid ending at 0 (see ``flow_sigmas``), and step i integrates from sigmas[i] to sigmas[i+1].
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .registry import Registry

VelocityFn = Callable[[Tensor, Tensor], Tensor]
Conditioning = Tensor | tuple[Tensor, ...]


@dataclass
class SampleOutput:
    """Result of a sampler.

    sample: x at sigma = 0.
    sigmas: the grid that was integrated over, length num_steps + 1.
    trajectory: x at every grid point (num_steps + 1 tensors, trajectory[0] is the noise),
        or None when not requested.
    log_probs: (B, num_steps) per-step Gaussian log-densities of the SDE transitions
        (``sde_sample`` only), else None.
    """

    sample: Tensor
    sigmas: Tensor
    trajectory: list[Tensor] | None = None
    log_probs: Tensor | None = None


def flow_sigmas(
    num_steps: int,
    shift: float = 1.0,
    *,
    num_train_timesteps: int = 1000,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Shifted flow-matching grid, num_steps + 1 values decreasing to 0.

        t_k     = (1 - 1/num_train_timesteps) * (1 - k/num_steps),    k = 0..num_steps
        sigma_k = shift * t_k / (1 + (shift - 1) * t_k)                (SD3 time shift)

    This is exactly the grid of diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True,
    flow_shift=shift)`` after ``set_timesteps(num_steps)``, the Flow-DPM-Solver rollout grid of
    DGPO (10 steps, shift 3: 0.9997, 0.964, 0.923, 0.875, 0.818, 0.750, 0.666, 0.562, 0.428,
    0.250, 0). The base grid is not linspace(1, 0) but is scaled by 1 - 1/num_train_timesteps
    because diffusers builds it from the largest discrete training timestep (999 of 1000), so
    the grid starts at 0.9997 rather than 1. This keeps alpha = 1 - sigma > 0 at the first step,
    so the log-SNR used by DPM-Solver is finite everywhere except at the final sigma = 0.
    The shift is computed in float64 and rounded once to ``dtype``.
    """
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64) * (1.0 - 1.0 / num_train_timesteps)
    sigmas = shift * t / (1.0 + (shift - 1.0) * t)
    return sigmas.to(device=device, dtype=dtype)


def _batch_sigma(sigmas: Tensor, index: int, batch_size: int) -> Tensor:
    """sigmas[index] repeated as a (B,) tensor, the form velocity functions receive."""
    return sigmas[index].expand(batch_size)


def euler_sample(
    velocity_fn: VelocityFn,
    noise: Tensor,
    sigmas: Tensor,
    *,
    return_trajectory: bool = False,
) -> SampleOutput:
    """Deterministic Euler integration of the flow ODE dx/dsigma = v(x, sigma):

        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, sigma_i),    x_0 = noise.
    """
    sigmas = sigmas.to(noise.device)
    sigma_values = sigmas.tolist()
    x = noise
    trajectory = [x] if return_trajectory else None
    for i in range(len(sigma_values) - 1):
        v = velocity_fn(x, _batch_sigma(sigmas, i, x.shape[0]))
        x = x + (sigma_values[i + 1] - sigma_values[i]) * v
        if trajectory is not None:
            trajectory.append(x)
    return SampleOutput(sample=x, sigmas=sigmas, trajectory=trajectory)


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma; -inf at sigma = 1 (alpha = 0)."""
    alpha = 1.0 - sigma
    return math.log(alpha / sigma) if alpha > 0.0 else -math.inf


def dpm_solver_sample(
    velocity_fn: VelocityFn,
    noise: Tensor,
    sigmas: Tensor,
    *,
    return_trajectory: bool = False,
) -> SampleOutput:
    """Flow-DPM-Solver: DPM-Solver++(2M) (multistep, second order, data prediction, midpoint).

    With alpha = 1 - sigma, lambda = log(alpha / sigma) and the data prediction
    D_i = x_i - sigma_i * v(x_i, sigma_i), a step from s = sigma_i to t = sigma_{i+1}
    (h = lambda_t - lambda_s) is

        first order:   x_{i+1} = (sigma_t / sigma_s) x_i + alpha_t (1 - e^{-h}) D_i
        second order:  x_{i+1} = (sigma_t / sigma_s) x_i + alpha_t (1 - e^{-h}) (D_i + (D_i - D_{i-1}) / (2 r)),
                       r = (lambda_s - lambda_{s-1}) / h,   lambda_{s-1} the log-SNR at sigma_{i-1}.

    The first step has no history and the last step is forced to first order
    (diffusers' ``lower_order_final``, always on when the grid ends at sigma = 0); every other
    step is second order. This reproduces diffusers' ``DPMSolverMultistepScheduler(
    algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction",
    use_flow_sigmas=True)`` step for step. The first-order step equals the Euler step.

    Endpoints without NaN: using e^{-h} = (sigma_t alpha_s) / (alpha_t sigma_s), the first-order
    coefficient is written alpha_t (1 - e^{-h}) = alpha_t - sigma_t alpha_s / sigma_s, which is
    finite at sigma_t = 0 (the step returns D_i) and at sigma_s = 1 (alpha_s = 0). A previous point
    at sigma = 1 has lambda = -inf, so r = inf and the correction term vanishes.
    """
    sigmas = sigmas.to(noise.device)
    sigma_values = sigmas.tolist()
    num_steps = len(sigma_values) - 1
    x = noise
    trajectory = [x] if return_trajectory else None
    previous_data_prediction = None
    for i in range(num_steps):
        sigma_s, sigma_t = sigma_values[i], sigma_values[i + 1]
        alpha_s, alpha_t = 1.0 - sigma_s, 1.0 - sigma_t
        v = velocity_fn(x, _batch_sigma(sigmas, i, x.shape[0]))
        data_prediction = x - sigma_s * v
        data_coefficient = alpha_t - sigma_t * alpha_s / sigma_s
        if previous_data_prediction is None or i == num_steps - 1:
            data_term = data_prediction
        else:
            lambda_s, lambda_t = _log_snr(sigma_s), _log_snr(sigma_t)
            lambda_previous = _log_snr(sigma_values[i - 1])
            inverse_r = (lambda_t - lambda_s) / (lambda_s - lambda_previous)
            data_term = data_prediction + 0.5 * inverse_r * (data_prediction - previous_data_prediction)
        x = (sigma_t / sigma_s) * x + data_coefficient * data_term
        previous_data_prediction = data_prediction
        if trajectory is not None:
            trajectory.append(x)
    return SampleOutput(sample=x, sigmas=sigmas, trajectory=trajectory)


def _concat_conditioning(first: Conditioning, second: Conditioning) -> Conditioning:
    """cat([first, second]) along dim 0, element-wise for tuples of tensors."""
    if isinstance(first, Tensor):
        return torch.cat([first, second])
    return tuple(torch.cat([a, b]) for a, b in zip(first, second, strict=True))


def cfg_velocity(
    velocity_fn_batched: Callable[[Tensor, Tensor, Conditioning], Tensor],
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance_scale: float,
) -> VelocityFn:
    """Classifier-free guided velocity with one batched forward per call:

        [v_uncond, v_cond] = velocity_fn_batched(cat([x, x]), cat([sigma, sigma]), cat([uncond, cond]))
        v = v_uncond + guidance_scale * (v_cond - v_uncond)

    The unconditional half comes first, as in diffusers' SD3 pipeline. ``cond`` and ``uncond``
    are tensors or tuples of tensors (e.g. (prompt_embeds, pooled_embeds)) with the batch
    first; they are concatenated once, here. With guidance_scale == 1 or uncond None, the
    returned function is the plain conditional velocity: one forward of batch size B.
    """
    if uncond is None or guidance_scale == 1.0:
        return lambda x, sigma: velocity_fn_batched(x, sigma, cond)

    conditioning = _concat_conditioning(uncond, cond)

    def guided_velocity(x: Tensor, sigma: Tensor) -> Tensor:
        v_uncond, v_cond = velocity_fn_batched(torch.cat([x, x]), torch.cat([sigma, sigma]), conditioning).chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    return guided_velocity


def _as_sample_shape(value: float | Tensor, x: Tensor) -> Tensor:
    """A scalar or (B,) value as a tensor broadcastable against x (B, ...)."""
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if value.ndim == 1:
        value = value.view(-1, *([1] * (x.ndim - 1)))
    return value


def sde_step_mean_std(
    x: Tensor,
    v: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float,
    *,
    sigma_max: float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and std of the Gaussian transition of ``sde_step`` (see there), without drawing noise."""
    t = _as_sample_shape(sigma, x)
    dt = _as_sample_shape(sigma_next, x) - t
    if sigma_max is None:
        if bool((t >= 1.0).any()):
            raise ValueError("sde_step at sigma >= 1 needs sigma_max (Flow-GRPO uses sigmas[1])")
        t_in_denominator = t
    else:
        t_in_denominator = torch.minimum(t, _as_sample_shape(sigma_max, x))
    noise_scale = noise_level * torch.sqrt(t / (1.0 - t_in_denominator))
    mean = x + (v + noise_scale**2 / (2.0 * t) * (x + (1.0 - t) * v)) * dt
    std = noise_scale * torch.sqrt(-dt)
    return mean, std


def sde_step(
    x: Tensor,
    v: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    sigma_max: float | Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Euler-Maruyama step of the Flow-GRPO reverse SDE, which has the flow ODE's marginals:

        sigma_t = a * sqrt(t / (1 - min(t, sigma_max))),  a = noise_level,  t = sigma,  dt = sigma_next - sigma < 0
        mean    = x + [v + sigma_t^2 / (2 t) * (x + (1 - t) v)] dt
        std     = sigma_t * sqrt(|dt|)
        x_next  = mean + std * noise,   noise ~ N(0, I) (drawn with ``generator`` when None)

    (x + (1 - t) v) / t is minus the score of p_t. sigma_t diverges at t = 1, so t is capped
    at ``sigma_max`` inside 1 / (1 - t) (the numerator keeps the true t). Flow-GRPO writes
    where(t == 1, sigmas[1], t); passing ``sigma_max = sigmas[1]`` (what ``sde_sample`` does)
    is identical on a grid starting at 1 and also tames grids starting just below 1, such as
    ``flow_sigmas`` (0.9997, where the uncapped noise scale would be ~58 a). Recompute log-probs
    with the same ``sigma_max`` as the rollout. With sigma_max None, t must be < 1.

    sigma and sigma_next are floats, 0-d tensors or (B,) tensors. Returns (x_next, mean, std).
    """
    mean, std = sde_step_mean_std(x, v, sigma, sigma_next, noise_level, sigma_max=sigma_max)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return mean + std * noise, mean, std


def sde_step_log_prob(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-sample Gaussian log-density of an SDE transition, (B,):

        log p = MEAN over non-batch dims of [ -(x_next - mean)^2 / (2 std^2) - log std - log sqrt(2 pi) ]

    The mean (not the sum) over dimensions follows Flow-GRPO's code; it rescales the true
    log-density by 1 / num_dims, which only changes the scale of PPO log-ratios. x_next is
    detached, as in Flow-GRPO: gradients flow only through mean and std.
    """
    x_next = x_next.detach()
    log_density = -((x_next - mean) ** 2) / (2.0 * std**2) - torch.log(std) - 0.5 * math.log(2.0 * math.pi)
    return log_density.mean(dim=tuple(range(1, log_density.ndim)))


def sde_sample(
    velocity_fn: VelocityFn,
    noise: Tensor,
    sigmas: Tensor,
    noise_level: float,
    generator: torch.Generator | None = None,
    return_trajectory: bool = True,
    step_noise: Tensor | None = None,
    sde_steps: Tensor | None = None,
) -> SampleOutput:
    """Flow-GRPO SDE rollout: ``sde_step`` at every step of ``sigmas`` (the last one to sigma = 0
    included), with sigma_max = sigmas[1], recording each transition's ``sde_step_log_prob``.

    The injected noise is ``step_noise[:, i]`` at step i when given, shape (B, num_steps, ...),
    so a caller can key it per sample; otherwise it is drawn from ``generator``.

    ``sde_steps`` (B, num_steps) bool, when given, makes the rollout Flow-GRPO-Fast's: sample n takes the SDE step
    at step i only where ``sde_steps[n, i]``, and elsewhere the deterministic Euler step of the ODE,

        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i)

    (Flow-GRPO's SDE step at noise level 0), whose log-prob entry is NaN. The noise of every step is still drawn,
    so a sample's SDE steps see the same noise whatever its window.

    Returns the trajectory (num_steps + 1 states, needed to recompute log-probs under the
    current policy) and log_probs of shape (B, num_steps).
    """
    sigmas = sigmas.to(noise.device)
    sigma_values = sigmas.tolist()
    x = noise
    trajectory = [x] if return_trajectory else None
    log_probs = []
    num_steps = len(sigma_values) - 1
    if step_noise is not None and tuple(step_noise.shape) != (noise.shape[0], num_steps, *noise.shape[1:]):
        raise ValueError(f"step_noise must have shape (B, {num_steps}, ...) = {(noise.shape[0], num_steps, *noise.shape[1:])}, got {tuple(step_noise.shape)}")
    if sde_steps is not None:
        if tuple(sde_steps.shape) != (noise.shape[0], num_steps):
            raise ValueError(f"sde_steps must have shape (B, num_steps) = {(noise.shape[0], num_steps)}, got {tuple(sde_steps.shape)}")
        sde_steps = sde_steps.to(device=noise.device, dtype=torch.bool)
    for i in range(num_steps):
        v = velocity_fn(x, _batch_sigma(sigmas, i, x.shape[0]))
        x_sde, mean, std = sde_step(
            x, v, sigma_values[i], sigma_values[i + 1], noise_level,
            noise=None if step_noise is None else step_noise[:, i], generator=generator, sigma_max=sigma_values[1],
        )
        log_prob = sde_step_log_prob(x_sde, mean, std)
        if sde_steps is None:
            x = x_sde
        else:
            stochastic = sde_steps[:, i]
            x = torch.where(stochastic.view(-1, *([1] * (x.ndim - 1))), x_sde, x + (sigma_values[i + 1] - sigma_values[i]) * v)
            log_prob = torch.where(stochastic, log_prob, torch.full_like(log_prob, math.nan))
        log_probs.append(log_prob)
        if trajectory is not None:
            trajectory.append(x)
    return SampleOutput(sample=x, sigmas=sigmas, trajectory=trajectory, log_probs=torch.stack(log_probs, dim=1))


def sde_window_starts(u: Tensor, window: int, window_range: tuple[int, int]) -> Tensor:
    """Flow-GRPO-Fast's window start from U[0, 1) draws ``u`` (one per sample): uniform over the integers

        start in [lo, hi - window],   (lo, hi) = window_range

    as Flow-GRPO's ``random.randint(sde_window_range[0], sde_window_range[1] - sde_window_size)``
    (flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_fast.py). Steps start .. start + window - 1 are stochastic.
    """
    lo, hi = window_range
    if window < 1 or lo < 0 or hi - lo < window:
        raise ValueError(f"need window >= 1 and 0 <= lo, lo + window <= hi; got window={window}, window_range={window_range}")
    count = hi - window - lo + 1
    return lo + (u * count).long().clamp(max=count - 1)


def sde_window_steps(starts: Tensor, window: int, num_steps: int) -> Tensor:
    """(B, num_steps) bool mask for ``sde_sample(sde_steps=...)``: step i of sample n is stochastic iff
    starts[n] <= i < starts[n] + window."""
    steps = torch.arange(num_steps, device=starts.device)
    return (steps[None, :] >= starts[:, None]) & (steps[None, :] < starts[:, None] + window)


# ----- the sampler registry ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """A registered sampler. ``stochastic``: an SDE, called as ``fn(velocity_fn, noise, sigmas, noise_level,
    step_noise=..., sde_steps=..., return_trajectory=...)`` and returning per-step log-probs; otherwise an ODE
    solver, ``fn(velocity_fn, noise, sigmas, return_trajectory=...)``, deterministic given the noise."""

    fn: Callable[..., SampleOutput]
    stochastic: bool = False

    def sample(
        self,
        velocity_fn: VelocityFn,
        noise: Tensor,
        sigmas: Tensor,
        *,
        noise_level: float = 0.7,
        step_noise: Tensor | None = None,
        sde_steps: Tensor | None = None,
        return_trajectory: bool = False,
    ) -> SampleOutput:
        """Run the sampler; the SDE-only arguments are passed to stochastic samplers only."""
        if not self.stochastic:
            return self.fn(velocity_fn, noise, sigmas, return_trajectory=return_trajectory)
        if step_noise is None:
            raise ValueError("a stochastic sampler needs step_noise (B, num_steps, ...): keyed noise keeps it reproducible")
        return self.fn(velocity_fn, noise, sigmas, noise_level, step_noise=step_noise, return_trajectory=return_trajectory, sde_steps=sde_steps)


SAMPLER_REGISTRY: Registry[Sampler] = Registry("sampler")
SAMPLERS: dict[str, Callable[..., SampleOutput]] = {}
"""The deterministic (ODE) samplers by name."""


def register_sampler(name: str, fn: Callable[..., SampleOutput], stochastic: bool = False) -> Sampler:
    sampler = SAMPLER_REGISTRY.register(name)(Sampler(fn, stochastic))
    if not stochastic:
        SAMPLERS[name] = fn
    return sampler


def get_sampler(name: str) -> Callable[..., SampleOutput]:
    """The ODE sampler registered under ``name`` in ``SAMPLERS``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid choices: {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_check(field: str, name: str, deterministic: bool = False) -> str | None:
    """Why ``name`` cannot be the value of config field ``field`` (None when it can): not registered, or
    stochastic where ``deterministic`` is required."""
    if name not in SAMPLER_REGISTRY:
        return f"{field} must be one of {', '.join(SAMPLER_REGISTRY.names())}, got {name!r}"
    if deterministic and SAMPLER_REGISTRY.get(name).stochastic:
        return f"{field} must be an ODE sampler ({', '.join(sorted(SAMPLERS))}), got the SDE {name!r}"
    return None


register_sampler("euler", euler_sample)
register_sampler("dpm2m", dpm_solver_sample)
register_sampler("sde", sde_sample, stochastic=True)
