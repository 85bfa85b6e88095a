"""Benchmark: where one training step of a recipe spends its time on this CPU.

Trains the recipe (default: the ShapesEval main job, configs/shapes/dgpo.yaml) for a few steps in a
temporary directory, profiles the last one with torch.profiler, and prints the step's wall time
(rollouts, update) and the operators with the largest share of its CPU time. The same step takes
2x longer on a CPU without AVX-512 (results/machine_speed/), so the CPU's name and vector
capability are written with the numbers. Writes a JSON file with the command. Usage:

    python benchmarks/step_profile.py [--config configs/shapes/dgpo.yaml] [--steps 3] [--threads 2] \
        [--output results/machine_speed/step_profile.json] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from dgpo.machine import describe_machine
from dgpo.train.config import load_config
from dgpo.train.loop import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes/dgpo.yaml")
    parser.add_argument("--steps", type=int, default=3, help="steps trained; the last is profiled (the first ones warm up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--output", default="results/machine_speed/step_profile.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as output:
        overrides = [f"run.max_steps={args.steps}", "eval.every=0", "run.save_every=0", "run.tensorboard=false", f"run.output_dir={output}", *args.set]
        trainer = Trainer(load_config(args.config, overrides))
        # the profiler records only the last step: it waits through the others
        profiler = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=args.steps - 1, warmup=0, active=1, repeat=1))
        logged: list[dict] = []
        with profiler:
            trainer.train(on_step=lambda trainer, metrics: (logged.append(metrics), profiler.step()))
    steps = [
        {**{k: m[k] for k in ("step", "time/rollout", "time/update", "time/reward") if k in m},
         "seconds": m["elapsed_seconds"] - (logged[i - 1]["elapsed_seconds"] if i else 0.0)}
        for i, m in enumerate(logged)
    ]
    table = [event for event in profiler.key_averages() if not event.key.startswith("ProfilerStep")]  # the schedule's step marker, not an operator
    total = sum(event.self_cpu_time_total for event in table)
    operators = [
        {"name": event.key, "self_share": event.self_cpu_time_total / total, "self_seconds": event.self_cpu_time_total / 1e6, "calls": event.count}
        for event in sorted(table, key=lambda event: event.self_cpu_time_total, reverse=True)[: args.top]
    ]
    result = {
        "command": shlex.join(["python", "benchmarks/step_profile.py", *(argv if argv is not None else sys.argv[1:])]),
        **describe_machine(),
        "steps": steps,
        "profiled_step": steps[-1]["step"],
        "note": ("the profiled step runs under torch.profiler, which adds some overhead to its seconds; "
                 "the shares are of the profiled step's CPU time over all threads"),
        "operators": operators,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['cpu']} ({result['cpu_capability']}), {args.threads} threads, torch {result['torch']}")
    print("| step | seconds | rollouts | update |\n|---|---|---|---|")
    for s in steps:
        print(f"| {s['step']} | {s['seconds']:.2f} | {s.get('time/rollout', float('nan')):.2f} | {s.get('time/update', float('nan')):.2f} |")
    print(f"\nstep {result['profiled_step']}, operators by self CPU time:\n| operator | share | seconds | calls |\n|---|---|---|---|")
    for op in operators:
        print(f"| {op['name']} | {op['self_share']:.1%} | {op['self_seconds']:.2f} | {op['calls']} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
