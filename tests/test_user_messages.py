"""What a user sees through the command line when a run is shorter than its evaluation EMA's interval, a model
path or a prompt or recipe file is wrong, the guard trips, a reward fails, a comparison's scores move in the
fourth decimal, or an optional library logs on import: each said in words, in one line where it is an error."""
from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import tiny_dgpo_recipe, tiny_recipe_file

from dgpo.cli import OPTIONAL_KERNEL_LOGGER, OPTIONAL_KERNEL_WARNING, main
from dgpo.rewards import REWARDS, register_reward
from dgpo.train.config import load_config
from dgpo.train.ema import eval_ema_decay, eval_ema_updates
from dgpo.train.run import apply_guard
from dgpo.train.state import RunState

REPO = Path(__file__).resolve().parents[1]
# Evaluation as small as ShapesEval allows: one image per category, two solver steps.
SMALL_EVAL = {"eval.images_per_category": 1, "eval.final_images_per_category": 1, "eval.num_steps": 2}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dgpo: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ----- which model an evaluation scored -------------------------------------------------------------------


@pytest.mark.parametrize("every", [1, 2, 3, 8])
def test_eval_ema_updates_counts_the_updates_of_the_schedule(every):
    for steps in range(30):
        assert eval_ema_updates(steps, every) == sum(eval_ema_decay(n, 0.9, every) is not None for n in range(1, steps + 1))


