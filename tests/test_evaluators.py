"""Evaluators are a registry: periodic evaluation, the guard and the report go through the interface (how the
general modules reach ShapesEval only through the plugin registrations: tests/test_plugins.py)."""
from __future__ import annotations

import json

import numpy as np
from helpers import tiny_overrides

from dgpo.evaluators import EVALUATORS, EvalResult, Evaluator, GridSelection, register_evaluator, resolve_evaluator
from dgpo.generation import generate
from dgpo.train.config import load_config
from dgpo.train.data import PROMPT_SOURCES, Prompt, PromptSource, register_prompt_source
from dgpo.train.run import comparison_table, run_training


def test_evaluator_choice_follows_the_backend_and_can_be_turned_off():
    assert resolve_evaluator("", "shapes")[0] == "shapes"
    name, why = resolve_evaluator("", "sd3")
    assert name == "none" and "sd3" in why
    assert resolve_evaluator("none", "shapes")[0] == "none"


def test_a_registered_prompt_source_loads_by_name():
    @register_prompt_source("test:two")
    def two():
        return [Prompt("a", {}), Prompt("b", {})]

    try:
        assert [p.text for p in PromptSource.load("test:two").prompts] == ["a", "b"]
    finally:
        PROMPT_SOURCES.unregister("test:two")


class ToyEvaluator(Evaluator):
    """Two prompt sets; its out-of-domain 'toy_quality' gets worse at every evaluation, so the guard trips."""

    title = "Toy evaluation"
    score_label = "prompt set"
    out_of_domain = {"toy_quality": "toy quality"}
    calls = 0

    def evaluate(self, model, settings, images_per_category, seed=0):
        type(self).calls += 1
        prompts = ["a red circle"] * images_per_category + ["a blue square"] * images_per_category
        images = generate(model, prompts, [("toy", seed, i) for i in range(len(prompts))], settings)
        brightness = images.mean(dim=(1, 2, 3)).numpy()
        scores = {"reds": float(np.mean(brightness[:images_per_category])), "blues": float(np.mean(brightness[images_per_category:]))}
        return EvalResult(
            overall=float(np.mean(list(scores.values()))), scores=scores, out_of_domain={"toy_quality": 1.0 / type(self).calls},
            images=images, prompts=prompts, metadata=[{} for _ in prompts],
            grid=GridSelection(images[:4], prompts[:4]), scores_key=self.scores_key,
        )


def test_a_toy_evaluator_drives_periodic_evaluation_the_guard_and_the_report(tiny_model_dir, tmp_path):
    register_evaluator("test_toy")(ToyEvaluator)
    lines = []
    try:
        overrides = {
            "run.max_steps": 4, "eval.every": 1, "eval.images_per_category": 1, "eval.final_images_per_category": 1,
            "eval.evaluator": "test_toy", "eval.guard_metric": "toy_quality", "eval.guard_max_drop": 0.1,
            "eval.metrics": "[jpeg_compressibility]",
        }
        summary = run_training(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **overrides)), log=lines.append)
        evals = json.loads((tmp_path / "evals.json").read_text())
        assert [e["evaluator"] for e in evals] == ["test_toy"] * len(evals) and ToyEvaluator.calls == len(evals)
        assert set(evals[0]["scores"]) == {"reds", "blues"} and "toy_quality" in evals[0] and "jpeg_compressibility" in evals[0]["metrics"]
        assert evals[1]["step"] == 1 and "guard" in evals[1], "the first periodic evaluation is worse by half: the guard stops the run"
        assert summary["status"] == 0 and summary["steps"] == 1
        assert any(line.startswith("guard: toy_quality") for line in lines)
        assert (tmp_path / "grid_before.png").exists()
        report = (tmp_path / "report.md").read_text()
        assert "## Toy evaluation" in report and "| prompt set | before | after |" in report and "| toy quality |" in report
        assert "| reds |" in comparison_table(summary["before"], summary["after"])
    finally:
        EVALUATORS.unregister("test_toy")


def test_evaluation_off_is_logged_and_writes_no_evaluations(tiny_model_dir, tmp_path):
    lines = []
    overrides = {"run.max_steps": 1, "eval.evaluator": "none"}
    summary = run_training(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **overrides)), log=lines.append)
    assert summary["status"] == 0 and summary["before"] is None and summary["after"] is None
    assert [line for line in lines if line.startswith("evaluation is off: eval.evaluator=none")]
    assert not (tmp_path / "evals.json").exists() or json.loads((tmp_path / "evals.json").read_text()) == []
