"""Prompt samplers (data.prompt_sampling): uniform draws as before; preference draws shift towards the categories whose
groups carry a preference and keep a floor; draws are a pure function of (seed, step, state); the state resumes
exactly from a checkpoint; 1 and 2 processes draw the same prompts; a sampler registered from outside trains."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides

from dgpo.train.config import ConfigError, load_config
from dgpo.train.data import Prompt, PromptSource
from dgpo.train.loop import Trainer
from dgpo.train.prompt_sampling import (
    LOGGED_CATEGORIES,
    PROMPT_SAMPLERS,
    PreferenceSampler,
    PromptSampler,
    UniformSampler,
    informative_groups,
    register_prompt_sampler,
    sampling_metrics,
)
from dgpo.train.sections import DataConfig

REPO = Path(__file__).resolve().parents[1]


def source(categories: dict[str, int]) -> PromptSource:
    return PromptSource([Prompt(f"{category} {i}", {"category": category}) for category, n in categories.items() for i in range(n)], "test")


def texts(prompts: list[Prompt]) -> list[str]:
    return [p.text for p in prompts]


# ----------------------------------------------------------------------------- the samplers alone


@pytest.mark.parametrize("seed, expected", [(0, [[2, 0, 1], [3, 4, 0], [2, 4, 3], [1, 2, 4]]), (7, [[2, 0, 3], [1, 4, 0], [1, 2, 4], [3, 0, 3]])])
def test_uniform_draws_the_same_prompts_as_before_prompt_samplers(seed, expected):
    """The indices PromptSource.for_step drew at commit 145cd1e, before samplers existed."""
    prompts = PromptSource([Prompt(f"p{i}", {}) for i in range(5)], "test")
    sampler = UniformSampler(prompts, DataConfig())
    sampler.observe(["p0", "p1", "p2"], [True, False, True])  # uniform ignores what the groups carried
    assert [[int(p.text[1:]) for p in sampler.draw(seed, step, 3)] for step in range(4)] == expected


def test_informative_groups_are_those_with_two_unequal_finite_rewards():
    nan = float("nan")
    rewards = torch.tensor([[1.0, 1, 1, 1], [1, 2, 1, 1], [nan, 1, 1, 1], [nan, 1, 2, nan], [nan, nan, nan, 3], [nan, nan, nan, nan]])
    assert informative_groups(rewards).tolist() == [False, True, False, True, False, False]


def run_sampler(sampler: PromptSampler, steps: int, count: int, informative_category: str, seed: int = 0) -> list[list[Prompt]]:
    """Draw ``steps`` steps, observing that only ``informative_category``'s groups carry a preference."""
    draws = []
    for step in range(steps):
        prompts = sampler.draw(seed, step, count)
        categories = [p.metadata["category"] for p in prompts]
        sampler.observe(categories, [c == informative_category for c in categories])
        draws.append(prompts)
    return draws


def test_preference_shifts_draws_to_the_category_with_reward_variance_and_keeps_the_floor():
    floor = 0.1
    config = DataConfig(prompt_sampling="preference", prompt_sampling_floor=floor, prompt_sampling_decay=0.8)
    sampler = PreferenceSampler(source({"saturated": 6, "open": 2}), config)
    assert sampler.weights() == pytest.approx({"open": 0.25, "saturated": 0.75})  # before any group: the uniform shares
    draws = run_sampler(sampler, steps=40, count=8, informative_category="open")
    weights = sampler.weights()
    assert weights["saturated"] >= floor * 0.75
    assert weights["saturated"] == pytest.approx(floor * 0.75, abs=0.01)
    assert weights["open"] > 0.9
    late = Counter(p.metadata["category"] for step in draws[20:] for p in step)
    assert late["open"] / sum(late.values()) > 0.8
    assert late["saturated"] > 0  # the floor keeps drawing it


def test_a_floor_of_one_draws_categories_at_their_uniform_shares():
    sampler = PreferenceSampler(source({"saturated": 6, "open": 2}), DataConfig(prompt_sampling="preference", prompt_sampling_floor=1.0))
    run_sampler(sampler, steps=10, count=8, informative_category="open")
    assert sampler.weights() == pytest.approx({"open": 0.25, "saturated": 0.75})


def test_within_a_category_every_prompt_comes_once_per_pass():
    sampler = PreferenceSampler(source({"only": 3, "other": 1}), DataConfig(prompt_sampling="preference"))
    draws = [p.text for step in run_sampler(sampler, steps=40, count=1, informative_category="only") for p in step if p.metadata["category"] == "only"]
    passes = len(draws) // 3
    assert passes >= 5
    for start in range(0, 3 * passes, 3):
        assert sorted(draws[start : start + 3]) == ["only 0", "only 1", "only 2"]


