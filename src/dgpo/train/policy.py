"""The model being trained: its trainable parameters and their EMAs, the frozen reference, the cached prompt
embeddings, and the velocities an algorithm trains with (policy, old policy, reference)."""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.base import FlowModelAdapter, PromptEmbeddings, cat_embeddings, index_embeddings
from ..models.merge import find_lora
from ..seeding import stable_seed
from .config import Config, ModelConfig
from .ema import ParameterEMA
from .sharding import full_trainable_state


def attach_trainable(model, cfg: ModelConfig) -> list[tuple[str, torch.nn.Parameter]]:
    """LoRA via peft on the transformer (rank > 0) or the whole transformer; returns named trainable params."""
    transformer = model.transformer
    transformer.requires_grad_(False)
    if cfg.lora_rank > 0:
        targets = cfg.lora_targets or model.lora_target_modules
        transformer.add_adapter(
            LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets, init_lora_weights="gaussian")
        )
        if cfg.init_adapter:
            load_initial_adapter(transformer, cfg.init_adapter, cfg.lora_alpha)
        named = [(n, p) for n, p in transformer.named_parameters() if "lora_" in n]
        for _, p in named:
            p.requires_grad_(True)
        return named
    transformer.requires_grad_(True)
    return list(transformer.named_parameters())


def load_initial_adapter(transformer, path: str | Path, lora_alpha: float) -> None:
    """Overwrite the transformer's fresh LoRA (peft's ``default`` adapter) with the trained one at ``path`` (see
    ``find_lora``), which must wrap the same modules with the same rank and alpha: continuing a run's adapter under a
    new recipe, or fine-tuning a published one further."""
    weights = find_lora(path)
    with safe_open(str(weights), "pt") as f:
        metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        state = {name.removeprefix("transformer."): f.get_tensor(name) for name in f.keys()}
    alpha = metadata.get("transformer.lora_alpha")
    if alpha is not None and float(alpha) != float(lora_alpha):
        raise ValueError(f"model.init_adapter {str(path)!r} was trained with lora_alpha {alpha}, this run sets model.lora_alpha {lora_alpha}")
    expected = get_peft_model_state_dict(transformer)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"model.init_adapter {str(path)!r} wraps other modules than this run's LoRA: "
                         f"{len(missing)} of its weights missing (e.g. {missing[:1]}), {len(extra)} extra (e.g. {extra[:1]})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"model.init_adapter {str(path)!r}: {name} has shape {tuple(tensor.shape)}, this run's LoRA "
                             f"{tuple(expected[name].shape)} (a different model.lora_rank or model)")
    set_peft_model_state_dict(transformer, {name: tensor.to(expected[name].dtype) for name, tensor in state.items()})


class Policy:
    """``model`` with trainable weights attached (LoRA, initialised from the run seed or model.init_adapter) and ``texts``
    embedded and cached (then the text encoders offloaded, with model.offload_text_encoders)."""

    def __init__(self, model: FlowModelAdapter, config: Config, texts: list[str], shard=None):
        """``shard``: wraps a transformer for a sharded model.sharding once its trainable weights are attached (it
        replaces the parameters, so everything that holds them, the optimizer and EMAs included, is built after it)."""
        m = config.model
        self.model = model
        self.embedding_cache: dict[str, PromptEmbeddings] = {}
        self.embed(texts + [""])
        if m.offload_text_encoders:
            for encoder in model.text_encoders():
                encoder.to("cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed("adapter-init", config.run.seed))
            names = [name for name, _ in attach_trainable(model, m)]
        if m.gradient_checkpointing:
            model.transformer.enable_gradient_checkpointing()
        self.lora = m.lora_rank > 0
        # Copied before sharding (a sharded module cannot be deep-copied), then sharded like the policy.
        reference = None if self.lora else copy.deepcopy(model.transformer).requires_grad_(False)
        self.sharded = shard is not None
        if self.sharded:
            model.transformer = shard(model.transformer)
            reference = None if reference is None else shard(reference)
        self.reference_transformer = reference
        params = dict(model.transformer.named_parameters())
        self.trainable = [(name, params[name]) for name in names]
        self.rollout_ema = ParameterEMA(self.trainable, config.rollout.ema_decay)
        self.eval_ema = ParameterEMA(self.trainable, config.eval.ema_decay) if config.eval.ema_decay > 0 else None

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.trainable]

    def embed(self, texts: list[str]) -> PromptEmbeddings:
        """Embeddings of ``texts``, each encoded once per run (in chunks of 256) and cached."""
        missing = sorted({t for t in texts if t not in self.embedding_cache})
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            embeddings = self.model.encode_prompts(chunk)
            for i, text in enumerate(chunk):
                self.embedding_cache[text] = index_embeddings(embeddings, slice(i, i + 1))
        return cat_embeddings([self.embedding_cache[t] for t in texts])

    def empty(self, count: int) -> PromptEmbeddings:
        """The empty prompt's embeddings, ``count`` times (the unconditional half of CFG)."""
        return self.embed([""] * count)

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference: the same transformer with LoRA disabled (no second copy), or the frozen copy."""
        if self.reference_transformer is None:
            self.model.transformer.disable_adapters()
            try:
                yield
            finally:
                self.model.transformer.enable_adapters()
        else:
            live, self.model.transformer = self.model.transformer, self.reference_transformer
            try:
                yield
            finally:
                self.model.transformer = live

    # ----- the velocities an algorithm trains with: v(x, sigma, embeddings) -----------------------------------
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeddings: PromptEmbeddings) -> torch.Tensor:
        """The policy's, with gradients."""
        return self.model.velocity(x, sigma, embeddings)

    def old_velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeddings: PromptEmbeddings) -> torch.Tensor:
        """The rollout EMA's (the old policy), without gradients. Call it before ``velocity``: it swaps the EMA
        weights in place, which would invalidate the policy forward's autograd graph."""
        with torch.no_grad(), self.rollout_ema.swapped_in():
            return self.model.velocity(x, sigma, embeddings)

    def reference_velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeddings: PromptEmbeddings) -> torch.Tensor:
        """The frozen reference's, without gradients."""
        with torch.no_grad(), self.reference():
            return self.model.velocity(x, sigma, embeddings)

    def export(self, path: Path, write: bool = True, with_ema: bool = True) -> None:
        """LoRA in diffusers' format (``pipe.load_lora_weights`` / ``transformer.load_lora_adapter``), or the whole
        transformer; with an evaluation EMA and ``with_ema`` also its weights, beside it as ``<path>_ema``. Sharded,
        every process calls it (the weights are gathered) and the one with ``write`` writes."""
        self._export_weights(path, write)
        if self.eval_ema is not None and with_ema:
            with self.eval_ema.swapped_in():
                self._export_weights(path.with_name(path.name + "_ema"), write)

    def _export_weights(self, path: Path, write: bool) -> None:
        state = full_trainable_state(self.model.transformer) if self.sharded else None
        if not write:
            return
        if self.lora:
            self.model.save_lora(path, state)
        elif state is None:
            self.model.transformer.save_pretrained(str(path))
        else:
            save_transformer(self.model.transformer, state, path)


def save_transformer(transformer, state: dict[str, torch.Tensor], path: Path) -> None:
    """A transformer in diffusers' folder layout (config.json and the weights) from its gathered weights
    (``save_pretrained`` would save the sharded module's local shards)."""
    path.mkdir(parents=True, exist_ok=True)
    transformer.save_config(str(path))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "diffusion_pytorch_model.safetensors"))
