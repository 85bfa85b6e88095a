"""Probe: can the base model's denoiser learn what its prompts ask from exact supervision, and how fast?

Fine-tunes the whole denoiser of a ShapesEval model with plain rectified flow on renders captioned
*exactly* (``captions.EXACT_CAPTIONS``: every attribute stated, never wrong) and evaluates the raw
weights (no EMA) on the test set every few hundred steps. It bounds what RL can do in the same number
of images: DGPO's update is at best flow matching on the right images of each group. If exact
captions do not teach relations and bindings in N images, RL will not teach them in N rollouts.
Usage (writes results/probe_supervised_<tag>.json):

    python benchmarks/probes/shapes_supervised.py --model shipped --tag base [--categories position color_attr]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from dgpo.models import load_model
from dgpo.sampler_settings import SamplerSettings
from dgpo.shapes.captions import EXACT_CAPTIONS
from dgpo.shapes.evaluator import shapes_eval
from dgpo.shapes.pretrain import DenoiserTraining, Pool, PretrainConfig, build_pool, pool_latents


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shipped")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--categories", nargs="*", default=[], help="train on these categories only (default: all)")
    parser.add_argument("--pool", type=int, default=8000, help="renders drawn before the category filter")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[100, 300, 600])
    parser.add_argument("--images-per-category", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model("shapes", args.model)
    pool = build_pool(args.pool, 11)
    if args.categories:
        keep = [i for i, s in enumerate(pool.specs) if s.category in args.categories]
        pool = Pool([pool.specs[i] for i in keep], [pool.scenes[i] for i in keep], pool.pixels[keep])
    latents = pool_latents(model, pool.pixels)
    # A cosine schedule 100,000 steps long stays within 0.01% of --lr over the probe's few hundred steps.
    training = DenoiserTraining(model, PretrainConfig(captions=EXACT_CAPTIONS, dit_lr=args.lr, warmup_steps=0, dit_steps=100_000, seed=11))
    settings = SamplerSettings(num_steps=10)
    rows = []

    def evaluate(step: int, seconds: float) -> None:
        model.transformer.eval()
        with torch.no_grad():
            result = shapes_eval(model, settings, images_per_category=args.images_per_category, seed=0)
        model.transformer.train()
        rows.append({"step": step, "images_seen": step * training.cfg.dit_batch, "train_seconds": seconds,
                     "overall": result.overall, "categories": result.categories})
        print(step, f"overall {result.overall:.3f}", {k: round(v, 3) for k, v in result.categories.items()}, flush=True)

    evaluate(0, 0.0)
    start = time.perf_counter()
    for step in range(1, max(args.eval_at) + 1):
        training.train_step(pool, latents)
        if step in args.eval_at:
            evaluate(step, time.perf_counter() - start)
    out = Path("results") / f"probe_supervised_{args.tag}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"command": "python " + shlex.join(sys.argv), "pool_renders": len(pool.scenes), "evaluations": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
