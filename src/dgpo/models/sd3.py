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

    def __init__(self, pipeline, resolution: int = 0, max_sequence_length: int = 256):
        """``resolution`` 0: the checkpoint's native size (``transformer.config.sample_size`` latents)."""
        PipelineAdapter.__init__(self, pipeline)
        config = pipeline.transformer.config
        native, resolution = self.native_resolution(0), self.native_resolution(resolution)
        if resolution % (self.vae_scale * config.patch_size):
            raise ValueError(f"model.resolution {resolution} must be a multiple of {self.vae_scale * config.patch_size} for this model")
        # The MMDiT crops its positional embedding from a pos_embed_max_size grid of patches: no larger image fits.
        limit = (config.pos_embed_max_size or 0) * config.patch_size * self.vae_scale
        if limit and resolution > limit:
            raise ValueError(f"model.resolution {resolution} is above this model's limit of {limit} px (pos_embed_max_size "
                             f"{config.pos_embed_max_size} patches); use at most {limit}, or 0 for its native {native}")
        self.latent_size = resolution // self.vae_scale
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(cls, path: str | Path, resolution: int = 0, torch_dtype: torch.dtype | None = None) -> "SD3Model":
        return cls(cls.load_pipeline(path, torch_dtype), resolution)

    def prompt_token_limits(self) -> list[tuple[str, object, int]]:
        p = self.pipeline
        limits = [("CLIP", p.tokenizer, p.tokenizer_max_length)]
        return limits + ([("T5", p.tokenizer_3, self.max_sequence_length)] if p.tokenizer_3 is not None and p.text_encoder_3 is not None else [])

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        with torch.no_grad():
            hidden, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=self.text_encoder_device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )
        return (hidden.to(self.device), pooled.to(self.device))
