"""Launch configs the trainer does not honour are refused in one line before any model loads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dgpo.cli import main

REPO = Path(__file__).resolve().parents[1]
REFUSAL = ("dgpo: error: the accelerate launch config asks for {}, which dgpo does not take from accelerate (it would train unsharded); "
           "launch with a MULTI_GPU config such as configs/accelerate/multi_gpu.yaml and set model.sharding: fsdp2 to shard the model")


def train_args(tmp_path: Path) -> list[str]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run: {tensorboard: false}\n")
    # A model path that does not exist: the refusal must come before the model is loaded.
    return ["train", str(recipe), "--set", "model.path=/no/such/model", "--set", f"run.output_dir={tmp_path / 'run'}"]


@pytest.mark.parametrize("name, flag", [("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")])
def test_sharded_launch_env_is_a_one_line_error(name, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(flag, "true")  # what `accelerate launch` sets from a config with distributed_type FSDP / DEEPSPEED
    assert main(train_args(tmp_path)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [REFUSAL.format(name)]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_accelerate_launch_with_an_fsdp_config_stops_every_process(tmp_path):
    """On a CPU build accelerate itself ignores FSDP (it runs the processes as MULTI_CPU): only the trainer's check stops them."""
    config = tmp_path / "fsdp.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\nnum_processes: 2\nmixed_precision: 'no'\n"
                      "fsdp_config: {fsdp_version: 2, fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, fsdp_state_dict_type: FULL_STATE_DICT}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", str(29700 + os.getpid() % 1000),
           "-m", "dgpo.cli", *train_args(tmp_path)]
    result = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).splitlines()
    # The launcher tears the other process down once one fails, so it may not live to print the refusal too;
    # a process that got past the check would instead fail to load the (missing) model.
    assert any(line.endswith(REFUSAL.format("FSDP")) for line in lines), result.stderr[-3000:]
    assert not any("/no/such/model" in line for line in lines), result.stderr[-3000:]
