"""Sampling with a LoRA folded into its base weights: one weight per layer instead of the LoRA path at every forward.

A peft LoRA layer computes W x + s B (A x) at every forward; a rollout of the ShapesEval recipe runs each layer
20 times a sample (10 solver steps, CFG), and the two extra matrix products and the sum cost 8% of a rollout's
time on a 2-core CPU (`benchmarks/rollout_lora_fold.py`, results/machine_speed/). ``lora_folded`` forms
W + s B A once and turns the adapter path off for the duration; the base weights are swapped back afterwards,
bit for bit (no merge-then-unmerge rounding creeping into the frozen reference). The folded forward equals the
unfolded one up to float rounding.
"""
from __future__ import annotations

import contextlib

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from torch.distributed.tensor import DTensor


def _foldable(layer: LoraLinear) -> bool:
    """An active, unmerged plain LoRA on a dense weight: what W + s B A reproduces exactly (no DoRA, no LoRA
    bias, no dropout that acts; sharded weights are left to the unfolded path)."""
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    return (
        not layer.disable_adapters and not layer.merged and bool(adapters)
        and not isinstance(layer.get_base_layer().weight, DTensor)
        and not any(layer.use_dora.get(a, False) or layer.lora_bias.get(a, False) for a in adapters)
        and not any(isinstance(layer.lora_dropout[a], nn.Dropout) and layer.lora_dropout[a].p > 0 and layer.training for a in adapters)
    )


@contextlib.contextmanager
def lora_folded(transformer: nn.Module):
    """Inside, ``transformer`` computes with each active LoRA folded into its base weight (no gradient flows to the
    LoRA). Nothing changes where any LoRA layer cannot be folded exactly, or none is active (the reference with
    adapters disabled, a model without LoRA)."""
    layers = [m for m in transformer.modules() if isinstance(m, LoraLinear)]
    if not layers or not all(_foldable(layer) for layer in layers):
        yield
        return
    originals = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                originals.append((weight, weight.data))
                weight.data = weight.data + delta.to(weight.dtype)
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for weight, data in originals:
            weight.data = data
        for layer in layers:
            layer.enable_adapters(True)
