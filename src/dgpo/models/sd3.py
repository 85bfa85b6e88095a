"""Stable Diffusion 3 / 3.5 (Medium, Large) through diffusers' ``StableDiffusion3Pipeline`` components.

The MMDiT takes ``timestep = sigma * 1000`` and keyword names ``encoder_hidden_states`` /
``pooled_projections`` (``MMDiTLatents``, shared with the ShapesEval model); prompts go through the
pipeline's own ``encode_prompt`` (two CLIP encoders and T5, or zeros where T5 is absent).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .base import PromptEmbeddings
from .common import PipelineAdapter, VAELatents


class MMDiTLatents(VAELatents):
    """Velocity of an ``SD3Transformer2DModel`` on unpacked latents; subclasses set ``latent_size``."""

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.transformer.config.in_channels, self.latent_size, self.latent_size)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, embeddings: PromptEmbeddings) -> torch.Tensor:
        hidden, pooled = embeddings
        timestep = sigma.expand(latents.shape[0]) * 1000.0
        return self.transformer(
            hidden_states=latents, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=timestep
        ).sample


class SD3Model(MMDiTLatents, PipelineAdapter):
    """Adapter for SD3 / SD3.5 (see ``dgpo.models.base.FlowModelAdapter``)."""

    pipeline_class = "StableDiffusion3Pipeline"

    def __init__(self, pipeline, resolution: int = 512, max_sequence_length: int = 256):
        PipelineAdapter.__init__(self, pipeline)
        if resolution % (self.vae_scale * pipeline.transformer.config.patch_size):
            raise ValueError(f"model.resolution {resolution} must be a multiple of {self.vae_scale * pipeline.transformer.config.patch_size} for this model")
        self.latent_size = resolution // self.vae_scale
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(cls, path: str | Path, resolution: int = 512, torch_dtype: torch.dtype | None = None) -> "SD3Model":
        return cls(cls.load_pipeline(path, torch_dtype), resolution)

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        with torch.no_grad():
            hidden, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=self.text_encoder_device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )
        return (hidden.to(self.device), pooled.to(self.device))
