"""Tests of the run configuration: defaults, YAML recipes, dotted overrides, validation, help."""
from __future__ import annotations

import dataclasses

import pytest

from dgpo.train.config import Config, ConfigError, config_help, load_config, save_config


def _error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, f"ConfigError must be one line, got {message!r}"
    return message


def _write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- defaults and recipes


def test_defaults_validate_and_equal_load_without_recipe():
    config = Config()
    assert config.validate() is config
    loaded = load_config()
    assert loaded == Config()
    assert loaded.to_dict() == Config().to_dict()


def test_yaml_recipe_sets_fields_and_keeps_other_defaults(tmp_path):
    path = _write(
        tmp_path,
        "data:\n  group_size: 6\n  micro_batch: 12\n"
        "loss:\n  beta: 50\n  t_min: 0.3\n"
        "model:\n  lora_targets: [to_q, to_v]\n"
        "reward:\n  weights: {shapes_partial: 1, jpeg_compressibility: 0.25}\n"
        "optim:\n  betas: [0.8, 0.95]\n"
        "run:\n  tensorboard: false\n",
    )
    config = load_config(path)
    assert config.data.group_size == 6 and config.data.micro_batch == 12
    assert config.loss.beta == 50.0 and isinstance(config.loss.beta, float)
    assert config.loss.t_min == 0.3
    assert config.model.lora_targets == ["to_q", "to_v"]
    assert config.reward.weights == {"shapes_partial": 1.0, "jpeg_compressibility": 0.25}
    assert all(isinstance(v, float) for v in config.reward.weights.values())
    assert config.optim.betas == (0.8, 0.95) and isinstance(config.optim.betas, tuple)
    assert config.run.tensorboard is False
    # untouched fields keep their defaults
    defaults = Config()
    assert config.data.groups_per_step == defaults.data.groups_per_step
    assert config.loss.t_max == defaults.loss.t_max
    assert config.rollout == defaults.rollout


def test_empty_recipe_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()


def test_overrides_apply_after_recipe(tmp_path):
    path = _write(tmp_path, "loss:\n  beta: 10\n  timesteps: 3\n")
    config = load_config(path, ["loss.beta=50"])
    assert config.loss.beta == 50.0
    assert config.loss.timesteps == 3
    # later overrides win over earlier ones
    assert load_config(path, ["loss.beta=50", "loss.beta=7"]).loss.beta == 7.0


@pytest.mark.parametrize(
    "override, section, name, expected, kind",
    [
        ("loss.beta=50", "loss", "beta", 50.0, float),
        ("optim.lr=1e-4", "optim", "lr", 1e-4, float),  # YAML 1.1 reads 1e-4 as a string
        ("data.group_size=6", "data", "group_size", 6, int),
        ("run.seed= 17 ", "run", "seed", 17, int),
        ("run.tensorboard=false", "run", "tensorboard", False, bool),
        ("run.tensorboard=true", "run", "tensorboard", True, bool),
        ("model.lora_targets=[to_q, to_k]", "model", "lora_targets", ["to_q", "to_k"], list),
        ("model.lora_targets=[]", "model", "lora_targets", [], list),
        (
            "reward.weights={shapes_partial: 2, jpeg_compressibility: 0.5}",
            "reward",
            "weights",
            {"shapes_partial": 2.0, "jpeg_compressibility": 0.5},
            dict,
        ),
        ("optim.betas=[0.8, 0.95]", "optim", "betas", (0.8, 0.95), tuple),
        ("run.output_dir=runs/a=b", "run", "output_dir", "runs/a=b", str),
        ("data.prompts=shapes:test", "data", "prompts", "shapes:test", str),
        ("run.wandb_project=", "run", "wandb_project", "", str),
        ("model.mixed_precision=bf16", "model", "mixed_precision", "bf16", str),
    ],
)
def test_override_type_coercion(override, section, name, expected, kind):
    value = getattr(getattr(load_config(None, [override]), section), name)
    assert value == expected
    assert type(value) is kind


def test_override_coerces_items_inside_containers():
    config = load_config(None, ["optim.betas=[0, 0.99]", "reward.weights={shapes_partial: 3}"])
    assert config.optim.betas == (0.0, 0.99) and all(type(b) is float for b in config.optim.betas)
    assert type(config.reward.weights["shapes_partial"]) is float


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("lss.beta=1", ["lss", "did you mean 'loss'"]),
        ("loss.bta=1", ["bta", "did you mean 'beta'"]),
        ("data.grup_size=4", ["grup_size", "did you mean 'group_size'"]),
    ],
)
def test_unknown_key_has_did_you_mean(override, must_contain):
    message = _error(overrides=[override])
    for text in must_contain:
        assert text in message


