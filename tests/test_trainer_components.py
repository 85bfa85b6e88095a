"""The trainer's parts on their own: keyed draws, the scorer's failure policy, the single-process collectives."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dgpo.train.collectives import Collectives
from dgpo.train.config import ConfigError, load_config
from dgpo.train.data import GroupLayout, Prompt
from dgpo.train.draws import Draws
from dgpo.train.optim import learning_rate
from dgpo.train.scoring import RewardFailure, Scorer, rewards_by_category


def draws(*overrides: str) -> Draws:
    c = load_config(None, list(overrides))
    return Draws(c.run.seed, c.rollout, c.loss, c.run.max_steps, (4, 2, 2))


def test_draws_depend_on_the_sample_not_on_the_batch():
    d = draws("rollout.sampler=sde", "rollout.sde_window=2", "rollout.sde_window_range=[0, 5]")
    ids = [3, 4, 5, 6]
    assert torch.equal(d.rollout_noise(2, ids)[1:3], d.rollout_noise(2, [4, 5]))
    assert torch.equal(d.sde_noise(2, ids)[2:], d.sde_noise(2, [5, 6]))
    assert d.sde_noise(2, ids).shape == (4, 10, 4, 2, 2)
    steps = d.sde_steps(2, ids)
    assert steps.shape == (4, 10) and (steps.sum(dim=1) == 2).all()
    assert torch.equal(d.group_noise(1, (0, 0), torch.tensor([0, 0, 1]))[0], d.group_noise(1, (0, 0), torch.tensor([0]))[0])
    assert not torch.equal(d.sample_noise("a", 1, [0], (0, 0)), d.sample_noise("b", 1, [0], (0, 0)))
    assert draws().sde_steps(0, ids) is None


def test_training_sigmas_move_t_min_over_the_run():
    d = draws("loss.t_min=0.2", "loss.t_min_end=0.6", "run.max_steps=5")
    assert (d.t_min(0), d.t_min(4), d.t_min(9)) == (0.2, pytest.approx(0.6), pytest.approx(0.6))
    sigma = d.training_sigmas(4, (0, 0), torch.arange(16))
    assert ((sigma >= 0.6) & (sigma <= 1.0)).all()


class Chunk(SimpleNamespace):
    pass


def test_scorer_masks_non_finite_scores_and_names_a_failing_reward():
    config = load_config(None, ["reward.weights={a: 1.0}", "reward.background=false"]).reward
    scores = {"a": lambda images, prompts, metadata: [1.0, float("inf"), None]}
    scorer = Scorer(scores, config, log=lambda *a: None)
    chunk = Chunk(images=torch.zeros(3, 3, 2, 2), prompts=[Prompt("p", {})] * 3)
    scoring = scorer.start()
    scoring.submit(chunk)
    local, logs = scorer.finish(scoring, lambda failed: [0] if failed else [])
    assert np.isnan(local[1:].numpy()).all() and local[0] == 1.0 and logs["invalid/a"] == 2
    # Another process failed: this one stops too, saying where.
    scoring = scorer.start()
    scoring.submit(chunk)
    with pytest.raises(RewardFailure, match="process 1"):
        scorer.finish(scoring, lambda failed: [1])
    scorer.rewards = {"a": lambda images, prompts, metadata: 1 / 0}
    scoring = scorer.start()
    scoring.submit(chunk)
    with pytest.raises(RewardFailure, match="reward 'a' failed: ZeroDivisionError"):
        scorer.finish(scoring, lambda failed: [0] if failed else [])


def test_scorer_stops_after_consecutive_bad_steps():
    config = load_config(None, ["reward.max_bad_steps=2"]).reward
    scorer = Scorer({}, config, log=lambda *a: None)
    mostly_nan = torch.tensor([1.0, float("nan"), float("nan"), 2.0, float("nan")])
    scorer.check(0, mostly_nan, {})
    with pytest.raises(RewardFailure, match="steps 0-1"):
        scorer.check(1, mostly_nan, {})
    with pytest.raises(RewardFailure, match="every reward is NaN"):
        scorer.check(2, torch.full((3,), float("nan")), {})


def test_single_process_collectives_are_local():
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    collectives = Collectives(accelerator, GroupLayout(2, 2, 4, 1, 0))
    values, groups = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1])
    assert collectives.group_sum(values, groups).tolist() == [3.0, 3.0, 7.0, 7.0]
    rewards = collectives.gather_rewards(torch.tensor([5.0, 6.0]), [3, 1])
    assert rewards[[3, 1]].tolist() == [5.0, 6.0] and rewards[[0, 2]].isnan().all()
    assert collectives.failed_processes(True) == [0] and collectives.failed_processes(False) == []
    assert collectives.max(1.5) == 1.5 and collectives.broadcast({"x": 1}) == {"x": 1}


def test_rewards_by_category_average_each_categorys_groups_and_skip_invalid_rewards():
    rewards = torch.tensor([1.0, 3.0, 0.0, float("nan"), 5.0, 7.0, 9.0, 9.0])
    by_category = rewards_by_category(["position", "counting", "position", None], rewards, group_size=2)
    assert by_category == {"reward_by/position": 4.0, "reward_by/counting": 0.0}
    assert rewards_by_category([None, None], torch.ones(4), group_size=2) == {}


def test_learning_rate_warms_up_then_follows_its_schedule_to_the_last_step():
    lr, steps = 1e-3, 11
    # no warm-up: every schedule starts at optim.lr; cosine and linear reach 0 at run.max_steps
    assert all(learning_rate(0, lr, name, 0, steps + 1) == lr for name in ("constant", "cosine", "linear"))
    assert learning_rate(steps, lr, "linear", 0, steps) == 0.0 and learning_rate(steps, lr, "cosine", 0, steps) < 1e-20
    # cosine is symmetric about the middle of the run, linear is a straight line, constant is flat
    for step in range(steps + 1):
        mirrored = steps - step
        assert learning_rate(step, lr, "cosine", 0, steps) + learning_rate(mirrored, lr, "cosine", 0, steps) == pytest.approx(lr)
        assert learning_rate(step, lr, "linear", 0, steps) == pytest.approx(lr * (1 - step / steps))
        assert learning_rate(step, lr, "constant", 0, steps) == lr
    # warm-up: lr * (k + 1) / warmup for the first steps, then the schedule starts from 1
    warm = [learning_rate(k, lr, "linear", 4, 14) for k in range(6)]
    assert warm == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr, lr, 0.9 * lr])


def test_a_decay_over_the_last_steps_holds_the_rate_then_follows_the_schedule_to_zero():
    lr, steps = 1e-3, 20
    # decay_steps 5: optim.lr through step 15, then the schedule over the last five steps, as the whole-run schedule
    # over five steps would run
    held = [learning_rate(k, lr, "cosine", 0, steps, decay_steps=5) for k in range(steps + 1)]
    assert held[:16] == [lr] * 16
    assert held[15:] == pytest.approx([learning_rate(k, lr, "cosine", 0, 5) for k in range(6)])
    assert held[15] > held[16] > held[17] > held[18] > held[19] > held[20] == pytest.approx(0.0, abs=1e-20)
    # with a warm-up, the warm-up still comes first; a decay longer than what follows the warm-up starts after it
    warm = [learning_rate(k, lr, "linear", 4, steps, decay_steps=5) for k in range(steps + 1)]
    assert warm[:4] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr]) and warm[4:16] == [lr] * 12
    assert [learning_rate(k, lr, "linear", 4, 14, decay_steps=14) for k in range(6)] == \
        pytest.approx([learning_rate(k, lr, "linear", 4, 14) for k in range(6)])
    # decay_steps 0 (the default) is the whole-run schedule
    assert [learning_rate(k, lr, "cosine", 2, steps, decay_steps=0) for k in range(steps)] == \
        [learning_rate(k, lr, "cosine", 2, steps) for k in range(steps)]


def test_config_refuses_an_unknown_schedule():
    with pytest.raises(ConfigError, match="optim.lr_schedule must be one of constant, cosine, linear"):
        load_config(None, ["optim.lr_schedule=step"])
