"""model.sharding=fsdp2 on CPU ranks (gloo): 2 sharded ranks train like 1 unsharded process, hold about half the
bytes, checkpoint shards that resume on 2 ranks and on 1, and stop together when one rank fails.

One torchrun launch trains every sharded configuration in turn (a launch costs more than a tiny run)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from diffusers import SD3Transformer2DModel
from helpers import FLOW_GRPO, held_bytes, start_training, tiny_overrides, train_on_two_processes, whole_state, write_recipe
from safetensors.torch import load_file

from dgpo.errors import UserError
from dgpo.train.config import ConfigError, load_config
from dgpo.train.loop import Trainer, refuse_sharded_launch

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux")

VARIANTS = {
    "lora-dgpo": {},
    # A clip far below the gradient norm: each rank must clip by the global norm, not its shards'.
    "full-dgpo": {"model.lora_rank": 0, "optim.grad_clip": 1e-3},
    "lora-flow-grpo": FLOW_GRPO,
    "full-flow-grpo": {**FLOW_GRPO, "model.lora_rank": 0},
}
REWARD = {"reward.weights": {"test_brightness": 1.0}}


def sharded(model_dir, output_dir, variant: dict, **extra) -> list[str]:
    return tiny_overrides(model_dir, output_dir, **{"data.micro_batch": 2, "model.sharding": "fsdp2", **REWARD, **variant, **extra})


def unsharded_run(model_dir, output_dir, variant: dict) -> tuple[Trainer, dict]:
    trainer = Trainer(load_config(None, tiny_overrides(model_dir, output_dir, **{"data.micro_batch": 4, **REWARD, **variant})), log=lambda *a: None)
    trainer.train()
    return trainer, whole_state(trainer)


def assert_same_training(sharded_state: dict, expected: dict) -> None:
    for key in ("params", "rollout_ema", "eval_ema"):
        assert sharded_state[key].keys() == expected[key].keys()
        for name, value in expected[key].items():
            # Adam normalises each element's step, so near-zero gradients turn last-bit differences into ~1e-6 ones.
            torch.testing.assert_close(sharded_state[key][name], value, rtol=1e-4, atol=1e-5, msg=f"{key}/{name}")
    for got, want in zip(sharded_state["history"], expected["history"], strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tmp_path_factory):
    """Every variant trained on 2 sharded ranks; then the LoRA DGPO run resumed from its step-1 checkpoint on 2 ranks."""
    tmp = tmp_path_factory.mktemp("sharded")
    jobs = [{"name": name, "overrides": sharded(tiny_model_dir, tmp / name, variant)} for name, variant in VARIANTS.items()]
    jobs.append({"name": "resumed-on-2", "overrides": sharded(tiny_model_dir, tmp / "resumed-on-2", {}),
                 "resume_from": str(first_checkpoint(tmp))})
    return tmp, train_on_two_processes(jobs, tmp)


def first_checkpoint(tmp: Path) -> Path:
    return tmp / "lora-dgpo" / "checkpoints" / "step-00000001"


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_sharded_ranks_train_like_one_unsharded_process(two_ranks, tiny_model_dir, tmp_path, variant):
    _, expected = unsharded_run(tiny_model_dir, tmp_path, VARIANTS[variant])
    assert_same_training(two_ranks[1][variant], expected)


@pytest.mark.parametrize("variant", ["lora-dgpo", "full-dgpo"])
def test_each_rank_holds_about_half_the_weights_and_optimizer_state(two_ranks, tiny_model_dir, tmp_path, variant):
    trainer, _ = unsharded_run(tiny_model_dir, tmp_path, VARIANTS[variant])
    param_bytes, optimizer_bytes = held_bytes(trainer)
    for rank_params, rank_optimizer in two_ranks[1][variant]["bytes"]:
        # Shards of an odd-sized dimension are padded, hence "about".
        assert 0.45 < rank_params / param_bytes < 0.56
        assert 0.45 < rank_optimizer / optimizer_bytes < 0.56


@pytest.mark.parametrize("variant", ["lora-dgpo", "full-dgpo"])
def test_the_export_gathers_the_shards_into_diffusers_formats(two_ranks, tiny_model_dir, tmp_path, variant):
    trainer, _ = unsharded_run(tiny_model_dir, tmp_path, VARIANTS[variant])
    trainer.export_adapter(tmp_path / "adapter")
    for folder in ("adapter", "adapter_ema"):
        (gathered,), (whole,) = (list((root / folder).glob("*.safetensors")) for root in (two_ranks[0] / variant, tmp_path))
        assert gathered.name == whole.name
        gathered, whole = load_file(gathered), load_file(whole)
        assert gathered.keys() == whole.keys()
        for name, value in whole.items():
            torch.testing.assert_close(gathered[name], value, rtol=1e-4, atol=1e-5, msg=name)
    if variant == "full-dgpo":
        loaded = SD3Transformer2DModel.from_pretrained(two_ranks[0] / variant / "adapter")
        assert {**loaded.config, "_name_or_path": ""} == {**trainer.policy.model.transformer.config, "_name_or_path": ""}


def test_a_sharded_checkpoint_resumes_on_two_ranks_and_on_one(two_ranks, tiny_model_dir, tmp_path):
    tmp, results = two_ranks
    _, expected = unsharded_run(tiny_model_dir, tmp_path / "straight", {})
    assert {p.name for p in first_checkpoint(tmp).iterdir()} == {"manifest.json", "sharded", "state.json"}
    assert_same_training(results["resumed-on-2"], expected)
    # One process launched without torchrun: the trainer makes its own one-member process group for FSDP2.
    (tmp_path / "one" / "checkpoints").mkdir(parents=True)
    shutil.copytree(first_checkpoint(tmp), tmp_path / "one" / "checkpoints" / "step-00000001")
    trainer = Trainer(load_config(None, sharded(tiny_model_dir, tmp_path / "one", {}, **{"data.micro_batch": 4})), log=lambda *a: None)
    try:
        trainer.train(resume=True)
        assert_same_training(whole_state(trainer), expected)
    finally:
        dist.destroy_process_group()


def test_a_rank_failing_mid_step_stops_both_with_one_sharded_checkpoint(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    process = start_training(tmp_path, recipe, out, "--set", "data.micro_batch=2", "--set", "model.sharding=fsdp2", nproc=2, fail_rank="1")
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "test_jpeg" in output and "scorer lost its weights" in output
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]
    assert (out / "checkpoints" / "step-00000001" / "sharded").is_dir()


def test_a_sharded_run_evaluates_on_every_rank_and_exports_the_gathered_adapter(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    overrides = ["data.micro_batch=2", "model.sharding=fsdp2", "run.max_steps=2", "eval.every=1", "eval.images_per_category=1"]
    process = start_training(tmp_path, recipe, out, *(arg for override in overrides for arg in ("--set", override)), nproc=2)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    assert [e["step"] for e in json.loads((out / "evals.json").read_text())] == [0, 1, 2]
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_sharding_is_validated_and_a_sharded_accelerate_launch_points_to_it(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="model.sharding must be fsdp2 or none"):
        load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"model.sharding": "fsdp"}))
    with pytest.raises(ConfigError, match=r"needs an optim.optimizer that takes sharded \(DTensor\) parameters \(adamw\), got 'adamw8bit'"):
        load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"model.sharding": "fsdp2", "optim.optimizer": "adamw8bit"}))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="model.sharding: fsdp2"):
        refuse_sharded_launch()
