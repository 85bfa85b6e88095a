"""Memory options: bitsandbytes' 8-bit AdamW (trains, resumes exactly, a one-line error when absent)."""
from __future__ import annotations

import sys

import pytest
import torch
from test_train import tiny_overrides, trainable_state

from dgpo.cli import main
from dgpo.train.config import load_config
from dgpo.train.loop import Trainer

# Rank 128 on the tiny model's 32-wide projections: every LoRA matrix has 4096 elements, the size from
# which AdamW8bit keeps its moments in 8 bits (smaller tensors keep 32-bit moments).
ADAMW8BIT = {"optim.optimizer": "adamw8bit", "model.lora_rank": 128}


def test_adamw8bit_trains_with_8bit_state_and_resumes_exactly(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    straight = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "a", **ADAMW8BIT, **{"run.max_steps": 3})))
    before = trainable_state(straight)
    straight.train()
    assert type(straight.optimizer).__name__ == "AdamW8bit"
    assert sum(not torch.equal(before[n], p) for n, p in straight.trainable) >= len(before) // 2
    states = [straight.optimizer.state[p] for _, p in straight.trainable]
    assert all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in states)

    first = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "b", **ADAMW8BIT, **{"run.max_steps": 2})))
    first.train()
    resumed = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "b", **ADAMW8BIT, **{"run.max_steps": 3})))
    resumed.train(resume=True)
    for name, value in trainable_state(straight).items():
        assert torch.equal(value, trainable_state(resumed)[name]), name
    for (_, p), (_, q) in zip(straight.trainable, resumed.trainable):
        a, b = straight.optimizer.state[p], resumed.optimizer.state[q]
        assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    assert [h["reward_mean"] for h in straight.counters.history] == [h["reward_mean"] for h in resumed.counters.history]


def test_adamw8bit_without_bitsandbytes_is_a_one_line_error_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim: {optimizer: adamw8bit}\n")
    assert main(["train", str(recipe), "--set", "model.path=/no/such/model", "--set", f"run.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["dgpo: error: optim.optimizer=adamw8bit needs bitsandbytes, which is not installed (pip install bitsandbytes)"]


def test_unknown_optimizer_is_a_config_error():
    from dgpo.train.config import ConfigError

    with pytest.raises(ConfigError, match="optim.optimizer must be adamw or adamw8bit, got 'adam8bit'"):
        load_config(None, ["optim.optimizer=adam8bit"])
