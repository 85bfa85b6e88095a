"""A whole run: evaluate the base model, train, evaluate again, write the report."""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..drift import velocity_drift  # noqa: E402
from ..evaluators import (  # noqa: E402
    NONE,
    EvalResult,
    Evaluator,
    evaluator_of,
    get_evaluator,
    metric_means,
    out_of_domain_of,
    resolve_evaluator,
    scores_of,
)
from ..image_grid import save_grid  # noqa: E402
from .algorithms import get_algorithm  # noqa: E402
from .config import Config  # noqa: E402
from .ema import eval_ema_updates  # noqa: E402
from .loop import Trainer  # noqa: E402

DRIFT_IMAGES = 64


def build_evaluator(trainer: Trainer, log=print) -> Evaluator | None:
    """The run's evaluator (``eval.evaluator``, or the default for ``model.backend``); None, with a log line saying why, when off."""
    config = trainer.config
    name, why = resolve_evaluator(config.eval.evaluator, config.model.backend, config.eval.prompts)
    if name == NONE:
        log(f"evaluation is off: {why} (set eval.prompts to a held-out prompt file, or eval.evaluator to a registered evaluator, to evaluate)")
        return None
    return get_evaluator(name).from_config(config, trainer.policy.model, rewards=trainer.scorer.rewards)


def evaluated_model(config: Config, completed_steps: int) -> dict:
    """Which weights an evaluation scores (an evals.json record's ``evaluated_model``): the policy, or with
    eval.ema_decay > 0 its evaluation EMA, with how many updates the EMA has had (``eval_ema_updates``)."""
    e = config.eval
    if e.ema_decay <= 0:
        return {"weights": "policy"}
    return {"weights": "eval_ema", "ema_decay": e.ema_decay, "ema_every": e.ema_every, "ema_updates": eval_ema_updates(completed_steps, e.ema_every)}


def describe_evaluated(model: dict | None) -> str:
    """An ``evaluated_model`` record in words."""
    if model is None:
        return "not recorded"
    if model["weights"] == "policy":
        return "the policy"
    return f"the evaluation EMA (eval.ema_decay {model['ema_decay']:g}, {model['ema_updates']} updates)"


def unmoved_ema_warning(evaluation: dict) -> str | None:
    """A warning line for an evaluation after step 0 of an evaluation EMA that has had no update: it still holds the
    base model's weights, so the evaluation scores the untrained model (None when that is not the case)."""
    model = evaluation.get("evaluated_model")
    if evaluation["step"] == 0 or model is None or model["weights"] != "eval_ema" or model["ema_updates"]:
        return None
    return (f"warning: the evaluation at step {evaluation['step']} scored the evaluation EMA, which has had no update yet "
            f"(eval.ema_every={model['ema_every']}: its first update is after step {max(1, model['ema_every'] - 1)}), so it scored "
            "the base model; lower eval.ema_every, or set eval.ema_decay=0 to evaluate the policy")


def evaluate(trainer: Trainer, evaluator: Evaluator, images_per_category: int, grid_path: Path | None = None) -> dict:
    """The evaluator's scores for the evaluation EMA of the policy (or the policy itself: ``evaluated_model`` says
    which), plus velocity drift and the evaluation-only reward metrics (``eval.metrics``) on the same images."""
    policy = trainer.policy
    swap = policy.eval_ema.swapped_in() if policy.eval_ema is not None else contextlib.nullcontext()
    with swap:
        result: EvalResult = evaluator.evaluate(policy.model, trainer.config.eval.sampler_settings, images_per_category, seed=0)
        images, texts = result.images, result.prompts
        spread = torch.linspace(0, len(texts) - 1, min(DRIFT_IMAGES, len(texts))).round().long()
        drift = evaluation_drift(trainer, images[spread], [texts[i] for i in spread.tolist()])
    if grid_path is not None and result.grid is not None:
        save_grid(result.grid.images, result.grid.labels, grid_path, passed=result.grid.passed)
    out = {"evaluator": evaluator.name, **result.to_dict()}
    out["evaluated_model"] = evaluated_model(trainer.config, trainer.counters.step)
    out["velocity_drift"] = drift
    if trainer.eval_rewards:
        out["metrics"] = metric_means(trainer.eval_rewards, result)
    return out


