"""benchmarks/gpu_sd35m_step.py times the trainer's own rollout and update: its code path runs on the tiny model."""
from __future__ import annotations

import json

from helpers import load_benchmark


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
    before = [p.detach().clone() for _, p in trainer.trainable]
    rollout_seconds, update_seconds = benchmark.time_step(trainer, 0)
    assert rollout_seconds > 0 and update_seconds > 0
    assert any(not (a == p).all() for a, (_, p) in zip(before, trainer.trainable))


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
