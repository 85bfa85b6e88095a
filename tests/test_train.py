"""End-to-end DGPO training on a tiny model: weights move, numbers are exact across resume and processes."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from helpers import ALGORITHMS, FLOW_GRPO, tiny_overrides, train_on_two_processes, train_recording_group_sums, trainable_state

from dgpo.train.config import load_config
from dgpo.train.loop import Trainer
from dgpo.train.optim import learning_rate


def test_dgpo_steps_move_lora_weights_and_log_finite_loss(tiny_model_dir, tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path)))
    before = trainable_state(trainer)
    assert trainer.train() == 0
    after = trainable_state(trainer)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) >= len(before) // 2
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert torch.isfinite(torch.tensor([h["preference_loss"], h["grad_norm"], h["reward_mean"]])).all()
        # The reward per prompt category: one entry per category drawn, averaging (by groups) to the step's mean.
        categories = [p.metadata["category"] for p in trainer.prompts.for_step(trainer.config.run.seed, h["step"] - 1, 2)]
        by_category = {k.split("/", 1)[1]: v for k, v in h.items() if k.startswith("reward_by/")}
        assert set(by_category) == set(categories)
        assert np.mean([by_category[c] for c in categories]) == pytest.approx(h["reward_mean"], rel=1e-5)
    assert (tmp_path / "checkpoints" / "step-00000002").is_dir()


@pytest.mark.parametrize(
    "variant",
    [
        {"loss.ppo_clip_eps": 0.001},
        {"loss.reference_guidance_scale": 4.5, "rollout.guidance_scale": 1.0},
        {"loss.timestep_mode": "grid"},
        {"model.lora_rank": 0},
        FLOW_GRPO,
        {"rollout.sampler": "sde"},
        {"loss.algorithm": "diffusion_dpo"},
        {"reward.advantage": "rank"},
        {"loss.t_min_end": 0.1},
        {"optim.updates_per_rollout": 2},
    ],
    ids=["ppo-clip", "cfg-mode-2", "grid-timesteps", "full-finetune", "flow-grpo", "dgpo-sde-rollouts", "diffusion-dpo", "rank-advantages",
         "t-min-schedule", "two-updates-per-rollout"],
)
def test_recipe_variants_train(tiny_model_dir, tmp_path, variant):
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **variant)))
    before = trainable_state(trainer)
    trainer.train()
    after = trainable_state(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(p).all() for p in after.values())
    if "loss.ppo_clip_eps" in variant:
        assert "clipped_fraction" in trainer.counters.history[-1]
    assert trainer.counters.history[-1]["forward_equivalents"] > trainer.counters.history[0]["forward_equivalents"] > 0


def test_flow_grpo_recomputed_log_probs_match_the_rollout(tiny_model_dir, tmp_path):
    """Before any update the policy is the rollout model, so every PPO ratio is 1 and nothing is clipped."""
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **FLOW_GRPO, **{"run.max_steps": 1})))
    trainer.train()
    metrics = trainer.counters.history[0]
    assert metrics["approx_kl"] < 1e-8
    assert metrics["clipped_fraction"] == 0.0


def test_flow_grpo_second_update_on_a_rollout_sees_a_moved_policy(tiny_model_dir, tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **FLOW_GRPO, **{"run.max_steps": 1, "optim.updates_per_rollout": 2})))
    trainer.train()
    assert trainer.counters.history[0]["approx_kl"] > 0


def test_flow_grpo_trains_distinct_trajectory_steps_per_sample(tiny_model_dir, tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **FLOW_GRPO, **{"rollout.num_steps": 4, "loss.timesteps": 4})))
    ids = torch.arange(6)
    steps = torch.stack([trainer.draws.trajectory_steps(0, k, ids) for k in range(4)])
    for column in steps.T:
        assert sorted(column.tolist()) == [0, 1, 2, 3]
    assert not torch.equal(steps[:, 0], steps[:, 1]) or not torch.equal(steps[:, 1], steps[:, 2])


@pytest.mark.parametrize("rollout_precision, sampled", [("model", torch.float32), ("bf16", torch.bfloat16)])
def test_rollouts_sample_in_their_own_precision_and_the_update_stays_float32(tiny_model_dir, tmp_path, rollout_precision, sampled):
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"rollout.mixed_precision": rollout_precision, "run.max_steps": 1})))
    seen = {True: set(), False: set()}  # output dtypes of the transformer's last projection, by whether gradients flow
    trainer.policy.model.transformer.proj_out.register_forward_hook(lambda module, args, out: seen[torch.is_grad_enabled()].add(out.dtype))
    trainer.train()
    assert (torch.bfloat16 in seen[False]) == (sampled == torch.bfloat16) and seen[True] == {torch.float32}


def test_offline_pool_reuses_reference_samples(tiny_model_dir, tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"rollout.offline_pool": 2, "run.max_steps": 4})))
    trainer.train()
    rewards = [h["reward_mean"] for h in trainer.counters.history]
    assert rewards[0] == rewards[2] and rewards[1] == rewards[3] and rewards[0] != rewards[1]
    forwards = [h["forward_equivalents"] for h in trainer.counters.history]
    # steps 2 and 3 reuse the pool: only the update's forwards are added, not the rollout's
    assert forwards[3] - forwards[2] < forwards[1] - forwards[0]


def test_offline_metrics_name_the_pool_prompts_and_a_resume_counts_the_pool_once(tiny_model_dir, tmp_path):
    offline = {"rollout.offline_pool": 2, "run.max_steps": 4}
    straight = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "a", **offline)))
    straight.train()
    by_category = [{k: v for k, v in h.items() if k.startswith("reward_by/")} for h in straight.counters.history]
    # steps 2 and 3 train on pool slots 0 and 1 again: their per-category rewards are those slots', not the prompts drawn for steps 2 and 3
    assert by_category[0] and by_category[2] == by_category[0] and by_category[3] == by_category[1]
    Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "b", **{**offline, "run.max_steps": 3}))).train()
    resumed = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "b", **offline)))
    resumed.train(resume=True)
    # the resumed run regenerates pool slot 1 for step 3: the same samples, so the same rewards, counted once as uninterrupted
    assert resumed.counters.history[-1]["reward_mean"] == straight.counters.history[-1]["reward_mean"]
    assert resumed.counters.forward_equivalents == straight.counters.forward_equivalents


def test_flow_grpo_refuses_offline_and_ode_rollouts(tiny_model_dir, tmp_path):
    from dgpo.train.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.sampler=sde"):
        load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{**FLOW_GRPO, "rollout.sampler": "dpm2m"}))
    with pytest.raises(ValueError, match="offline"):
        Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **FLOW_GRPO, **{"rollout.offline_pool": 2})))


def test_max_seconds_stops_with_a_checkpoint(tiny_model_dir, tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"run.max_seconds": 1e-3, "run.max_steps": 5, "run.save_every": 0})))
    assert trainer.train() == 0
    assert trainer.counters.step == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]


def test_forward_budget_stops_at_the_first_step_that_spends_it(tiny_model_dir, tmp_path):
    one_step = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "one", **{"run.max_steps": 1})))
    one_step.train()
    per_step = one_step.counters.forward_equivalents
    assert per_step > 0
    budget = {"run.max_forward_equivalents": 1.5 * per_step, "run.max_steps": 5, "run.save_every": 0}
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "budget", **budget)))
    assert trainer.train() == 0
    assert trainer.counters.step == 2
    assert trainer.counters.forward_equivalents == 2 * per_step


def test_exported_adapter_loads_into_a_fresh_model_and_changes_its_output(tiny_model_dir, tmp_path):
    from dgpo.shapes.model import ShapesModel

    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"run.max_steps": 1})))
    trainer.train()
    trainer.export_adapter(tmp_path / "adapter")
    base = ShapesModel.from_pretrained(tiny_model_dir)
    tuned = ShapesModel.from_pretrained(tiny_model_dir)
    tuned.transformer.load_lora_adapter(str(tmp_path / "adapter"), use_safetensors=True)
    x = torch.randn(2, *base.latent_shape)
    sigma = torch.full((2,), 0.7)
    emb = base.encode_prompts(["a photo of a red circle", "a photo of two squares"])
    with torch.no_grad():
        v_base, v_tuned = base.velocity(x, sigma, emb), tuned.velocity(x, sigma, emb)
        trainer.policy.model.transformer.eval()
        v_trained = trainer.policy.model.velocity(x, sigma, emb)
    assert not torch.allclose(v_base, v_tuned)
    torch.testing.assert_close(v_tuned, v_trained)


def test_resume_reproduces_an_uninterrupted_run_exactly(tiny_model_dir, tmp_path):
    straight = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "a", **{"run.max_steps": 3})))
    straight.train()
    first = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "b", **{"run.max_steps": 2})))
    first.train()
    resumed = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "b", **{"run.max_steps": 3})))
    resumed.train(resume=True)
    assert resumed.counters.step == 3
    for name, value in trainable_state(straight).items():
        assert torch.equal(value, trainable_state(resumed)[name]), name
    for a, b in zip(straight.policy.rollout_ema.shadow + straight.policy.eval_ema.shadow, resumed.policy.rollout_ema.shadow + resumed.policy.eval_ema.shadow):
        assert torch.equal(a, b)

    def rewards(tr):
        return [h["reward_mean"] for h in tr.counters.history]

    assert rewards(straight) == rewards(resumed)
    logged = [json.loads(line)["reward_mean"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == rewards(straight)


def test_training_sets_the_scheduled_learning_rate_at_every_step(tiny_model_dir, tmp_path):
    # the linear decay over the last three of four steps: the rate held for the first two, then falling
    overrides = {"run.max_steps": 4, "optim.lr_schedule": "linear", "optim.decay_steps": 3, "optim.lr": 1e-3}
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **overrides)))
    trainer.train()
    logged = [h["lr"] for h in trainer.counters.history]
    assert logged == [learning_rate(step, 1e-3, "linear", 0, 4, decay_steps=3) for step in range(4)]
    assert logged[0] == logged[1] > logged[2] > logged[3] > 0
    assert all(group["lr"] == logged[-1] for group in trainer.optimizer.param_groups)


def test_resume_keeps_a_kl_weight_the_guard_raised_unless_the_config_changes_it(tiny_model_dir, tmp_path):
    first = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"run.max_steps": 1})))
    first.train()
    assert first.state.raise_kl() == 0.02  # what apply_guard's raise_kl does mid-run
    first.save()
    same_config = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"run.max_steps": 1})), log=lambda *a: None)
    assert same_config.resume()
    assert same_config.state.kl_beta == 0.02 and same_config.config.loss.kl_beta == 0.01
    edited = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"run.max_steps": 1, "loss.kl_beta": 0.5})), log=lambda *a: None)
    assert edited.resume()
    assert edited.state.kl_beta == 0.5


TWO_PROCESS_REWARD = {"reward.weights": {"test_brightness": 1.0}}


@pytest.fixture(scope="module")
def two_process_runs(tiny_model_dir, tmp_path_factory):
    """Every algorithm's tiny run on two processes, each group of 4 split 2 + 2 over them."""
    out = tmp_path_factory.mktemp("two-processes")
    jobs = [{"name": name, "overrides": tiny_overrides(tiny_model_dir, out / name, **{**variant, "data.micro_batch": 2, **TWO_PROCESS_REWARD})}
            for name, variant in ALGORITHMS.items()]
    return train_on_two_processes(jobs, out)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_processes_match_one_process(tiny_model_dir, tmp_path, two_process_runs, algorithm):
    overrides = tiny_overrides(tiny_model_dir, tmp_path, **{**ALGORITHMS[algorithm], "data.micro_batch": 4, **TWO_PROCESS_REWARD})
    one, sums_one = train_recording_group_sums(overrides)
    two = two_process_runs[algorithm]
    # DGPO's loss sums each group over the processes (2 + 2 samples), the others' are per sample: the sums must match.
    assert bool(sums_one) == (algorithm == "dgpo") and len(two["sums"][0]) == len(two["sums"][1]) == len(sums_one)
    for call_one, call_rank0, call_rank1 in zip(sums_one, *two["sums"]):
        merged = {**call_rank0, **call_rank1}
        assert merged.keys() == call_one.keys()
        for group, total in call_one.items():
            assert merged[group] == pytest.approx(total, rel=1e-4, abs=1e-6)
    assert [h["reward_mean"] for h in one.counters.history] == pytest.approx([h["reward_mean"] for h in two["history"]], abs=1e-6)
    for name, value in trainable_state(one).items():
        # Adam normalises each element's step, so near-zero gradients turn last-bit differences into ~1e-6 ones.
        torch.testing.assert_close(two["params"][name], value, rtol=1e-4, atol=1e-5)


