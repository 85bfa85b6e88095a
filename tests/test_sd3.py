"""The SD3 backend on a tiny random-config StableDiffusion3Pipeline built in the test (diffusers-style
dummy components; a local character-level CLIP tokenizer; no T5, as SD3 allows): contract, one DGPO
run end to end, and the LoRA export loading into a fresh pipeline with `load_lora_weights`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from dgpo.models import load_model
from dgpo.train.config import load_config
from dgpo.train.loop import Trainer

RESOLUTION = 32


def character_clip_tokenizer(directory: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with no merges: every character is a token (the real class, a tiny vocabulary)."""
    chars = [chr(c) for c in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-sd3")
    torch.manual_seed(0)
    tokenizer = character_clip_tokenizer(root / "tokenizer-src")
    clip = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, vocab_size=len(tokenizer), projection_dim=32)
    pipeline = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
                                          caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4),
        vae=AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          block_out_channels=(4, 8), layers_per_block=1, latent_channels=4, norm_num_groups=1, use_quant_conv=False,
                          use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(clip), text_encoder_2=CLIPTextModelWithProjection(clip), text_encoder_3=None,
        tokenizer=tokenizer, tokenizer_2=tokenizer, tokenizer_3=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipeline.save_pretrained(root / "pipeline")
    return root / "pipeline"


def test_sd3_adapter_contract(sd3_dir):
    model = load_model("sd3", str(sd3_dir), RESOLUTION)
    assert model.latent_shape == (4, RESOLUTION // 2, RESOLUTION // 2)
    hidden, pooled = model.encode_prompts(["a red circle", ""])
    assert hidden.shape[0] == pooled.shape[0] == 2 and pooled.shape[1] == 64 and hidden.shape[-1] == 64
    x = torch.randn(2, *model.latent_shape)
    with torch.no_grad():
        v = model.velocity(x, torch.full((2,), 0.5), (hidden, pooled))
        images = model.decode(x)
        # the adapter's timestep scaling is the pipeline's: timestep = sigma * 1000
        direct = model.transformer(hidden_states=x, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=torch.full((2,), 500.0)).sample
        latents = model.encode_images(images)
    assert v.shape == x.shape and torch.equal(v, direct)
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION) and 0 <= float(images.min()) <= float(images.max()) <= 1
    assert latents.shape == x.shape


def test_sd3_resolution_must_fit_the_patch_grid(sd3_dir):
    with pytest.raises(ValueError, match="multiple of 2"):
        load_model("sd3", str(sd3_dir), 33)


def test_dgpo_on_sd3_trains_and_exports_a_lora_the_pipeline_loads(sd3_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    overrides = {
        "model.backend": "sd3", "model.path": str(sd3_dir), "model.resolution": RESOLUTION, "model.lora_rank": 4,
        "data.prompts": str(prompts), "data.group_size": 4, "data.groups_per_step": 2, "data.micro_batch": 4,
        "rollout.num_steps": 2, "loss.grid_points": 2, "run.max_steps": 2, "run.save_every": 0, "run.tensorboard": False,
        "run.output_dir": str(tmp_path / "run"), "run.threads": 1, "reward.weights": {"jpeg_incompressibility": 1.0},
    }
    trainer = Trainer(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    before = {n: p.detach().clone() for n, p in trainer.trainable}
    assert trainer.train() == 0
    assert any(not torch.equal(before[n], p) for n, p in trainer.trainable)
    trainer.export_adapter(tmp_path / "adapter")

    pipeline = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), text_encoder_3=None, tokenizer_3=None)
    x = torch.randn(2, *trainer.model.latent_shape)
    embeddings = trainer.model.encode_prompts(["a red circle", "a blue square"])

    def pipeline_velocity():
        with torch.no_grad():
            return pipeline.transformer(hidden_states=x, encoder_hidden_states=embeddings[0], pooled_projections=embeddings[1],
                                        timestep=torch.full((2,), 700.0)).sample

    base = pipeline_velocity()
    pipeline.load_lora_weights(str(tmp_path / "adapter"))
    tuned = pipeline_velocity()
    trainer.model.transformer.eval()
    with torch.no_grad():
        trained = trainer.model.velocity(x, torch.full((2,), 0.7), embeddings)
    assert not torch.allclose(base, tuned)
    torch.testing.assert_close(tuned, trained)
