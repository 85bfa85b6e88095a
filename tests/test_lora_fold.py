"""Sampling with the LoRA folded into the base weights: the same velocities and images as the unfolded LoRA,
the base weights restored bit for bit, and nothing folded where the adapters are off."""
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from dgpo.generation import sample
from dgpo.models.lora_fold import lora_folded
from dgpo.sampler_settings import SamplerSettings
from dgpo.shapes.model import build_tiny_model


def lora_model():
    model = build_tiny_model(seed=0)
    # init_lora_weights=False: B random too, so the LoRA changes the output (peft's default starts B at zero)
    model.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=model.lora_target_modules, init_lora_weights=False))
    return model


def inputs(model, batch=3):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model.latent_shape, generator=generator)
    return x, torch.full((batch,), 0.6), model.encode_prompts(["two red circles"] * batch)


def lora_layers(model):
    return [m for m in model.transformer.modules() if isinstance(m, LoraLinear)]


def test_folded_velocity_is_the_lora_velocity_and_the_base_weights_come_back_unchanged():
    model = lora_model()
    x, sigma, embeddings = inputs(model)
    bases = {name: p.detach().clone() for name, p in model.transformer.named_parameters() if "lora_" not in name}
    with torch.no_grad():
        lora = model.velocity(x, sigma, embeddings)
        model.transformer.disable_adapters()
        base = model.velocity(x, sigma, embeddings)
        model.transformer.enable_adapters()
        with lora_folded(model.transformer):
            assert all(layer.disable_adapters for layer in lora_layers(model))  # the LoRA path is off inside
            folded = model.velocity(x, sigma, embeddings)
    assert (lora - base).abs().max() > 1e-2
    torch.testing.assert_close(folded, lora, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, bases[name]) for name, p in model.transformer.named_parameters() if "lora_" not in name)
    assert not any(layer.disable_adapters for layer in lora_layers(model))
    assert all(p.requires_grad for name, p in model.transformer.named_parameters() if "lora_" in name)


def test_nothing_is_folded_with_the_adapters_disabled_as_for_the_reference():
    model = lora_model()
    x, sigma, embeddings = inputs(model)
    model.transformer.disable_adapters()
    with torch.no_grad():
        base = model.velocity(x, sigma, embeddings)
        with lora_folded(model.transformer):
            inside = model.velocity(x, sigma, embeddings)
    assert torch.equal(inside, base)
    assert all(layer.disable_adapters for layer in lora_layers(model))


def test_sampled_images_match_the_unfolded_lora():
    model = lora_model()
    noise = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    cond, uncond = model.encode_prompts(["a blue square"] * 2), model.encode_prompts([""] * 2)
    settings = SamplerSettings(num_steps=4)
    folded = sample(model, cond, uncond, noise, settings).images
    unfolded = sample(model, cond, uncond, noise, settings, fold_lora=False).images
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-4)
