"""Run several recipes under one evaluation protocol and budget; report time and compute to score thresholds.

Every recipe trains from the same base model with the same training seeds (``run.seed`` 0..N-1), test
prompts and evaluation interval, until its step, wall-clock or forward-equivalent budget runs out.
Compute is counted both in seconds of training (evaluation excluded) and in model forward-equivalents
(a backward counts as two forwards), so the ratios carry across machines. Writes, under the output
directory: ``curves.csv`` (one row per evaluation and seed), ``curves.png`` (mean +- standard error
across seeds), ``summary.json`` and ``summary.md``.

The cost of a recipe to a threshold is the mean over its seeds of each seed's cost to its first
*confirmed* evaluation at or above it: one whose next ``confirmations`` evaluations also reach it (default 1),
so that a single lucky evaluation does not count as a crossing (0 takes the first evaluation reaching it). A
recipe's ``confirmed_best`` is likewise the best score held over that many consecutive evaluations. A seed
that never reaches a threshold counts at the cost it spent, so the mean is then a lower bound, and so is its
ratio to the baseline; a baseline seed that never reaches it makes the ratio an upper bound. The ratio's
interval is a bootstrap over seeds (recipe and baseline resampled independently, 2000 draws, 2.5th-97.5th
percentile).

The summary also times every recipe to the baseline's confirmed best, as papers read speed-ups off reward curves (the
cost to reach the score the baseline reached): the lowest of the baseline seeds' confirmed bests, so that every baseline
seed reaches it (``to_baseline_best``).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..errors import UserError  # noqa: E402
from ..evaluators import NONE, get_evaluator, out_of_domain_of, resolve_evaluator, scores_of  # noqa: E402
from ..machine import machine_label  # noqa: E402
from .checkpoint import latest_good_checkpoint  # noqa: E402
from .compare_budget import Budget  # noqa: E402
from .config import ConfigError, config_from_dict, load_config  # noqa: E402
from .run import run_training  # noqa: E402


def parse_recipe(text: str) -> tuple[str, Path]:
    """'NAME=path.yaml' or 'path.yaml' (named after the file)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).stem, text
    if not name or not path:
        raise ValueError(f"recipe {text!r} must be NAME=PATH or PATH")
    return name, Path(path)


def check_evaluates(name: str, recipe: Path, overrides: list[str]) -> str:
    """A comparison is of evaluation curves: refuse a recipe whose runs would not evaluate, before any training.
    Returns the recipe's evaluator."""
    config = load_config(recipe, overrides)
    evaluator, why = resolve_evaluator(config.eval.evaluator, config.model.backend, config.eval.prompts)
    if evaluator == NONE:
        raise UserError(f"recipe {name} ({recipe}) has no evaluation to compare: {why}; set eval.prompts to a held-out prompt file")
    return evaluator


def default_thresholds(evaluators: list[str]) -> list[float]:
    """The thresholds to time when none are given: the recipes' evaluator's own (one evaluator for all of them)."""
    if len(set(evaluators)) > 1:
        raise UserError(f"the recipes evaluate with different evaluators ({', '.join(sorted(set(evaluators)))}): their scores do not compare")
    thresholds = list(get_evaluator(evaluators[0]).default_thresholds)
    if not thresholds:
        raise UserError(f"evaluator {evaluators[0]!r} has no default score thresholds (its rewards have their own units); pass --threshold T")
    return thresholds


# Where and how often a run is written and logged: not part of what it trains.
BOOKKEEPING_FIELDS = ("output_dir", "save_every", "keep_checkpoints", "tensorboard", "wandb_project")


def same_training(saved: dict, config: dict) -> bool:
    """Whether a run's saved config trains as ``config`` does: equal in every field but the run's bookkeeping (where
    it was written, how often it checkpointed, its loggers), so runs moved into a results folder, or made elsewhere,
    are reused or resumed. A field added since the run was saved counts at its default, the behaviour of the code
    that ran it; a saved field that no longer exists makes it another training."""
    try:
        saved = config_from_dict(saved).to_dict()
    except ConfigError:
        return False

    def training_fields(c: dict) -> dict:
        c = json.loads(json.dumps(c))
        for name in BOOKKEEPING_FIELDS:
            c.get("run", {}).pop(name, None)
        return c
    return training_fields(saved) == training_fields(config)


