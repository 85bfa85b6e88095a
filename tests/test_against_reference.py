"""The trainer against the DGPO and Flow-GRPO reference code (its formulas written out here)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides

from dgpo.train.config import load_config
from dgpo.train.ema import eval_ema_decay, ramped_decay
from dgpo.train.loop import Trainer

QUIET = {"log": lambda *a: None}


# ----- gradient clipping: the logged norm is the pre-clip one ------------------------------------


def test_grad_norm_in_metrics_is_the_norm_before_clipping(tiny_model_dir, tmp_path):
    norms = {}
    for clip in (0.0, 1e-6):
        out = tmp_path / str(clip)
        trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, out, **{"run.max_steps": 1, "optim.grad_clip": clip})), **QUIET)
        trainer.train()
        norms[clip] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
    # The first step's gradient does not depend on the clip; a post-clip norm would read 1e-6.
    assert norms[1e-6] == norms[0.0] > 1e-3


# ----- the GPU recipes against the reference configs (DGPO's config/dgpo.py, written out) --------

REPO = Path(__file__).resolve().parents[1]

# geneval_sd3_4gpu, general_ocr_sd3_4gpu and pickscore_sd3_4gpu, with what they inherit from compressibility()
# and base.get_config(): G, beta_dpo, beta_kl, clip_range (clip_dsm is on in all three), max_grad_norm.
REFERENCE_CONFIGS = {
    "sd35m/geneval": {"G": 16, "beta_dpo": 100, "beta_kl": 0.02, "clip_range": 1e-2, "max_grad_norm": 1.0, "switch_ema_ref": 500,
                      "global_std": False, "trunc_steps": 4},
    "sd35m/ocr": {"G": 16, "beta_dpo": 100, "beta_kl": 0.02, "clip_range": 1e-2, "max_grad_norm": 1.0, "switch_ema_ref": 200,
                  "global_std": True, "trunc_steps": 6},
    "sd35m/pickscore": {"G": 24, "beta_dpo": 10, "beta_kl": 0.001, "clip_range": 5e-2, "max_grad_norm": 1.0, "switch_ema_ref": 200,
                        "global_std": True, "trunc_steps": 6},
}
# shared by all three: num_train_timesteps 4 (M), 10 DPM-Solver steps at shift 3 and CFG 4.5, lr 3e-4, weight decay 1e-4,
# adv_clip_max 5, 8 groups per optimizer step
REFERENCE_COMMON = {"M": 4, "num_steps": 10, "flow_shift": 3.0, "guidance_scale": 4.5, "learning_rate": 3e-4, "adam_weight_decay": 1e-4,
                    "adv_clip_max": 5.0, "num_groups": 8, "eval_num_steps": 14, "ema_decay": 0.9, "ema_update_step_interval": 8}


@pytest.mark.parametrize("recipe", sorted(REFERENCE_CONFIGS))
def test_gpu_recipes_match_the_reference_configs(recipe):
    reference = REFERENCE_CONFIGS[recipe]
    c = load_config(REPO / "configs" / f"{recipe}.yaml")
    G = c.data.group_size
    assert G == reference["G"]
    assert c.loss.beta * G == pytest.approx(reference["beta_dpo"], rel=1e-3)  # loss.beta is beta_dpo / G
    assert c.loss.kl_beta == reference["beta_kl"]  # in the reference code's units (dgpo_kl_term)
    assert c.loss.ppo_clip_eps == reference["clip_range"]
    assert c.reward.std_mode == ("global" if reference["global_std"] else "group")
    # training timesteps: M distinct points of the first trunc_steps + 1 rollout sigmas, shared by the batch
    assert (c.loss.timestep_mode, c.loss.grid_draw) == ("grid", "shared")
    assert c.loss.grid_points == reference["trunc_steps"] + 1
    common = REFERENCE_COMMON
    assert (c.loss.timesteps, c.rollout.num_steps, c.rollout.shift, c.rollout.guidance_scale) == \
        (common["M"], common["num_steps"], common["flow_shift"], common["guidance_scale"])
    assert (c.optim.lr, c.optim.weight_decay, c.reward.advantage_clip, c.data.groups_per_step) == \
        (common["learning_rate"], common["adam_weight_decay"], common["adv_clip_max"], common["num_groups"])
    assert (c.eval.num_steps, c.eval.ema_decay, c.eval.ema_every) == (common["eval_num_steps"], common["ema_decay"], common["ema_update_step_interval"])
    # the trainer's gradient is beta x G times the reference code's
    assert c.optim.grad_clip == pytest.approx(reference["max_grad_norm"] * reference["beta_dpo"], rel=1e-3)
    # The reference samples with the EMA at an epoch that starts with 'global_step > switch_ema_ref'
    # (one optimizer step per epoch); the trainer from step index rollout.ema_after on.
    first_ema_step = next(step for step in range(10_000) if 0 <= c.rollout.ema_after <= step)
    assert first_ema_step == next(step for step in range(10_000) if step > reference["switch_ema_ref"])
    assert [ramped_decay(k, c.rollout.ema_decay, c.rollout.ema_ramp) for k in (0, 150, 299, 300, 900)] == \
        [min(0.3, 0.001 * k) for k in (0, 150, 299, 300, 900)]


# ----- the rollout EMA's ramp -------------------------------------------------------------------


def test_ramped_decay_is_the_reference_schedule_and_zero_ramp_is_fixed():
    for step in (0, 1, 7, 299, 300, 301, 5000):
        assert ramped_decay(step, 0.3, 0.001) == min(0.3, 0.001 * step)  # train_sd3_dgpo.py: ema_ref_decay
        assert ramped_decay(step, 0.3, 0.0) == 0.3


def test_rollout_ema_follows_the_ramped_decay_in_training(tiny_model_dir, tmp_path):
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"run.max_steps": 3, "rollout.ema_decay": 0.3, "rollout.ema_ramp": 0.25}))
    trainer = Trainer(config, **QUIET)
    initial = [p.detach().clone() for _, p in trainer.policy.trainable]
    after_each_step = []
    trainer.train(on_step=lambda tr, metrics: after_each_step.append([p.detach().clone() for _, p in tr.policy.trainable]))

    def ema(decay_at):
        shadow = initial
        for step, params in enumerate(after_each_step):
            shadow = [decay_at(step) * s + (1 - decay_at(step)) * p for s, p in zip(shadow, params)]
        return shadow

    ramped = ema(lambda step: min(0.3, 0.25 * step))  # 0 (the EMA becomes the policy), 0.25, then 0.3
    fixed = ema(lambda step: 0.3)
    for expected, actual in zip(ramped, trainer.policy.rollout_ema.shadow):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(a, b) for a, b in zip(ramped, fixed))


# ----- grid timesteps: the reference code's shared draw -----------------------------------------


def test_shared_grid_draw_is_m_distinct_points_for_the_whole_batch(tiny_model_dir, tmp_path):
    overrides = {"rollout.num_steps": 6, "loss.timestep_mode": "grid", "loss.grid_points": 5, "loss.timesteps": 3}
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **overrides)), **QUIET)
    assert trainer.config.loss.grid_draw == "shared"  # the default
    grid = trainer.draws.sigmas[:5]
    counts = torch.zeros(5)
    draws = set()
    for step in range(300):
        # train_sd3_dgpo.py: sampled_timesteps = random.sample(range(trunc_steps + 1), M), broadcast to every rank,
        # then every micro-batch trains sample["timesteps"][:, j] for j in sampled_timesteps.
        per_pass = []
        for k in range(3):
            one_micro_batch = trainer.draws.training_sigmas(step, (0, k), torch.tensor([0, 0, 1, 1]))
            another_process = trainer.draws.training_sigmas(step, (0, k), torch.tensor([6, 7, 7]))
            assert torch.equal(one_micro_batch, torch.full((4,), float(one_micro_batch[0])))
            assert torch.equal(another_process, torch.full((3,), float(one_micro_batch[0])))
            per_pass.append(int(torch.nonzero(grid == one_micro_batch[0])))
        assert len(set(per_pass)) == 3  # distinct: a draw without replacement
        counts[per_pass] += 1
        draws.add(tuple(per_pass))
    # every point equally likely (3 of 5 per step: 180 of 300 expected), every ordered triple possible (60)
    assert counts.min() > 140 and counts.max() < 220
    assert len(draws) > 50
    # fresh points for a second update on the same rollout, as the reference's inner epochs draw afresh
    assert any(not torch.equal(trainer.draws.shared_grid_points(step, 0), trainer.draws.shared_grid_points(step, 1)) for step in range(5))


def test_per_group_grid_draw_is_still_offered(tiny_model_dir, tmp_path):
    overrides = {"rollout.num_steps": 6, "loss.timestep_mode": "grid", "loss.grid_points": 5, "loss.grid_draw": "per_group"}
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **overrides)), **QUIET)
    sigmas = torch.stack([trainer.draws.training_sigmas(step, (0, 0), torch.arange(8)) for step in range(4)])
    assert len(set(sigmas.flatten().tolist())) > 1 and not all(len(set(row.tolist())) == 1 for row in sigmas)


def test_shared_grid_draw_needs_enough_grid_points():
    from dgpo.train.config import ConfigError

    with pytest.raises(ConfigError, match="grid_draw=shared"):
        load_config(None, ["loss.timestep_mode=grid", "loss.grid_points=3", "loss.timesteps=4"])
    load_config(None, ["loss.timestep_mode=grid", "loss.grid_points=3", "loss.timesteps=4", "loss.grid_draw=per_group"])
    load_config(None, ["loss.grid_points=3", "loss.timesteps=4"])  # continuous mode: no grid draw


# ----- the evaluation EMA ------------------------------------------------------------------------


def reference_ema_step(decay: float, update_step_interval: int, optimization_step: int) -> float | None:
    """flow_grpo/ema.py's EMAModuleWrapper.step without a decay argument, written out: the decay it applies, or None."""
    current_decay = min((1 + optimization_step) / (10 + optimization_step), decay)
    if (optimization_step + 1) % update_step_interval == 0:
        return current_decay
    return None


