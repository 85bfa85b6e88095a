"""The model adapter contract: everything the trainer and samplers need from a backend.

A backend (the ShapesEval model, SD3, FLUX, SANA) wraps its diffusers components and
hides their specifics (timestep scaling, keyword names, VAE scaling and shift) behind
these few methods. Latents are the denoiser's working space; flow convention is
x_sigma = (1 - sigma) x0 + sigma eps and the denoiser predicts v = eps - x0.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

# Prompt embeddings are a tuple of tensors with the batch dimension first
# (SD3: (hidden_states, pooled)), so they can be concatenated, indexed and repeated generically.
PromptEmbeddings = tuple[torch.Tensor, ...]


@runtime_checkable
class FlowModelAdapter(Protocol):
    transformer: nn.Module
    """The trainable denoiser; LoRA adapters are attached to it."""

    lora_target_modules: list[str]
    """Module names a LoRA config targets by default (the attention projections)."""

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent sample, without the batch dimension."""

    def text_encoders(self) -> list[nn.Module]:
        """The prompt encoders. They may sit on another device than the transformer (the CPU, after
        ``model.offload_text_encoders``): prompts are encoded where they are."""

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        """Text-encode prompts (no gradient) on the text encoders' device; returned on the transformer's
        device. The empty string is the unconditional prompt."""

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, embeddings: PromptEmbeddings) -> torch.Tensor:
        """Predicted velocity at noise level sigma (B,), in [0, 1]."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images, float (B, 3, H, W) in [0, 1]."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] to latents (the mean of the VAE posterior, or a deterministic
        autoencoder's encoding)."""

    def save_lora(self, path, state_dict=None) -> None:
        """Save the transformer's LoRA adapter in the format the model's diffusers pipeline loads (from
        ``state_dict``, the transformer's gathered weights, when given)."""


def index_embeddings(embeddings: PromptEmbeddings, index: torch.Tensor | slice) -> PromptEmbeddings:
    return tuple(e[index] for e in embeddings)


def cat_embeddings(parts: list[PromptEmbeddings]) -> PromptEmbeddings:
    return tuple(torch.cat(tensors, dim=0) for tensors in zip(*parts))
