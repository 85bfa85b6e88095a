"""Evaluators are a registry: periodic evaluation, the guard and the report go through the interface, and the
general modules reach ShapesEval (dgpo.shapes) only through the registry hook."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
from test_train import tiny_overrides

from dgpo.evaluation import generate
from dgpo.evaluators import EVALUATORS, EvalResult, Evaluator, GridSelection, register_evaluator, resolve_evaluator
from dgpo.registry import PLUGINS
from dgpo.train.config import load_config
from dgpo.train.data import PROMPT_SOURCES, Prompt, PromptSource, register_prompt_source
from dgpo.train.run import comparison_table, run_training

SRC = Path(__file__).resolve().parents[1] / "src" / "dgpo"
GENERAL = [*sorted((SRC / "train").glob("*.py")), SRC / "cli.py", SRC / "evaluation.py", SRC / "evaluators.py",
           SRC / "rollout.py", SRC / "sampling.py", SRC / "losses.py", SRC / "registry.py"]


def _shapes_imports(path: Path, module_level_only: bool) -> list[str]:
    """Imports of dgpo.shapes in a module (relative ones resolved), at module level or anywhere."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            names = [f"{base}.{a.name}" for a in node.names]
            if any(".shapes" in n.replace("..", ".") and "models.shapes" not in n for n in [base, *names]):
                found.append(f"{path.name}:{node.lineno} from {base}")
        elif isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names if a.name.startswith("dgpo.shapes")]
    return found


def test_general_modules_reach_shapes_only_through_the_registry_hook():
    offenders = [hit for path in GENERAL for hit in _shapes_imports(path, module_level_only=True)]
    assert not offenders, f"module-level imports of dgpo.shapes in general modules: {offenders}"
    # not even inside functions, except the ShapesEval-only `dgpo pretrain-shapes` command in the CLI
    deep = [hit for path in GENERAL if path.name != "cli.py" for hit in _shapes_imports(path, module_level_only=False)]
    assert not deep, deep
    assert "dgpo.shapes.plugin" in PLUGINS
    # the registries list ShapesEval's parts without the user importing anything
    assert "shapes" in EVALUATORS and {"shapes:train", "shapes:test"} <= set(PROMPT_SOURCES.names())


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
