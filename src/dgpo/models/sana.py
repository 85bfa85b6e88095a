"""SANA (1.0, 1.5) through diffusers' ``SanaPipeline`` components.

Conventions, as the pipeline's denoising loop uses them:

* The linear-attention DiT takes ``timestep = sigma * 1000 * transformer.config.timestep_scale`` (the
  scheduler's t, which the pipeline multiplies by ``timestep_scale``) and an ``encoder_attention_mask``:
  Gemma's padding is masked out of the cross-attention, so the mask travels with the embeddings as the
  second tensor of ``PromptEmbeddings`` and is concatenated and indexed with them.
* Its ``flow_prediction`` output is the trainer's velocity as it is: the pipeline's schedulers take
  ``x0 = x_sigma - sigma * v``, which is ``v = eps - x0`` for ``x_sigma = (1 - sigma) x0 + sigma eps``.
* ``AutoencoderDC`` is deterministic (no posterior): latents are its encoding times ``scaling_factor``,
  with no shift.
* Prompts go through the pipeline's ``encode_prompt``. SANA was trained with Gemma reading a "complex
  human instruction" before the user prompt, which ``SanaPipeline.__call__`` prepends by default (the
  instruction's tokens are then cut off, but the prompt's hidden states have seen them); this adapter does
  the same with the pipeline's own default text, so training and the pipeline's sampling condition alike.
  The unconditional prompt ``""`` is encoded without it, as the pipeline encodes its negative prompt.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from .base import PromptEmbeddings, cat_embeddings, index_embeddings
from .common import PipelineAdapter

# SANA's blocks have self-attention (attn1) and cross-attention (attn2) with these projections; the
# joint-attention add_*_proj of SD3 / FLUX do not exist here.
SANA_ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


def pipeline_complex_human_instruction() -> list[str]:
    """The instruction ``SanaPipeline.__call__`` prepends by default, read from the installed diffusers."""
    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


class SanaModel(PipelineAdapter):
    """Adapter for SANA (see ``dgpo.models.base.FlowModelAdapter``).

    ``resolution`` 0 is the checkpoint's native size (``sample_size`` latents); ``complex_human_instruction``
    None is the pipeline's default instruction, an empty list none.
    """

    pipeline_class = "SanaPipeline"
    lora_target_modules = SANA_ATTENTION_PROJECTIONS

    def __init__(self, pipeline, resolution: int = 0, max_sequence_length: int = 300,
                 complex_human_instruction: list[str] | None = None):
        super().__init__(pipeline)
        config = pipeline.transformer.config
        resolution = resolution or config.sample_size * self.vae_scale
        if resolution % (self.vae_scale * config.patch_size):
            raise ValueError(f"model.resolution {resolution} must be a multiple of {self.vae_scale * config.patch_size} for this model")
        self.latent_size = resolution // self.vae_scale
        self.max_sequence_length = max_sequence_length
        self.complex_human_instruction = pipeline_complex_human_instruction() if complex_human_instruction is None else complex_human_instruction

    @classmethod
    def from_pretrained(cls, path: str | Path, resolution: int = 0, torch_dtype: torch.dtype | None = None) -> SanaModel:
        return cls(cls.load_pipeline(path, torch_dtype), resolution)

    def prompt_token_limits(self) -> list[tuple[str, object, int]]:
        # The pipeline reads max_sequence_length tokens of the prompt after the complex human instruction.
        return [("Gemma", self.pipeline.tokenizer, self.max_sequence_length)]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.transformer.config.in_channels, self.latent_size, self.latent_size)

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        """(hidden states, attention mask); prompts with the instruction, empty ones without, in input order."""
        groups = [[i for i, p in enumerate(prompts) if p.strip()], [i for i, p in enumerate(prompts) if not p.strip()]]
        parts = []
        with torch.no_grad():
            for indices, instruction in zip(groups, (self.complex_human_instruction, None)):
                if indices:
                    hidden, mask, _, _ = self.pipeline.encode_prompt(
                        [prompts[i] for i in indices], do_classifier_free_guidance=False, device=self.text_encoder_device,
                        max_sequence_length=self.max_sequence_length, complex_human_instruction=instruction,
                    )
                    parts.append((hidden, mask))
        order = torch.tensor(groups[0] + groups[1])
        return tuple(e.to(self.device) for e in index_embeddings(cat_embeddings(parts), torch.argsort(order)))

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, embeddings: PromptEmbeddings) -> torch.Tensor:
        hidden, mask = embeddings
        timestep = sigma.expand(latents.shape[0]) * 1000.0 * self.transformer.config.timestep_scale
        return self.transformer(
            hidden_states=latents, encoder_hidden_states=hidden, encoder_attention_mask=mask, timestep=timestep
        ).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode((images * 2.0 - 1.0).to(self.vae.dtype)).latent * self.vae.config.scaling_factor
