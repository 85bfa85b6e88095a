"""Probe: does a ShapesEval denoiser use the relation and colour-binding words of its prompt?

A diffusion-classifier test. For held-out renders of position (colour-attribution) scenes, it compares
the flow-matching loss under the exact caption with the loss under the same caption with the relation
reversed (the two colours swapped), at the same noise and time. A denoiser that uses the word predicts
the true scene better from the true caption: the relative gap (swapped - true) / true is clearly
positive and the share of renders where the true caption wins is well above one half. One that
ignores the word scores a gap of ~0 and a share of ~0.5, whatever it draws. Cheap (forwards only), so
it reads a base model or an RL adapter without sampling noise. Usage:

    python benchmarks/probes/shapes_word_use.py [--model DIR] [--adapter RUN_DIR/adapter] [--output results/x.json]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from dgpo.models import load_model
from dgpo.models.merge import load_adapter
from dgpo.shapes.captions import EXACT_CAPTIONS, OPPOSITE_RELATION, caption_scene
from dgpo.shapes.pretrain import build_pool, pool_latents

TIMES = (0.5, 0.7, 0.85, 0.95)


def swap_relation(caption: str) -> str:
    relation = next(r for r in OPPOSITE_RELATION if f" {r} " in caption)
    return caption.replace(f" {relation} ", f" {OPPOSITE_RELATION[relation]} ")


def swap_colours(caption: str, scene) -> str:
    first, second = scene[0].color, scene[1].color
    words = caption.split()
    # An exact caption names the first object first: its colour is the first colour word, the second's the last.
    i, j = words.index(first), len(words) - 1 - words[::-1].index(second)
    words[i], words[j] = second, first
    return " ".join(words)


def word_use(model, latents: torch.Tensor, true: list[str], swapped: list[str], seed: int = 0) -> dict[str, dict[str, float]]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        e_true, e_swapped = model.encode_prompts(true), model.encode_prompts(swapped)
        for t in TIMES:
            noise = torch.randn(latents.shape, generator=generator)
            x_t, sigma = (1 - t) * latents + t * noise, torch.full((len(latents),), t)
            target = noise - latents
            loss_true = ((model.velocity(x_t, sigma, e_true) - target) ** 2).mean(dim=(1, 2, 3))
            loss_swapped = ((model.velocity(x_t, sigma, e_swapped) - target) ** 2).mean(dim=(1, 2, 3))
            out[str(t)] = {"relative_gap": float((loss_swapped - loss_true).mean() / loss_true.mean()),
                           "true_wins": float((loss_true < loss_swapped).float().mean())}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shipped")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--renders", type=int, default=200, help="held-out renders per category")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model("shapes", args.model)
    if args.adapter:
        load_adapter(model, args.adapter)
    pool = build_pool(30 * args.renders, seed=5)  # not the pretraining pools' seeds
    report = {"command": "python " + shlex.join(sys.argv)}
    for category, swap in (("position", lambda c, s: swap_relation(c)), ("color_attr", swap_colours)):
        chosen = [i for i, spec in enumerate(pool.specs) if spec.category == category][: args.renders]
        captions = [caption_scene(pool.scenes[i], EXACT_CAPTIONS, np.random.default_rng(k)) for k, i in enumerate(chosen)]
        swapped = [swap(c, pool.scenes[i]) for c, i in zip(captions, chosen)]
        report[category] = word_use(model, pool_latents(model, pool.pixels[chosen]), captions, swapped)
        print(category, {t: f"gap {v['relative_gap']:+.4f} true wins {v['true_wins']:.2f}" for t, v in report[category].items()})
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
