"""Fuse a trained LoRA into its base model and save the whole pipeline, for use without dgpo or peft.

The result is an ordinary diffusers model directory: ``DiffusionPipeline.from_pretrained(output)`` loads
it and its transformer computes what the base transformer with the LoRA loaded computes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import load_model

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PIPELINE_BACKENDS = ("sd3", "flux", "sana")


def find_lora(path: str | Path) -> Path:
    """The LoRA weights file of ``path``: the file itself, an adapter directory (what ``save_lora`` writes)
    or a run directory (``dgpo train`` writes the final adapter to ``run_dir/adapter``)."""
    path = Path(path)
    for candidate in (path, path / LORA_WEIGHTS, path / "adapter" / LORA_WEIGHTS):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no LoRA at {str(path)!r}: expected {LORA_WEIGHTS}, a directory holding it, or a run directory with adapter/{LORA_WEIGHTS}")


def load_adapter(model, path: str | Path) -> None:
    """Load a trained LoRA (see ``find_lora``) into ``model``'s transformer, for sampling or evaluating with it."""
    weights = find_lora(path)
    model.transformer.load_lora_adapter(str(weights.parent), weight_name=weights.name, use_safetensors=True)


def merge_lora(backend: str, model: str | Path, lora: str | Path, output: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Load ``backend``'s pipeline from the directory ``model``, fuse the LoRA ``lora`` (see ``find_lora``)
    into its transformer and save the pipeline to ``output``, cast to ``dtype`` when given.

    The fusion happens in the precision the pipeline loads in (float32) and only the result is cast, so a
    bfloat16 output is the fused float32 weights rounded once."""
    if backend not in PIPELINE_BACKENDS:
        raise ValueError(f"merge-lora takes the backends {', '.join(PIPELINE_BACKENDS)} (diffusers pipelines), not {backend!r}")
    if not Path(model).is_dir():
        raise FileNotFoundError(f"model directory {str(model)!r} does not exist")
    weights = find_lora(lora)
    adapter = load_model(backend, str(model))
    pipeline = adapter.pipeline
    pipeline.load_lora_weights(str(weights.parent), weight_name=weights.name)
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    if dtype is not None and dtype != adapter.transformer.dtype:
        pipeline.to(dtype)
    pipeline.save_pretrained(str(output))
    return Path(output)
