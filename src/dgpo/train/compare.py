"""Run several recipes under one evaluation protocol and budget; report time and compute to score thresholds.

Every recipe trains from the same base model with the same seed, test prompts and evaluation
interval, until its step, wall-clock or forward-equivalent budget runs out. Compute is counted both in seconds of
training (evaluation excluded) and in model forward-equivalents (a backward counts as two
forwards), so the ratios carry across machines. Writes, under the output directory:
``curves.csv`` (one row per evaluation), ``curves.png``, ``summary.json`` and ``summary.md``.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..errors import UserError  # noqa: E402
from ..shapes.prompts import CATEGORIES  # noqa: E402
from .config import load_config  # noqa: E402
from .run import run_training  # noqa: E402


@dataclass(frozen=True)
class Budget:
    steps: int
    seconds: float = 0.0
    forwards: float = 0.0
    eval_every: int = 10
    eval_images_per_category: int = 24


def parse_recipe(text: str) -> tuple[str, Path]:
    """'NAME=path.yaml' or 'path.yaml' (named after the file)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).stem, text
    if not name or not path:
        raise ValueError(f"recipe {text!r} must be NAME=PATH or PATH")
    return name, Path(path)


def run_recipe(name: str, recipe: Path, output: Path, budget: Budget, overrides: list[str], reuse: bool, log=print) -> list[dict]:
    """Train one recipe under the shared protocol (or reuse a finished run); returns its evaluations."""
    run_dir = output / "runs" / name
    protocol = [
        f"run.output_dir={run_dir}",
        f"run.max_steps={budget.steps}",
        f"run.max_seconds={budget.seconds}",
        f"run.max_forward_equivalents={budget.forwards}",
        f"eval.every={budget.eval_every}",
        f"eval.images_per_category={budget.eval_images_per_category}",
        f"eval.final_images_per_category={budget.eval_images_per_category}",
        "run.save_every=0",
    ]
    config = load_config(recipe, [*overrides, *protocol])
    finished = run_dir / "results.json"
    as_saved = json.loads(json.dumps(config.to_dict()))
    if reuse and finished.exists() and json.loads(finished.read_text()).get("config") == as_saved:
        log(f"{name}: reusing the finished run in {run_dir}")
    else:
        limits = [f"{budget.steps} steps"] + ([f"{budget.seconds:.0f} s"] if budget.seconds else [])
        limits += [f"{budget.forwards:.3g} forwards"] if budget.forwards else []
        log(f"{name}: training {recipe} (budget {', '.join(limits)})")
        summary = run_training(config, overwrite=True, log=log)
        if summary["status"] != 0:
            raise UserError(f"recipe {name} stopped early with status {summary['status']}")
    return json.loads((run_dir / "evals.json").read_text())


def curve_rows(name: str, evals: list[dict]) -> list[dict]:
    rows = []
    for e in sorted(evals, key=lambda e: e["step"]):
        row = {
            "recipe": name,
            "step": e["step"],
            "training_seconds": round(e.get("training_seconds", 0.0), 2),
            "forward_equivalents": int(e.get("forward_equivalents", 0)),
            "overall": round(e["overall"], 4),
        }
        row.update({c: round(e["categories"][c], 4) for c in CATEGORIES})
        row.update(artifact=round(e["artifact"], 5), diversity=round(e["diversity"], 4), velocity_drift=round(e.get("velocity_drift", float("nan")), 4))
        rows.append(row)
    return rows


def time_to_threshold(rows: list[dict], threshold: float) -> dict | None:
    """The first evaluation whose overall score reaches ``threshold`` (None if none does)."""
    for row in rows:
        if row["overall"] >= threshold:
            return {k: row[k] for k in ("step", "training_seconds", "forward_equivalents", "overall")}
    return None


def summarize(curves: dict[str, list[dict]], thresholds: list[float], baseline: str) -> dict:
    """Per recipe: start/best/final score and the cost to each threshold, with ratios to ``baseline``."""
    recipes = {}
    for name, rows in curves.items():
        recipes[name] = {
            "start": rows[0]["overall"],
            "best": max(r["overall"] for r in rows),
            "final": rows[-1]["overall"],
            "final_step": rows[-1]["step"],
            "training_seconds": rows[-1]["training_seconds"],
            "forward_equivalents": rows[-1]["forward_equivalents"],
            "thresholds": {str(t): time_to_threshold(rows, t) for t in thresholds},
        }
    for entry in recipes.values():
        for t, reached in entry["thresholds"].items():
            base = recipes[baseline]["thresholds"][t]
            if reached is not None and base is not None and base["training_seconds"] > 0:
                reached["seconds_ratio_to_baseline"] = round(reached["training_seconds"] / base["training_seconds"], 3)
                reached["forwards_ratio_to_baseline"] = round(reached["forward_equivalents"] / max(base["forward_equivalents"], 1), 3)
    return {"baseline": baseline, "thresholds": thresholds, "recipes": recipes}


def markdown_summary(summary: dict) -> str:
    thresholds = summary["thresholds"]
    header = "| recipe | start | best | final (step) | " + " | ".join(f"to {t}: s / forwards / x{summary['baseline']}" for t in thresholds) + " |"
    lines = [header, "|" + "---|" * (4 + len(thresholds))]
    for name, entry in summary["recipes"].items():
        cells = []
        for t in thresholds:
            reached = entry["thresholds"][str(t)]
            if reached is None:
                cells.append("not reached")
            else:
                ratio = reached.get("seconds_ratio_to_baseline")
                cells.append(f"{reached['training_seconds']:.0f} s / {reached['forward_equivalents']:.3g} / " + (f"{ratio:.2f}x" if ratio is not None else "-"))
        lines.append(f"| {name} | {entry['start']:.3f} | {entry['best']:.3f} | {entry['final']:.3f} ({entry['final_step']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(curves: dict[str, list[dict]], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, rows in curves.items():
        overall = [r["overall"] for r in rows]
        axes[0].plot([r["training_seconds"] for r in rows], overall, marker="o", label=name)
        axes[1].plot([r["forward_equivalents"] for r in rows], overall, marker="o", label=name)
        axes[2].plot([r["step"] for r in rows], overall, marker="o", label=name)
    for ax, xlabel in zip(axes, ("training seconds (this CPU)", "model forward-equivalents", "optimizer steps")):
        ax.set(xlabel=xlabel, ylabel="ShapesEval overall", title=f"score vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_comparison(
    recipes: list[tuple[str, Path]],
    output: Path,
    budget: Budget,
    thresholds: list[float],
    overrides: list[str] = (),
    baseline: str | None = None,
    reuse: bool = False,
    log=print,
) -> dict:
    names = [name for name, _ in recipes]
    if len(set(names)) != len(names):
        raise ValueError(f"recipe names must be unique, got {names}")
    baseline = baseline or names[0]
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of the recipes {names}")
    output.mkdir(parents=True, exist_ok=True)
    curves = {name: curve_rows(name, run_recipe(name, path, output, budget, list(overrides), reuse, log)) for name, path in recipes}
    with open(output / "curves.csv", "w", newline="") as handle:
        all_rows = [row for rows in curves.values() for row in rows]
        writer = csv.DictWriter(handle, fieldnames=list(all_rows[0]))
        writer.writeheader()
        writer.writerows(all_rows)
    plot_comparison(curves, output / "curves.png")
    summary = summarize(curves, thresholds, baseline)
    summary["budget"] = budget.__dict__
    summary["overrides"] = list(overrides)
    summary["recipes_run"] = {name: str(path) for name, path in recipes}
    (output / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (output / "summary.md").write_text(markdown_summary(summary) + "\n")
    return summary