def test_unknown_key_without_close_match_lists_known_keys():
    message = _error(overrides=["loss.zzzzzzzz=1"])
    assert "zzzzzzzz" in message
    assert "did you mean" not in message
    assert "beta" in message and "t_min" in message  # the known keys of the section


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.group_size=abc", "data.group_size"),  # string for an int
        ("data.group_size=true", "data.group_size"),  # bool for an int
        ("data.group_size=2.5", "data.group_size"),
        ("run.seed=[1]", "run.seed"),
        ("loss.beta=high", "loss.beta"),
        ("loss.beta=true", "loss.beta"),  # bool for a float
        ("loss.beta=[1]", "loss.beta"),
        ("run.tensorboard=maybe", "run.tensorboard"),
        ("run.tensorboard=3", "run.tensorboard"),
        ("run.output_dir=[a, b]", "run.output_dir"),
        ("model.lora_targets=to_q", "model.lora_targets"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.betas=0.9", "optim.betas"),
        ("optim.betas=[0.9, x]", "optim.betas[1]"),
        ("reward.weights=[shapes_partial]", "reward.weights"),
        ("reward.weights={shapes_partial: heavy}", "reward.weights.shapes_partial"),
    ],
)
def test_wrong_type_is_one_line_error_naming_the_key(override, key):
    message = _error(overrides=[override])
    assert key in message


@pytest.mark.parametrize(
    "overrides, must_contain",
    [
        (["data.group_size=1"], ["data.group_size", "1"]),
        (["data.group_size=0"], ["data.group_size"]),
        (["data.groups_per_step=0"], ["data.groups_per_step"]),
        (["data.micro_batch=0"], ["data.micro_batch"]),
        (["data.text_dropout=1.0"], ["data.text_dropout"]),
        (["data.text_dropout=-0.1"], ["data.text_dropout"]),
        (["loss.t_min=0.8", "loss.t_max=0.8"], ["t_min", "t_max"]),
        (["loss.t_min=0.9", "loss.t_max=0.5"], ["t_min", "t_max"]),
        (["loss.t_max=1.5"], ["t_max"]),
        (["loss.t_min=-0.1"], ["t_min"]),
        (["optim.lr=-1e-4"], ["optim.lr"]),
        (["optim.lr=0"], ["optim.lr"]),
        (["optim.decay_steps=-1"], ["optim.decay_steps"]),
        (["run.max_steps=100", "optim.decay_steps=101"], ["optim.decay_steps", "run.max_steps (100)"]),
        (["reward.std_mode=median"], ["reward.std_mode", "median"]),
        (["loss.grid_points=11"], ["loss.grid_points", "10"]),
        (["rollout.num_steps=3"], ["loss.grid_points"]),  # default grid_points 5 > 3 steps
        (["loss.grid_points=0"], ["loss.grid_points"]),
        (["loss.beta=0"], ["loss.beta"]),
        (["loss.timesteps=0"], ["loss.timesteps"]),
        (["loss.timestep_mode=random"], ["loss.timestep_mode", "random"]),
        (["loss.kl_beta=-0.1"], ["loss.kl_beta"]),
        (["rollout.num_steps=0"], ["rollout.num_steps"]),
        (["rollout.shift=0"], ["rollout.shift"]),
        (["rollout.guidance_scale=0.5"], ["rollout.guidance_scale"]),
        (["rollout.ema_decay=1"], ["rollout.ema_decay"]),
        (["eval.ema_decay=1"], ["eval.ema_decay"]),
        (["model.lora_rank=-1"], ["model.lora_rank"]),
        (["model.mixed_precision=fp8"], ["model.mixed_precision", "fp8"]),
        (["rollout.mixed_precision=fp8"], ["rollout.mixed_precision", "fp8"]),
        (["run.max_steps=-1"], ["run.max_steps"]),
        (["run.max_steps=0"], ["run.max_steps must be >= 1", "dgpo eval"]),
        (["run.keep_checkpoints=0"], ["run.keep_checkpoints"]),
        (["reward.weights={}"], ["reward.weights", "empty"]),
        (["reward.weights={shapes_partial: 1, shapes_strict: -1}"], ["reward.weights", "zero"]),
    ],
)
def test_out_of_range_is_one_line_error_naming_the_key(overrides, must_contain):
    message = _error(overrides=overrides)
    for text in must_contain:
        assert text in message


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.group_size=2"],
        ["loss.t_min=0", "loss.t_max=1"],
        ["data.text_dropout=0"],
        ["loss.grid_points=10"],
        ["rollout.num_steps=1", "loss.grid_points=1"],
        ["reward.std_mode=global"],
        ["reward.std_mode=none"],
        ["loss.timestep_mode=grid"],
        ["run.max_steps=1"],
        ["reward.weights={shapes_partial: 1, jpeg_compressibility: -0.5}"],
    ],
)
def test_boundary_values_are_accepted(overrides):
    load_config(None, overrides)


