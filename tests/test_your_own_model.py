"""Your own diffusers model end to end, on a tiny SD3 pipeline built in the test: the prompt-set evaluator
drives periodic evaluation, eval.metrics, the guard, the report and the printed summary."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import build_sd3, save_tiny

from dgpo.cli import main
from dgpo.evaluators import resolve_evaluator
from dgpo.models import load_model
from dgpo.prompt_set import PromptSetEvaluator
from dgpo.rewards import REWARDS, RewardFailure, register_reward
from dgpo.sampler_settings import SamplerSettings
from dgpo.train.config import ConfigError, load_config
from dgpo.train.data import PromptSource
from dgpo.train.run import run_training

RESOLUTION = 32


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return save_tiny(build_sd3, tmp_path_factory.mktemp("own-sd3"))


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prompts")
    (root / "train.txt").write_text("a red circle\na blue square\n")
    (root / "held_out.txt").write_text("a green triangle\na yellow star\n")
    (root / "ood.txt").write_text("an orange moon\n")
    return root / "held_out.txt", root / "ood.txt"


def sd3_overrides(model: Path, output: Path, prompts: Path, **extra) -> list[str]:
    values = {
        "model.backend": "sd3", "model.path": str(model), "model.resolution": RESOLUTION, "model.lora_rank": 4,
        "data.prompts": str(prompts.parent / "train.txt"), "data.group_size": 4, "data.groups_per_step": 1, "data.micro_batch": 4,
        "rollout.num_steps": 2, "loss.grid_points": 2, "run.max_steps": 2, "run.save_every": 0, "run.tensorboard": False,
        "run.output_dir": str(output), "run.threads": 1, "reward.weights": {"jpeg_incompressibility": 1.0},
        "eval.prompts": str(prompts), "eval.num_steps": 2, "eval.images_per_category": 4, "eval.final_images_per_category": 4,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


class Countdown:
    """An evaluation-only metric that is lower at every evaluation than at the one before, so a guard on it trips."""

    calls = 0

    def __call__(self, images, prompts, metadata):
        type(self).calls += 1
        return [1.0 / type(self).calls] * len(prompts)


def test_the_prompt_set_evaluator_is_the_default_for_a_diffusers_backend_with_eval_prompts():
    assert resolve_evaluator("", "sd3", "held_out.txt")[0] == "prompts"
    assert resolve_evaluator("", "shapes", "held_out.txt")[0] == "shapes"
    assert resolve_evaluator("", "flux", "")[0] == "none"
    with pytest.raises(ConfigError, match="eval.evaluator=prompts needs eval.prompts"):
        load_config(None, ["model.backend=sd3", "eval.evaluator=prompts"])
    with pytest.raises(ConfigError, match="ood_reward"):
        load_config(None, ["model.backend=sd3", "eval.prompts=p.txt", "eval.guard_metric=ood_reward"])
    load_config(None, ["model.backend=sd3", "eval.prompts=p.txt", "eval.ood_prompts=o.txt", "eval.guard_metric=ood_reward"])


def test_a_tiny_sd3_run_evaluates_before_during_and_after_and_its_guard_trips(sd3_dir, prompt_files, tmp_path):
    held_out, ood = prompt_files
    register_reward("test_countdown")(Countdown)
    lines = []
    try:
        extra = {"eval.every": 1, "eval.ood_prompts": str(ood), "eval.metrics": "[test_countdown, jpeg_incompressibility]",
                 "eval.guard_metric": "test_countdown", "eval.guard_max_drop": 0.01}
        summary = run_training(load_config(None, sd3_overrides(sd3_dir, tmp_path / "run", held_out, **extra)), log=lines.append)
    finally:
        REWARDS.unregister("test_countdown")
    run = tmp_path / "run"
    evals = json.loads((run / "evals.json").read_text())
    assert [e["step"] for e in evals] == [0, 1] and all(e["evaluator"] == "prompts" for e in evals), "the stop step is evaluated once"
    before = evals[0]
    assert set(before["rewards"]) == {"jpeg_incompressibility"} and before["overall"] == pytest.approx(before["rewards"]["jpeg_incompressibility"])
    # eval.metrics reuse the evaluator's score of a training reward instead of scoring it again
    assert before["metrics"]["jpeg_incompressibility"] == before["rewards"]["jpeg_incompressibility"]
    assert before["num_images"] == 4 and np.isfinite([before["diversity"], before["ood_reward"], before["ood_diversity"]]).all()
    assert "guard" in evals[1] and summary["steps"] == 1, "the countdown metric halves: the guard stops the run after step 1"
    assert any(line.startswith("guard: test_countdown") for line in lines)
    assert {"grid_before.png", "grid_after.png", "curves.png", "report.md", "adapter"} <= {p.name for p in run.iterdir()}
    report = (run / "report.md").read_text()
    assert "## held-out prompts (eval.prompts)" in report and "| jpeg_incompressibility |" in report and "![after](grid_after.png)" in report
    printed = "\n".join(lines)
    assert "run finished: 1 optimizer steps" in printed and "| diversity within prompt |" in printed
    assert f"report:  {run / 'report.md'}" in printed and f"adapter: {run / 'adapter'}" in printed


def test_a_run_builds_each_training_reward_once_for_training_evaluation_and_eval_metrics(sd3_dir, prompt_files, tmp_path):
    held_out, _ = prompt_files
    built = []

    def expensive_reward():
        """A reward that loads a model when built: the run must build it once."""
        built.append(1)
        return lambda images, prompts, metadata: [float(i) for i in range(len(prompts))]

    register_reward("test_expensive")(expensive_reward)
    try:
        overrides = sd3_overrides(sd3_dir, tmp_path / "run", held_out, **{"run.max_steps": 1, "reward.weights": {"test_expensive": 1.0},
                                                                          "eval.metrics": "[test_expensive]"})
        run_training(load_config(None, overrides))
    finally:
        REWARDS.unregister("test_expensive")
    assert len(built) == 1
    evals = json.loads((tmp_path / "run" / "evals.json").read_text())
    assert [e["rewards"]["test_expensive"] for e in evals] == [1.5, 1.5], "4 images per evaluation score 0, 1, 2, 3"
    assert [e["metrics"]["test_expensive"] for e in evals] == [1.5, 1.5]


def test_the_prompt_set_evaluator_masks_non_finite_scores_and_a_failing_reward_names_itself(sd3_dir, prompt_files):
    held_out, _ = prompt_files
    model = load_model("sd3", str(sd3_dir), RESOLUTION)
    settings = SamplerSettings(num_steps=2)

    def first_is_inf(images, prompts, metadata):
        return [float("inf")] + [1.0] * (len(prompts) - 1)

    evaluator = PromptSetEvaluator(PromptSource.load(str(held_out)), {"first_is_inf": first_is_inf}, {"first_is_inf": 1.0}, batch_size=2)
    result = evaluator.evaluate(model, settings, images_per_category=4)
    assert result.scores["first_is_inf"] == 1.0 and result.overall == 1.0, "the inf of each chunk's first image is left out"

    def broken(images, prompts, metadata):
        raise KeyError("score table")

    evaluator.rewards = {"broken": broken}
    with pytest.raises(RewardFailure, match="reward 'broken' failed: KeyError"):
        evaluator.evaluate(model, settings, images_per_category=4)


def test_a_run_without_evaluation_reports_no_grids_and_says_so(sd3_dir, prompt_files, tmp_path):
    held_out, _ = prompt_files
    lines = []
    summary = run_training(load_config(None, sd3_overrides(sd3_dir, tmp_path, held_out, **{"eval.prompts": "", "run.max_steps": 1})),
                           log=lines.append)
    assert summary["status"] == 0 and summary["before"] is None
    report = (tmp_path / "report.md").read_text()
    assert "grid_before" not in report and "## Samples" not in report and not list(tmp_path.glob("grid_*.png")) and "![curves](curves.png)" in report
    assert "evaluation: off" in "\n".join(lines) and f"curves:  {tmp_path / 'curves.png'}" in "\n".join(lines)


def test_eval_and_sample_take_any_backend_and_compare_runs_or_refuses_its_recipes(sd3_dir, prompt_files, tmp_path, capsys):
    held_out, _ = prompt_files
    model = ["--backend", "sd3", "--model", str(sd3_dir), "--resolution", str(RESOLUTION), "--steps", "2"]
    assert main(["sample", "a photo of a red cat", *model, "--num", "2", "--output", str(tmp_path / "cat.png")]) == 0
    assert (tmp_path / "cat.png").is_file()
    assert main(["eval", *model, "--prompts", str(held_out), "--metrics", "jpeg_incompressibility,jpeg_compressibility",
                 "--images-per-category", "4", "--output", str(tmp_path / "eval.json"), "--grid", str(tmp_path / "grid.png")]) == 0
    out = json.loads((tmp_path / "eval.json").read_text())
    assert out["evaluator"] == "prompts" and set(out["rewards"]) == set(out["metrics"]) == {"jpeg_incompressibility", "jpeg_compressibility"}
    assert out["overall"] == pytest.approx(np.mean(list(out["rewards"].values()))) and out["num_images"] == 4
    assert (tmp_path / "grid.png").is_file()

    capsys.readouterr()
    assert main(["sample", "a cat", "--backend", "sd3"]) == 2
    assert main(["eval", *model]) == 2
    assert main(["eval", *model, "--prompts", str(held_out)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(e.startswith("dgpo: error: ") for e in errors)
    assert "needs a model directory" in errors[0] and "nothing to evaluate" in errors[1] and "--prompts needs --metrics" in errors[2]

    recipe = tmp_path / "own.yaml"
    recipe.write_text(yaml.safe_dump(config_from_overrides(sd3_overrides(sd3_dir, tmp_path / "unused", held_out))))
    assert main(["compare", f"a={recipe}", "--output", str(tmp_path / "cmp"), "--budget-steps", "1", "--eval-every", "1",
                 "--eval-images", "2", "--threshold", "0.0"]) == 0
    assert json.loads((tmp_path / "cmp" / "runs" / "a" / "seed-0" / "evals.json").read_text())[0]["evaluator"] == "prompts"
    capsys.readouterr()
    assert main(["compare", f"a={recipe}", "--set", "eval.prompts=", "--output", str(tmp_path / "cmp2")]) == 2
    assert "recipe a" in capsys.readouterr().err and not (tmp_path / "cmp2").exists()
    # A reward has its own units: no default threshold to time.
    assert main(["compare", f"a={recipe}", "--output", str(tmp_path / "cmp3")]) == 2
    assert "pass --threshold" in capsys.readouterr().err and not (tmp_path / "cmp3").exists()


def config_from_overrides(overrides: list[str]) -> dict:
    """A YAML recipe of section.field=value overrides."""
    recipe: dict = {}
    for text in overrides:
        key, value = text.split("=", 1)
        section, name = key.split(".")
        recipe.setdefault(section, {})[name] = yaml.safe_load(value) if value else ""
    return recipe


def test_resolution_zero_is_the_checkpoints_native_size(sd3_dir):
    model = load_model("sd3", str(sd3_dir))
    assert model.latent_shape == (4, 16, 16)  # sample_size 16 latents, VAE scale 2: 32 px, as the pipeline samples


def test_bad_model_and_prompt_settings_are_one_line_errors_before_the_run_directory(sd3_dir, prompt_files, tmp_path, capsys):
    held_out, _ = prompt_files
    long_prompts = tmp_path / "long.txt"
    long_prompts.write_text("a red circle\n" + "a very long prompt " * 6 + "\n")  # 114 characters: CLIP reads 77 tokens, no T5
    run = tmp_path / "run"
    cases = {
        "model.resolution=256": "above this model's limit of 192 px",
        "model.backend=flux": "holds a diffusers StableDiffusion3Pipeline (model_index.json), which model.backend flux does not load; "
                              "set model.backend: sd3",
        "model.backend=shapes": "which model.backend shapes does not load; set model.backend: sd3",
        f"model.path={sd3_dir / 'transformer'}": f"is the 'transformer' component of the diffusers pipeline in {sd3_dir}",
        f"model.path={tmp_path}": "has no model_index.json",
        f"data.prompts={long_prompts}": "is longer than any text encoder of this model reads, in tokens: CLIP 77 (this prompt: 92)",
        f"eval.prompts={long_prompts}": f"eval.prompts {long_prompts}: prompt 2",
    }
    recipe = tmp_path / "own.yaml"
    recipe.write_text(yaml.safe_dump(config_from_overrides(sd3_overrides(sd3_dir, run, held_out, **{"model.resolution": 0}))))
    for override, message in cases.items():
        capsys.readouterr()
        assert main(["train", str(recipe), "--set", override]) == 2, override
        err = capsys.readouterr().err  # loading progress bars, then the error
        errors = [line for line in err.splitlines() if line.startswith("dgpo: error: ")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, (override, err)
        assert not run.exists(), override


README = Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parent
WALKTHROUGH_MARKER = "<!-- your-own-model: tests/test_your_own_model.py runs this block -->"
# What makes each command tiny; everything else is the README's, as written.
TINY = {
    "train": ["--set", "data.group_size=4", "--set", "data.groups_per_step=1", "--set", "data.micro_batch=4", "--set", "rollout.num_steps=2",
              "--set", "loss.grid_points=2", "--set", "run.max_steps=2", "--set", "run.tensorboard=false", "--set", "run.threads=1",
              "--set", "eval.num_steps=2", "--set", "eval.every=1", "--set", "eval.images_per_category=4",
              "--set", "eval.final_images_per_category=4", "--set", "model.lora_rank=4"],
    "eval": ["--steps", "2", "--images-per-category", "4"],
    "sample": ["--steps", "2", "--num", "2"],
    "merge-lora": [],
}


def walkthrough_commands() -> list[str]:
    """The README's "Your own model" code block, one command per entry (backslash continuations joined)."""
    text = README.read_text()
    block = text[text.index(WALKTHROUGH_MARKER):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [command.strip() for command in block.replace("\\\n", " ").splitlines() if command.strip()]


def test_the_readme_walkthrough_runs_on_a_tiny_pipeline(sd3_dir, tmp_path, monkeypatch, capsys):
    """Shell lines (variables, printf) run in bash; dgpo commands in-process, with $VARIABLES expanded and the
    model variable pointing at the tiny pipeline."""
    commands = walkthrough_commands()
    assert [c.split()[1] for c in commands if c.startswith("dgpo ")] == ["train", "eval", "sample", "merge-lora"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    variables = {"MODEL": str(sd3_dir)}
    for command in commands:
        if command.startswith("dgpo "):
            args = shlex.split(command)[1:]
            for name, value in variables.items():
                args = [a.replace(f"${name}", value) for a in args]
            assert main([*args, *TINY[args[0]]]) == 0, command
        elif re.fullmatch(r"[A-Z_]+=\S+(\s+#.*)?", command):
            continue  # the README's placeholder for the user's model: the test's is in `variables`
        else:
            subprocess.run(["bash", "-c", command], check=True, cwd=tmp_path)
    printed = capsys.readouterr().out
    assert "held-out prompts (eval.prompts), before -> after" in printed and "report:  runs/mine/report.md" in printed
    evaluation = json.loads((tmp_path / "runs" / "mine" / "eval.json").read_text())
    assert evaluation["adapter"] == "runs/mine" and set(evaluation["rewards"]) == {"jpeg_incompressibility", "jpeg_compressibility"}
    assert (tmp_path / "cat.png").is_file() and (tmp_path / "my-sd3-tuned" / "model_index.json").is_file()
