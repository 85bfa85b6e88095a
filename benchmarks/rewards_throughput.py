"""Benchmark: images/s of each built-in reward that runs on this machine's CPU.

ShapesEval rewards (and `remote`, a loopback server wrapping shapes_partial) score 32 px
ShapesEval renders; the others score 512 px images with rendered text, the size of a real
text-to-image sample. clip_score / pickscore / aesthetic run a TINY RANDOM CLIP (224 px input,
2 layers, width 32) built here: they measure the reward plumbing, not CLIP-L/CLIP-H weights.
Writes results/rewards_throughput.json and prints a Markdown table. Usage:

    python benchmarks/rewards_throughput.py [--seconds 3] [--batch 16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import save_file

from dgpo.rewards import get_reward
from dgpo.rewards.clip import save_tiny_clip
from dgpo.rewards.remote import RewardServer
from dgpo.shapes.prompts import scene_for_spec, test_specs
from dgpo.shapes.world import render_scene

TINY = "tiny random CLIP, not the real weights"


def shapes_inputs(batch: int):
    specs = [test_specs()[i % len(test_specs())] for i in range(batch)]
    rng = np.random.default_rng(0)
    images = torch.stack([torch.from_numpy(np.array(render_scene(scene_for_spec(s, rng)))).permute(2, 0, 1) for s in specs])
    return images.float() / 255, [s.prompt for s in specs], [s.to_metadata() for s in specs]


def text_inputs(batch: int, size: int = 512):
    words = ["Hello World", "OPEN 24 HOURS", "coffee shop", "DGPO"]
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 48)
    except OSError:
        font = ImageFont.load_default(size=48)
    images, prompts = [], []
    for i in range(batch):
        image = Image.new("RGB", (size, size), (230, 220 - 10 * (i % 4), 200))
        ImageDraw.Draw(image).text((40, size // 2 - 30), words[i % 4], fill=(20, 20, 30), font=font)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        prompts.append(f'a shop sign that says "{words[i % 4]}"')
    return torch.stack(images).float() / 255, prompts, [{} for _ in prompts]


def measure(reward, inputs, seconds: float) -> tuple[float, int]:
    """images/s over whole calls, after one warm-up call; at least two timed calls."""
    images, prompts, metadata = inputs
    reward(images, prompts, metadata)
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        reward(images, prompts, metadata)
        calls += 1
    return calls * len(prompts) / (time.perf_counter() - start), calls * len(prompts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per reward (default: 3)")
    parser.add_argument("--batch", type=int, default=16, help="images per reward call (default: 16)")
    parser.add_argument("--results", default="results/rewards_throughput.json")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dgpo-rewards-bench-"))
    save_tiny_clip(tmp / "clip", image_size=224)
    torch.manual_seed(0)
    save_file({"layers.0.weight": torch.randn(8, 16), "layers.1.weight": torch.randn(1, 8)}, tmp / "head.safetensors")
    clip = str(tmp / "clip")
    shapes, text = shapes_inputs(args.batch), text_inputs(args.batch)
    server = RewardServer(get_reward("shapes_partial"), "shapes_partial", "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    cases = [  # reward, options, inputs, input description, note
        ("shapes_partial", {}, shapes, "32 px ShapesEval", ""),
        ("shapes_strict", {}, shapes, "32 px ShapesEval", ""),
        ("jpeg_compressibility", {}, text, "512 px", ""),
        ("jpeg_incompressibility", {}, text, "512 px", ""),
        ("ocr", {}, text, "512 px text", "Tesseract, one process per image"),
        ("clip_score", dict(model=clip, device="cpu"), text, "512 px", TINY),
        ("pickscore", dict(model=clip, tokenizer=clip, device="cpu"), text, "512 px", TINY),
        ("aesthetic", dict(model=clip, head=str(tmp / "head.safetensors"), device="cpu"), text, "512 px", TINY),
        ("remote", dict(url=server.url, reward="shapes_partial"), shapes, "32 px ShapesEval", "loopback HTTP server wrapping shapes_partial"),
    ]
    results = []
    try:
        for name, options, inputs, size, note in cases:
            try:
                start = time.perf_counter()
                reward = get_reward(name, **options)
                load_s = time.perf_counter() - start
            except RuntimeError as exc:  # e.g. no tesseract binary here
                print(f"skipping {name}: {exc}", file=sys.stderr)
                continue
            rate, images = measure(reward, inputs, args.seconds)
            results.append(dict(reward=name, input=size, batch=args.batch, images=images, images_per_s=round(rate, 1), load_s=round(load_s, 2), note=note))
            print(f"{name}: {rate:.1f} images/s", file=sys.stderr)
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(tmp, ignore_errors=True)

    out = dict(
        command="python " + " ".join(shlex.quote(a) for a in sys.argv),
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), niceness=os.nice(0),
                     load_average_at_start=[round(x, 2) for x in os.getloadavg()]),
        note=f"clip_score, pickscore and aesthetic numbers are for a {TINY} (224 px input, 2 layers, width 32).",
        results=results,
    )
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(out, indent=1) + "\n")
    print("| reward | input | images/s | load s | note |\n|---|---|---:|---:|---|")
    for r in results:
        print(f"| {r['reward']} | {r['input']} | {r['images_per_s']} | {r['load_s']} | {r['note']} |")
    print(f"\n{out['note']}\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