def run_recipe(name: str, recipe: Path, output: Path, budget: Budget, overrides: list[str], reuse: bool, seed: int = 0, log=print) -> list[dict]:
    """Train one recipe with one training seed under the shared protocol; returns its evaluations. With ``reuse`` a
    finished run of the same training is reused, and an unfinished one with a checkpoint is resumed from it."""
    run_dir = output / "runs" / name / f"seed-{seed}"
    protocol = [
        f"run.output_dir={run_dir}",
        f"run.seed={seed}",
        f"run.max_steps={budget.steps}",
        f"run.max_seconds={budget.seconds}",
        f"run.max_forward_equivalents={budget.forwards}",
        f"eval.every={budget.eval_every}",
        f"eval.images_per_category={budget.eval_images_per_category}",
        f"eval.final_images_per_category={budget.final_images}",
        f"run.save_every={budget.save_every}",
    ]
    config = load_config(recipe, [*overrides, *protocol])
    finished = run_dir / "results.json"
    if reuse and finished.exists() and same_training(json.loads(finished.read_text()).get("config", {}), config.to_dict()):
        log(f"{name} seed {seed}: reusing the finished run in {run_dir}")
    else:
        limits = [f"{budget.steps} steps"] + ([f"{budget.seconds:.0f} s"] if budget.seconds else [])
        limits += [f"{budget.forwards:.3g} forwards"] if budget.forwards else []
        started = run_dir / "config.yaml"
        resume = (reuse and started.exists() and latest_good_checkpoint(run_dir / "checkpoints", warn=log) is not None
                  and same_training(yaml.safe_load(started.read_text()), config.to_dict()))
        log(f"{name} seed {seed}: {'resuming' if resume else 'training'} {recipe} (budget {', '.join(limits)})")
        summary = run_training(config, resume=resume, overwrite=not resume, log=log)
        if summary["status"] != 0:
            raise UserError(f"recipe {name} (seed {seed}) stopped early with status {summary['status']}")
    return json.loads((run_dir / "evals.json").read_text())


def curve_rows(name: str, evals: list[dict], seed: int = 0) -> list[dict]:
    """One CSV row per evaluation: cost so far, overall, the evaluator's scores and out-of-domain metrics, at full
    precision (a reward may move in its fourth decimal, and a rounded score could miss or fake a threshold), and
    which model it scored (the policy, or the evaluation EMA and its number of updates)."""
    rows = []
    for e in sorted(evals, key=lambda e: e["step"]):
        evaluated = e.get("evaluated_model", {})
        row = {
            "recipe": name,
            "seed": seed,
            "step": e["step"],
            "training_seconds": e.get("training_seconds", 0.0),
            "forward_equivalents": int(e.get("forward_equivalents", 0)),
            "overall": e["overall"],
        }
        row.update(scores_of(e))
        row.update(out_of_domain_of(e))
        row.update(velocity_drift=e.get("velocity_drift", float("nan")), evaluated_model=evaluated.get("weights", ""),
                   eval_ema_updates=evaluated.get("ema_updates", ""))
        rows.append(row)
    return rows


def held_scores(rows: list[dict], confirmations: int) -> list[float]:
    """Per evaluation, the lowest overall score of it and the next ``confirmations`` evaluations: the score it
    holds. The last ``confirmations`` evaluations have too few successors to be confirmed and are left out."""
    scores = [row["overall"] for row in rows]
    return [min(scores[i:i + confirmations + 1]) for i in range(len(scores) - confirmations)]


def time_to_threshold(rows: list[dict], threshold: float, confirmations: int = 1) -> dict | None:
    """The first evaluation whose overall score reaches ``threshold`` and is confirmed by the next
    ``confirmations`` evaluations reaching it too (None if there is none)."""
    for row, held in zip(rows, held_scores(rows, confirmations)):
        if held >= threshold:
            return {k: row[k] for k in ("step", "training_seconds", "forward_equivalents", "overall")}
    return None