def test_background_reward_scoring_trains_exactly_like_inline_scoring(tiny_model_dir, tmp_path):
    runs = {}
    for background in (True, False):
        trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / str(background), **{"reward.background": background})))
        trainer.train()
        runs[background] = (trainable_state(trainer), trainer.counters.history)
    (weights_bg, history_bg), (weights_inline, history_inline) = runs[True], runs[False]
    assert all(torch.equal(weights_bg[n], weights_inline[n]) for n in weights_bg)
    for a, b in zip(history_bg, history_inline):
        assert (a["reward_mean"], a["preference_loss"], a["grad_norm"]) == (b["reward_mean"], b["preference_loss"], b["grad_norm"])


def test_reward_scores_a_chunk_while_the_next_chunk_is_generated(tiny_model_dir, tmp_path):
    """The first micro-batch's reward waits until the second micro-batch has been generated: only
    possible when scoring runs beside generation (inline, it would time out and fail the step)."""
    import threading

    from dgpo.rewards import REWARDS, register_reward

    second_chunk_generated = threading.Event()
    reward_threads = []

    def waits_for_the_next_chunk():
        def reward(images, prompts, metadata):
            reward_threads.append(threading.current_thread().name)
            if len(reward_threads) == 1 and not second_chunk_generated.wait(timeout=20):
                raise TimeoutError("the second chunk was not generated while the first was scored")
            return [float(img.mean()) for img in images]

        return reward

    register_reward("test_waiting")(waits_for_the_next_chunk)
    try:
        trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"reward.weights": {"test_waiting": 1.0}, "run.max_steps": 1})))
        generate_chunk = trainer.rollouts.generate_chunk
        chunks = []

        def recording_generate_chunk(*args):
            chunks.append(generate_chunk(*args))
            if len(chunks) == 2:
                second_chunk_generated.set()
            return chunks[-1]

        trainer.rollouts.generate_chunk = recording_generate_chunk
        assert trainer.train() == 0
    finally:
        REWARDS.unregister("test_waiting")
    assert len(reward_threads) == 2 and all(name.startswith("dgpo-reward") for name in reward_threads)


