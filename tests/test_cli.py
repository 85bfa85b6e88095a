"""The command line: safe run directories, plugins through --import, and which errors are one line."""
from __future__ import annotations

import json
import sys

import pytest
import torch.distributed as dist
from helpers import tiny_recipe_file

from dgpo import cli
from dgpo.cli import main
from dgpo.errors import UserError
from dgpo.rewards import REWARDS


def _run_files(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_new_run_refuses_a_directory_holding_a_run_and_overwrite_replaces_it(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = tiny_recipe_file(tmp_path, tiny_model_dir, out, **{"run.max_steps": 2})
    assert main(["train", recipe]) == 0
    before = _run_files(out)
    capsys.readouterr()
    assert main(["train", recipe, "--set", "run.max_steps=1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dgpo: error: run.output_dir") and "--resume" in error and "--overwrite" in error and "\n" not in error
    assert _run_files(out) == before, "the refused run changed the old run's files"
    assert main(["train", recipe, "--resume", "--overwrite"]) == 2
    # --overwrite: nothing of the old run survives (its step-2 checkpoint, its metrics, a stray file).
    (out / "notes.txt").write_text("from the old run")
    assert main(["train", recipe, "--overwrite", "--set", "run.max_steps=1"]) == 0
    assert not (out / "notes.txt").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


PLUGIN = '''
import numpy as np
from dgpo.rewards import register_reward

@register_reward("plugin_brightness")
def plugin_brightness():
    """Mean pixel value: a user's reward, registered from outside the package."""
    return lambda images, prompts, metadata: images.float().mean(dim=(1, 2, 3)).numpy().astype(np.float64)
'''


def test_a_reward_from_an_imported_module_trains_through_the_cli(tiny_model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_dgpo_plugin.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    out = tmp_path / "run"
    recipe = tiny_recipe_file(tmp_path, tiny_model_dir, out, **{"reward.weights": {"plugin_brightness": 1.0}, "run.max_steps": 1})
    try:
        assert main(["train", recipe]) == 2
        assert "plugin_brightness" in capsys.readouterr().err
        assert main(["train", recipe, "--import", "my_dgpo_plugin", "--overwrite"]) == 0
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert metrics[0]["reward_mean"] > 0
        assert main(["rewards", "--import", "my_dgpo_plugin"]) == 0
        assert "plugin_brightness" in capsys.readouterr().out
    finally:
        if "plugin_brightness" in REWARDS:
            REWARDS.unregister("plugin_brightness")
        sys.modules.pop("my_dgpo_plugin", None)


def test_a_missing_plugin_module_is_one_line(capsys):
    assert main(["rewards", "--import", "no_such_dgpo_plugin"]) == 2
    assert "no module named 'no_such_dgpo_plugin'" in capsys.readouterr().err


def test_user_errors_are_one_line_and_anything_else_keeps_its_traceback(monkeypatch, capsys):
    def fails_with(exc):
        def command(args):
            raise exc
        return command

    monkeypatch.setattr(cli, "cmd_rewards", fails_with(UserError("install the thing")))
    assert main(["rewards"]) == 2
    assert capsys.readouterr().err == "dgpo: error: install the thing\n"
    for unexpected in (KeyError("a bug"), RuntimeError("CUDA out of memory"), MemoryError()):
        monkeypatch.setattr(cli, "cmd_rewards", fails_with(unexpected))
        with pytest.raises(type(unexpected)):
            main(["rewards"])


def test_a_command_that_returns_leaves_the_process_group_it_ran_in(tmp_path, capsys):
    """Under torchrun a gloo group left alive at exit can abort the finished process; a command ends it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["rewards"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_an_unknown_pretraining_text_encoder_is_one_line_naming_the_known_ones(tmp_path, capsys):
    output = tmp_path / "base"
    assert main(["pretrain-shapes", "--output", str(output), "--text-encoder", "bert"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "'bert'" in error
    assert all(name in error for name in ("bidirectional", "orthogonal", "trained"))
    assert not output.exists()
