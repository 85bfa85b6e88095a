"""The SD3 and FLUX backends on tiny random-config pipelines built in the test (diffusers-style dummy
components, local character-level tokenizers, no downloads): the adapter contract, one DGPO run end to
end, and the exported LoRA loading into a fresh pipeline with ``load_lora_weights``."""
from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
from tokenizers import Tokenizer, models
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from dgpo.models import load_model
from dgpo.train.config import load_config
from dgpo.train.loop import Trainer

RESOLUTION = 32
CHARACTERS = [chr(c) for c in range(33, 127)]


def character_clip_tokenizer(directory: Path) -> CLIPTokenizer:
    """CLIP's BPE tokenizer with no merges: every character is a token (the real class, a tiny vocabulary)."""
    tokens = ["<|startoftext|>", "<|endoftext|>", *CHARACTERS, *(c + "</w>" for c in CHARACTERS)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


def character_t5_tokenizer() -> T5TokenizerFast:
    """T5's fast tokenizer over a Unigram model whose pieces are single characters."""
    pieces = ["<pad>", "</s>", "<unk>", *CHARACTERS]
    return T5TokenizerFast(tokenizer_object=Tokenizer(models.Unigram([(p, 0.0) for p in pieces], unk_id=2)),
                           pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0, model_max_length=32)


def tiny_vae(latent_channels: int) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(4, 8), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, vocab_size=len(tokenizer), projection_dim=32)


def build_sd3(root: Path) -> StableDiffusion3Pipeline:
    tokenizer = character_clip_tokenizer(root / "clip-tokenizer")
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
                                          caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4),
        vae=tiny_vae(4),
        text_encoder=CLIPTextModelWithProjection(clip_config(tokenizer)), text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer)),
        text_encoder_3=None, tokenizer=tokenizer, tokenizer_2=tokenizer, tokenizer_3=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def build_flux(root: Path) -> FluxPipeline:
    tokenizer, t5_tokenizer = character_clip_tokenizer(root / "clip-tokenizer"), character_t5_tokenizer()
    return FluxPipeline(
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                           joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True),
        vae=tiny_vae(1),
        text_encoder=CLIPTextModel(clip_config(tokenizer)),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)),
        tokenizer=tokenizer, tokenizer_2=t5_tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(),
    )


BUILDERS = {"sd3": build_sd3, "flux": build_flux}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def backend(request, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp(f"tiny-{request.param}")
    torch.manual_seed(0)
    BUILDERS[request.param](root).save_pretrained(root / "pipeline")
    return request.param, root / "pipeline"


def pipeline_velocity(name: str, transformer, x: torch.Tensor, sigma: float, embeddings) -> torch.Tensor:
    """What each diffusers pipeline's denoising loop feeds its transformer, written out independently."""
    hidden, pooled = embeddings
    t = torch.full((x.shape[0],), sigma * 1000.0)
    with torch.no_grad():
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
    before = {n: p.detach().clone() for n, p in trainer.trainable}
    assert trainer.train() == 0
    assert any(not torch.equal(before[n], p) for n, p in trainer.trainable)
    trainer.export_adapter(tmp_path / "adapter")

    pipeline = getattr(diffusers, trainer.model.pipeline_class).from_pretrained(str(path), **({"text_encoder_3": None, "tokenizer_3": None} if name == "sd3" else {}))
    x = torch.randn(2, *trainer.model.latent_shape)
    embeddings = trainer.model.encode_prompts(["a red circle", "a blue square"])
    base = pipeline_velocity(name, pipeline.transformer, x, 0.7, embeddings)
    pipeline.load_lora_weights(str(tmp_path / "adapter"))
    tuned = pipeline_velocity(name, pipeline.transformer, x, 0.7, embeddings)
    trainer.model.transformer.eval()
    assert not torch.allclose(base, tuned)
    torch.testing.assert_close(tuned, pipeline_velocity(name, trainer.model.transformer, x, 0.7, embeddings))
