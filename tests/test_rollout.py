"""dgpo.generation.sample entered mid-grid: the rollout that the decision-time probe restarts from a re-noised latent."""
from __future__ import annotations

import pytest
import torch

from dgpo.generation import sample
from dgpo.models import load_model
from dgpo.models.base import cat_embeddings
from dgpo.sampler_settings import SamplerSettings
from dgpo.seeding import keyed_randn


@pytest.fixture(scope="module")
def model_and_prompts(tiny_model_dir):
    model = load_model("shapes", str(tiny_model_dir))
    prompts = ["a photo of a red circle", "a photo of a blue square left of a green triangle"]
    cond = model.encode_prompts(prompts)
    uncond = cat_embeddings([model.encode_prompts([""])] * len(prompts))
    noise = keyed_randn(model.latent_shape, [("rollout-test", i) for i in range(len(prompts))])
    return model, cond, uncond, noise


@pytest.mark.parametrize("start_step", [1, 3])
def test_sample_from_a_trajectory_latent_finishes_the_same_rollout(model_and_prompts, start_step):
    # Euler is one-step, so restarting at sigma_k from the full run's x_k must repeat the rest of that run.
    model, cond, uncond, noise = model_and_prompts
    settings = SamplerSettings(sampler="euler", num_steps=5)
    whole = sample(model, cond, uncond, noise, settings, return_trajectory=True)
    resumed = sample(model, cond, uncond, whole.trajectory[:, start_step], settings, start_step=start_step)
    torch.testing.assert_close(resumed.latents, whole.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resumed.images, whole.images, rtol=1e-5, atol=1e-5)
    # and the start is not ignored: entering one step later from the same latent ends elsewhere
    later = sample(model, cond, uncond, whole.trajectory[:, start_step], settings, start_step=start_step + 1)
    assert not torch.allclose(later.latents, whole.latents, atol=1e-4)


@pytest.mark.parametrize("start_step", [-1, 5])
def test_sample_refuses_a_start_outside_the_grid(model_and_prompts, start_step):
    model, cond, uncond, noise = model_and_prompts
    with pytest.raises(ValueError, match="start_step must be in"):
        sample(model, cond, uncond, noise, SamplerSettings(sampler="euler", num_steps=5), start_step=start_step)


def test_rollouts_and_training_timesteps_use_one_grid(model_and_prompts, monkeypatch):
    # The rollout grid has one home, SamplerSettings.sigmas: sample() integrates over the grid the trainer's draws
    # take training timesteps from, for any num_steps and shift; and the config sections' solver defaults are its.
    from types import SimpleNamespace

    from dgpo.sampling import SAMPLER_REGISTRY, flow_sigmas
    from dgpo.train.config import Config, load_config
    from dgpo.train.draws import Draws

    assert Config().rollout.sampler_settings == SamplerSettings() == Config().eval.sampler_settings
    model, cond, uncond, noise = model_and_prompts
    config = load_config(None, ["rollout.sampler=euler", "rollout.num_steps=7", "rollout.shift=2.0", "rollout.guidance_scale=1"])
    euler, integrated = SAMPLER_REGISTRY.get("euler"), []

    def recording(velocity_fn, x, sigmas, **kwargs):
        integrated.append(sigmas.clone())
        return euler.sample(velocity_fn, x, sigmas, **kwargs)

    monkeypatch.setattr(SAMPLER_REGISTRY, "get", lambda name: SimpleNamespace(sample=recording, stochastic=False))
    sample(model, cond, uncond, noise, config.rollout.sampler_settings)
    draws = Draws(0, config.rollout, config.loss, 10, model.latent_shape)
    torch.testing.assert_close(integrated[0], draws.sigmas)
    torch.testing.assert_close(draws.sigmas, flow_sigmas(7, 2.0))
