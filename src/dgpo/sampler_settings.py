"""How images are sampled, as one value: the sampler, its grid and CFG (``SamplerSettings``)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerSettings:
    """How images are sampled: a registered sampler over ``flow_sigmas(num_steps, shift)`` with CFG ``guidance_scale``.

    The one home of the solver's defaults, the paper's rollout and evaluation solver (Flow-DPM-Solver, 10 steps,
    shift 3, CFG 4.5): the config sections (rollout.*, eval.*) and the command line take their defaults from here."""

    sampler: str = "dpm2m"
    num_steps: int = 10
    shift: float = 3.0
    guidance_scale: float = 4.5
    noise_level: float = 0.7
    """Stochastic samplers only: a in sigma_t = a * sqrt(t / (1 - t))."""

    @classmethod
    def of(cls, section) -> SamplerSettings:
        """The settings a config section names (``rollout`` or ``eval``: sampler, num_steps, shift, guidance_scale, and
        noise_level where the section has one)."""
        return cls(section.sampler, section.num_steps, section.shift, section.guidance_scale, getattr(section, "noise_level", cls.noise_level))

    def sigmas(self, device=None):
        """The sampling grid, ``dgpo.sampling.flow_sigmas(num_steps, shift)``: num_steps + 1 sigmas decreasing to 0, the grid
        rollouts integrate over and training timesteps are drawn from."""
        # Imported here: this module stays free of torch so that the command line and config parsing start fast.
        from .sampling import flow_sigmas

        return flow_sigmas(self.num_steps, self.shift, device=device)
