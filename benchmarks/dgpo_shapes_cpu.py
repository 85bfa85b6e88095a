"""Benchmark: the default DGPO recipe on ShapesEval, from the shipped base model, on this machine's CPU.

Prints the before/after table and the wall-clock time; writes results/dgpo_shapes_cpu.json
(plus the curves and before/after grids as PNG). Usage:

    python benchmarks/dgpo_shapes_cpu.py [--set section.field=value ...]
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from dgpo.train.config import load_config
from dgpo.train.run import comparison_table, run_training

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "shapes" / "dgpo.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--results", default="results/dgpo_shapes_cpu.json")
    args = parser.parse_args()
    config = load_config(RECIPE, ["run.output_dir=runs/bench-dgpo-shapes", *args.set])
    shutil.rmtree(config.run.output_dir, ignore_errors=True)
    start = time.perf_counter()
    summary = run_training(config)
    total = time.perf_counter() - start
    print(comparison_table(summary["before"], summary["after"]))
    print(f"training wall clock {summary['wall_clock_seconds']:.0f} s ({summary['optimizer_steps']} steps), "
          f"whole benchmark incl. evaluations {total:.0f} s")
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    out_dir = Path(config.run.output_dir)
    stem = results.with_suffix("")
    for name in ("curves.png", "grid_before.png", "grid_after.png"):
        shutil.copy(out_dir / name, f"{stem}_{name}")
    evals = json.loads((out_dir / "evals.json").read_text())
    summary.update(
        benchmark_seconds_including_evaluation=total,
        evaluations=[{k: e[k] for k in ("step", "overall", "categories", "artifact", "diversity")} for e in evals],
        command="python benchmarks/dgpo_shapes_cpu.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    results.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