def seed_cost(rows: list[dict], threshold: float, confirmations: int = 1) -> dict:
    """One seed's cost to ``threshold``: at its first confirmed evaluation reaching it, or (not reached) all it spent."""
    reached = time_to_threshold(rows, threshold, confirmations)
    at = reached or rows[-1]
    return {"reached": reached is not None, "step": at["step"], "training_seconds": at["training_seconds"], "forward_equivalents": at["forward_equivalents"]}


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    mean = float(np.mean(values))
    return mean, (float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0)


def bootstrap_ratio(costs: list[float], baseline: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """2.5th and 97.5th percentile of mean(costs*) / mean(baseline*) over seeds resampled with replacement."""
    rng = np.random.default_rng(seed)
    a = rng.choice(np.asarray(costs, dtype=float), size=(draws, len(costs))).mean(axis=1)
    b = rng.choice(np.asarray(baseline, dtype=float), size=(draws, len(baseline))).mean(axis=1)
    ratios = a / np.maximum(b, 1e-12)
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def threshold_entry(costs: list[dict], baseline_costs: list[dict]) -> dict:
    """A recipe's cost to one threshold over its seeds, and its ratio to the baseline's with a bootstrap interval."""
    entry = {
        "seeds": len(costs),
        "reached_seeds": sum(c["reached"] for c in costs),
        "step": float(np.mean([c["step"] for c in costs])),
        "training_seconds": float(np.mean([c["training_seconds"] for c in costs])),
        "forward_equivalents": float(np.mean([c["forward_equivalents"] for c in costs])),
        "per_seed": costs,
    }
    recipe_reached, baseline_reached = entry["reached_seeds"] == len(costs), all(c["reached"] for c in baseline_costs)
    # A recipe short of the threshold spent at least its cost: lower bound; a baseline short of it, an upper bound.
    bound = "exact" if recipe_reached and baseline_reached else "lower" if baseline_reached else "upper" if recipe_reached else "none"
    ratio = {"bound": bound}
    for unit in ("training_seconds", "forward_equivalents"):
        ours, theirs = [c[unit] for c in costs], [c[unit] for c in baseline_costs]
        if bound == "none" or np.mean(theirs) <= 0:
            continue
        key = "seconds" if unit == "training_seconds" else "forwards"
        ratio[key] = float(np.mean(ours) / np.mean(theirs))
        ratio[f"{key}_interval"] = list(bootstrap_ratio(ours, theirs))
    entry["ratio"] = ratio
    return entry


def mean_curve(seed_rows: dict[int, list[dict]]) -> list[dict]:
    """Per evaluation step: mean +- standard error of the overall score over the seeds that evaluated it, and their mean cost."""
    steps = sorted({row["step"] for rows in seed_rows.values() for row in rows})
    curve = []
    for step in steps:
        at = [row for rows in seed_rows.values() for row in rows if row["step"] == step]
        mean, se = mean_and_se([row["overall"] for row in at])
        curve.append({
            "step": step, "seeds": len(at), "overall_mean": mean, "overall_se": se,
            "training_seconds": float(np.mean([row["training_seconds"] for row in at])),
            "forward_equivalents": float(np.mean([row["forward_equivalents"] for row in at])),
        })
    return curve


def summarize(curves: dict[str, dict[int, list[dict]]], thresholds: list[float], baseline: str, confirmations: int = 1) -> dict:
    """Per recipe (``curves``: recipe -> seed -> evaluation rows): the mean curve, start/best/confirmed best/final score
    and the cost to each threshold with its ratio to ``baseline`` (see the module docstring for confirmation, bounds
    and intervals)."""
    recipes = {}
    costs = {name: {t: [seed_cost(rows, t, confirmations) for rows in seed_rows.values()] for t in thresholds}
             for name, seed_rows in curves.items()}
    seed_bests = [max(held_scores(rows, confirmations), default=None) for rows in curves[baseline].values()]
    baseline_best = None if None in seed_bests else min(seed_bests)
    if baseline_best is not None:
        best_costs = {name: [seed_cost(rows, baseline_best, confirmations) for rows in seed_rows.values()] for name, seed_rows in curves.items()}
    for name, seed_rows in curves.items():
        curve = mean_curve(seed_rows)
        finals = [rows[-1] for rows in seed_rows.values()]
        recipes[name] = {
            "seeds": sorted(seed_rows),
            "start": curve[0]["overall_mean"],
            "best": max(point["overall_mean"] for point in curve),
            "confirmed_best": max(held_scores([{"overall": p["overall_mean"]} for p in curve], confirmations), default=None),
            "final": float(np.mean([row["overall"] for row in finals])),
            "final_se": mean_and_se([row["overall"] for row in finals])[1],
            "final_step": max(row["step"] for row in finals),
            "training_seconds": float(np.mean([row["training_seconds"] for row in finals])),
            "forward_equivalents": float(np.mean([row["forward_equivalents"] for row in finals])),
            "curve": curve,
            "thresholds": {str(t): threshold_entry(costs[name][t], costs[baseline][t]) for t in thresholds},
        }
        if baseline_best is not None:
            recipes[name]["to_baseline_best"] = threshold_entry(best_costs[name], best_costs[baseline])
    return {"baseline": baseline, "thresholds": thresholds, "confirmations": confirmations, "baseline_best": baseline_best, "recipes": recipes}


def _ratio_cell(entry: dict) -> str:
    ratio = entry["ratio"]
    sign = {"exact": "", "lower": ">= ", "upper": "<= ", "none": ""}[ratio["bound"]]
    return " / ".join(f"{sign}{ratio[unit]:.2f}x [{ratio[unit + '_interval'][0]:.2f}, {ratio[unit + '_interval'][1]:.2f}]"
                      if unit in ratio else "-" for unit in ("forwards", "seconds"))


def _cost_cell(entry: dict) -> str:
    prefix = "" if entry["reached_seeds"] == entry["seeds"] else ">= "
    return (f"{prefix}{entry['forward_equivalents']:.3g} / {prefix}{entry['training_seconds']:.0f} s "
            f"({entry['reached_seeds']}/{entry['seeds']}) / {_ratio_cell(entry)}")


NOT_RECORDED = "not recorded"


def run_machines(run_dir: Path) -> list[str]:
    """The machines that trained a finished run (``machines`` in its results.json), NOT_RECORDED for the steps of a
    run made (or begun, before a resume) before they were recorded."""
    stretches = json.loads((run_dir / "results.json").read_text()).get("machines") or []
    unrecorded = not stretches or stretches[0]["from_step"] > 0
    return [NOT_RECORDED] * unrecorded + [machine_label(s["machine"]) for s in stretches]


def distinct_machines(machines: dict[str, list[str]]) -> set[str]:
    """The machines that trained any of the recipes' runs (``machines``: recipe -> its runs' machine labels)."""
    return {label for labels in machines.values() for label in labels}


def machines_note(machines: dict[str, list[str]]) -> str | None:
    """A line saying which machines the seconds come from, when they are not all one machine's."""
    if len(distinct_machines(machines)) <= 1:
        return None
    return ("Training seconds measured on different machines, so the ratios in seconds compare the machines as well as the "
            "recipes (forwards do not depend on the machine): " + "; ".join(f"{name}: {', '.join(labels)}" for name, labels in machines.items()) + ".")


def seconds_axis_label(machines: dict[str, list[str]]) -> str:
    """The seconds axis of curves.png: the machine that trained every run, or a pointer to the summary's note on them."""
    labels = distinct_machines(machines)
    return f"training seconds ({labels.pop()})" if len(labels) == 1 else "training seconds (several machines: summary.md)"


def markdown_summary(summary: dict) -> str:
    """One row per recipe; each cost cell: forwards / seconds (seeds reaching) / ratio to the baseline in forwards /
    in seconds with its 95% interval, ">=" where a seed fell short (a bound); under it, which machines trained the
    recipes when they differ."""
    thresholds, baseline, best = summary["thresholds"], summary["baseline"], summary.get("baseline_best")
    columns = [f"to {t}" for t in thresholds] + ([f"to {baseline}'s confirmed best, {best:.4f}"] if best is not None else [])
    header = ("| recipe | seeds | start | best | confirmed best | final +- se (step) | "
              + " | ".join(f"{c}: forwards / s (seeds reaching) / x{baseline} in forwards / s [95%]" for c in columns) + " |")
    lines = [header, "|" + "---|" * (6 + len(columns))]
    for name, entry in summary["recipes"].items():
        cells = [_cost_cell(entry["thresholds"][str(t)]) for t in thresholds]
        if best is not None:
            cells.append(_cost_cell(entry["to_baseline_best"]))
        confirmed = "-" if entry["confirmed_best"] is None else f"{entry['confirmed_best']:.4f}"
        lines.append(f"| {name} | {len(entry['seeds'])} | {entry['start']:.4f} | {entry['best']:.4f} | {confirmed} | "
                     f"{entry['final']:.4f} +- {entry['final_se']:.4f} ({entry['final_step']}) | " + " | ".join(cells) + " |")
    note = machines_note(summary.get("machines", {}))
    return "\n".join(lines + ([f"\n{note}"] if note else []))


def plot_comparison(summary: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, entry in summary["recipes"].items():
        curve = entry["curve"]
        mean = np.array([p["overall_mean"] for p in curve])
        se = np.array([p["overall_se"] for p in curve])
        for ax, key in zip(axes, ("training_seconds", "forward_equivalents", "step")):
            x = [p[key] for p in curve]
            (line,) = ax.plot(x, mean, marker="o", label=f"{name} ({len(entry['seeds'])} seeds)")
            ax.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.2)
    for ax, xlabel in zip(axes, (seconds_axis_label(summary.get("machines", {})), "model forward-equivalents", "optimizer steps")):
        ax.set(xlabel=xlabel, ylabel="evaluation overall (mean +- se)", title=f"score vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_comparison(
    recipes: list[tuple[str, Path]],
    output: Path,
    budget: Budget,
    thresholds: list[float] | None,
    overrides: list[str] = (),
    baseline: str | None = None,
    reuse: bool = False,
    log=print,
    confirmations: int = 1,
    recipe_seeds: dict[str, int] | None = None,
) -> dict:
    """Train (or, with ``reuse``, reuse or resume) every recipe's seeds and write the curves and summary. Each recipe
    trains ``budget.seeds`` seeds, or the count ``recipe_seeds`` gives it, so a reference recipe measured with more
    seeds (the baseline of one-seed ablations) keeps all of them in the summary."""
    names = [name for name, _ in recipes]
    if len(set(names)) != len(names):
        raise ValueError(f"recipe names must be unique, got {names}")
    baseline = baseline or names[0]
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of the recipes {names}")
    if budget.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {budget.seeds}")
    recipe_seeds = dict(recipe_seeds or {})
    for name, count in recipe_seeds.items():
        if name not in names:
            raise ValueError(f"--recipe-seeds names {name!r}, which is not one of the recipes {names}")
        if count < 1:
            raise ValueError(f"--recipe-seeds {name}={count}: a recipe needs at least one seed")
    seeds = {name: range(recipe_seeds.get(name, budget.seeds)) for name in names}
    if confirmations < 0:
        raise ValueError(f"--confirm must be >= 0, got {confirmations}")
    evaluators = [check_evaluates(name, path, list(overrides)) for name, path in recipes]
    thresholds = thresholds or default_thresholds(evaluators)
    output.mkdir(parents=True, exist_ok=True)
    curves = {
        name: {seed: curve_rows(name, run_recipe(name, path, output, budget, list(overrides), reuse, seed, log), seed) for seed in seeds[name]}
        for name, path in recipes
    }
    with open(output / "curves.csv", "w", newline="") as handle:
        all_rows = [row for seed_rows in curves.values() for rows in seed_rows.values() for row in rows]
        writer = csv.DictWriter(handle, fieldnames=list(all_rows[0]))
        writer.writeheader()
        writer.writerows(all_rows)
    summary = summarize(curves, thresholds, baseline, confirmations)
    summary["machines"] = {name: list(dict.fromkeys(label for seed in seeds[name]
                                                    for label in run_machines(output / "runs" / name / f"seed-{seed}")))
                           for name, _ in recipes}
    plot_comparison(summary, output / "curves.png")
    summary["budget"] = budget.__dict__
    summary["recipe_seeds"] = recipe_seeds
    summary["overrides"] = list(overrides)
    summary["recipes_run"] = {name: str(path) for name, path in recipes}
    (output / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (output / "summary.md").write_text(markdown_summary(summary) + "\n")
    return summary
