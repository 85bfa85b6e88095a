"""Soak benchmark: many training epochs on a tiny random model; resident memory and time per epoch must stay flat.

An epoch here is --steps-per-epoch optimizer steps (rollout -> reward -> advantages -> update,
checkpoints every 5 steps with rotation, JSONL logging). Prints one line per epoch and writes
results/soak_tiny.json with the per-epoch figures and the growth between the first and last
quarter of the run. Usage:

    python benchmarks/soak_tiny.py [--epochs 30] [--steps-per-epoch 10] [--algorithm dgpo]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from dgpo.shapes.model import build_tiny_model
from dgpo.train.config import load_config
from dgpo.train.loop import Trainer


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--algorithm", default="dgpo", choices=["dgpo", "flow_grpo"])
    parser.add_argument("--results", default="results/soak_tiny.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_tiny_model().save_pretrained(model_dir)
        overrides = [
            f"model.path={model_dir}", "model.lora_rank=4", "data.group_size=4", "data.groups_per_step=4", "data.micro_batch=8",
            "rollout.num_steps=4", "loss.grid_points=4", "rollout.ema_after=20", "reward.weights={jpeg_incompressibility: 1.0}",
            f"run.max_steps={args.epochs * args.steps_per_epoch}", "run.save_every=5", "run.keep_checkpoints=2",
            "run.tensorboard=false", f"run.output_dir={Path(tmp) / 'run'}", "eval.ema_decay=0.9",
        ]
        if args.algorithm == "flow_grpo":
            overrides += ["loss.algorithm=flow_grpo", "rollout.sampler=sde", "loss.ppo_clip_eps=1e-4", "loss.timesteps=3", "rollout.ema_after=-1"]
        trainer = Trainer(load_config(None, overrides), log=lambda *a: None)
        epochs = []

        def on_step(tr, metrics):
            if tr.counters.step % args.steps_per_epoch == 0:
                now = time.perf_counter()
                epochs.append({"epoch": len(epochs) + 1, "step": tr.counters.step, "rss_mib": round(resident_mib(), 1),
                               "seconds": round(now - on_step.last, 3)})
                on_step.last = now
                print(f"epoch {len(epochs):3d}  step {tr.counters.step:5d}  rss {epochs[-1]['rss_mib']:8.1f} MiB  {epochs[-1]['seconds']:.2f} s", flush=True)

        on_step.last = time.perf_counter()
        trainer.train(on_step=on_step)
    quarter = max(len(epochs) // 4, 1)

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    summary = {
        "algorithm": args.algorithm,
        "epochs": epochs,
        "rss_growth_mib_first_to_last_quarter": round(mean(epochs[-quarter:], "rss_mib") - mean(epochs[:quarter], "rss_mib"), 1),
        "epoch_seconds_first_quarter": round(mean(epochs[:quarter], "seconds"), 3),
        "epoch_seconds_last_quarter": round(mean(epochs[-quarter:], "seconds"), 3),
        "command": "python benchmarks/soak_tiny.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "epochs"}, indent=1))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
