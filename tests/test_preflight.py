"""`dgpo check` and `dgpo train --dry-run`: each problem it catches is one line and a non-zero exit, all problems are
reported together, no weights are read, and a good recipe passes with its memory estimate."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import build_sd3, save_tiny

from dgpo.cli import main
from dgpo.models import describe_model
from dgpo.preflight import CHECKS, MemoryEstimate, estimate_memory, lora_parameters, register_check
from dgpo.requirements import Package, Setting
from dgpo.rewards import REWARDS, register_reward
from dgpo.shapes.model import ShapesModel
from dgpo.train.config import load_config
from dgpo.train.policy import attach_trainable

SHAPES_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "shapes" / "dgpo.yaml"


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return save_tiny(build_sd3, tmp_path_factory.mktemp("preflight-sd3"))


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "train.txt"
    path.write_text("a red circle\na blue square\n")
    return path


def shapes_recipe(model: Path, tmp_path: Path, **extra) -> list[str]:
    """A tiny shapes run: 2 groups of 4 images per step, 4 images per micro-step."""
    values = {"model.path": str(model), "model.lora_rank": 4, "data.group_size": 4, "data.groups_per_step": 2, "data.micro_batch": 4,
              "run.output_dir": str(tmp_path / "run"), **extra}
    return [f"--set={key}={value}" for key, value in values.items()]


def sd3_recipe(model: Path | str, tmp_path: Path, prompts: Path, **extra) -> list[str]:
    return shapes_recipe(model, tmp_path, **{"model.backend": "sd3", "model.resolution": 32, "data.prompts": str(prompts),
                                             "reward.weights": "{jpeg_incompressibility: 1.0}", **extra})


def check(capsys, *args: str) -> tuple[int, list[str]]:
    status = main(["check", *args])
    return status, capsys.readouterr().out.splitlines()


def problems(lines: list[str]) -> list[str]:
    return [line.removeprefix("problem: ") for line in lines if line.startswith("problem: ")]


def test_a_good_tiny_recipe_passes_and_prints_the_memory_estimate(tiny_model_dir, tmp_path, capsys):
    status, lines = check(capsys, *shapes_recipe(tiny_model_dir, tmp_path))
    assert status == 0 and problems(lines) == []
    assert lines[-1] == "no problems found: the recipe is ready to train"
    assert "memory per process (estimate, 1 process):" in lines
    assert any(line.split()[0] == "total" and line.split()[2] in ("KiB", "MiB") for line in lines)


@pytest.mark.parametrize("recipe", sorted(SHAPES_RECIPE.parent.rglob("*.yaml")), ids=lambda path: path.stem)
def test_the_shipped_shapes_recipes_pass(recipe, tmp_path, capsys):
    status, lines = check(capsys, str(recipe), f"--set=run.output_dir={tmp_path / 'run'}")
    assert status == 0, lines
    assert any(line.split()[:2] == ["trainable", "state"] for line in lines)


def test_a_missing_prompt_file_is_one_line(tiny_model_dir, tmp_path, capsys):
    status, lines = check(capsys, *shapes_recipe(tiny_model_dir, tmp_path, **{"data.prompts": str(tmp_path / "missing.txt")}))
    assert status == 2
    assert problems(lines) == [f"data.prompts: prompt file not found: {tmp_path / 'missing.txt'} (or use a registered prompt source: "
                               "shapes:test / shapes:train)"]


def test_a_malformed_prompt_file_names_its_line(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a red circle"}\n{"text": "a blue square"}\n')
    status, lines = check(capsys, *shapes_recipe(tiny_model_dir, tmp_path, **{"data.prompts": str(path)}))
    assert status == 2
    assert problems(lines) == [f"data.prompts: {path}:2: expected a JSON object with a text 'prompt' field"]


def test_a_missing_eval_prompt_file_is_one_line(sd3_dir, tmp_path, prompts, capsys):
    held_out = tmp_path / "held_out.txt"
    status, lines = check(capsys, *sd3_recipe(sd3_dir, tmp_path, prompts, **{"eval.prompts": str(held_out)}))
    assert status == 2
    assert problems(lines) == [f"eval.prompts: prompt file not found: {held_out} (or use a registered prompt source: shapes:test / shapes:train)"]


def test_a_missing_model_directory_is_one_line(tiny_model_dir, tmp_path, capsys):
    status, lines = check(capsys, *shapes_recipe(tmp_path / "no-model", tmp_path))
    assert status == 2
    assert problems(lines) == [f"model.path {tmp_path / 'no-model'}: no such directory (the shapes backend loads a ShapesEval model "
                               "folder: vae/, transformer/, text_encoder/, tokenizer.json)"]
    assert "memory: not estimated (the model's transformer configuration could not be read)" in lines


def test_a_hub_id_not_in_the_local_cache_is_one_line_and_a_path_that_is_not_one_too(tmp_path, prompts, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    status, lines = check(capsys, *sd3_recipe("dgpo-test/tiny-sd3-typo", tmp_path, prompts))
    assert status == 2
    assert problems(lines) == ["model.path dgpo-test/tiny-sd3-typo: no such directory, and no hub id of that name in the local Hugging Face "
                               "cache (the check uses no network: download it first, `huggingface-cli download dgpo-test/tiny-sd3-typo`, "
                               "or give a local directory)"]
    status, lines = check(capsys, *sd3_recipe("./tiny-sd3-typo", tmp_path, prompts))
    assert status == 2 and problems(lines) == ["model.path ./tiny-sd3-typo: no such directory"]


def test_a_model_directory_without_a_components_config_is_one_line(sd3_dir, tmp_path, prompts, capsys):
    broken = tmp_path / "pipeline"
    shutil.copytree(sd3_dir, broken)
    (broken / "transformer" / "config.json").unlink()
    status, lines = check(capsys, *sd3_recipe(broken, tmp_path, prompts))
    assert status == 2
    assert problems(lines) == [f"model.path: {broken / 'transformer'} has no config.json (the SD3Transformer2DModel component's configuration)"]


def test_a_model_directory_of_another_backend_is_one_line(sd3_dir, tmp_path, capsys):
    status, lines = check(capsys, *shapes_recipe(sd3_dir, tmp_path, **{"model.backend": "flux", "reward.weights": "{jpeg_incompressibility: 1}"}))
    assert status == 2
    assert problems(lines) == [f"model.path {sd3_dir} holds a diffusers StableDiffusion3Pipeline (model_index.json), which model.backend flux "
                               "does not load; set model.backend: sd3 (--backend sd3)"]


def test_no_weights_are_read_the_check_passes_with_corrupt_weight_files(sd3_dir, tmp_path, prompts, capsys):
    corrupt = tmp_path / "pipeline"
    shutil.copytree(sd3_dir, corrupt)
    weights = [p for p in corrupt.rglob("*") if p.suffix in (".safetensors", ".bin")]
    assert weights
    for path in weights:
        path.write_bytes(b"not a weights file")
    status, lines = check(capsys, *sd3_recipe(corrupt, tmp_path, prompts))
    assert status == 0, lines
    assert any(line.strip().startswith("weights") and "transformer" in line for line in lines)


def test_the_counts_on_the_meta_device_are_those_of_the_loaded_model(tiny_model_dir):
    description = describe_model("shapes", str(tiny_model_dir), 0)
    model = ShapesModel.from_pretrained(tiny_model_dir)
    loaded = {"vae": model.vae, "transformer": model.transformer, "text_encoder": model.text_encoder}
    assert {name: description.parameters(name) for name in loaded} == {name: sum(p.numel() for p in m.parameters()) for name, m in loaded.items()}
    assert description.image_tokens == model.latent_shape[1] * model.latent_shape[2]
    config = load_config(None, ["model.lora_rank=4"])
    counted = lora_parameters(description.components["transformer"], description.lora_targets, 4)
    assert counted == sum(p.numel() for _, p in attach_trainable(model, config.model))


def test_a_reward_with_a_missing_package_and_weights_path_is_a_line_each(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DGPO_TEST_WEIGHTS", raising=False)

    @register_reward("test_needy", requires=(Package("dgpo_no_such_package", "pip install dgpo-no-such-package"),
                                             Setting("weights", "DGPO_TEST_WEIGHTS", kind="file")))
    def needy(weights: str | None = None):
        """A reward whose requirements are unmet."""
        raise AssertionError("the check must not build the reward")

    try:
        overrides = shapes_recipe(tiny_model_dir, tmp_path, **{"reward.weights": "{test_needy: 1.0}"})
        status, lines = check(capsys, *overrides)
        assert status == 2
        assert problems(lines) == [
            "reward 'test_needy' needs the Python package 'dgpo_no_such_package', which is not installed: pip install dgpo-no-such-package",
            "reward 'test_needy' needs weights: set DGPO_TEST_WEIGHTS or reward.options.test_needy.weights",
        ]
        monkeypatch.setenv("DGPO_TEST_WEIGHTS", str(tmp_path / "absent.safetensors"))
        status, lines = check(capsys, *overrides, "--set=reward.options={test_needy: {weights: " + str(tmp_path / "given.pt") + "}}")
        assert problems(lines)[1] == f"reward 'test_needy': reward.options.test_needy.weights (or $DGPO_TEST_WEIGHTS) {tmp_path / 'given.pt'} is not a file"
    finally:
        REWARDS.unregister("test_needy")


def test_an_unknown_reward_option_and_an_eval_metric_built_without_options_are_checked(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DGPO_REMOTE_URL", raising=False)
    status, lines = check(capsys, *shapes_recipe(tiny_model_dir, tmp_path, **{
        "reward.weights": "{jpeg_compressibility: 1.0}", "reward.options": "{jpeg_compressibility: {quality: 90}}", "eval.metrics": "[remote]"}))
    assert status == 2
    assert problems(lines) == [
        "reward 'jpeg_compressibility': got an unexpected keyword argument 'quality' (it takes no options)",
        "eval.metrics: reward 'remote' needs url: set DGPO_REMOTE_URL or reward.options.remote.url",
    ]


def test_groups_that_do_not_divide_among_the_processes_are_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    overrides = shapes_recipe(tiny_model_dir, tmp_path)
    status, lines = check(capsys, *overrides, "--processes=3")
    assert status == 2
    assert problems(lines) == ["process layout (data.group_size, data.groups_per_step, data.micro_batch): groups_per_step 2 is not a multiple "
                               "of the 3 groups each micro-step holds (3 x 4 images / group of 4)"]
    # train --dry-run is the same check, with the process count of the launcher
    monkeypatch.setenv("WORLD_SIZE", "2")
    status = main(["train", str(SHAPES_RECIPE), "--dry-run", *overrides, "--set=data.micro_batch=3"])
    lines = capsys.readouterr().out.splitlines()
    assert status == 2 and lines[0].endswith("on 2 processes")
    assert problems(lines) == ["process layout (data.group_size, data.groups_per_step, data.micro_batch): 2 process(es) x micro_batch 3 = 6 "
                               "images per micro-step, which does not hold whole groups of 4; choose micro_batch so that world_size * "
                               "micro_batch is a multiple of group_size"]


def test_a_run_directory_holding_a_run_is_a_problem_unless_the_run_resumes_it(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    overrides = shapes_recipe(tiny_model_dir, tmp_path)
    status, lines = check(capsys, *overrides)
    assert status == 2 and len(problems(lines)) == 1 and "already holds a run (metrics.jsonl)" in problems(lines)[0]
    assert main(["train", str(SHAPES_RECIPE), "--dry-run", "--resume", *overrides]) == 0


def test_every_problem_is_reported_not_only_the_first(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DGPO_REMOTE_URL", raising=False)
    status, lines = check(capsys, *shapes_recipe(tmp_path / "no-model", tmp_path, **{
        "data.prompts": str(tmp_path / "missing.txt"), "reward.weights": "{remote: 1.0}", "eval.guard_metric": "nonsense"}), "--processes=3")
    found = problems(lines)
    assert status == 2 and len(found) == 5, found
    assert found[0].startswith("eval.guard_metric 'nonsense' must be one of")  # the config's validation, then every check
    assert [line.split(" ")[0] for line in found[1:]] == ["process", "model.path", "data.prompts:", "reward"]
    assert lines[-1] == "5 problems: dgpo train would fail"


def test_a_plugin_registers_its_own_check(tiny_model_dir, tmp_path, capsys):
    @register_check("test_plugin")
    def plugin_check(preflight):
        return [f"test plugin: group_size {preflight.config.data.group_size}"]

    try:
        status, lines = check(capsys, *shapes_recipe(tiny_model_dir, tmp_path))
    finally:
        CHECKS.unregister("test_plugin")
    assert status == 2 and problems(lines) == ["test plugin: group_size 4"]


def test_the_memory_estimate_follows_the_recipe():
    description = describe_model("shapes", "shipped", 0)
    transformer = description.parameters("transformer")

    def estimate(*overrides: str) -> MemoryEstimate:
        return estimate_memory(load_config(None, ["data.group_size=4", "data.groups_per_step=2", *overrides]), description, 2)

    base = estimate("data.micro_batch=8")
    lora = lora_parameters(description.components["transformer"], description.lora_targets, 16)
    assert base.weights == description.parameters() * 4
    assert base.trainable == lora * (4 + 4 + 8 + 4)  # LoRA weight, gradient, AdamW moments, rollout EMA
    assert estimate("data.micro_batch=16").activations == 2 * base.activations
    assert estimate("data.micro_batch=8", "model.gradient_checkpointing=true").activations < base.activations / 2
    assert estimate("data.micro_batch=8", "model.mixed_precision=bf16").activations == base.activations / 2
    assert estimate("data.micro_batch=8", "eval.ema_decay=0.9").trainable == lora * (4 + 4 + 8 + 4 + 4)
    assert estimate("data.micro_batch=8", "optim.optimizer=adamw8bit").trainable == lora * (4 + 4 + 2 + 4)
    full = estimate("data.micro_batch=8", "model.lora_rank=0")
    assert full.trainable == transformer * (4 + 8 + 4 + 4)  # gradient, moments, EMA, reference copy
    sharded = estimate("data.micro_batch=8", "model.lora_rank=0", "model.sharding=fsdp2")
    assert sharded.trainable == full.trainable / 2 and full.weights - sharded.weights == transformer * 4 / 2


def test_the_geneval_reward_is_checked_with_the_requirements_of_the_detector_it_chooses(tiny_model_dir, tmp_path, capsys, monkeypatch):
    for variable in ("DGPO_GENEVAL_CHECKPOINT", "DGPO_GENEVAL_MODEL", "DGPO_CLIP_MODEL"):
        monkeypatch.delenv(variable, raising=False)
    local = tmp_path / "weights"
    local.mkdir()

    def geneval_problems(**options) -> list[str]:
        given = {"clip_model": str(local), **options}
        text = "{geneval: {" + ", ".join(f"{key}: {value}" for key, value in given.items()) + "}}"
        status, lines = check(capsys, *shapes_recipe(tiny_model_dir, tmp_path, **{"reward.weights": "{geneval: 1.0}", "reward.options": text}))
        assert status == (2 if problems(lines) else 0)
        return problems(lines)

    assert geneval_problems(model=str(local)) == []
    assert geneval_problems(model=str(tmp_path / "absent")) == [
        f"reward 'geneval' (detector transformers): reward.options.geneval.model (or $DGPO_GENEVAL_MODEL) {tmp_path / 'absent'}: no such directory"]
    assert "reward 'geneval' (detector mmdet) needs checkpoint: set DGPO_GENEVAL_CHECKPOINT or reward.options.geneval.checkpoint" in \
        geneval_problems(detector="mmdet")
    assert geneval_problems(detector="mmdetection", model=str(local)) == [
        "reward 'geneval': reward.options.geneval.detector: unknown GenEval detector 'mmdetection' (did you mean 'mmdet'?); available: mmdet, transformers"]