@pytest.mark.parametrize("background", [True, False], ids=["background", "inline"])
def test_crashing_reward_stops_with_its_name_and_keeps_a_checkpoint(tiny_model_dir, tmp_path, background):
    from dgpo.rewards import REWARDS, register_reward
    from dgpo.train.loop import RewardFailure

    calls = {"n": 0}

    def crash_in_second_step():
        def reward(images, prompts, metadata):
            calls["n"] += 1
            if calls["n"] == 3:  # two calls per step, one per micro-batch: the first of step 2
                raise OSError("model file vanished")
            return [float(i) for i in range(len(images))]

        return reward

    register_reward("test_crashing")(crash_in_second_step)
    try:
        overrides = {"reward.weights": {"test_crashing": 1.0}, "run.save_every": 0, "run.max_steps": 3, "reward.background": background}
        trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **overrides)))
        with pytest.raises(RewardFailure, match="test_crashing.*model file vanished"):
            trainer.train()
    finally:
        REWARDS.unregister("test_crashing")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]


def test_rewards_mostly_nan_for_several_steps_stop_training_naming_the_reward(tiny_model_dir, tmp_path):
    from dgpo.rewards import REWARDS, register_reward
    from dgpo.train.loop import RewardFailure

    def mostly_nan():
        def reward(images, prompts, metadata):
            return [float(len(images))] + [float("nan")] * (len(images) - 1)  # one valid score per micro-batch of 4

        return reward

    register_reward("test_mostly_nan")(mostly_nan)
    try:
        overrides = {"reward.weights": {"test_mostly_nan": 1.0}, "reward.max_bad_steps": 2, "run.save_every": 0, "run.max_steps": 5}
        trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **overrides)))
        with pytest.raises(RewardFailure, match=r"steps 0-1: over 50% .*NaN/inf.*test_mostly_nan: 6"):
            trainer.train()
    finally:
        REWARDS.unregister("test_mostly_nan")
    assert trainer.counters.history[0]["invalid_rewards"] == 8 - 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]


