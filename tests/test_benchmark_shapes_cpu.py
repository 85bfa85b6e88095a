"""benchmarks/dgpo_shapes_cpu.py resumes a seed only under the config its checkpoints were trained with."""
from __future__ import annotations

import pytest
from helpers import load_benchmark

from dgpo.train.config import load_config, save_config


def test_a_seed_trained_under_another_recipe_is_refused_naming_what_changed(tmp_path):
    benchmark = load_benchmark("dgpo_shapes_cpu")
    trained = load_config(benchmark.RECIPE, ["run.seed=1"])
    save_config(trained, tmp_path / "config.yaml")
    benchmark.refuse_another_config(tmp_path, load_config(benchmark.RECIPE, ["run.seed=1"]))
    edited = load_config(benchmark.RECIPE, ["run.seed=1", "model.lora_rank=0", "optim.lr=1e-4"])
    with pytest.raises(SystemExit, match=r"another config \(model.lora_rank, optim.lr\); move it aside"):
        benchmark.refuse_another_config(tmp_path, edited)