def test_preference_draws_are_a_pure_function_of_seed_step_and_state():
    config = DataConfig(prompt_sampling="preference", prompt_sampling_decay=0.5)
    trained = PreferenceSampler(source({"a": 3, "b": 2, "c": 4}), config)
    run_sampler(trained, steps=6, count=4, informative_category="b")
    restored = PreferenceSampler(source({"a": 3, "b": 2, "c": 4}), config)
    restored.load_state_dict(json.loads(json.dumps(trained.state_dict())))  # as checkpoints store it
    assert restored.state_dict() == trained.state_dict()
    for step in range(6, 12):
        assert texts(restored.draw(0, step, 4)) == texts(trained.draw(0, step, 4)) == texts(trained.draw(0, step, 4))
    assert [texts(trained.draw(1, step, 4)) for step in range(6, 12)] != [texts(trained.draw(0, step, 4)) for step in range(6, 12)]
    fresh = PreferenceSampler(source({"a": 3, "b": 2, "c": 4}), config)
    assert [texts(fresh.draw(0, step, 4)) for step in range(6, 12)] != [texts(trained.draw(0, step, 4)) for step in range(6, 12)]


def test_prompts_without_categories_are_weighed_one_by_one():
    prompts = PromptSource([Prompt(text, {}) for text in ("easy", "easy", "hard")], "test")
    sampler = PreferenceSampler(prompts, DataConfig(prompt_sampling="preference", prompt_sampling_decay=0.5))
    assert sampler.weights() == pytest.approx({"easy": 2 / 3, "hard": 1 / 3})
    for step in range(8):
        chosen = texts(sampler.draw(0, step, 2))
        sampler.observe(chosen, [text == "hard" for text in chosen])
    assert sampler.weights()["hard"] > 0.8


def test_many_categories_log_their_weight_range_instead_of_each():
    weights = {f"c{i}": 1 / (LOGGED_CATEGORIES + 1) for i in range(LOGGED_CATEGORIES + 1)}
    assert set(sampling_metrics(["c0"], [False], weights)) == {"prompts/weight_min", "prompts/weight_max"}
    few = sampling_metrics(["a", "a", "b"], [True, False, False], {"a": 0.4, "b": 0.6})
    assert few == {"prompts/zero_variance/a": 0.5, "prompts/zero_variance/b": 1.0, "prompts/weight/a": 0.4, "prompts/weight/b": 0.6}


@pytest.mark.parametrize("overrides, message", [
    (["data.prompt_sampling=preferense"], "data.prompt_sampling: unknown prompt sampler 'preferense' (did you mean 'preference'?)"),
    (["data.prompt_sampling=preference", "data.prompt_sampling_floor=0"], "data.prompt_sampling_floor must be in (0, 1]"),
    (["data.prompt_sampling=preference", "data.prompt_sampling_decay=1"], "data.prompt_sampling_decay must be in [0, 1)"),
    (["data.prompt_sampling=preference", "rollout.offline_pool=2"], "rollout.offline_pool fixes them"),
])
def test_bad_prompt_sampling_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- tiny training runs


@register_prompt_sampler("test_varied_only")
class VariedOnly(PromptSampler):
    """A sampler from outside the package: only the 'varied' prompts, in order."""

    def draw(self, seed, step, count):
        varied = self.members["varied"]
        return [varied[(step * count + i) % len(varied)] for i in range(count)]

    def weights(self):
        return {"varied": 1.0}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [("a photo of a red circle", "flat"), ("a photo of a blue square", "flat"),
            ("a photo of two triangles", "varied"), ("a photo of a circle left of a square", "varied")]
    path.write_text("".join(json.dumps({"prompt": text, "metadata": {"category": category}}) + "\n" for text, category in rows))
    return path


def preference_run(model_dir, prompt_file, output_dir, **extra) -> list[str]:
    return tiny_overrides(model_dir, output_dir, **{"data.prompts": str(prompt_file), "data.prompt_sampling": "preference",
                                                    "data.prompt_sampling_decay": 0.5, "reward.weights": {"test_flat_category": 1.0},
                                                    "run.max_steps": 3, **extra})


def prompt_logs(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k.startswith(("prompts/", "reward_by/"))} for h in history]


