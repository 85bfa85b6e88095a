"""The timing benchmarks of benchmarks/ on the tiny model: gpu_sd35m_step.py and gpu_fsdp2_step.py time the trainer's own
rollout and update (their code path runs here); dgpo_shapes_cpu.py resumes a seed only under the config its checkpoints
were trained with."""
from __future__ import annotations

import json

import pytest
from helpers import load_benchmark

from dgpo.train.config import load_config, save_config


def test_gpu_step_benchmark_runs_the_trainer_on_the_tiny_model(tmp_path):
    benchmark = load_benchmark()
    summary = benchmark.main(["--tiny", "--repeats", "1", "--results", str(tmp_path / "result.json")])
    assert json.loads((tmp_path / "result.json").read_text()) == summary
    assert summary["group_size"] == 4 and summary["rollout_seconds_per_group"] > 0 and summary["update_seconds_per_group"] > 0
    assert "Trainer" in summary["code"]


def test_time_step_moves_the_weights(tmp_path):
    benchmark = load_benchmark()
    args = benchmark.argparse.Namespace(tiny=True, group_size=4, timesteps=1, lora_rank=4, repeats=0)
    trainer = benchmark.build_trainer(args, tmp_path)
    before = [p.detach().clone() for _, p in trainer.policy.trainable]
    rollout_seconds, update_seconds = benchmark.time_step(trainer, 0)
    assert rollout_seconds > 0 and update_seconds > 0
    assert any(not (a == p).all() for a, (_, p) in zip(before, trainer.policy.trainable))


def test_fsdp2_benchmark_runs_every_mode_on_the_tiny_model(tmp_path):
    import torch.distributed as dist

    module = load_benchmark("gpu_fsdp2_step")
    try:
        summary = module.main(["--tiny", "--repeats", "1", "--results", str(tmp_path / "result.json")])
    finally:
        # The sharded modes made this process a one-member process group; later tests expect none.
        if dist.is_initialized():
            dist.destroy_process_group()
    assert json.loads((tmp_path / "result.json").read_text()) == summary
    assert list(summary["modes"]) == ["lora", "fsdp2-full", "fsdp2-full-offload"]
    assert all(mode["step_seconds_per_group"] > 0 for mode in summary["modes"].values())


def test_a_seed_trained_under_another_recipe_is_refused_naming_what_changed(tmp_path):
    benchmark = load_benchmark("dgpo_shapes_cpu")
    trained = load_config(benchmark.RECIPE, ["run.seed=1"])
    save_config(trained, tmp_path / "config.yaml")
    benchmark.refuse_another_config(tmp_path, load_config(benchmark.RECIPE, ["run.seed=1"]))
    edited = load_config(benchmark.RECIPE, ["run.seed=1", "model.lora_rank=0", "optim.lr=1e-4"])
    with pytest.raises(SystemExit, match=r"another config \(model.lora_rank, optim.lr\); move it aside"):
        benchmark.refuse_another_config(tmp_path, edited)
