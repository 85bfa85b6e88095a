"""The comparison harness on a tiny model with a two-step budget: files, rows and threshold arithmetic."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
from helpers import tiny_dgpo_recipe

from dgpo.cli import main
from dgpo.evaluators import get_evaluator
from dgpo.machine import describe_machine, machine_label
from dgpo.train.compare import NOT_RECORDED, markdown_summary, seconds_axis_label, summarize, time_to_threshold


def _row(step, seconds, forwards, overall):
    return {"step": step, "training_seconds": seconds, "forward_equivalents": forwards, "overall": overall}


def test_time_to_threshold_unconfirmed_takes_the_first_evaluation_reaching_it():
    rows = [_row(0, 0, 0, 0.40), _row(10, 50, 1000, 0.52), _row(20, 100, 2000, 0.49), _row(30, 150, 3000, 0.61)]
    assert time_to_threshold(rows, 0.5, confirmations=0)["training_seconds"] == 50
    assert time_to_threshold(rows, 0.6, confirmations=0)["step"] == 30
    assert time_to_threshold(rows, 0.7, confirmations=0) is None


def test_a_lucky_evaluation_is_not_a_crossing_until_the_next_one_confirms_it():
    rows = [_row(0, 0, 0, 0.40), _row(10, 50, 1000, 0.52), _row(20, 100, 2000, 0.49), _row(30, 150, 3000, 0.51),
            _row(40, 200, 4000, 0.55), _row(50, 250, 5000, 0.61)]
    # 0.52 at step 10 falls back to 0.49: the crossing of 0.5 is at step 30, held at step 40.
    assert time_to_threshold(rows, 0.5)["step"] == 30
    assert time_to_threshold(rows, 0.5, confirmations=2)["step"] == 30
    assert time_to_threshold(rows, 0.55)["step"] == 40
    # The last evaluation has no successor to confirm it.
    assert time_to_threshold(rows, 0.6) is None
    curves = {"dgpo": {0: rows}}
    summary = summarize(curves, [0.5, 0.6], "dgpo")
    assert summary["recipes"]["dgpo"]["best"] == 0.61 and summary["recipes"]["dgpo"]["confirmed_best"] == 0.55
    assert summary["recipes"]["dgpo"]["thresholds"]["0.6"]["reached_seeds"] == 0
    assert "| 0.6100 | 0.5500 |" in markdown_summary(summary)


def test_summary_ratios_are_relative_to_the_baseline():
    curves = {
        "dgpo": {0: [_row(0, 0, 0, 0.4), _row(10, 40, 1000, 0.55)]},
        "flow_grpo": {0: [_row(0, 0, 0, 0.4), _row(10, 100, 8000, 0.45), _row(20, 200, 16000, 0.56)]},
    }
    summary = summarize(curves, [0.5], "dgpo", confirmations=0)
    reached = summary["recipes"]["flow_grpo"]["thresholds"]["0.5"]
    assert reached["ratio"] == {"bound": "exact", "seconds": 5.0, "seconds_interval": [5.0, 5.0], "forwards": 16.0, "forwards_interval": [16.0, 16.0]}
    assert summary["recipes"]["dgpo"]["thresholds"]["0.5"]["ratio"]["seconds"] == 1.0


def test_seeds_average_and_a_recipe_short_of_the_threshold_gives_a_lower_bound():
    curves = {
        "dgpo": {0: [_row(0, 0, 0, 0.4), _row(10, 40, 1000, 0.55)], 1: [_row(0, 0, 0, 0.42), _row(10, 60, 1000, 0.53)]},
        "flow_grpo": {
            0: [_row(0, 0, 0, 0.4), _row(10, 100, 8000, 0.45), _row(20, 300, 16000, 0.52)],
            1: [_row(0, 0, 0, 0.42), _row(10, 100, 8000, 0.44), _row(20, 200, 16000, 0.47)],  # never reaches 0.5
        },
    }
    summary = summarize(curves, [0.5], "dgpo", confirmations=0)
    dgpo, grpo = summary["recipes"]["dgpo"], summary["recipes"]["flow_grpo"]
    assert dgpo["curve"][0] == {"step": 0, "seeds": 2, "overall_mean": pytest.approx(0.41), "overall_se": pytest.approx(0.01),
                                "training_seconds": 0.0, "forward_equivalents": 0.0}
    assert dgpo["final"] == pytest.approx(0.54) and dgpo["final_se"] == pytest.approx(0.01)
    entry = grpo["thresholds"]["0.5"]
    assert entry["reached_seeds"] == 1 and entry["seeds"] == 2
    # Seed 1 counts at all it spent (200 s); the baseline's mean is 50 s: ratio >= (300 + 200) / 2 / 50.
    assert entry["training_seconds"] == 250.0 and entry["ratio"]["bound"] == "lower" and entry["ratio"]["seconds"] == 5.0
    low, high = entry["ratio"]["seconds_interval"]
    assert 200 / 60 <= low < 5.0 < high <= 300 / 40  # the extremes of resampling
    # Swapped roles: the baseline falls short, so the other recipe's ratio is an upper bound.
    assert summarize(curves, [0.5], "flow_grpo", confirmations=0)["recipes"]["dgpo"]["thresholds"]["0.5"]["ratio"]["bound"] == "upper"


def test_compare_cli_runs_two_recipes_on_a_tiny_model(tiny_model_dir, tmp_path):
    recipe = tiny_dgpo_recipe(tiny_model_dir, tmp_path)
    grpo = tmp_path / "grpo.yaml"
    grpo.write_text("inherit: dgpo.yaml\nloss: {algorithm: flow_grpo, ppo_clip_eps: 0.0001, kl_beta: 0.04}\nrollout: {sampler: sde}\n")
    out = tmp_path / "compare"
    argv = ["compare", f"dgpo={recipe}", f"flow_grpo={grpo}", "--output", str(out), "--budget-steps", "2",
            "--eval-every", "1", "--eval-images", "1", "--threshold", "0.0", "--threshold", "0.99"]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "curves.csv").read_text().splitlines()))
    assert [(r["recipe"], int(r["seed"]), int(r["step"])) for r in rows] == [(n, 0, k) for n in ("dgpo", "flow_grpo") for k in range(3)]
    by_recipe = {name: [r for r in rows if r["recipe"] == name] for name in ("dgpo", "flow_grpo")}
    for recipe_rows in by_recipe.values():
        forwards = [float(r["forward_equivalents"]) for r in recipe_rows]
        assert forwards[0] == 0 and forwards[0] < forwards[1] < forwards[2]
    # Flow-GRPO trains with CFG on a trajectory step and a KL forward: more forwards per step than DGPO.
    assert float(by_recipe["flow_grpo"][-1]["forward_equivalents"]) > float(by_recipe["dgpo"][-1]["forward_equivalents"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipes"]["dgpo"]["thresholds"]["0.0"]["step"] == 0
    assert summary["recipes"]["flow_grpo"]["thresholds"]["0.99"]["reached_seeds"] == 0
    assert (out / "curves.png").stat().st_size > 0 and "flow_grpo" in (out / "summary.md").read_text()
    # Both ran here: one machine, so no note on the seconds.
    here = machine_label(describe_machine())
    assert summary["machines"] == {"dgpo": [here], "flow_grpo": [here]}
    assert "different machines" not in (out / "summary.md").read_text()
    # A second call with --reuse trains nothing and reproduces the summary.
    assert main([*argv, "--reuse"]) == 0
    assert json.loads((out / "summary.json").read_text())["recipes"] == summary["recipes"]
    # Finished runs moved to another folder are reused there (where a run was written is not part of its training);
    # a run whose settings differ is trained again.
    moved = tmp_path / "moved"
    shutil.copytree(out / "runs", moved / "runs")
    shutil.rmtree(out)
    at_moved = [str(moved) if arg == str(out) else arg for arg in argv]
    finished = moved / "runs" / "dgpo" / "seed-0" / "results.json"
    # A run made before machines were recorded is reused, and the summary says its seconds' machine is unknown.
    grpo_results = moved / "runs" / "flow_grpo" / "seed-0" / "results.json"
    grpo_results.write_text(json.dumps({k: v for k, v in json.loads(grpo_results.read_text()).items() if k != "machines"}))
    written = finished.stat().st_mtime_ns
    assert main([*at_moved, "--reuse"]) == 0
    assert finished.stat().st_mtime_ns == written
    rebuilt = json.loads((moved / "summary.json").read_text())
    assert rebuilt["recipes"] == summary["recipes"] and rebuilt["machines"] == {"dgpo": [here], "flow_grpo": [NOT_RECORDED]}
    assert f"dgpo: {here}; flow_grpo: {NOT_RECORDED}" in (moved / "summary.md").read_text()
    assert main([*at_moved, "--reuse", "--set", "optim.lr=0.01"]) == 0
    assert finished.stat().st_mtime_ns != written


def test_compare_reuse_resumes_an_interrupted_run_where_its_last_checkpoint_left_it(tiny_model_dir, tmp_path, capsys):
    recipe = tiny_dgpo_recipe(tiny_model_dir, tmp_path)
    out = tmp_path / "resume"
    argv = ["compare", f"dgpo={recipe}", "--output", str(out), "--budget-steps", "3", "--eval-every", "1",
            "--eval-images", "1", "--threshold", "0.0", "--save-every", "1", "--reuse"]
    assert main(argv) == 0
    whole = list(csv.DictReader((out / "curves.csv").read_text().splitlines()))
    # Killed after step 3 was evaluated (evals.json keeps it) but before its checkpoint and results were written.
    run = out / "runs" / "dgpo" / "seed-0"
    (run / "results.json").unlink()
    shutil.rmtree(sorted((run / "checkpoints").iterdir())[-1])
    capsys.readouterr()
    assert main(argv) == 0
    assert "dgpo seed 0: resuming" in capsys.readouterr().out
    resumed = list(csv.DictReader((out / "curves.csv").read_text().splitlines()))
    # Step 3 and the final evaluation are redone, once each, and match the uninterrupted run's.
    assert [int(r["step"]) for r in resumed] == [int(r["step"]) for r in whole] == [0, 1, 2, 3]
    assert [(r["overall"], r["forward_equivalents"]) for r in resumed] == [(r["overall"], r["forward_equivalents"]) for r in whole]
    # The checkpoint carried the machine of the steps before it: resumed on the same machine, one stretch from step 0.
    stretches = json.loads((run / "results.json").read_text())["machines"]
    assert [(s["from_step"], s["machine"]) for s in stretches] == [(0, describe_machine())]


def test_compare_forward_budget_stops_a_recipe_at_the_step_that_spends_it(tiny_model_dir, tmp_path):
    recipe = tiny_dgpo_recipe(tiny_model_dir, tmp_path)
    argv = ["compare", f"dgpo={recipe}", "--budget-steps", "5", "--eval-every", "1", "--eval-images", "1"]
    assert main([*argv, "--output", str(tmp_path / "steps")]) == 0
    per_step = [float(r["forward_equivalents"]) for r in csv.DictReader((tmp_path / "steps" / "curves.csv").read_text().splitlines())]
    assert main([*argv, "--output", str(tmp_path / "budget"), "--budget-forwards", str(1.5 * per_step[1])]) == 0
    budgeted = list(csv.DictReader((tmp_path / "budget" / "curves.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in budgeted] == [0, 1, 2]
    assert [float(r["forward_equivalents"]) for r in budgeted] == per_step[:3]
    # No --threshold: the evaluator's own (ShapesEval's) are timed.
    assert json.loads((tmp_path / "budget" / "summary.json").read_text())["thresholds"] == list(get_evaluator("shapes").default_thresholds)


def test_compare_trains_every_seed_and_keeps_each_in_the_curves(tiny_model_dir, tmp_path):
    recipe = tiny_dgpo_recipe(tiny_model_dir, tmp_path)
    out = tmp_path / "seeds"
    assert main(["compare", f"dgpo={recipe}", "--output", str(out), "--budget-steps", "1", "--eval-every", "1",
                 "--eval-images", "1", "--final-eval-images", "2", "--seeds", "2", "--threshold", "0.0"]) == 0
    rows = list(csv.DictReader((out / "curves.csv").read_text().splitlines()))
    assert [(int(r["seed"]), int(r["step"])) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    configs = [json.loads((out / "runs" / "dgpo" / f"seed-{k}" / "results.json").read_text())["config"] for k in (0, 1)]
    assert [c["run"]["seed"] for c in configs] == [0, 1]
    assert [(c["eval"]["images_per_category"], c["eval"]["final_images_per_category"]) for c in configs] == [(1, 2)] * 2
    # Different seeds draw different prompts and noise: the trained models differ.
    assert rows[1]["overall"] != rows[3]["overall"] or rows[1]["velocity_drift"] != rows[3]["velocity_drift"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipes"]["dgpo"]["seeds"] == [0, 1] and summary["budget"]["seeds"] == 2


def test_a_recipe_can_keep_more_seeds_than_the_others(tiny_model_dir, tmp_path):
    """One-seed ablations against a baseline measured with two seeds: the baseline's seeds are all in its curve, its
    costs and the ratios' bootstrap, the ablation trains only seed 0."""
    recipe = tiny_dgpo_recipe(tiny_model_dir, tmp_path)
    out = tmp_path / "ablations"
    assert main(["compare", f"dgpo={recipe}", f"ablation={recipe}", "--output", str(out), "--budget-steps", "1", "--eval-every", "1",
                 "--eval-images", "1", "--seeds", "1", "--recipe-seeds", "dgpo=2", "--baseline", "dgpo", "--threshold", "0.0"]) == 0
    assert sorted(p.name for p in (out / "runs" / "dgpo").iterdir()) == ["seed-0", "seed-1"]
    assert sorted(p.name for p in (out / "runs" / "ablation").iterdir()) == ["seed-0"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipes"]["dgpo"]["seeds"] == [0, 1] and summary["recipes"]["ablation"]["seeds"] == [0]
    assert summary["recipes"]["dgpo"]["curve"][-1]["seeds"] == 2 and summary["recipe_seeds"] == {"dgpo": 2}
    assert summary["recipes"]["ablation"]["thresholds"]["0.0"]["seeds"] == 1
    assert len(summary["recipes"]["dgpo"]["thresholds"]["0.0"]["per_seed"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--recipe-seeds", "b=2"], "not one of the recipes"),
    (["--recipe-seeds", "a=0"], "at least one seed"),
])
def test_compare_rejects_bad_recipe_seeds(argv, message, tmp_path, capsys):
    assert main(["compare", "a=x.yaml", "--output", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_compare_rejects_a_recipe_seed_count_that_is_not_a_number(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "a=x.yaml", "--output", str(tmp_path), "--recipe-seeds", "a=two"])
    assert "expected NAME=N" in capsys.readouterr().err


def test_the_seconds_axis_names_its_machine_or_points_to_the_note_when_runs_ran_on_several():
    assert seconds_axis_label({"a": ["Intel Xeon"], "b": ["Intel Xeon"]}) == "training seconds (Intel Xeon)"
    assert "several machines" in seconds_axis_label({"a": ["Intel Xeon"], "b": ["AMD EPYC", "Intel Xeon"]})
    assert "several machines" in seconds_axis_label({"a": [NOT_RECORDED], "b": ["AMD EPYC"]})


def test_compare_rejects_duplicate_names_and_unknown_baseline(tmp_path, capsys):
    assert main(["compare", "a=x.yaml", "a=y.yaml", "--output", str(tmp_path)]) == 2
    assert "unique" in capsys.readouterr().err
    assert main(["compare", "a=x.yaml", "--baseline", "b", "--output", str(tmp_path)]) == 2
    assert "baseline" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["=x.yaml", "name="])
def test_compare_rejects_malformed_recipe_arguments(text, tmp_path, capsys):
    assert main(["compare", text, "--output", str(tmp_path)]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


def test_every_recipe_is_timed_to_the_score_every_baseline_seed_confirmed():
    curves = {
        # The baseline's seeds confirm 0.53 and 0.47 (seed 0's 0.56 is its last evaluation, unconfirmed): the lower counts.
        "flow_grpo": {0: [_row(0, 0, 0, 0.4), _row(10, 100, 8000, 0.52), _row(20, 200, 16000, 0.53), _row(30, 300, 24000, 0.56)],
                      1: [_row(0, 0, 0, 0.4), _row(10, 100, 8000, 0.47), _row(20, 200, 16000, 0.48), _row(30, 300, 24000, 0.45)]},
        "dgpo": {0: [_row(0, 0, 0, 0.4), _row(10, 40, 1000, 0.46), _row(20, 80, 2000, 0.5), _row(30, 120, 3000, 0.55)],
                 1: [_row(0, 0, 0, 0.4), _row(10, 40, 1000, 0.48), _row(20, 80, 2000, 0.49), _row(30, 120, 3000, 0.40)]},
    }
    summary = summarize(curves, [0.5], "flow_grpo")
    assert summary["baseline_best"] == 0.47
    grpo, dgpo = summary["recipes"]["flow_grpo"]["to_baseline_best"], summary["recipes"]["dgpo"]["to_baseline_best"]
    assert grpo["reached_seeds"] == 2 and grpo["forward_equivalents"] == 8000.0
    # dgpo seed 0 holds 0.47 from step 20 (0.46 at step 10 is below it), seed 1 from step 10.
    assert [c["step"] for c in dgpo["per_seed"]] == [20, 10] and dgpo["ratio"]["bound"] == "exact"
    assert dgpo["ratio"]["forwards"] == pytest.approx(1500 / 8000) and dgpo["ratio"]["seconds"] == pytest.approx(60 / 100)
    assert "flow_grpo's confirmed best, 0.4700" in markdown_summary(summary)
    assert "0.19x [0.12, 0.25] / 0.60x [0.40, 0.80]" in markdown_summary(summary)
