"""What a run's training saw, window by window: the mean training reward and the share of groups that carried no
preference (all images of the prompt scored alike), overall and per prompt category, and the mean pre-clip gradient
norm, over consecutive windows of steps of each run's metrics.jsonl. Prints a markdown table per run and, with
--output, writes it as JSON and markdown (with this command).

    python benchmarks/training_readout.py results/dgpo_shapes_cpu_runs/seed-0 results/dgpo_shapes_cpu_runs/seed-1 \\
        --window 100 --output results/dgpo_shapes_cpu_training.json

Categories are whatever the reward logs as reward_by/<category> and prompts/zero_variance/<category>, so the readout
serves any prompt file with categories, not only ShapesEval.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import date
from pathlib import Path

REWARD_PREFIX = "reward_by/"
NO_PREFERENCE_PREFIX = "prompts/zero_variance/"


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"training_readout: {run} has no metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if key in row and row[key] == row[key]]
    return sum(values) / len(values) if values else None


def windows(metrics: list[dict], window: int) -> list[dict]:
    """One entry per window of `window` steps (the last may be shorter): steps first-last, and the means over it."""
    if window < 1:
        raise SystemExit(f"training_readout: --window must be >= 1, got {window}")
    categories = sorted({key[len(REWARD_PREFIX):] for row in metrics for key in row if key.startswith(REWARD_PREFIX)})
    last_step = max(row["step"] for row in metrics)
    out = []
    for start in range(0, last_step, window):
        rows = [row for row in metrics if start < row["step"] <= start + window]
        if not rows:
            continue
        out.append({
            "steps": [rows[0]["step"], rows[-1]["step"]],
            "reward": mean(rows, "reward_mean"),
            "no_preference_groups": mean(rows, "zero_variance_groups"),
            "grad_norm": mean(rows, "grad_norm"),
            "categories": {c: {"reward": mean(rows, REWARD_PREFIX + c), "no_preference_groups": mean(rows, NO_PREFERENCE_PREFIX + c)}
                           for c in categories},
        })
    return out


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(name: str, rows: list[dict]) -> str:
    categories = list(rows[0]["categories"]) if rows else []
    lines = [f"**{name}**: training reward / share of groups with no preference",
             "", "| steps | all | " + " | ".join(categories) + " | grad norm |", "|" + "---|" * (len(categories) + 3)]
    for row in rows:
        cells = [f"{fmt(row['categories'][c]['reward'])} / {fmt(row['categories'][c]['no_preference_groups'], 2)}" for c in categories]
        lines.append(f"| {row['steps'][0]}-{row['steps'][1]} | {fmt(row['reward'])} / {fmt(row['no_preference_groups'], 2)} | "
                     + " | ".join(cells) + f" | {fmt(row['grad_norm'], 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="run folders, each with a metrics.jsonl")
    p.add_argument("--window", type=int, default=100, help="steps per window (default: 100)")
    p.add_argument("--output", type=Path, help="write the readout to OUTPUT as JSON, and beside it as markdown (suffix .md)")
    args = p.parse_args(argv)
    readout = {str(run): windows(read_metrics(run), args.window) for run in args.runs}
    text = "\n\n".join(markdown(name, rows) for name, rows in readout.items())
    print(text)
    if args.output:
        command = "python benchmarks/training_readout.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        today = date.today().isoformat()
        args.output.with_suffix(".md").write_text(f"{text}\n\nCommand: `{command}` ({today})\n")
        args.output.with_suffix(".json").write_text(json.dumps({"command": command, "date": today, "window": args.window, "runs": readout}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