def test_range_checks_also_apply_to_recipes(tmp_path):
    path = _write(tmp_path, "data:\n  group_size: 1\n")
    assert "data.group_size" in _error(path)


def test_unknown_key_in_recipe_has_did_you_mean(tmp_path):
    message = _error(_write(tmp_path, "loss:\n  bta: 5\n"))
    assert "bta" in message and "did you mean 'beta'" in message
    message = _error(_write(tmp_path, "optimiser:\n  lr: 1\n"))
    assert "optimiser" in message and "did you mean 'optim'" in message


def test_recipe_section_must_be_a_mapping(tmp_path):
    message = _error(_write(tmp_path, "loss: 5\n"))
    assert "loss" in message


def test_recipe_must_be_a_mapping(tmp_path):
    message = _error(_write(tmp_path, "- loss\n- data\n"))
    assert "mapping" in message


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = _error(path)
    assert "not found" in message and str(path) in message


def test_invalid_yaml(tmp_path):
    path = _write(tmp_path, "loss:\n  beta: [1, 2\n  t_min: 0.3\n")
    message = _error(path)
    assert "YAML" in message and str(path) in message


@pytest.mark.parametrize("text", ["loss.beta", "loss.beta 50", "beta=50", ""])
def test_malformed_override(text):
    message = _error(overrides=[text])
    assert "section.field=value" in message
    assert repr(text) in message


# ----------------------------------------------------------------------------- save / help


def test_save_then_load_round_trips(tmp_path):
    config = load_config(
        None,
        [
            "loss.beta=42",
            "data.group_size=6",
            "data.micro_batch=12",
            "model.lora_targets=[to_q, to_k]",
            "reward.weights={shapes_partial: 1, jpeg_compressibility: 0.5}",
            "optim.betas=[0.85, 0.99]",
            "run.tensorboard=false",
            "run.output_dir=runs/x",
            "model.mixed_precision=bf16",
        ],
    )
    path = tmp_path / "saved.yaml"
    save_config(config, path)
    loaded = load_config(path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded == config
    # and the defaults round-trip too (they include string 'no' and tuple betas)
    save_config(Config(), path)
    assert load_config(path).to_dict() == Config().to_dict()


def test_config_help_mentions_every_field_with_its_help():
    text = config_help()
    lines = text.splitlines()
    for section in dataclasses.fields(Config):
        assert f"{section.name}:" in lines
        for f in dataclasses.fields(section.default_factory()):
            assert any(line.startswith(f"  {f.name} = ") for line in lines), f"{section.name}.{f.name} missing"
            assert f.metadata["help"] in text


# YAML 1.1 reads a bare `no` as False; text fields must still get the word.


def test_mixed_precision_no_via_override():
    assert load_config(None, ["model.mixed_precision=no"]).model.mixed_precision == "no"


def test_text_field_override_is_taken_verbatim():
    assert load_config(None, ["run.output_dir=true"]).run.output_dir == "true"


def test_mixed_precision_no_in_recipe(tmp_path):
    path = _write(tmp_path, "model:\n  mixed_precision: no\n")
    assert load_config(path).model.mixed_precision == "no"


def test_reward_options_are_mappings_for_weighted_rewards():
    config = load_config(None, ["reward.weights={ocr: 1.0}", "reward.options={ocr: {lang: eng}}"])
    assert config.reward.options == {"ocr": {"lang": "eng"}}
    with pytest.raises(ConfigError, match="reward.options names rewards without a weight.*clip_score"):
        load_config(None, ["reward.options={clip_score: {model: x}}"])
    with pytest.raises(ConfigError, match="reward.options.ocr must be a mapping"):
        load_config(None, ["reward.weights={ocr: 1.0}", "reward.options={ocr: eng}"])


def test_recipe_inherits_another_and_overrides_a_few_fields(tmp_path):
    (tmp_path / "base.yaml").write_text("loss:\n  beta: 50\n  t_min: 0.4\ndata:\n  group_size: 8\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("inherit: ../base.yaml\nloss:\n  t_min: 0.0\n")
    config = load_config(tmp_path / "sub" / "child.yaml", ["data.group_size=6"])
    assert (config.loss.beta, config.loss.t_min, config.data.group_size) == (50, 0.0, 6)


def test_recipe_inheritance_loop_and_missing_parent_are_clear_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("inherit: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*inherited by"):
        load_config(tmp_path / "c.yaml")
