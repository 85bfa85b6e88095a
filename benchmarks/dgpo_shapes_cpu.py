"""Benchmark: the default DGPO recipe on ShapesEval, from the shipped base model, on this machine's CPU.

Trains the recipe once per training seed (``run.seed``), each in runs/bench-dgpo-shapes/seed-N, and
prints each before/after table and the wall-clock time. Writes results/dgpo_shapes_cpu.json after
every seed: the first seed's summary at the top level (the keys earlier versions wrote), every
seed's under ``seeds``, and the mean and spread of the final scores; each seed's final adapter, per-step
metrics and evaluations go to results/dgpo_shapes_cpu_runs/seed-N (beside --results). A seed whose run finished with
the same config is reused, and an interrupted one resumes from its newest checkpoint, so a benchmark
of several CPU hours can be stopped and continued. Usage:

    python benchmarks/dgpo_shapes_cpu.py [--seeds 0 1] [--set section.field=value ...]
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from dgpo.shapes.prompts import CATEGORIES
from dgpo.train.checkpoint import latest_good_checkpoint
from dgpo.train.config import load_config
from dgpo.train.run import comparison_table, run_training

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "shapes" / "dgpo.yaml"
RUNS = Path("runs/bench-dgpo-shapes")


def train_seed(seed: int, overrides: list[str]) -> dict:
    """One seed's run: reused when finished with this config, resumed when interrupted, else started afresh."""
    run_dir = RUNS / f"seed-{seed}"
    config = load_config(RECIPE, [*overrides, f"run.output_dir={run_dir}", f"run.seed={seed}"])
    finished = run_dir / "results.json"
    if finished.exists():
        summary = json.loads(finished.read_text())
        if summary.get("config") == as_saved(config):
            print(f"seed {seed}: reusing the finished run in {run_dir}")
            return summary
    resume = latest_good_checkpoint(run_dir / "checkpoints", warn=print) is not None
    if resume:
        refuse_another_config(run_dir, config)
    start = time.perf_counter()
    summary = run_training(config, resume=resume, overwrite=not resume)
    if summary["status"] != 0:
        raise SystemExit(f"seed {seed} stopped with status {summary['status']}; run the same command again to resume it")
    summary["benchmark_seconds_including_evaluation"] = time.perf_counter() - start
    evals = json.loads((run_dir / "evals.json").read_text())
    summary["evaluations"] = [{k: e[k] for k in ("step", "overall", "categories", "artifact", "diversity")} for e in evals]
    summary["seed"] = seed
    finished.write_text(json.dumps(summary, indent=1))
    return summary


def as_saved(config) -> dict:
    """The config as a run's config.yaml and results.json hold it (plain lists, dicts and numbers)."""
    return json.loads(json.dumps(config.to_dict()))


def refuse_another_config(run_dir: Path, config) -> None:
    """A seed's checkpoints resume only under the config they were trained with (a recipe edited between
    an interruption and a resume would otherwise continue, or extend a finished run, under the new one)."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else None
    current = as_saved(config)
    if saved is not None and saved != current:
        changed = sorted(f"{section}.{key}" for section in current for key in current[section]
                         if saved.get(section, {}).get(key) != current[section][key])
        raise SystemExit(f"{run_dir} holds a run of another config ({', '.join(changed) or 'sections differ'}); "
                         "move it aside or delete it to start this seed afresh")


def keep_seed_files(run_dir: Path, kept: Path) -> None:
    """What a reader needs to check a seed without its checkpoints: the final adapter (and the evaluation EMA's, with
    eval.ema_decay), so that `dgpo eval --adapter` reproduces its table, the per-step metrics and evaluations, and
    results.json, with which `dgpo compare --reuse` takes the seed as a finished run of the same training."""
    if kept.exists():
        shutil.rmtree(kept)
    kept.mkdir(parents=True)
    for name in ("adapter", "adapter_ema"):
        if (run_dir / name).is_dir():
            shutil.copytree(run_dir / name, kept / name)
    for name in ("metrics.jsonl", "evals.json", "config.yaml", "results.json"):
        shutil.copy(run_dir / name, kept / name)


def spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)), "values": values}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (run.seed), one run each (default: 0)")
    parser.add_argument("--results", default="results/dgpo_shapes_cpu.json")
    args = parser.parse_args()
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    stem = results.with_suffix("")
    command = "python benchmarks/dgpo_shapes_cpu.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    seeds = []
    for seed in args.seeds:
        summary = train_seed(seed, args.set)
        seeds.append(summary)
        print(f"seed {seed}:")
        print(comparison_table(summary["before"], summary["after"]))
        print(f"training wall clock {summary['wall_clock_seconds']:.0f} s ({summary['optimizer_steps']} steps)")
        suffix = "" if seed == args.seeds[0] else f"_seed{seed}"
        for name in ("curves.png", "grid_before.png", "grid_after.png"):
            shutil.copy(Path(summary["output_dir"]) / name, f"{stem}{suffix}_{name}")
        keep_seed_files(Path(summary["output_dir"]), Path(f"{stem}_runs") / f"seed-{seed}")
        out = dict(seeds[0])
        out.update(
            seeds=seeds,
            across_seeds={
                "after_overall": spread([s["after"]["overall"] for s in seeds]),
                "after_categories": {c: spread([s["after"]["categories"][c] for s in seeds]) for c in CATEGORIES},
                "wall_clock_seconds": spread([s["wall_clock_seconds"] for s in seeds]),
            },
            command=command,
        )
        results.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {results} ({len(seeds)} of {len(args.seeds)} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
