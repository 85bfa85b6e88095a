"""The SD3, FLUX and SANA backends on tiny random-config pipelines built in the test (diffusers-style dummy
components, local character-level tokenizers, no downloads): the adapter contract, one DGPO run end to
end, the exported LoRA loading into a fresh pipeline with ``load_lora_weights``, and ``dgpo merge-lora``."""
from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusion3Pipeline,
)
from helpers import BUILDERS, RESOLUTION, build_sana, build_sd3, save_tiny
from peft import LoraConfig

from dgpo.cli import main
from dgpo.models import load_model
from dgpo.models.sana import pipeline_complex_human_instruction
from dgpo.train.config import load_config
from dgpo.train.loop import Trainer


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def backend(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, save_tiny(BUILDERS[request.param], tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(scope="module")
def sana(tmp_path_factory) -> Path:
    return save_tiny(build_sana, tmp_path_factory.mktemp("tiny-sana"))


@pytest.fixture(scope="module")
def sd3_with_t5(tmp_path_factory) -> Path:
    return save_tiny(lambda root: build_sd3(root, with_t5=True), tmp_path_factory.mktemp("tiny-sd3-t5"))


def pipeline_velocity(name: str, transformer, x: torch.Tensor, sigma: float, embeddings) -> torch.Tensor:
    """What each diffusers pipeline's denoising loop feeds its transformer, written out independently."""
    t = torch.full((x.shape[0],), sigma * 1000.0)
    with torch.no_grad():
        if name == "sana":
            hidden, mask = embeddings
            return transformer(x, encoder_hidden_states=hidden, encoder_attention_mask=mask, timestep=t * transformer.config.timestep_scale).sample
        hidden, pooled = embeddings
        if name == "sd3":
            return transformer(hidden_states=x, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=t).sample
        b, c, h, w = x.shape
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] += torch.arange(h // 2)[:, None]
        ids[..., 2] += torch.arange(w // 2)[None, :]
        out = transformer(hidden_states=packed, timestep=t / 1000, guidance=torch.full((b,), 3.5), pooled_projections=pooled,
                          encoder_hidden_states=hidden, txt_ids=torch.zeros(hidden.shape[1], 3), img_ids=ids.reshape(-1, 3)).sample
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def test_adapter_contract_matches_the_pipeline_conventions(backend):
    name, path = backend
    model = load_model(name, str(path), RESOLUTION)
    embeddings = model.encode_prompts(["a red circle", ""])
    assert all(e.shape[0] == 2 for e in embeddings)
    x = torch.randn(2, *model.latent_shape)
    with torch.no_grad():
        v = model.velocity(x, torch.full((2,), 0.7), embeddings)
        images = model.decode(x)
        latents = model.encode_images(images)
    assert v.shape == x.shape == latents.shape
    torch.testing.assert_close(v, pipeline_velocity(name, model.transformer, x, 0.7, embeddings))
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION) and 0 <= float(images.min()) <= float(images.max()) <= 1


def test_resolution_must_fit_the_latent_grid(backend):
    name, path = backend
    with pytest.raises(ValueError, match="multiple of"):
        load_model(name, str(path), 33)


def test_dgpo_trains_and_exports_a_lora_the_pipeline_loads(backend, tmp_path):
    name, path = backend
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    overrides = {
        "model.backend": name, "model.path": str(path), "model.resolution": RESOLUTION, "model.lora_rank": 4,
        "data.prompts": str(prompts), "data.group_size": 4, "data.groups_per_step": 2, "data.micro_batch": 4,
        "rollout.num_steps": 2, "loss.grid_points": 2, "run.max_steps": 2, "run.save_every": 0, "run.tensorboard": False,
        "run.output_dir": str(tmp_path / "run"), "run.threads": 1, "reward.weights": {"jpeg_incompressibility": 1.0},
    }
    trainer = Trainer(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    before = {n: p.detach().clone() for n, p in trainer.policy.trainable}
    assert trainer.train() == 0
    assert any(not torch.equal(before[n], p) for n, p in trainer.policy.trainable)
    trainer.export_adapter(tmp_path / "adapter")

    without_t5 = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3" else {}
    pipeline = getattr(diffusers, trainer.policy.model.pipeline_class).from_pretrained(str(path), **without_t5)
    x = torch.randn(2, *trainer.policy.model.latent_shape)
    embeddings = trainer.policy.model.encode_prompts(["a red circle", "a blue square"])
    base = pipeline_velocity(name, pipeline.transformer, x, 0.7, embeddings)
    pipeline.load_lora_weights(str(tmp_path / "adapter"))
    tuned = pipeline_velocity(name, pipeline.transformer, x, 0.7, embeddings)
    trainer.policy.model.transformer.eval()
    assert not torch.allclose(base, tuned)
    torch.testing.assert_close(tuned, pipeline_velocity(name, trainer.policy.model.transformer, x, 0.7, embeddings))


def test_sana_encodes_prompts_as_its_pipeline_does(sana):
    """Prompts with the pipeline's default complex human instruction, "" without it (as the pipeline's negative
    prompt), each with its padding mask, in input order."""
    model = load_model("sana", str(sana), RESOLUTION)
    hidden, mask = model.encode_prompts(["a red circle", "", "a blue square"])
    cond, cond_mask, uncond, uncond_mask = model.pipeline.encode_prompt(
        ["a red circle", "a blue square"], do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=300,
        complex_human_instruction=pipeline_complex_human_instruction(),
    )
    torch.testing.assert_close(hidden, torch.stack([cond[0], uncond[0], cond[1]]))
    assert torch.equal(mask, torch.stack([cond_mask[0], uncond_mask[0], cond_mask[1]]))
    without_instruction = model.pipeline.encode_prompt(["a red circle"], do_classifier_free_guidance=False, complex_human_instruction=None)[0]
    assert mask.shape == (3, 300) and int(mask[1].sum()) == 1 and not torch.allclose(hidden[0], without_instruction[0])


def test_sana_latents_round_trip_through_the_autoencoder(sana):
    """encode_images then decode is AutoencoderDC's own round trip, postprocessed as the pipeline does: the
    scaling_factor cancels and there is no shift."""
    model = load_model("sana", str(sana), RESOLUTION)
    images = torch.rand(2, 3, RESOLUTION, RESOLUTION)
    with torch.no_grad():
        latents = model.encode_images(images)
        decoded = model.decode(latents)
        expected = model.pipeline.image_processor.postprocess(model.vae.decode(model.vae.encode(images * 2 - 1).latent).sample, output_type="pt")
    assert latents.shape == (2, *model.latent_shape) and model.latent_shape == (4, RESOLUTION // 2, RESOLUTION // 2)
    torch.testing.assert_close(decoded, expected)
    assert load_model("sana", str(sana)).latent_shape == (4, 16, 16)


def test_merge_lora_saves_a_pipeline_with_the_lora_fused(sd3_with_t5, tmp_path, capsys):
    model = load_model("sd3", str(sd3_with_t5), RESOLUTION)
    torch.manual_seed(1)
    model.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=model.lora_target_modules, init_lora_weights=False))
    model.save_lora(tmp_path / "run" / "adapter")

    assert main(["merge-lora", "--backend", "sd3", "--model", str(sd3_with_t5), "--lora", str(tmp_path / "run"), "--output", str(tmp_path / "merged")]) == 0
    merged = DiffusionPipeline.from_pretrained(str(tmp_path / "merged"))
    assert isinstance(merged, StableDiffusion3Pipeline) and not any("lora" in n for n, _ in merged.transformer.named_parameters())
    pipeline = StableDiffusion3Pipeline.from_pretrained(str(sd3_with_t5))
    x = torch.randn(2, *model.latent_shape)
    embeddings = model.encode_prompts(["a red circle", "a blue square"])
    base = pipeline_velocity("sd3", pipeline.transformer, x, 0.7, embeddings)
    pipeline.load_lora_weights(str(tmp_path / "run" / "adapter"))
    merged_velocity = pipeline_velocity("sd3", merged.transformer, x, 0.7, embeddings)
    torch.testing.assert_close(merged_velocity, pipeline_velocity("sd3", pipeline.transformer, x, 0.7, embeddings), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged_velocity, base, atol=1e-3)

    capsys.readouterr()
    assert main(["merge-lora", "--backend", "sd3", "--model", str(tmp_path / "missing"), "--lora", str(tmp_path / "run"), "--output", str(tmp_path / "o")]) == 2
    assert main(["merge-lora", "--backend", "sd3", "--model", str(sd3_with_t5), "--lora", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert main(["merge-lora", "--backend", "shapes", "--model", str(sd3_with_t5), "--lora", str(tmp_path / "run"), "--output", str(tmp_path / "o")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [f"dgpo: error: model directory {str(tmp_path / 'missing')!r} does not exist",
                      (f"dgpo: error: no LoRA at {str(tmp_path)!r}: expected pytorch_lora_weights.safetensors, a directory holding it, "
                       "or a run directory with adapter/pytorch_lora_weights.safetensors"),
                      "dgpo: error: merge-lora takes the backends sd3, flux, sana (diffusers pipelines), not 'shapes'"]