def test_eval_only_metric_is_logged_and_its_guard_stops_the_run(tiny_model_dir, tmp_path):
    from dgpo.train.run import run_training

    overrides = {
        "run.max_steps": 6, "eval.every": 1, "eval.images_per_category": 1, "eval.final_images_per_category": 1,
        "eval.metrics": "[jpeg_compressibility]", "eval.guard_metric": "jpeg_compressibility",
        # any change at all trips it: the tiny random model's JPEG size moves at every step
        "eval.guard_max_drop": 1e-9,
    }
    summary = run_training(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **overrides)), log=lambda *a: None)
    evals = json.loads((tmp_path / "evals.json").read_text())
    assert all("jpeg_compressibility" in e["metrics"] for e in evals)
    tripped = [e for e in evals if "guard" in e]
    assert tripped and summary["steps"] < 6 and summary["status"] == 0
    assert (tmp_path / "report.md").exists()


def test_guard_raise_kl_doubles_the_kl_weight():
    from types import SimpleNamespace

    from dgpo.train.config import Config
    from dgpo.train.run import apply_guard, guard_tripped
    from dgpo.train.state import RunState

    lower = frozenset({"artifact"})
    assert guard_tripped({"artifact": 0.010}, {"artifact": 0.012}, "artifact", 0.1, lower)
    assert not guard_tripped({"artifact": 0.010}, {"artifact": 0.0105}, "artifact", 0.1, lower)
    assert guard_tripped({"diversity": 0.30}, {"diversity": 0.25}, "diversity", 0.1, lower)
    assert not guard_tripped({"diversity": 0.30}, {"diversity": 0.40}, "diversity", 0.1, lower)
    config = Config()
    config.eval.guard_metric, config.eval.guard_action, config.loss.kl_beta = "diversity", "raise_kl", 0.02
    config.validate()
    trainer = SimpleNamespace(config=config, counters=SimpleNamespace(step=7), state=RunState.from_config(config.loss.kl_beta))
    now = {"diversity": 0.1}
    apply_guard(trainer, {"diversity": 0.3}, now, log=lambda *a: None)
    assert trainer.state.kl_beta == 0.04 and not trainer.state.guard_stopped and now["guard"]["kl_beta"] == 0.04
    assert config.loss.kl_beta == 0.02  # the config is frozen: the run state holds what changed
    # A recipe's small KL weight is doubled, not jumped to a floor; no KL at all starts at 0.01.
    for configured, raised in ((2.0e-4, 4.0e-4), (0.0, 0.01)):
        trainer.state = RunState.from_config(configured)
        apply_guard(trainer, {"diversity": 0.3}, {"diversity": 0.1}, log=lambda *a: None)
        assert trainer.state.kl_beta == raised