def evaluation_drift(trainer: Trainer, images: torch.Tensor, prompts: list[str]) -> float:
    """``velocity_drift`` of the evaluated policy against the reference model, on evaluation images and their prompts."""
    policy = trainer.policy
    latents = policy.model.encode_images(images.to(policy.model.device))
    embeddings = policy.model.encode_prompts(prompts)
    keys = [("drift", i) for i in range(len(prompts))]
    return velocity_drift(policy.velocity, policy.reference_velocity, latents, embeddings, keys)


def guard_metric_value(evaluation: dict, name: str) -> float:
    """An ``eval.metrics`` reward's mean, or an out-of-domain metric of the evaluator (a top-level key)."""
    metrics = evaluation.get("metrics", {})
    return metrics[name] if name in metrics else evaluation[name]


def distinct_digits(a: float, b: float, least: int = 4) -> tuple[str, str]:
    """``a`` and ``b`` with the fewest significant digits, at least ``least``, that tell them apart (17 tell any
    two doubles apart), so that a printed change never reads as no change."""
    for digits in range(least, 18):
        shown = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if shown[0] != shown[1]:
            break
    return shown


def guard_tripped(before: dict, now: dict, name: str, max_drop: float, lower_is_better: frozenset[str]) -> bool:
    """True when metric ``name`` is worse than at step 0 by more than ``max_drop`` of its step-0 value (``lower_is_better``:
    the evaluator's metrics where lower is better; an ``eval.metrics`` reward is always higher-is-better)."""
    start, current = guard_metric_value(before, name), guard_metric_value(now, name)
    lower = name in lower_is_better and name not in now.get("metrics", {})
    worsening = (current - start) if lower else (start - current)
    return worsening > max_drop * abs(start)


def apply_guard(trainer: Trainer, before: dict, now: dict, log, lower_is_better: frozenset[str] | None = None) -> None:
    """Stop the run or raise its KL weight (``trainer.state``, a ``RunState``) when the guard metric got worse.
    ``lower_is_better``: the evaluator's metrics where lower is better (default: that of the evaluator that wrote ``now``,
    none when it is not registered)."""
    e = trainer.config.eval
    if lower_is_better is None:
        cls = evaluator_of(now)
        lower_is_better = cls.lower_is_better if cls is not None else frozenset()
    if not e.guard_metric or not guard_tripped(before, now, e.guard_metric, e.guard_max_drop, lower_is_better):
        return
    start, value = distinct_digits(guard_metric_value(before, e.guard_metric), guard_metric_value(now, e.guard_metric))
    message = (f"guard: {e.guard_metric} went from {start} at step 0 to {value} at step {trainer.counters.step} "
               f"(eval.guard_max_drop {e.guard_max_drop:g})")
    if e.guard_action == "stop" and trainer.finished():
        message += "; the run has ended already"  # the final evaluation: there is nothing left to stop
    elif e.guard_action == "stop":
        trainer.state.guard_stopped = True
        message += "; stopping the run"
    else:
        message += f"; loss.kl_beta raised to {trainer.state.raise_kl():g}"
    log(message)
    now["guard"] = {"metric": e.guard_metric, "action": e.guard_action, "kl_beta": trainer.state.kl_beta, "message": message}


def plot_curves(history: list[dict], evals: list[dict], path: Path, algorithm: str = "dgpo") -> None:
    """Training reward, the algorithm's loss curves (as it registered them) and, when the run evaluated, the evaluator's scores."""
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(13 if evals else 9, 3.5))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h["reward_mean"] for h in history])
    axes[0].set(title="training reward (mean over rollouts)", xlabel="step")
    for key, label in get_algorithm(algorithm).curves:
        axes[1].plot(steps, [h.get(key, float("nan")) for h in history], label=label)
    axes[1].set(title=f"{algorithm} loss", xlabel="step")
    axes[1].legend()
    if evals:
        axes[2].plot([e["step"] for e in evals], [e["overall"] for e in evals], marker="o", label="overall")
        for c in scores_of(evals[0]):
            axes[2].plot([e["step"] for e in evals], [scores_of(e).get(c, float("nan")) for e in evals], alpha=0.5, label=c)
        cls = evaluator_of(evals[0])
        axes[2].set(title=f"{cls.title if cls else 'evaluation'} score", xlabel="step")
        if cls is None or cls.score_range is not None:
            axes[2].set_ylim(*(cls.score_range if cls else (0, 1)))
        axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def comparison_table(before: dict, after: dict) -> str:
    """Markdown table of two evaluations (evals.json entries): scores, overall, out-of-domain metrics."""
    cls = evaluator_of(after)
    label = cls.score_label if cls is not None else "set"
    labels = cls.out_of_domain if cls is not None else {}
    rows = [f"| {label} | before | after |", "|---|---|---|"]
    after_scores = scores_of(after)
    for c, value in scores_of(before).items():
        rows.append(f"| {c} | {value:.3f} | {after_scores.get(c, float('nan')):.3f} |")
    rows.append(f"| **overall** | **{before['overall']:.3f}** | **{after['overall']:.3f}** |")
    after_ood = out_of_domain_of(after)
    for name, value in out_of_domain_of(before).items():
        rows.append(f"| {labels.get(name, name)} | {value:.4f} | {after_ood.get(name, float('nan')):.4f} |")
    after_metrics = after.get("metrics", {})
    for name, value in before.get("metrics", {}).items():
        rows.append(f"| {name} (eval.metrics) | {value:.4f} | {after_metrics.get(name, float('nan')):.4f} |")
    return "\n".join(rows)


