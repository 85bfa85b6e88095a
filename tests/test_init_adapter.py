"""model.init_adapter: a run that starts its LoRA from a trained adapter starts exactly where that adapter ended, and an
adapter that does not fit the run's LoRA is one line naming the mismatch."""
import pytest
import torch
from helpers import tiny_overrides, trainable_state

from dgpo.cli import main
from dgpo.train.config import ConfigError, load_config
from dgpo.train.loop import Trainer


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A one-step run's trainer and the directory it exported its adapter to."""
    out = tmp_path_factory.mktemp("init-adapter")
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, out / "run", **{"run.max_steps": 1})))
    trainer.train()
    trainer.export_adapter(out / "adapter")
    return trainer, out / "adapter"


def test_a_run_starts_from_the_adapter_whatever_its_seed_and_trains_on_from_there(trained, tiny_model_dir, tmp_path):
    source, adapter = trained
    ended = trainable_state(source)
    fresh = trainable_state(Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "fresh", **{"run.seed": 7}))))
    continued = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "continued", **{"run.seed": 7, "run.max_steps": 1,
                                                                                                   "model.init_adapter": str(adapter)})))
    started = trainable_state(continued)
    assert started.keys() == ended.keys()
    for name in ended:
        torch.testing.assert_close(started[name], ended[name], rtol=0, atol=0)
    assert any(not torch.equal(fresh[name], ended[name]) for name in ended)
    continued.train()
    assert any(not torch.equal(trainable_state(continued)[name], ended[name]) for name in ended)


@pytest.mark.parametrize("setting, message", [
    ({"model.lora_rank": 8}, "has shape (4, "),
    ({"model.lora_alpha": 4.0}, "was trained with lora_alpha 32.0, this run sets model.lora_alpha 4.0"),
    ({"model.lora_targets": "[to_q, to_k]"}, "wraps other modules than this run's LoRA"),
])
def test_an_adapter_that_does_not_fit_the_runs_lora_is_one_line(trained, tiny_model_dir, tmp_path, setting, message):
    _, adapter = trained
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"model.init_adapter": str(adapter), **setting}))
    with pytest.raises(ValueError, match="model.init_adapter") as caught:
        Trainer(config)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_init_adapter_needs_a_lora(trained, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.init_adapter starts a LoRA from trained weights: it needs model.lora_rank > 0"):
        load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"model.init_adapter": str(trained[1]), "model.lora_rank": 0}))


def test_a_missing_adapter_is_one_line_in_the_check_and_in_training(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "no-adapter"
    overrides = tiny_overrides(tiny_model_dir, tmp_path / "run", **{"model.init_adapter": str(missing)})
    assert main(["check", *[f"--set={item}" for item in overrides]]) == 2
    problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith("problem: ")]
    assert problems == [f"problem: model.init_adapter: no LoRA at {str(missing)!r}: expected pytorch_lora_weights.safetensors, "
                        "a directory holding it, or a run directory with adapter/pytorch_lora_weights.safetensors"]
    with pytest.raises(FileNotFoundError, match="no LoRA at"):
        Trainer(load_config(None, overrides))
