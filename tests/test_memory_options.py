"""Memory options: bitsandbytes' 8-bit AdamW (trains, resumes exactly, a one-line error when absent) and
text encoders offloaded to the CPU once the prompts are cached (later prompts still encode, identically)."""
from __future__ import annotations

import sys

import pytest
import torch
from helpers import BUILDERS, RESOLUTION, build_sd3, save_tiny, tiny_overrides, trainable_state

from dgpo.cli import main
from dgpo.models import load_model
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
    assert sum(not torch.equal(before[n], p) for n, p in straight.policy.trainable) >= len(before) // 2
    states = [straight.optimizer.state[p] for _, p in straight.policy.trainable]
    assert all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in states)

    first = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "b", **ADAMW8BIT, **{"run.max_steps": 2})))
    first.train()
    resumed = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "b", **ADAMW8BIT, **{"run.max_steps": 3})))
    resumed.train(resume=True)
    for name, value in trainable_state(straight).items():
        assert torch.equal(value, trainable_state(resumed)[name]), name
    for (_, p), (_, q) in zip(straight.policy.trainable, resumed.policy.trainable):
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

    with pytest.raises(ConfigError, match="optim.optimizer must be one of adamw, adamw8bit, got 'adam8bit'"):
        load_config(None, ["optim.optimizer=adam8bit"])


def test_an_optimizer_registered_from_outside_the_package_trains(tiny_model_dir, tmp_path):
    from dgpo.train.config import ConfigError
    from dgpo.train.optim import OPTIMIZERS, register_optimizer

    made = []

    class RecordingSGD(torch.optim.SGD):
        def __init__(self, params, lr, betas, weight_decay):
            made.append(lr)
            super().__init__(params, lr=lr, weight_decay=weight_decay)

    register_optimizer("sgd_for_test", takes_sharded_parameters=False)(lambda: RecordingSGD)
    try:
        with pytest.raises(ConfigError, match="model.sharding=fsdp2 needs an optim.optimizer that takes sharded"):
            load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"optim.optimizer": "sgd_for_test", "model.sharding": "fsdp2"}))
        trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"optim.optimizer": "sgd_for_test", "run.max_steps": 1})))
        before = trainable_state(trainer)
        trainer.train()
    finally:
        OPTIMIZERS.unregister("sgd_for_test")
    assert isinstance(trainer.optimizer, RecordingSGD) and made == [trainer.config.optim.lr]
    assert any(not torch.equal(before[n], p) for n, p in trainer.policy.trainable)


@pytest.fixture(scope="module")
def sd3_with_t5(tmp_path_factory):
    return save_tiny(lambda root: build_sd3(root, with_t5=True), tmp_path_factory.mktemp("tiny-sd3-t5"))


def test_offloaded_text_encoders_still_encode_a_new_prompt_identically(sd3_with_t5, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    overrides = {
        "model.backend": "sd3", "model.path": str(sd3_with_t5), "model.resolution": RESOLUTION, "model.lora_rank": 4,
        "model.offload_text_encoders": True, "data.prompts": str(prompts), "data.group_size": 4, "data.groups_per_step": 2,
        "data.micro_batch": 4, "rollout.num_steps": 2, "loss.grid_points": 2, "run.max_steps": 1, "run.save_every": 0,
        "run.tensorboard": False, "run.output_dir": str(tmp_path / "run"), "run.threads": 1, "reward.weights": {"jpeg_incompressibility": 1.0},
    }
    trainer = Trainer(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    encoders = trainer.policy.model.text_encoders()
    pipeline = trainer.policy.model.pipeline
    assert encoders == [pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3]
    assert all(p.device.type == "cpu" for encoder in encoders for p in encoder.parameters())
    assert set(trainer.policy.embedding_cache) == {"a red circle", "a blue square", ""}
    assert trainer.train() == 0
    new = trainer.policy.embed(["a green triangle"])  # not cached: encoded now, by the offloaded encoders
    expected = load_model("sd3", str(sd3_with_t5), RESOLUTION).encode_prompts(["a green triangle"])
    assert all(torch.equal(a, b) for a, b in zip(new, expected))


@pytest.mark.parametrize("backend", ["shapes", *sorted(BUILDERS)])
def test_prompts_are_encoded_on_the_text_encoders_device_and_returned_on_the_transformers(backend, tiny_model_dir, tmp_path):
    """With the transformer elsewhere than the text encoders (the meta device stands in for the accelerator
    the CPU-resident encoders were offloaded from), the adapter encodes where the encoders are."""
    path = tiny_model_dir if backend == "shapes" else save_tiny(BUILDERS[backend], tmp_path)
    model = load_model(backend, str(path), 0 if backend == "shapes" else RESOLUTION)
    on_cpu = model.encode_prompts(["a red circle", ""])
    model.transformer.to("meta")
    input_devices = []

    def record(module, args, kwargs):
        input_devices.extend(t.device.type for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))

    for encoder in model.text_encoders():
        encoder.register_forward_pre_hook(record, with_kwargs=True)
    elsewhere = model.encode_prompts(["a red circle", ""])
    assert input_devices and set(input_devices) == {"cpu"}
    assert all(e.device.type == "meta" and e.shape == c.shape and e.dtype == c.dtype for e, c in zip(elsewhere, on_cpu))