def check_run_directory(path: Path, resume: bool, overwrite: bool) -> None:
    """A new run starts only in an empty or absent directory, so that no file of one run is mixed into another."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in run.output_dir and --overwrite deletes it: pass one of them")
    if resume or overwrite or not path.is_dir():
        return
    held = sorted(p.name for p in path.iterdir())
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(f"run.output_dir {path} already holds a run ({shown}); pass --resume to continue it or --overwrite to replace it")


def run_training(config: Config, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Evaluate (cached across resumes), train, evaluate, write ``report.md``, ``results.json``, curves and grids.

    A new run refuses a non-empty ``run.output_dir`` unless ``overwrite``, which empties it first.
    """
    check_run_directory(Path(config.run.output_dir), resume, overwrite)
    # The model, prompts and evaluator load (and fail, on bad input) before the run directory is touched.
    trainer = Trainer(config, log=log)
    main = trainer.acc.is_main_process
    quiet = log if main else (lambda *args: None)
    # A sharded model's forwards are collectives: then every process runs the evaluation (the same images) and the main one writes.
    evaluator = build_evaluator(trainer, quiet) if main or trainer.sharding.sharded else None
    out = trainer.output
    if overwrite and trainer.acc.is_main_process:
        shutil.rmtree(out, ignore_errors=True)
    trainer.acc.wait_for_everyone()
    out.mkdir(parents=True, exist_ok=True)
    evals_path = out / "evals.json"
    evals: list[dict] = json.loads(evals_path.read_text()) if resume and evals_path.exists() else []

    def run_eval(images_per_category: int, tag: str) -> dict | None:
        if evaluator is None:
            return None
        start = time.perf_counter()
        result = evaluate(trainer, evaluator, images_per_category, out / f"grid_{tag}.png" if main else None)
        c = trainer.counters
        result.update(
            step=c.step, training_seconds=c.elapsed_seconds, forward_equivalents=c.forward_equivalents,
            images_per_category=images_per_category, seconds=time.perf_counter() - start,
        )
        before = next((e for e in evals if e["step"] == 0), None)
        if before is not None:
            apply_guard(trainer, before, result, quiet, evaluator.lower_is_better)
        # A run killed after an evaluation resumes from an earlier checkpoint: what it evaluated beyond it is redone.
        evals[:] = [e for e in evals if e["step"] < c.step or e["step"] == 0]
        evals.append(result)
        if main:
            evals_path.write_text(json.dumps(evals, indent=1))
        quiet(f"{evaluator.title.split(' (')[0]} at step {c.step}: overall {result['overall']:.3f} "
              f"({describe_evaluated(result['evaluated_model'])})")
        warning = unmoved_ema_warning(result)
        if warning:
            quiet(warning)
        return result

    if not any(e["step"] == 0 for e in evals):
        run_eval(config.eval.final_images_per_category, "before")
    every = config.eval.every

    def periodic(tr: Trainer, metrics: dict) -> None:
        if every and tr.counters.step % every == 0 and not tr.finished():
            run_eval(config.eval.images_per_category, periodic_tag(tr.counters.step))
            tr.share_run_state()

    status = trainer.train(resume=resume, on_step=periodic)
    summary = {"status": status, "steps": trainer.counters.step, "output_dir": str(out)}
    if status != 0:
        log(f"\nthe run stopped at step {trainer.counters.step} with status {status}; its checkpoints are in {out} "
            "(continue with --resume)")
        return summary
    # Before the final evaluation, whose guard check (if it trips) stops nothing.
    stopped_by_guard = trainer.state.guard_stopped
    last = evals[-1] if evals else None
    if stopped_by_guard and last is not None and last["step"] == trainer.counters.step:
        # The guard stopped the run at this evaluation: it is the run's last, not repeated at the same step.
        after = last
        stop_grid = out / f"grid_{periodic_tag(last['step'])}.png"
        if main and stop_grid.is_file():
            shutil.copyfile(stop_grid, out / "grid_after.png")
    else:
        after = run_eval(config.eval.final_images_per_category, "after")
    trainer.export_adapter(out / "adapter")
    if main:
        before = next((e for e in evals if e["step"] == 0), None)
        plot_curves(trainer.counters.history, evals, out / "curves.png", config.loss.algorithm)
        summary.update(
            before=before,
            after=after,
            wall_clock_seconds=trainer.counters.elapsed_seconds,
            machines=trainer.counters.machines,
            optimizer_steps=trainer.counters.step,
            forward_equivalents=trainer.counters.forward_equivalents,
            guard_stopped=stopped_by_guard,
            guard=[e["guard"]["message"] for e in evals if "message" in e.get("guard", {})],
            config=config.to_dict(),
        )
        (out / "results.json").write_text(json.dumps(summary, indent=1))
        write_report(out, config, summary)
        log("\n" + run_summary(out, summary, evaluator is not None))
    trainer.acc.wait_for_everyone()
    return summary


