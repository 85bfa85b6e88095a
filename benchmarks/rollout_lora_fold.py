"""Benchmark: a recipe's rollout chunk with the LoRA folded into the weights (what rollout.sample does) against the
LoRA path at every forward, timed alternately in one process so that the machine's drift hits both alike.

The model and LoRA come from the recipe (default: the ShapesEval main job, configs/shapes/dgpo.yaml: the shipped
base, LoRA r16 on the attention projections); a chunk is data.micro_batch samples of one prompt, sampled with
the recipe's rollout solver and CFG. Writes a JSON file with the command. Usage:

    python benchmarks/rollout_lora_fold.py [--config configs/shapes/dgpo.yaml] [--rounds 5] [--threads 2] \
        [--output results/machine_speed/rollout_lora_fold.json]
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from dgpo.generation import sample
from dgpo.models import load_model
from dgpo.train.config import load_config
from dgpo.train.policy import attach_trainable

PROMPT = "three red circles"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes/dgpo.yaml")
    parser.add_argument("--rounds", type=int, default=5, help="folded and unfolded chunks timed, alternately, after one warm-up each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="results/machine_speed/rollout_lora_fold.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    model = load_model(config.model.backend, config.model.path, config.model.resolution)
    attach_trainable(model, config.model)
    batch = config.data.micro_batch
    cond, uncond = model.encode_prompts([PROMPT] * batch), model.encode_prompts([""] * batch)
    noise = torch.randn(batch, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    settings = config.rollout.sampler_settings

    def chunk_seconds(folded: bool) -> float:
        start = time.perf_counter()
        sample(model, cond, uncond, noise, settings, fold_lora=folded)
        return time.perf_counter() - start

    chunk_seconds(True), chunk_seconds(False)
    times: dict[str, list[float]] = {"folded": [], "unfolded": []}
    for _ in range(args.rounds):
        times["unfolded"].append(chunk_seconds(False))
        times["folded"].append(chunk_seconds(True))
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "command": shlex.join(["python", "benchmarks/rollout_lora_fold.py", *(argv if argv is not None else sys.argv[1:])]),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "chunk": {"samples": batch, "solver": settings.sampler, "num_steps": settings.num_steps, "guidance_scale": settings.guidance_scale,
                  "lora_rank": config.model.lora_rank},
        "seconds": times,
        "median_seconds": median,
        "folded_saves": 1 - median["folded"] / median["unfolded"],
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{batch} samples, {settings.num_steps} {settings.sampler} steps, CFG {settings.guidance_scale}, {args.threads} threads ({result['cpu_capability']})")
    for name, values in times.items():
        print(f"{name}: median {median[name]:.3f} s  ({', '.join(f'{v:.3f}' for v in values)})")
    print(f"folding saves {result['folded_saves']:.1%} of a rollout chunk; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
