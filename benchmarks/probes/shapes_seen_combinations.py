"""Probe: does a ShapesEval model pass the prompts it trained on more often than the held-out ones?

ShapesEval's test prompts of a category are combinations its training prompts never show (counting: "four circles"
is a test prompt, and "four" is trained only with triangles). For every prompt of the chosen categories, train and
test alike, it samples images as evaluation does (10-step Flow-DPM-Solver, CFG 4.5, noise keyed by prompt and image)
and verifies them: the pass rate per prompt, and the mean over each split. A model whose training prompts pass far
more often than its test prompts has learned the combinations it saw rather than the words. Usage:

    python benchmarks/probes/shapes_seen_combinations.py [--model DIR] [--adapter NAME=RUN_DIR/adapter ...]
        [--category counting ...] [--images-per-prompt 32] [--output results/x.json]

The base model is always measured (as "base"); each --adapter adds a row.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from dgpo.generation import generate
from dgpo.models import load_model
from dgpo.models.merge import load_adapter
from dgpo.sampler_settings import SamplerSettings
from dgpo.shapes.prompts import test_specs, train_specs
from dgpo.shapes.verifier import verify


def pass_rates(model, category: str, images_per_prompt: int, settings: SamplerSettings, batch_size: int) -> dict:
    """Per prompt of ``category`` (train and test split): its pass rate over ``images_per_prompt`` keyed images."""
    specs = [(split, spec) for split, chosen in (("train", train_specs()), ("test", test_specs())) for spec in chosen
             if spec.category == category]
    images_of = [(spec, k) for _, spec in specs for k in range(images_per_prompt)]
    images = generate(model, [spec.prompt for spec, _ in images_of], [("seen_combinations", spec.prompt, k) for spec, k in images_of],
                      settings, batch_size)
    passed = np.asarray([verify(spec, image).passed for (spec, _), image in zip(images_of, images)], dtype=float)
    per_prompt = {spec.prompt: {"split": split, "pass": float(passed[i * images_per_prompt:(i + 1) * images_per_prompt].mean())}
                  for i, (split, spec) in enumerate(specs)}
    return {"prompts": per_prompt,
            **{f"{split}_mean": float(np.mean([p["pass"] for p in per_prompt.values() if p["split"] == split])) for split in ("train", "test")}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shipped")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--category", action="append", default=None)
    parser.add_argument("--images-per-prompt", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    categories = args.category or ["counting"]
    settings = SamplerSettings()
    command = shlex.join(["benchmarks/probes/shapes_seen_combinations.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"command": f"python {command}", "images_per_prompt": args.images_per_prompt, "models": {}}
    for name, adapter in [("base", None)] + [tuple(a.split("=", 1)) for a in args.adapter]:
        model = load_model("shapes", args.model)
        if adapter:
            load_adapter(model, adapter)
        report["models"][name] = {c: pass_rates(model, c, args.images_per_prompt, settings, args.batch_size) for c in categories}
        for c, rates in report["models"][name].items():
            print(f"{name} {c}: train prompts pass {rates['train_mean']:.3f}, test prompts {rates['test_mean']:.3f}")
            for prompt, row in rates["prompts"].items():
                print(f"  {row['split']:5s} {row['pass']:.3f}  {prompt}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
