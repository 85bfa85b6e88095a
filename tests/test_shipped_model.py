"""The committed ShapesEval base model loads offline and draws what it is asked for."""
from __future__ import annotations

import torch

from dgpo.generation import generate
from dgpo.models import load_model
from dgpo.sampler_settings import SamplerSettings
from dgpo.shapes.model import SHIPPED_MODEL
from dgpo.shapes.prompts import all_specs
from dgpo.shapes.verifier import verify


def test_shipped_model_loads_with_sd3_components():
    model = load_model("shapes", "shipped")
    assert type(model.transformer).__name__ == "SD3Transformer2DModel"
    assert type(model.vae).__name__ == "AutoencoderKL"
    assert model.latent_shape == (model.vae.config.latent_channels, 8, 8)
    assert model.vae.config.scaling_factor != 1.0, "latent scaling was never set by pretraining"
    assert (SHIPPED_MODEL / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_shipped_model_draws_coloured_shapes_the_verifier_accepts():
    model = load_model("shapes", "shipped")
    specs = [s for s in all_specs("colors") if s.objects[0].shape in ("circle", "square")][:4]
    prompts = [s.prompt for s in specs for _ in range(8)]
    keys = [("test-shipped", i) for i in range(len(prompts))]
    images = generate(model, prompts, keys, SamplerSettings())
    assert images.shape == (len(prompts), 3, 32, 32) and torch.isfinite(images).all()
    passed = [verify(spec, image).passed for spec, image in zip([s for s in specs for _ in range(8)], images)]
    assert sum(passed) / len(passed) >= 0.25
    # Conditioning works: the same noise with a different prompt gives a different image.
    other = generate(model, ["a photo of a blue square"] * 2, keys[:2], SamplerSettings())
    assert not torch.allclose(other, images[:2])