def test_eval_ema_schedule_is_the_reference_wrappers():
    schedule = [eval_ema_decay(n, 0.9, 8) for n in range(1, 200)]
    assert schedule == [reference_ema_step(0.9, 8, n) for n in range(1, 200)]
    assert [n for n, d in enumerate(schedule, start=1) if d is not None][:3] == [7, 15, 23]
    assert schedule[7 - 1] == pytest.approx(8 / 17) and schedule[199 - 1] == 0.9


def test_eval_ema_updates_on_its_schedule_and_is_exported_beside_the_adapter(tiny_model_dir, tmp_path):
    from dgpo.shapes.model import ShapesModel

    overrides = {"run.max_steps": 6, "run.save_every": 0, "eval.ema_decay": 0.9, "eval.ema_every": 3}
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **overrides)), **QUIET)
    initial = [p.detach().clone() for _, p in trainer.policy.trainable]
    after_each_step = []
    trainer.train(on_step=lambda tr, metrics: after_each_step.append([p.detach().clone() for _, p in tr.policy.trainable]))
    shadow = initial
    for n, params in enumerate(after_each_step, start=1):
        decay = reference_ema_step(0.9, 3, n)  # updates after 2 and 5 steps, decay 3/12 and 6/15
        if decay is not None:
            shadow = [decay * s + (1 - decay) * p for s, p in zip(shadow, params)]
    for expected, actual in zip(shadow, trainer.policy.eval_ema.shadow):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)

    trainer.export_adapter(tmp_path / "adapter")
    base = ShapesModel.from_pretrained(tiny_model_dir)
    x, sigma = torch.randn(2, *base.latent_shape), torch.full((2,), 0.7)
    emb = base.encode_prompts(["a photo of a red circle", "a photo of two squares"])
    trainer.policy.model.transformer.eval()
    velocities = []
    for folder, weights in (("adapter", None), ("adapter_ema", trainer.policy.eval_ema)):
        tuned = ShapesModel.from_pretrained(tiny_model_dir)
        tuned.transformer.load_lora_adapter(str(tmp_path / folder), use_safetensors=True)
        with torch.no_grad(), (weights.swapped_in() if weights else contextlib.nullcontext()):
            velocities.append(tuned.velocity(x, sigma, emb))
            torch.testing.assert_close(velocities[-1], trainer.policy.model.velocity(x, sigma, emb))
    assert not torch.allclose(*velocities)