@pytest.fixture(scope="module")
def straight(tiny_model_dir, prompt_file, tmp_path_factory) -> Trainer:
    """Three uninterrupted steps of the preference sampler on one process."""
    trainer = Trainer(load_config(None, preference_run(tiny_model_dir, prompt_file, tmp_path_factory.mktemp("straight"))), log=lambda *a: None)
    trainer.train()
    return trainer


def test_preference_run_logs_zero_variance_and_weights_per_category(straight):
    logged = [json.loads(line) for line in (straight.output / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in logged] == [1, 2, 3]
    for h in logged:
        assert h["prompts/weight/flat"] + h["prompts/weight/varied"] == pytest.approx(1.0)
        assert h.get("prompts/zero_variance/flat", 1.0) == 1.0 and h.get("prompts/zero_variance/varied", 0.0) == 0.0
    assert logged[0]["prompts/weight/flat"] == 0.5  # the prior: no category seen yet
    # The flat prompts' equal rewards move the draw away from them (the test needs them drawn in the first two steps).
    assert logged[2]["prompts/weight/flat"] < 0.5


def test_a_resumed_run_draws_what_an_uninterrupted_one_does(straight, tiny_model_dir, prompt_file, tmp_path):
    first = Trainer(load_config(None, preference_run(tiny_model_dir, prompt_file, tmp_path, **{"run.max_steps": 2})), log=lambda *a: None)
    first.train()
    saved = json.loads((tmp_path / "checkpoints" / "step-00000002" / "state.json").read_text())["prompt_sampler"]
    assert saved == first.prompt_sampler.state_dict() and saved["drawn"]
    resumed = Trainer(load_config(None, preference_run(tiny_model_dir, prompt_file, tmp_path)), log=lambda *a: None)
    resumed.train(resume=True)
    assert prompt_logs(resumed.counters.history) == prompt_logs(straight.counters.history)
    assert resumed.prompt_sampler.state_dict() == straight.prompt_sampler.state_dict()
    assert [h["reward_mean"] for h in resumed.counters.history] == [h["reward_mean"] for h in straight.counters.history]


TWO_PROCESS_SCRIPT = """
import json, sys, torch
sys.path.insert(0, sys.argv[3])
import helpers  # registers the test reward
from dgpo.train.config import load_config
from dgpo.train.loop import Trainer

trainer = Trainer(load_config(None, json.loads(sys.argv[1])), log=lambda *a: None)
trainer.train()
if trainer.acc.is_main_process:
    json.dump({"history": trainer.counters.history, "sampler": trainer.prompt_sampler.state_dict()}, open(sys.argv[2], "w"))
torch.distributed.destroy_process_group()  # a gloo group alive at exit can abort the process in teardown
"""


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_two_processes_draw_the_prompts_one_process_draws(straight, tiny_model_dir, prompt_file, tmp_path):
    script, result = tmp_path / "run.py", tmp_path / "result.json"
    script.write_text(TWO_PROCESS_SCRIPT)
    overrides = preference_run(tiny_model_dir, prompt_file, tmp_path / "run", **{"data.micro_batch": 2})  # each group split over the 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(29600 + os.getpid() % 1000),
           str(script), json.dumps(overrides), str(result), str(Path(__file__).parent)]
    launched = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    two = json.loads(result.read_text())
    assert two["sampler"] == straight.prompt_sampler.state_dict()
    assert [{k: v for k, v in h.items() if k.startswith("prompts/")} for h in two["history"]] == \
           [{k: v for k, v in h.items() if k.startswith("prompts/")} for h in straight.counters.history]
    assert [sorted(k for k in h if k.startswith("reward_by/")) for h in two["history"]] == \
           [sorted(k for k in h if k.startswith("reward_by/")) for h in straight.counters.history]


def test_a_sampler_registered_outside_the_package_draws_a_run_s_prompts(tiny_model_dir, prompt_file, tmp_path):
    assert "test_varied_only" in PROMPT_SAMPLERS.names()
    overrides = preference_run(tiny_model_dir, prompt_file, tmp_path, **{"data.prompt_sampling": "test_varied_only", "run.max_steps": 1})
    trainer = Trainer(load_config(None, overrides), log=lambda *a: None)
    trainer.train()
    (metrics,) = trainer.counters.history
    assert isinstance(trainer.prompt_sampler, VariedOnly)
    assert prompt_logs([metrics])[0] == {"prompts/zero_variance/varied": 0.0, "prompts/weight/varied": 1.0,
                                         "reward_by/varied": pytest.approx(metrics["reward_mean"])}
