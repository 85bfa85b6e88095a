"""The readout of a set of screens run by `dgpo compare` (benchmarks/recipe_screens.sh, benchmarks/comparison_screens.sh):
per screen, its evaluations, the final score against the baseline's with the standard error of the difference, the
training reward per prompt category and the share of groups that carried no preference over the last steps, and the
compute per step. Prints a markdown table and writes readout.md and readout.json (with this command) beside the runs.

    python benchmarks/screen_readout.py results/recipe_screens --baseline dgpo --last 50

The standard error of an evaluation's overall score (the mean of its category pass rates) is taken as
sqrt(sum_c p_c (1 - p_c) / n) / C with n the evaluation's images per category: the categories' own counts differ a
little (ShapesEval's test split has more colour-attribution prompts), so it is an approximation, slightly high.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from datetime import date
from pathlib import Path

CATEGORIES = ("counting", "position", "color_attr", "two_object")


def standard_error(evaluation: dict) -> float:
    rates = list(evaluation["categories"].values())
    n = evaluation["images_per_category"]
    return math.sqrt(sum(p * (1 - p) / n for p in rates)) / len(rates)


def read_run(folder: Path, last: int) -> dict:
    evaluations = json.loads((folder / "evals.json").read_text())
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tail = metrics[-last:]

    def mean(key: str) -> float | None:
        values = [m[key] for m in tail if key in m and m[key] == m[key]]
        return sum(values) / len(values) if values else None

    final = evaluations[-1]
    steps = metrics[-1]["step"]
    return {
        "evaluations": [(e["step"], e["overall"]) for e in evaluations],
        "final": {"step": final["step"], "overall": final["overall"], "se": standard_error(final), "num_images": final["num_images"],
                  "categories": final["categories"], "artifact": final.get("artifact"), "diversity": final.get("diversity")},
        "training_reward_last": {c: mean(f"reward_by/{c}") for c in CATEGORIES},
        "zero_variance_groups_last": mean("zero_variance_groups"),
        "forwards_per_step": metrics[-1]["forward_equivalents"] / steps,
        "seconds_per_step": metrics[-1]["elapsed_seconds"] / steps,
    }


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(runs: dict[str, dict], baseline: str, last: int, pairs: dict[str, str]) -> str:
    """One row per screen, compared with the baseline or, for a screen in pairs, with its own baseline (a replicate
    started elsewhere); a screen that is a baseline shows no comparison."""
    baselines = {baseline, *pairs.values()}
    header = (f"| screen | evaluations (step: score) | final (images) | vs {baseline} (+- se) | training reward, last {last} steps: "
              f"{', '.join(CATEGORIES)} | no-preference groups | forwards / step | artifact, diversity |")
    rows = [header, "|" + "---|" * 8]
    for name, run in runs.items():
        f = run["final"]
        against = pairs.get(name, baseline)
        base = runs[against]["final"]
        diff = f["overall"] - base["overall"]
        se = math.hypot(f["se"], base["se"])
        versus = "-" if name in baselines else f"{diff:+.3f} +- {se:.3f}" + ("" if against == baseline else f" (vs {against})")
        evaluations = ", ".join(f"{s}: {v:.3f}" for s, v in run["evaluations"])
        rewards = ", ".join(fmt(run["training_reward_last"][c], 2) for c in CATEGORIES)
        rows.append(f"| {name} | {evaluations} | {f['overall']:.3f} ({f['num_images']}) | {versus} | {rewards} | "
                    f"{fmt(run['zero_variance_groups_last'], 2)} | {run['forwards_per_step']:,.0f} | {fmt(f['artifact'], 4)}, {fmt(f['diversity'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", type=Path, help="a `dgpo compare --output` folder (its runs/ holds the screens)")
    p.add_argument("--baseline", required=True, help="the screen the others are compared with")
    p.add_argument("--last", type=int, default=50, help="steps the training readout averages over (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="training seed of the runs read (default: 0)")
    p.add_argument("--pair", action="append", default=[], metavar="SCREEN=BASELINE",
                   help="compare SCREEN with BASELINE instead of --baseline (a replicate started from another model; repeatable)")
    args = p.parse_args(argv)
    malformed = [pair for pair in args.pair if "=" not in pair]
    if malformed:
        raise SystemExit(f"screen_readout: --pair takes SCREEN=BASELINE, got {malformed}")
    pairs = dict(pair.split("=", 1) for pair in args.pair)
    runs = {}
    for folder in sorted((args.output / "runs").iterdir()):
        run = folder / f"seed-{args.seed}"
        if (run / "results.json").exists():
            runs[folder.name] = read_run(run, args.last)
    for name in (args.baseline, *pairs, *pairs.values()):
        if name not in runs:
            raise SystemExit(f"screen_readout: no finished run of {name!r} in {args.output / 'runs'}")
    runs = {args.baseline: runs.pop(args.baseline), **runs}
    table = markdown(runs, args.baseline, args.last, pairs)
    print(table)
    command = "python benchmarks/screen_readout.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    (args.output / "readout.md").write_text(f"{table}\n\nCommand: `{command}` ({date.today().isoformat()})\n")
    (args.output / "readout.json").write_text(json.dumps({"command": command, "date": date.today().isoformat(), "baseline": args.baseline,
                                                          "pairs": pairs, "last_steps": args.last, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