# ----- the defaults ------------------------------------------------------------------------------


def test_default_beta_is_the_papers_beta_dpo_over_the_default_group_size():
    from dgpo.train.config import Config

    c = Config()
    # train_sd3_dgpo.py: S = sum_i A_i * beta_dpo * (l_theta - l_ref) / group_size, beta_dpo = 100 (GenEval, OCR)
    assert c.loss.beta * c.data.group_size == pytest.approx(100)
    # the reference's max_grad_norm 1.0 on a surrogate 1 / (beta x G) the size of this loss
    assert c.optim.grad_clip == pytest.approx(1.0 * c.loss.beta * c.data.group_size)
    # DGPO's reference defaults elsewhere: the ramped rollout EMA, the shared grid draw
    assert (c.rollout.ema_decay, c.rollout.ema_ramp, c.loss.grid_draw) == (0.3, 0.001, "shared")


# ----- metrics: informative groups and the share of zero-variance groups ------------------------


@pytest.mark.parametrize("pattern", ["constant", "every_other_group"])
def test_zero_variance_groups_are_counted_and_left_out_of_the_preference_metrics(tiny_model_dir, tmp_path, pattern):
    from dgpo.rewards import REWARDS, register_reward

    calls = {"n": 0}

    def reward_factory():
        def reward(images, prompts, metadata):  # one call per micro-batch of 4 = one group
            calls["n"] += 1
            if pattern == "constant" or calls["n"] % 2 == 0:
                return [0.5] * len(images)
            return [float(i) for i in range(len(images))]

        return reward

    register_reward("test_saturating")(reward_factory)
    try:
        overrides = {"reward.weights": {"test_saturating": 1.0}, "reward.background": False, "run.max_steps": 2}
        trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **overrides)), **QUIET)
        trainer.train()
    finally:
        REWARDS.unregister("test_saturating")
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for metrics in logged:
        if pattern == "constant":
            assert metrics["zero_variance_groups"] == 1.0
            # nothing to prefer: no preference metric (it used to read ln 2 and accuracy 0)
            assert all(metrics[k] != metrics[k] for k in ("preference_loss", "implicit_accuracy", "margin_mean"))
        else:
            assert metrics["zero_variance_groups"] == 0.5
            assert metrics["preference_loss"] == metrics["preference_loss"] and metrics["implicit_accuracy"] in (0.0, 0.5, 1.0)
