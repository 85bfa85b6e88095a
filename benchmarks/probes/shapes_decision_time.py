"""Probe: at which noise level does a ShapesEval denoiser decide whether an image will pass?

For the test prompts of the categories that depend on words (two objects, counting, position, colour
attribution) it samples each image as evaluation does (10-step Flow-DPM-Solver, CFG 4.5), verifies
it, then re-noises that image to each sigma of the rollout grid with fresh noise and solves from there
again (the grid's remaining steps). If the outcome is already decided at sigma, a passing original
still passes after the re-noise and a failing one still fails, so the pass rate after re-noising
splits by the original's verdict; where it is not decided yet, both halves pass at the same rate.
The decision happens between the largest sigma with no split and the smallest with a full one.

DGPO trains only at timesteps in [t_min, 1]; the split tells which sigmas carry the choice each
category needs (where the layout, the count and the binding are made). Usage:

    python benchmarks/probes/shapes_decision_time.py [--model DIR] [--adapter RUN_DIR/adapter]
        [--images-per-category 96] [--output results/x.json]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from dgpo.generation import Samples, sample
from dgpo.models import load_model
from dgpo.models.base import cat_embeddings
from dgpo.models.merge import load_adapter
from dgpo.sampler_settings import SamplerSettings
from dgpo.seeding import keyed_randn
from dgpo.shapes.evaluator import eval_plan
from dgpo.shapes.verifier import verify

CATEGORIES = ("two_object", "counting", "position", "color_attr")
START_INDICES = (1, 2, 3, 4, 5, 6, 7, 8)
"""Where to restart on the 10-step grid: sigma 0.964, 0.923, 0.875, 0.818, 0.750, 0.666, 0.562, 0.428."""


@torch.no_grad()
def solve(model, prompts: list[str], start: torch.Tensor, settings: SamplerSettings, start_step: int = 0) -> Samples:
    """Latents and images from ``start`` at the grid's sigma[start_step] to 0: evaluation's rollout, entered mid-grid."""
    uncond = cat_embeddings([model.encode_prompts([""])] * len(prompts))
    return sample(model, model.encode_prompts(prompts), uncond, start, settings, start_step=start_step)


def split_at(model, specs, latents: torch.Tensor, passed: np.ndarray, settings: SamplerSettings, index: int,
             batch_size: int) -> dict[str, float]:
    """Pass rates after re-noising to the grid's sigma[index] with fresh noise, for originals that passed and that failed."""
    sigma = float(settings.sigmas()[index])
    again = []
    for start in range(0, len(specs), batch_size):
        chunk = slice(start, start + batch_size)
        keys = [("decision-time", index, i) for i in range(start, min(start + batch_size, len(specs)))]
        noise = keyed_randn(model.latent_shape, keys, device=model.device)
        noisy = (1.0 - sigma) * latents[chunk] + sigma * noise
        images = solve(model, [s.prompt for s in specs[chunk]], noisy, settings, index).images
        again.extend(verify(spec, image).passed for spec, image in zip(specs[chunk], images))
    again = np.asarray(again, dtype=bool)
    return {
        "sigma": sigma,
        "pass_after_pass": float(again[passed].mean()) if passed.any() else float("nan"),
        "pass_after_fail": float(again[~passed].mean()) if (~passed).any() else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shipped")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--images-per-category", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model("shapes", args.model)
    if args.adapter:
        load_adapter(model, args.adapter)
    settings = SamplerSettings()
    report = {"command": "python " + shlex.join(sys.argv), "categories": {}}
    all_specs, all_keys, _ = eval_plan(args.images_per_category)
    for category in CATEGORIES:
        chosen = [i for i, spec in enumerate(all_specs) if spec.category == category]
        specs = [all_specs[i] for i in chosen]
        noise = keyed_randn(model.latent_shape, [all_keys[i] for i in chosen], device=model.device)
        originals = [solve(model, [s.prompt for s in specs[j:j + args.batch_size]], noise[j:j + args.batch_size], settings)
                     for j in range(0, len(specs), args.batch_size)]
        latents = torch.cat([o.latents for o in originals])
        passed = np.asarray([verify(s, im).passed for s, im in zip(specs, torch.cat([o.images for o in originals]))], dtype=bool)
        rows = [split_at(model, specs, latents, passed, settings, index, args.batch_size)
                for index in START_INDICES]
        report["categories"][category] = {"images": len(specs), "pass_rate": float(passed.mean()), "restarts": rows}
        print(f"{category}: {len(specs)} images, pass {passed.mean():.3f}")
        for row in rows:
            print(f"  sigma {row['sigma']:.3f}: pass after pass {row['pass_after_pass']:.2f}, after fail {row['pass_after_fail']:.2f}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
