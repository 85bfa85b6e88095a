"""Implementation shared by the diffusers backends: LoRA export, AutoencoderKL latents, pipeline loading.

The flow-model specifics (token packing, timestep scale, keyword names) stay in each backend's
``velocity``; what every backend built on a diffusers pipeline does the same way lives here, and
what the ``AutoencoderKL`` backends (SD3, FLUX, ShapesEval) share on top of that in ``VAELatents``
(SANA's ``AutoencoderDC`` has its own latents).
"""
from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch

ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class PipelineLoRA:
    """LoRA export for a backend with a ``transformer``: saved in the format of the diffusers pipeline
    named by ``pipeline_class``, so that pipeline's ``load_lora_weights`` loads it."""

    lora_target_modules = ATTENTION_PROJECTIONS
    pipeline_class = "StableDiffusion3Pipeline"

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def text_encoder_device(self) -> torch.device:
        """Where prompts are encoded: the text encoders' device, which is not the transformer's once
        ``model.offload_text_encoders`` has moved them to the CPU."""
        return next(self.text_encoders()[0].parameters()).device

    def save_lora(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The transformer's LoRA in the pipeline's format; the metadata carries lora_alpha (without it
        the loader assumes alpha = rank and rescales). ``state_dict``: the transformer's weights gathered from
        a sharded transformer (default: its own)."""
        from peft.utils import get_peft_model_state_dict

        getattr(diffusers, self.pipeline_class).save_lora_weights(
            str(path),
            transformer_lora_layers=get_peft_model_state_dict(self.transformer, state_dict=state_dict),
            transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict(),
        )


class VAELatents(PipelineLoRA):
    """Decoding and encoding for a backend with an ``AutoencoderKL`` ``vae``: latents are the VAE posterior
    scaled as ``(z - shift_factor) * scaling_factor``."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        images = self.vae.decode(latents.to(self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor).sample
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        mean = self.vae.encode((images * 2.0 - 1.0).to(self.vae.dtype)).latent_dist.mean
        return (mean - cfg.shift_factor) * cfg.scaling_factor


def _absent_components(path: str | Path) -> dict[str, None]:
    """Components a local model_index.json lists as null (e.g. SD3 without T5), which diffusers
    wants passed explicitly as None."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    return {name: None for name, entry in entries.items() if isinstance(entry, list) and entry == [None, None]}


class PipelineAdapter(PipelineLoRA):
    """A backend wrapping a whole diffusers pipeline (text encoders, transformer, VAE), frozen."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.vae_scale = pipeline.vae_scale_factor

    @classmethod
    def load_pipeline(cls, path: str | Path, torch_dtype: torch.dtype | None = None):
        """A diffusers model directory (or a hub id where the network allows or the hub cache holds it), every module
        frozen. A hub id that cannot be loaded is one line naming model.path, not the hub library's chained errors."""
        try:
            pipeline = getattr(diffusers, cls.pipeline_class).from_pretrained(str(path), torch_dtype=torch_dtype, **_absent_components(path))
        except OSError:
            if Path(path).is_dir():
                raise
            raise FileNotFoundError(f"model.path {str(path)!r}: no such directory (in {Path.cwd()}), and as a hub model id it is "
                                    "not in the local hub cache and the hub is unreachable or does not hold it") from None
        for module in pipeline.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval().requires_grad_(False)
        return pipeline

    def native_resolution(self, resolution: int) -> int:
        """``resolution``, or for 0 the checkpoint's native size: the pipeline's ``default_sample_size`` latents
        (SD3 and SANA: the transformer's ``sample_size``; FLUX: 128) times the VAE scale, as the pipeline samples."""
        return resolution or self.pipeline.default_sample_size * self.vae_scale

    def prompt_token_limits(self) -> list[tuple[str, object, int]]:
        """(name, tokenizer, tokens it reads) of each text encoder; subclasses list theirs (see ``check_prompt_lengths``)."""
        return []

    def text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text_encoder, text_encoder_2, ... that it has (SD3 may come without T5)."""
        return [module for name, module in self.pipeline.components.items() if name.startswith("text_encoder") and module is not None]

    def to(self, device: torch.device | str) -> PipelineAdapter:
        self.pipeline.to(device)
        return self


def check_prompt_lengths(model, prompts: list[str], source: str) -> None:
    """Refuse a prompt longer than every text encoder of ``model`` reads (``prompt_token_limits``): its end would
    be cut off without a word. A prompt that only some encoders cut is allowed, as the pipelines allow it (SD3 and
    FLUX: the CLIP encoders read the first 77 tokens, T5 the rest up to max_sequence_length). Adapters without
    token limits are not checked (ShapesEval's tokenizer refuses a long prompt itself)."""
    limits = model.prompt_token_limits() if hasattr(model, "prompt_token_limits") else []
    if not limits or not prompts:
        return
    lengths = [[len(ids) for ids in tokenizer(prompts).input_ids] for _, tokenizer, _ in limits]
    for index, prompt in enumerate(prompts):
        if all(counts[index] > limit for counts, (_, _, limit) in zip(lengths, limits)):
            read = ", ".join(f"{name} {limit} (this prompt: {counts[index]})" for counts, (name, _, limit) in zip(lengths, limits))
            raise ValueError(f"{source}: prompt {index + 1} ({prompt[:40]!r}...) is longer than any text encoder of this model reads, "
                             f"in tokens: {read}; shorten it")
