"""Stable Diffusion 3 / 3.5 (Medium, Large) through diffusers' ``StableDiffusion3Pipeline`` components.

The diffusers specifics live here and in ``MMDiTLatents``: the MMDiT takes ``timestep = sigma * 1000``
and keyword names ``encoder_hidden_states`` / ``pooled_projections``; latents are the VAE's
posterior scaled as ``(z - shift_factor) * scaling_factor``; prompts go through the pipeline's
own ``encode_prompt`` (two CLIP encoders and T5, or zeros where T5 is absent).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import PromptEmbeddings

ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _absent_components(path: str | Path) -> dict[str, None]:
    """Components a local model_index.json lists as null (e.g. SD3 without T5), which diffusers
    wants passed explicitly as None."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    return {name: None for name, entry in entries.items() if isinstance(entry, list) and entry == [None, None]}


class MMDiTLatents:
    """Velocity, decoding and encoding for an ``SD3Transformer2DModel`` over an ``AutoencoderKL``'s
    latents; subclasses set ``transformer``, ``vae`` and ``latent_size``."""

    lora_target_modules = ATTENTION_PROJECTIONS

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.transformer.config.in_channels, self.latent_size, self.latent_size)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, embeddings: PromptEmbeddings) -> torch.Tensor:
        hidden, pooled = embeddings
        timestep = sigma.expand(latents.shape[0]) * 1000.0
        return self.transformer(
            hidden_states=latents, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=timestep
        ).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        images = self.vae.decode(latents.to(self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor).sample
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        mean = self.vae.encode((images * 2.0 - 1.0).to(self.vae.dtype)).latent_dist.mean
        return (mean - cfg.shift_factor) * cfg.scaling_factor

    def save_lora(self, path: str | Path) -> None:
        """The transformer's LoRA in SD3's pipeline format: ``StableDiffusion3Pipeline.load_lora_weights(path)``
        (or ``transformer.load_lora_adapter(path)``) loads it."""
        from diffusers import StableDiffusion3Pipeline
        from peft.utils import get_peft_model_state_dict

        # The metadata carries lora_alpha; without it the loader assumes alpha = rank and rescales.
        StableDiffusion3Pipeline.save_lora_weights(
            str(path),
            transformer_lora_layers=get_peft_model_state_dict(self.transformer),
            transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict(),
        )


class SD3Model(MMDiTLatents):
    """Adapter for SD3 / SD3.5 (see ``dgpo.models.base.FlowModelAdapter``)."""

    def __init__(self, pipeline, resolution: int = 512, max_sequence_length: int = 256):
        vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        if resolution % (vae_scale * pipeline.transformer.config.patch_size):
            raise ValueError(f"model.resolution {resolution} must be a multiple of {vae_scale * pipeline.transformer.config.patch_size} for this model")
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.latent_size = resolution // vae_scale
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(cls, path: str | Path, resolution: int = 512, torch_dtype: torch.dtype | None = None) -> "SD3Model":
        """A diffusers model directory (or a hub id where the network allows)."""
        from diffusers import StableDiffusion3Pipeline

        pipeline = StableDiffusion3Pipeline.from_pretrained(str(path), torch_dtype=torch_dtype, **_absent_components(path))
        for module in pipeline.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval().requires_grad_(False)
        return cls(pipeline, resolution)

    def to(self, device: torch.device | str) -> "SD3Model":
        self.pipeline.to(device)
        return self

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        with torch.no_grad():
            hidden, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )
        return (hidden, pooled)