def periodic_tag(step: int) -> str:
    """The name of a periodic evaluation's grid, grid_<tag>.png."""
    return f"step{step:05d}"


def run_notes(summary: dict) -> list[str]:
    """What the before -> after table does not say: which model each evaluation scored, an evaluation EMA that had
    not moved by the end, and what the reward-hacking guard did."""
    lines = []
    before, after = summary.get("before"), summary.get("after")
    if before and after:
        lines.append(f"evaluated: before (step {before['step']}) {describe_evaluated(before.get('evaluated_model'))}; "
                     f"after (step {after['step']}) {describe_evaluated(after.get('evaluated_model'))}")
        lines += [w for w in [unmoved_ema_warning(after)] if w]
    lines += summary.get("guard", [])
    if summary.get("guard_stopped"):
        lines.append(f"the reward-hacking guard (eval.guard_metric) stopped the run at step {summary['optimizer_steps']} "
                     f"(run.max_steps {summary['config']['run']['max_steps']})")
    return lines


def run_summary(out: Path, summary: dict, evaluated: bool) -> str:
    """What a finished run prints last: its length, the evaluation before -> after, and where its files are."""
    lines = [f"run finished: {summary['optimizer_steps']} optimizer steps, {summary['wall_clock_seconds']:.0f} s of training"]
    if summary.get("before") and summary.get("after"):
        cls = evaluator_of(summary["after"])
        lines += ["", f"{cls.title if cls else 'evaluation'}, before -> after", "", comparison_table(summary["before"], summary["after"]), ""]
    elif not evaluated:
        lines.append("evaluation: off (set eval.prompts to a held-out prompt file to evaluate before and after)")
    notes = run_notes(summary)
    lines += notes + ([""] if notes else [])
    lines += [f"report:  {out / 'report.md'}", f"adapter: {out / 'adapter'}", f"curves:  {out / 'curves.png'}"]
    return "\n".join(lines)


def write_report(out: Path, config: Config, summary: dict) -> None:
    lines = [
        f"# dgpo run report: {out}",
        "",
        f"{summary['optimizer_steps']} optimizer steps, {summary['wall_clock_seconds']:.0f} s of training "
        f"({summary['forward_equivalents']:.0f} model forward-equivalents).",
        "",
    ]
    if summary.get("before") and summary.get("after"):
        cls = evaluator_of(summary["after"])
        lines += [f"## {cls.title if cls else 'Evaluation'}", "", comparison_table(summary["before"], summary["after"]), ""]
    for note in run_notes(summary):
        lines += [note, ""]
    lines += ["## Curves", "", "![curves](curves.png)", ""]
    grids = [(tag, f"grid_{tag}.png") for tag in ("before", "after") if (out / f"grid_{tag}.png").is_file()]
    if grids:
        lines += ["## Samples before / after", ""]
        for tag, name in grids:
            lines += [f"![{tag}]({name})", ""]
    lines += [
        "## Config",
        "",
        "```yaml",
        (out / "config.yaml").read_text().rstrip(),
        "```",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
