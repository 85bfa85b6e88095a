"""Fault injection: SIGKILL and SIGTERM mid-run, double signals, a failing rank, corrupt checkpoints, bad input.

The runs are real `dgpo train` subprocesses on a tiny model; a resumed run must end with
bit-identical weights, EMAs and logged rewards to an uninterrupted run of the same length.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_RECIPE_STEPS, start_training, write_recipe

from dgpo.cli import main
from dgpo.train.checkpoint import load_checkpoint


def wait_for_checkpoint(out: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    manifest = out / "checkpoints" / f"step-{step:08d}" / "manifest.json"
    deadline = time.time() + timeout
    while not manifest.exists():
        assert process.poll() is None, process.communicate()[0][-2000:]
        assert time.time() < deadline, f"no checkpoint {manifest} after {timeout} s"
        time.sleep(0.05)


def wait_for_first_step(out: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not (out / "metrics.jsonl").exists():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)


def resume_and_compare(tmp_path: Path, recipe: Path, out: Path, expected: tuple[dict, list[float]]) -> str:
    resumed = start_training(tmp_path, recipe, out, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-2000:]
    tensors, logged = final_state(out)
    assert_identical(tensors, expected[0])
    assert logged == expected[1]
    return output


def final_state(out: Path) -> tuple[dict, list[float]]:
    tensors, _, state = load_checkpoint(out / "checkpoints" / f"step-{TINY_RECIPE_STEPS:08d}")
    logged = [json.loads(line)["reward_mean"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == [h["reward_mean"] for h in state["history"]]
    return tensors, logged


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for group in a:
        assert a[group].keys() == b[group].keys(), group
        for name in a[group]:
            assert torch.equal(a[group][name], b[group][name]), f"{group}/{name}"


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("straight")
    recipe = write_recipe(tmp_path, tiny_model_dir)
    process = start_training(tmp_path, recipe, tmp_path / "run")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-2000:]
    return final_state(tmp_path / "run")


def test_sigkill_mid_run_then_resume_is_bit_identical(uninterrupted, tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    process = start_training(tmp_path, recipe, out, delay=0.4)
    wait_for_checkpoint(out, 2, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    output = resume_and_compare(tmp_path, recipe, out, uninterrupted)
    assert "resumed from" in output
    # the EMA-rollout switch (rollout.ema_after = 2) happens inside the resumed part; both EMAs are compared
    assert {"trainable", "rollout_ema", "eval_ema"} <= uninterrupted[0].keys()


def test_sigterm_checkpoints_exits_75_and_resumes_identically(uninterrupted, tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    process = start_training(tmp_path, recipe, out, "--set", "run.save_every=0", delay=0.4)
    wait_for_first_step(out, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output[-2000:]
    assert "resume with --resume" in output
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0] < f"step-{TINY_RECIPE_STEPS:08d}"
    resume_and_compare(tmp_path, recipe, out, uninterrupted)


def test_second_signal_exits_at_once(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    process = start_training(tmp_path, recipe, out, "--set", "run.max_steps=50", delay=1.0)
    wait_for_first_step(out, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGINT


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_reward_failing_on_one_rank_stops_every_rank_with_one_checkpoint(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    process = start_training(tmp_path, recipe, out, "--set", "data.micro_batch=2", nproc=2, fail_rank="1")
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "test_jpeg" in output and "scorer lost its weights" in output
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_guard_stop_on_the_main_process_stops_every_rank(tiny_model_dir, tmp_path):
    """The guard is evaluated on the main process only; without sharing its decision the other rank trains on and hangs."""
    recipe = write_recipe(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    guard = ["eval.every=1", "eval.images_per_category=1", "eval.metrics=[jpeg_compressibility]",
             "eval.guard_metric=jpeg_compressibility", "eval.guard_max_drop=1e-9", "run.max_steps=6", "data.micro_batch=2"]
    process = start_training(tmp_path, recipe, out, *(arg for override in guard for arg in ("--set", override)), nproc=2)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-2000:]
    assert "guard: jpeg_compressibility" in output
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    assert steps < 6


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tiny_model_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, reward="jpeg_incompressibility")
    out = tmp_path / "run"
    args = ["train", str(recipe), "--set", f"run.output_dir={out}"]
    assert main([*args, "--set", "run.max_steps=2"]) == 0
    newest = out / "checkpoints" / "step-00000002" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    assert main([*args, "--set", "run.max_steps=3", "--resume"]) == 0
    log = capsys.readouterr()
    assert "step-00000002" in log.out + log.err and "resumed from" in log.out + log.err
    assert "step-00000001" in (log.out + log.err).split("resumed from")[1].splitlines()[0]


def _one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().replace("\r", "\n").splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("dgpo: error: ") and lines[-1] == errors[0], lines
    return errors[0]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["loss.betta=1"], "did you mean 'beta'"),
        (["data.group_size=four"], "data.group_size must be an integer"),
        (["loss.t_min=1.5"], "t_min"),
        (["data.group_size=3"], "group"),
        (["data.prompts=/no/such/prompts.txt"], "prompt file not found"),
        (["model.path=/no/such/model"], "not a model directory"),
        (["reward.weights={no_such_reward: 1.0}"], "unknown reward 'no_such_reward'"),
        (["reward.weights={jpeg_compressibility: 1.0, jpeg_incompressibility: -1.0}"], "sum to zero"),
        (["loss.algorithm=dgop"], "did you mean 'dgpo'"),
        (["reward.advantage=rnak"], "did you mean 'rank'"),
        (["eval.guard_metric=aesthetics"], "eval.guard_metric 'aesthetics' must be"),
        (["eval.metrics=[no_such_metric]"], "unknown reward 'no_such_metric'"),
        (["reward.max_invalid_fraction=1.5"], "reward.max_invalid_fraction"),
    ],
)
def test_bad_input_is_a_one_line_error_before_training(overrides, expected, tiny_model_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, reward="jpeg_incompressibility")
    out = tmp_path / "run"
    args = ["train", str(recipe), "--set", f"run.output_dir={out}"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 2
    assert expected in _one_line_error(capsys)
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("content, expected", [("", "is empty"), ("a photo of " + "red " * 30 + "circle\n", "text encoder accepts at most")])
def test_bad_prompt_files_are_one_line_errors(content, expected, tiny_model_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, reward="jpeg_incompressibility")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(content)
    args = ["train", str(recipe), "--set", f"run.output_dir={tmp_path / 'run'}", "--set", f"data.prompts={prompts}"]
    assert main(args) == 2
    assert expected in _one_line_error(capsys)
