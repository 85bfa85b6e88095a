"""FLUX.1 (dev, schnell) through diffusers' ``FluxPipeline`` components.

The trainer's latents are the VAE's unpacked (C, h, w) latents; FLUX's 2x2 packing into a token
sequence, the positional ids, ``timestep = sigma`` (FLUX takes t in [0, 1], not t * 1000) and the
distilled guidance input all stay inside ``velocity``. FLUX.1-dev is guidance-distilled: train and
roll out without CFG (``rollout.guidance_scale: 1``) and set the embedded guidance with
``guidance`` (3.5 by default); the unconditional prompt is still encoded for recipes that use CFG.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .base import PromptEmbeddings
from .common import PipelineAdapter, VAELatents


class FluxModel(VAELatents, PipelineAdapter):
    """Adapter for FLUX.1 (see ``dgpo.models.base.FlowModelAdapter``)."""

    pipeline_class = "FluxPipeline"

    def __init__(self, pipeline, resolution: int = 0, guidance: float = 3.5, max_sequence_length: int = 512):
        """``resolution`` 0: the checkpoint's native size (the pipeline's default, 1024 px for FLUX.1)."""
        super().__init__(pipeline)
        resolution = self.native_resolution(resolution)
        if resolution % (2 * self.vae_scale):
            raise ValueError(f"model.resolution {resolution} must be a multiple of {2 * self.vae_scale} for this model (2x2 latent packing)")
        self.resolution = resolution
        self.guidance = guidance
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(cls, path: str | Path, resolution: int = 0, torch_dtype: torch.dtype | None = None) -> FluxModel:
        return cls(cls.load_pipeline(path, torch_dtype), resolution)

    def prompt_token_limits(self) -> list[tuple[str, object, int]]:
        p = self.pipeline
        return [("CLIP", p.tokenizer, p.tokenizer_max_length), ("T5", p.tokenizer_2, self.max_sequence_length)]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        size = self.resolution // self.vae_scale
        return (self.vae.config.latent_channels, size, size)

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        with torch.no_grad():
            hidden, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompts, prompt_2=None, device=self.text_encoder_device, max_sequence_length=self.max_sequence_length
            )
        return (hidden.to(self.device), pooled.to(self.device))

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, embeddings: PromptEmbeddings) -> torch.Tensor:
        from diffusers import FluxPipeline

        hidden, pooled = embeddings
        batch, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance, device=latents.device, dtype=latents.dtype)
        packed_velocity = self.transformer(
            hidden_states=packed, timestep=sigma.expand(batch).to(latents.dtype), guidance=guidance,
            pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=text_ids, img_ids=image_ids,
        ).sample
        return FluxPipeline._unpack_latents(packed_velocity, self.resolution, self.resolution, self.vae_scale)