def test_an_evaluation_of_an_evaluation_ema_that_never_updated_says_so_everywhere(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    settings = {**SMALL_EVAL, "eval.every": 1, "eval.ema_decay": 0.9, "eval.ema_every": 8, "run.max_steps": 2}
    assert main(["train", tiny_recipe_file(tmp_path, tiny_model_dir, out, **settings)]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "(the evaluation EMA (eval.ema_decay 0.9, 0 updates))" in printed
    warnings = [line for line in printed.splitlines() if line.startswith("warning: the evaluation at step")]
    # Step 1's evaluation and the final one at step 2 (in the live log, and again under the printed table).
    assert len(warnings) == 3 and "its first update is after step 7" in warnings[0] and "so it scored the base model" in warnings[0]
    evals = json.loads((out / "evals.json").read_text())
    assert [e["evaluated_model"] for e in evals] == [{"weights": "eval_ema", "ema_decay": 0.9, "ema_every": 8, "ema_updates": 0}] * 3
    results = json.loads((out / "results.json").read_text())
    assert results["after"]["evaluated_model"]["ema_updates"] == 0
    report = (out / "report.md").read_text()
    assert "evaluated: before (step 0) the evaluation EMA (eval.ema_decay 0.9, 0 updates)" in report
    assert "warning: the evaluation at step 2 scored the evaluation EMA" in report
    # The unmoved EMA is the base model: it is not exported as if trained.
    assert (out / "adapter").is_dir() and not (out / "adapter_ema").exists()
    assert "warning: adapter_ema/ not written: the evaluation EMA had no update in 2 steps" in printed

    assert main(["train", tiny_recipe_file(tmp_path, tiny_model_dir, out, **{**settings, "eval.ema_every": 1}), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "warning" not in printed and (out / "adapter_ema").is_dir()
    assert [e["evaluated_model"]["ema_updates"] for e in json.loads((out / "evals.json").read_text())] == [0, 1, 2]
    assert main(["train", tiny_recipe_file(tmp_path, tiny_model_dir, out, **{**settings, "eval.ema_decay": 0.0}), "--overwrite"]) == 0
    assert "after (step 2) the policy" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["after"]["evaluated_model"] == {"weights": "policy"}


# ----- one-line errors for what the user typed ------------------------------------------------------------


@pytest.mark.parametrize("path, why", [("tiny-sd3-typo", "not in the local hub cache and the hub is unreachable or does not hold it"),
                                       ("./tiny-sd3-typo", "not a hub model id")])
def test_a_model_path_that_is_neither_a_directory_nor_on_the_hub_is_one_line(path, why, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe_file(tmp_path, tiny_model_dir, tmp_path / "run", **{"model.backend": "sd3", "model.path": path, "eval.evaluator": "none"})
    assert main(["train", recipe]) == 2
    error = _error_line(capsys)
    assert error.startswith(f"dgpo: error: model.path {path!r}: no such directory (in {tmp_path})") and why in error


def test_a_prompt_line_of_broken_json_is_named_invalid_json_with_its_line_and_column(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "a red circle" "metadata": {}}\n')
    assert main(["train", tiny_recipe_file(tmp_path, tiny_model_dir, tmp_path / "run", **{"data.prompts": str(prompts)})]) == 2
    assert _error_line(capsys) == f"dgpo: error: {prompts}:2: invalid JSON at column 27: Expecting ',' delimiter"


def test_a_yaml_syntax_error_keeps_its_line_and_column(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("loss:\n  beta: [1, 2\n  t_min: 0.3\n")
    assert main(["train", str(recipe)]) == 2
    assert _error_line(capsys) == (f"dgpo: error: {recipe}:3:8: not valid YAML: expected ',' or ']', but got ':' "
                                   "(while parsing a flow sequence)")


def test_a_run_of_zero_steps_is_refused_before_anything_is_written(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", tiny_recipe_file(tmp_path, tiny_model_dir, out, **{"run.max_steps": 0})]) == 2
    assert "run.max_steps must be >= 1 (a run of 0 steps trains nothing" in _error_line(capsys) and not out.exists()


# ----- the reward-hacking guard -------------------------------------------------------------------------


def test_the_guard_shows_the_drop_evaluates_the_stop_step_once_and_the_report_says_it_stopped(tiny_model_dir, tmp_path, capsys):
    calls = []

    def slowly_falling(images, prompts, metadata):
        """-4.25601, -4.25602, ...: equal at 4 significant digits."""
        calls.append(1)
        return [-4.256 - 1e-5 * len(calls)] * len(prompts)

    register_reward("test_slowly_falling")(lambda: slowly_falling)
    out = tmp_path / "run"
    settings = {**SMALL_EVAL, "eval.every": 1, "eval.metrics": "[test_slowly_falling]", "eval.guard_metric": "test_slowly_falling",
                "eval.guard_max_drop": 1e-7, "run.max_steps": 3}
    try:
        assert main(["train", tiny_recipe_file(tmp_path, tiny_model_dir, out, **settings)]) == 0
    finally:
        REWARDS.unregister("test_slowly_falling")
    printed = capsys.readouterr().out
    assert "guard: test_slowly_falling went from -4.25601 at step 0 to -4.25602 at step 1" in printed
    assert [e["step"] for e in json.loads((out / "evals.json").read_text())] == [0, 1], "the stop step is evaluated once"
    assert len(calls) == 2 and (out / "grid_after.png").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["guard_stopped"] and results["after"]["step"] == 1
    report = (out / "report.md").read_text()
    assert "the reward-hacking guard (eval.guard_metric) stopped the run at step 1 (run.max_steps 3)" in report
    assert "guard: test_slowly_falling went from -4.25601" in report


def test_a_guard_tripping_at_the_final_evaluation_does_not_claim_to_stop_the_run():
    config = load_config(None, ["eval.guard_metric=diversity"])
    lines: list[str] = []
    for finished, said in ((False, "; stopping the run"), (True, "; the run has ended already")):
        trainer = SimpleNamespace(config=config, counters=SimpleNamespace(step=4), state=RunState.from_config(0.0), finished=lambda ended=finished: ended)
        apply_guard(trainer, {"diversity": 0.3}, {"diversity": 0.1}, log=lines.append)
        assert lines[-1].endswith(said) and trainer.state.guard_stopped is not finished


def test_a_guard_without_evaluation_says_why_evaluation_is_off(tmp_path, capsys):
    recipe = tmp_path / "own.yaml"
    recipe.write_text("model: {backend: sd3}\neval: {guard_metric: ood_reward}\n")
    assert main(["train", str(recipe)]) == 2
    error = _error_line(capsys)
    assert "eval.guard_metric 'ood_reward' watches the evaluations, but evaluation is off: no evaluator is registered" in error
    assert "set eval.prompts" in error


# ----- a reward's failure under the progress bar ----------------------------------------------------------


def test_a_reward_failure_prints_below_the_closed_progress_bar(tiny_model_dir, tmp_path, capsys):
    calls = []

    def fails_at_the_second_step(images, prompts, metadata):
        calls.append(1)
        if len(calls) > 2:  # two micro-batches a step
            raise KeyError("score table")
        return [float(i) for i in range(len(prompts))]

    register_reward("test_fails_later")(lambda: fails_at_the_second_step)
    settings = {"eval.evaluator": "none", "reward.weights": {"test_fails_later": 1.0}, "run.max_steps": 3}
    try:
        assert main(["train", tiny_recipe_file(tmp_path, tiny_model_dir, tmp_path / "run", **settings)]) == 2
    finally:
        REWARDS.unregister("test_fails_later")
    err = capsys.readouterr().err
    assert err.count("dgpo: error: ") == 1 and err.index("dgpo: ") < err.index("dgpo: error: "), "the progress bar drew before the failure"
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("dgpo: error: reward 'test_fails_later' failed: KeyError"), repr(err[-400:])


# ----- dgpo compare's precision ---------------------------------------------------------------------------


def test_compare_keeps_scores_and_thresholds_at_full_precision(tiny_model_dir, tmp_path, capsys):
    recipe = tiny_dgpo_recipe(tiny_model_dir, tmp_path)
    out = tmp_path / "compare"
    argv = ["compare", f"dgpo={recipe}", "--output", str(out), "--budget-steps", "2", "--eval-every", "1", "--eval-images", "1",
            "--threshold", "0.71234"]
    assert main(argv) == 0
    # Scores that differ from the threshold in the fifth decimal: rounded to 4, 0.712345 would fall short of 0.71234.
    evals_path = out / "runs" / "dgpo" / "seed-0" / "evals.json"
    evals = json.loads(evals_path.read_text())
    for evaluation, overall in zip(evals, (0.5, 0.712345, 0.712346)):
        evaluation["overall"] = overall
    evals_path.write_text(json.dumps(evals))
    capsys.readouterr()
    assert main([*argv, "--reuse"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["recipes"]["dgpo"]
    assert summary["thresholds"] == [0.71234] and entry["thresholds"]["0.71234"]["reached_seeds"] == 1
    assert entry["thresholds"]["0.71234"]["step"] == 1 and entry["best"] == 0.712346 and entry["final"] == 0.712346
    assert [float(r["overall"]) for r in csv.DictReader((out / "curves.csv").read_text().splitlines())] == [0.5, 0.712345, 0.712346]
    assert "to 0.71234:" in (out / "summary.md").read_text()


# ----- a clean start ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["train", "--help-config"]])
def test_dgpo_starts_without_an_optional_librarys_import_warning(args):
    """`train --help-config` imports peft, which imports bitsandbytes, which warns on a CPU with AVX512-BF16."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-m", "dgpo.cli", *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout and result.stderr == ""


def test_only_the_optional_kernel_warning_is_silenced(capsys):
    assert main(["rewards"]) == 0
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(OPTIONAL_KERNEL_LOGGER)
    logger.addHandler(handler)
    try:
        logger.warning("%s: Kernel repository could not verify publisher trust status", OPTIONAL_KERNEL_WARNING)
        logger.warning("another bitsandbytes warning")
    finally:
        logger.removeHandler(handler)
    assert seen == ["another bitsandbytes warning"]
