import math

import pytest
import torch
import torch.nn.functional as F

from dgpo.losses import (
    apply_clip,
    best_worst_advantages,
    dgpo_group_margin,
    dgpo_kl_term,
    dgpo_loss,
    dgpo_loss_exact,
    flow_grpo_kl,
    flow_grpo_loss,
    group_advantages,
    informative_groups,
    local_group_sum,
    per_sample_mse,
    ppo_clip_mask,
    rank_advantages,
    sde_step_kl,
    velocity_kl,
)


@pytest.fixture(autouse=True)
def float64_default():
    # Hand-computed values are checked to 1e-12; restore the default so other test files are unaffected.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


SQRT3 = math.sqrt(3.0)
SQRT2 = math.sqrt(2.0)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def two_group_rewards():
    # group 0: mean 0.25, population std sqrt(0.1875) = sqrt(3)/4
    # group 1: mean 0.5,  population std sqrt(0.125)  = sqrt(2)/4
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 0.0])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    return rewards, group_ids


# ----------------------------------------------------------------- group_advantages


def test_group_advantages_per_group_std_hand_computed():
    rewards, group_ids = two_group_rewards()
    advantages = group_advantages(rewards, group_ids, eps=0.0, clip=None)
    expected = torch.tensor([SQRT3, -1 / SQRT3, -1 / SQRT3, -1 / SQRT3, 0.0, 0.0, SQRT2, -SQRT2])
    torch.testing.assert_close(advantages, expected)


def test_group_advantages_eps_is_added_to_std():
    rewards, group_ids = two_group_rewards()
    advantages = group_advantages(rewards, group_ids, eps=0.1, clip=None)
    std0, std1 = SQRT3 / 4, SQRT2 / 4
    expected = torch.tensor(
        [0.75 / (std0 + 0.1)] + [-0.25 / (std0 + 0.1)] * 3 + [0.0, 0.0, 0.5 / (std1 + 0.1), -0.5 / (std1 + 0.1)]
    )
    torch.testing.assert_close(advantages, expected)


def test_group_advantages_global_std():
    rewards, group_ids = two_group_rewards()
    # batch mean 3/8; squared deviations sum to 1.375 over 8 samples
    global_std = math.sqrt(1.375 / 8)
    advantages = group_advantages(rewards, group_ids, std_mode="global", eps=0.0, clip=None)
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.5, -0.5])
    torch.testing.assert_close(advantages, centred / global_std)


def test_group_advantages_global_std_is_the_reference_stat_tracker():
    import numpy as np

    generator = torch.Generator().manual_seed(6)
    rewards = torch.rand(12, generator=generator)
    group_ids = torch.arange(3).repeat_interleave(4)
    # flow_grpo/stat_tracking.py, PerPromptStatTracker(global_std=True).update, written out:
    r = rewards.numpy()
    expected = np.empty_like(r)
    for g in range(3):
        members = group_ids.numpy() == g
        expected[members] = (r[members] - np.mean(r[members])) / (np.std(r) + 1e-4)
    advantages = group_advantages(rewards, group_ids, std_mode="global", eps=1e-4, clip=None)
    torch.testing.assert_close(advantages, torch.from_numpy(expected))


def test_group_advantages_no_std_only_centres():
    rewards, group_ids = two_group_rewards()
    advantages = group_advantages(rewards, group_ids, std_mode="none", clip=None)
    torch.testing.assert_close(advantages, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.5, -0.5]))


def test_group_advantages_clipping():
    rewards, group_ids = two_group_rewards()
    advantages = group_advantages(rewards, group_ids, eps=0.0, clip=1.0)
    expected = torch.tensor([1.0, -1 / SQRT3, -1 / SQRT3, -1 / SQRT3, 0.0, 0.0, 1.0, -1.0])
    torch.testing.assert_close(advantages, expected)

    # one success among 100: A = 0.99 / sqrt(0.0099) = sqrt(99) ~ 9.95, clipped by the default 5
    lone_success = torch.zeros(100)
    lone_success[0] = 1.0
    advantages = group_advantages(lone_success, torch.zeros(100, dtype=torch.long), eps=0.0)
    assert advantages[0].item() == 5.0
    torch.testing.assert_close(advantages[1], torch.tensor(-0.01 / math.sqrt(0.0099)))


def test_group_advantages_invalid_samples_are_excluded_and_zero():
    # group 0 is group 0 of two_group_rewards plus a NaN and a masked outlier
    rewards = torch.tensor([1.0, float("nan"), 0.0, 0.0, 100.0, 0.0, 0.5, 0.5, 1.0, 0.0])
    group_ids = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    valid = torch.tensor([True, False, True, True, False, True, True, True, True, True])
    advantages = group_advantages(rewards, group_ids, eps=0.0, clip=None, valid=valid)
    expected = torch.tensor([SQRT3, 0.0, -1 / SQRT3, -1 / SQRT3, 0.0, -1 / SQRT3, 0.0, 0.0, SQRT2, -SQRT2])
    assert torch.isfinite(advantages).all()
    torch.testing.assert_close(advantages, expected)

    # NaN rewards are invalid even without a mask, in every std mode
    for std_mode in ("group", "global", "none"):
        advantages = group_advantages(rewards, group_ids, std_mode=std_mode)
        assert torch.isfinite(advantages).all()
        assert advantages[1].item() == 0.0


def test_group_advantages_group_with_one_valid_sample_is_zero():
    rewards = torch.tensor([1.0, float("nan"), 1.0, 0.0, 0.0, 3.0])
    group_ids = torch.tensor([0, 0, 1, 1, 1, 2])
    advantages = group_advantages(rewards, group_ids, eps=0.0, clip=None)
    torch.testing.assert_close(advantages[[0, 1, 5]], torch.zeros(3))
    torch.testing.assert_close(advantages[2:5], torch.tensor([SQRT2, -1 / SQRT2, -1 / SQRT2]))


def test_group_advantages_zero_spread_group_is_zero_even_without_eps():
    advantages = group_advantages(torch.full((4,), 0.7), torch.zeros(4, dtype=torch.long), eps=0.0)
    assert torch.isfinite(advantages).all()
    assert advantages.abs().max().item() < 1e-6


def test_group_advantages_non_contiguous_ids():
    rewards, group_ids = two_group_rewards()
    expected = group_advantages(rewards, group_ids, eps=0.0, clip=None)
    permutation = torch.tensor([6, 0, 4, 3, 1, 7, 5, 2])
    relabelled = torch.where(group_ids == 0, 42, -7)[permutation]
    advantages = group_advantages(rewards[permutation], relabelled, eps=0.0, clip=None)
    torch.testing.assert_close(advantages, expected[permutation])


def test_group_advantages_rejects_bad_input():
    rewards, group_ids = two_group_rewards()
    with pytest.raises(ValueError, match="std_mode"):
        group_advantages(rewards, group_ids, std_mode="batch")
    with pytest.raises(ValueError, match="shape"):
        group_advantages(rewards, group_ids[:-1])
    with pytest.raises(ValueError, match="shape"):
        group_advantages(rewards, group_ids, valid=torch.ones(3, dtype=torch.bool))


# ----------------------------------------------------------------- margin and loss


def test_local_group_sum():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    group_ids = torch.tensor([9, 2, 9, 5, 2])
    torch.testing.assert_close(local_group_sum(values, group_ids), torch.tensor([4.0, 7.0, 4.0, 4.0, 7.0]))


def hand_example():
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    err_theta = torch.tensor([0.3, 0.5, 0.2, 0.1])
    err_ref = torch.tensor([0.4, 0.4, 0.2, 0.2])
    group_ids = torch.tensor([0, 0, 1, 1])
    return advantages, err_theta, err_ref, group_ids


def test_dgpo_margin_and_loss_hand_computed():
    advantages, err_theta, err_ref, group_ids = hand_example()
    beta = 2.0
    # S_0 = 2 * (1 * (0.3 - 0.4) - 1 * (0.5 - 0.4)) = -0.4
    # S_1 = 2 * (0.5 * (0.2 - 0.2) - 0.5 * (0.1 - 0.2)) = 0.1
    s0, s1 = -0.4, 0.1
    margin = dgpo_group_margin(advantages, err_theta, err_ref, group_ids, beta)
    torch.testing.assert_close(margin, torch.tensor([s0, s0, s1, s1]))

    loss, metrics = dgpo_loss(advantages, err_theta, err_ref, group_ids, beta)
    # sum_i sigmoid(S) * beta * A_i * l_theta_i / 2 groups
    expected_loss = (sigmoid(s0) * 2 * (0.3 - 0.5) + sigmoid(s1) * 2 * (0.5 * 0.2 - 0.5 * 0.1)) / 2
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert metrics["margin_mean"].item() == pytest.approx((s0 + s1) / 2, rel=1e-12)
    assert metrics["sigmoid_weight_mean"].item() == pytest.approx((sigmoid(s0) + sigmoid(s1)) / 2, rel=1e-12)
    assert metrics["implicit_accuracy"].item() == 0.5
    expected_objective = (math.log1p(math.exp(s0)) + math.log1p(math.exp(s1))) / 2
    assert metrics["preference_loss"].item() == pytest.approx(expected_objective, rel=1e-12)
    assert all(not value.requires_grad for value in metrics.values())

    exact = dgpo_loss_exact(advantages, err_theta, err_ref, group_ids, beta)
    assert exact.item() == pytest.approx(expected_objective, rel=1e-12)


def test_dgpo_metrics_are_over_the_informative_groups():
    advantages, err_theta, err_ref, group_ids = hand_example()
    # group 2 has equal rewards: A = 0, so S = 0 whatever its errors, and no gradient
    advantages = torch.cat([advantages, torch.zeros(3)])
    err_theta = torch.cat([err_theta, torch.tensor([0.9, 0.1, 0.5])])
    err_ref = torch.cat([err_ref, torch.tensor([0.2, 0.3, 0.5])])
    group_ids = torch.cat([group_ids, torch.full((3,), 2)])
    beta, s0, s1 = 2.0, -0.4, 0.1
    loss, metrics = dgpo_loss(advantages, err_theta, err_ref, group_ids, beta)
    # the loss is still the mean over all three groups ...
    assert loss.item() == pytest.approx((sigmoid(s0) * 2 * (0.3 - 0.5) + sigmoid(s1) * 2 * (0.5 * 0.2 - 0.5 * 0.1)) / 3, rel=1e-12)
    # ... but the metrics leave out the group with nothing to prefer (it would add ln 2 and a miss)
    assert metrics["preference_loss"].item() == pytest.approx((math.log1p(math.exp(s0)) + math.log1p(math.exp(s1))) / 2, rel=1e-12)
    assert metrics["implicit_accuracy"].item() == 0.5
    assert metrics["margin_mean"].item() == pytest.approx((s0 + s1) / 2, rel=1e-12)
    assert metrics["sigmoid_weight_mean"].item() == pytest.approx((sigmoid(s0) + sigmoid(s1)) / 2, rel=1e-12)

    _, none_informative = dgpo_loss(torch.zeros(3), err_theta[-3:], err_ref[-3:], group_ids[-3:], beta)
    assert all(math.isnan(value.item()) for value in none_informative.values())


def test_informative_groups_look_at_the_whole_group():
    advantages = torch.tensor([0.0, 0.0, 0.0, 0.0])
    group_ids = torch.tensor([0, 0, 1, 1])
    assert not informative_groups(advantages, group_ids).any()
    # group 1's nonzero advantages are on another rank: its local samples are informative all the same
    other_rank = {1: 2.0}

    def cross_rank_sum(values, ids):
        return local_group_sum(values, ids) + torch.tensor([other_rank.get(int(g), 0.0) for g in ids])

    assert informative_groups(advantages, group_ids, cross_rank_sum).tolist() == [False, False, True, True]
    assert informative_groups(torch.tensor([0.5, -0.5, 0.0, 0.0]), group_ids).tolist() == [True, True, False, False]


def test_margin_is_detached():
    advantages, err_theta, err_ref, group_ids = hand_example()
    err_theta.requires_grad_(True)
    assert not dgpo_group_margin(advantages, err_theta, err_ref, group_ids, 2.0).requires_grad


def random_groups(generator, num_groups=3, group_size=4):
    n = num_groups * group_size
    group_ids = torch.arange(num_groups).repeat(group_size)[torch.randperm(n, generator=generator)] * 10 + 3
    rewards = torch.rand(n, generator=generator)
    advantages = group_advantages(rewards, group_ids)
    err_ref = torch.rand(n, generator=generator)
    err_theta = err_ref + 0.05 * torch.randn(n, generator=generator)
    return advantages, err_theta, err_ref, group_ids


def test_surrogate_gradient_matches_exact_objective():
    generator = torch.Generator().manual_seed(0)
    advantages, err_theta, err_ref, group_ids = random_groups(generator)
    beta = 3.0

    leaf = err_theta.clone().requires_grad_(True)
    dgpo_loss(advantages, leaf, err_ref, group_ids, beta)[0].backward()
    leaf_exact = err_theta.clone().requires_grad_(True)
    dgpo_loss_exact(advantages, leaf_exact, err_ref, group_ids, beta).backward()
    torch.testing.assert_close(leaf.grad, leaf_exact.grad)
    assert leaf.grad.abs().max() > 0.1


def test_surrogate_gradient_matches_exact_objective_through_a_model():
    generator = torch.Generator().manual_seed(1)
    advantages, _, _, group_ids = random_groups(generator)
    n = advantages.numel()
    inputs = torch.randn(n, 5, generator=generator)
    targets = torch.randn(n, 2, generator=generator)
    model = torch.nn.Linear(5, 2)
    with torch.no_grad():
        err_ref = per_sample_mse(model(inputs) + 0.1, targets)
    beta = 5.0

    def parameter_grads(loss_fn):
        model.zero_grad()
        loss_fn(advantages, per_sample_mse(model(inputs), targets), err_ref, group_ids, beta).backward()
        return [p.grad.clone() for p in model.parameters()]

    surrogate = parameter_grads(lambda *args: dgpo_loss(*args)[0])
    exact = parameter_grads(dgpo_loss_exact)
    for g_surrogate, g_exact in zip(surrogate, exact):
        torch.testing.assert_close(g_surrogate, g_exact)


def test_weight_is_one_half_at_the_reference():
    generator = torch.Generator().manual_seed(2)
    advantages, _, err_ref, group_ids = random_groups(generator)
    err_theta = err_ref.clone().requires_grad_(True)
    beta = 7.0
    loss, metrics = dgpo_loss(advantages, err_theta, err_ref, group_ids, beta)
    assert metrics["sigmoid_weight_mean"].item() == 0.5
    assert metrics["margin_mean"].item() == 0.0
    assert metrics["implicit_accuracy"].item() == 0.0  # a zero margin prefers nothing
    loss.backward()
    # advantage-weighted flow matching: gradient 0.5 * beta * A_i / num_groups
    torch.testing.assert_close(err_theta.grad, 0.5 * beta * advantages / 3)


def test_split_group_over_micro_batches_gives_full_batch_gradient():
    generator = torch.Generator().manual_seed(3)
    group_ids = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2])
    advantages = group_advantages(torch.rand(8, generator=generator), group_ids)
    err_ref = torch.rand(8, generator=generator)
    err_theta = (err_ref + 0.2 * torch.randn(8, generator=generator)).requires_grad_(True)
    beta = 4.0

    dgpo_loss(advantages, err_theta, err_ref, group_ids, beta)[0].backward()
    full_batch_grad = err_theta.grad.clone()
    err_theta.grad = None

    # group 1 is split; each micro-batch holds only two of the three groups
    halves = [torch.arange(0, 4), torch.arange(4, 8)]
    for this, other in (halves, halves[::-1]):
        other_contribution = (advantages[other] * (err_theta[other] - err_ref[other])).detach()

        def cross_rank_group_sum(values, ids, other=other, other_contribution=other_contribution):
            all_values = torch.cat([values, other_contribution])
            all_ids = torch.cat([ids, group_ids[other]])
            return local_group_sum(all_values, all_ids)[: values.numel()]

        loss, _ = dgpo_loss(
            advantages[this],
            err_theta[this],
            err_ref[this],
            group_ids[this],
            beta,
            group_sum=cross_rank_group_sum,
            num_groups=3,
        )
        loss.backward()
    torch.testing.assert_close(err_theta.grad, full_batch_grad)


def test_gradient_step_prefers_positive_advantage_samples():
    advantages = torch.tensor([1.5, 0.5, -0.5, -1.5, 1.0, -1.0])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1])
    targets = torch.zeros(6)
    # one free parameter per sample, so steps do not interfere across samples
    predictions = torch.tensor([0.5, 0.4, 0.6, 0.3, 0.2, 0.7], requires_grad=True)
    err_ref = (predictions.detach() + 0.05 - targets).square()
    beta = 2.0

    def errors():
        return (predictions - targets).square()

    err_before = errors().detach()
    objective_before = dgpo_loss_exact(advantages, err_before, err_ref, group_ids, beta)
    loss, _ = dgpo_loss(advantages, errors(), err_ref, group_ids, beta)
    loss.backward()
    with torch.no_grad():
        predictions -= 0.01 * predictions.grad
    change = errors().detach() - err_before

    assert (change[advantages > 0] < 0).all()
    assert (change[advantages < 0] > 0).all()
    assert dgpo_loss_exact(advantages, errors().detach(), err_ref, group_ids, beta) < objective_before


def test_dgpo_loss_rejects_bad_input():
    advantages, err_theta, err_ref, group_ids = hand_example()
    with pytest.raises(ValueError, match="shape"):
        dgpo_loss(advantages, err_theta[:3], err_ref, group_ids, 1.0)
    with pytest.raises(ValueError, match="group_sum"):
        dgpo_loss(advantages, err_theta, err_ref, group_ids, 1.0, group_sum=lambda v, g: v.sum())
    with pytest.raises(ValueError, match="num_groups"):
        dgpo_loss(advantages, err_theta, err_ref, group_ids, 1.0, num_groups=0)


def reference_code_loss(advantages, err_theta, err_ref, kl, group_ids, beta_dpo, group_size, beta_kl):
    """DGPO's train_sd3_dgpo.py, written out: compute_group_dgpo_loss_allreduce plus its KL term."""
    with torch.no_grad():
        per_sample_term = advantages * beta_dpo * (err_theta - err_ref) / group_size
        group_sums = torch.zeros(int(group_ids.max()) + 1).scatter_add_(0, group_ids, per_sample_term)
        weights = torch.sigmoid(group_sums)[group_ids]
    preference = (weights * advantages * err_theta).mean()
    return preference, beta_kl * kl.mean()


def test_kl_term_keeps_the_reference_codes_ratio_of_preference_to_kl_gradient():
    generator = torch.Generator().manual_seed(4)
    num_groups, group_size = 3, 4
    n = num_groups * group_size
    group_ids = torch.arange(num_groups).repeat_interleave(group_size)
    advantages = group_advantages(torch.rand(n, generator=generator), group_ids)
    inputs = torch.randn(n, 5, generator=generator)
    targets = torch.randn(n, 2, generator=generator)
    model = torch.nn.Linear(5, 2)
    with torch.no_grad():
        v_ref = model(inputs) + 0.1 * torch.randn(n, 2, generator=generator)
        err_ref = per_sample_mse(v_ref, targets)
    beta, kl_beta = 2.5, 0.02  # beta on the group sum; the reference code's beta_dpo = beta * G = 10

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    def ours():
        v = model(inputs)
        preference = dgpo_loss(advantages, per_sample_mse(v, targets), err_ref, group_ids, beta)[0]
        return preference, dgpo_kl_term(velocity_kl(v, v_ref), beta, kl_beta, num_groups)

    def reference():
        v = model(inputs)
        return reference_code_loss(advantages, per_sample_mse(v, targets), err_ref, velocity_kl(v, v_ref), group_ids,
                                   beta * group_size, group_size, kl_beta)

    pref_ours, pref_ref = grads(ours()[0]), grads(reference()[0])
    kl_ours, kl_ref = grads(ours()[1]), grads(reference()[1])
    assert kl_ref.norm() > 1e-5 and pref_ref.norm() > 1e-3
    # Both terms are beta_dpo times the reference code's, so their ratio is the reference code's ...
    torch.testing.assert_close(pref_ours, beta * group_size * pref_ref)
    torch.testing.assert_close(kl_ours, beta * group_size * kl_ref)
    assert (pref_ours.norm() / kl_ours.norm()).item() == pytest.approx((pref_ref.norm() / kl_ref.norm()).item(), rel=1e-12)
    # ... and so is the whole gradient, up to that one factor.
    torch.testing.assert_close(grads(sum(ours())), beta * group_size * grads(sum(reference())))


def test_kl_term_hand_computed_and_rejects_bad_input():
    kl = torch.tensor([0.1, 0.3, 0.2, 0.4])
    # kl_beta * beta * sum / num_groups = 0.02 * 5 * 1.0 / 2
    assert dgpo_kl_term(kl, 5.0, 0.02, 2).item() == pytest.approx(0.05, rel=1e-12)
    with pytest.raises(ValueError, match="1-D"):
        dgpo_kl_term(kl.view(2, 2), 5.0, 0.02, 2)
    with pytest.raises(ValueError, match="num_groups"):
        dgpo_kl_term(kl, 5.0, 0.02, 0)


# ----------------------------------------------------------------- per-sample errors


def test_per_sample_mse_and_velocity_kl():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 2.0]]])
    target = torch.tensor([[[1.0, 0.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]])
    expected = torch.tensor([4.0 / 4, 4.0 / 4])
    torch.testing.assert_close(per_sample_mse(pred, target), expected)
    torch.testing.assert_close(velocity_kl(pred, target), expected)
    torch.testing.assert_close(per_sample_mse(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])), torch.tensor([1.0, 4.0]))
    with pytest.raises(ValueError, match="shape"):
        per_sample_mse(pred, target[:, :1])


# ----------------------------------------------------------------- PPO-style clip


def test_ppo_clip_mask_all_branches():
    clip_eps = 0.1
    # ratio = exp(err_old - err_theta): exp(0.2) ~ 1.22 > 1.1, exp(-0.2) ~ 0.82 < 0.9
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 0.0])
    err_old = torch.tensor([0.5, 0.3, 0.3, 0.3, 0.5, 0.3, 0.3])
    err_theta = torch.tensor([0.3, 0.5, 0.3, 0.5, 0.3, 0.3, 0.5])
    mask = ppo_clip_mask(advantages, err_theta, err_old, clip_eps)
    expected = torch.tensor(
        [
            True,  # A > 0, ratio above 1 + eps: already improved enough
            False,  # A > 0, ratio below 1 + eps
            False,  # A > 0, ratio 1
            True,  # A < 0, ratio below 1 - eps: already worsened enough
            False,  # A < 0, ratio above 1 - eps
            False,  # A < 0, ratio 1
            True,  # A == 0 counts as negative
        ]
    )
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_apply_clip_stops_gradient_only_where_masked():
    err_theta = torch.tensor([0.1, 0.2, 0.3, 0.4], requires_grad=True)
    mask = torch.tensor([True, False, True, False])
    clipped = apply_clip(err_theta, mask)
    torch.testing.assert_close(clipped, err_theta.detach())
    clipped.sum().backward()
    torch.testing.assert_close(err_theta.grad, torch.tensor([0.0, 1.0, 0.0, 1.0]))


# ----- baselines and advantage variants ---------------------------------------------------------


def test_best_worst_advantages_pick_each_groups_pair_and_skip_ties_and_nan():
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.9, 0.4, 0.4, float("nan"), 0.1, 0.7])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    expected = torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 1.0])
    assert torch.equal(best_worst_advantages(rewards, groups), expected)


def test_rank_advantages_hand_example_with_ties():
    rewards = torch.tensor([0.3, 0.1, 0.3, 0.8, 5.0, -2.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    # group 0 ranks: 0.1 -> 1, 0.3 and 0.3 -> 2.5, 0.8 -> 4; A = 2 (rank - 1) / 3 - 1
    expected = torch.tensor([0.0, -1.0, 0.0, 1.0, 1.0, -1.0])
    torch.testing.assert_close(rank_advantages(rewards, groups), expected)


def test_rank_advantages_ignore_reward_scale():
    rewards = torch.tensor([0.1, 0.5, 0.2, 0.9])
    groups = torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(rank_advantages(rewards, groups), rank_advantages(rewards * 100 - 3, groups))


def test_dgpo_with_best_worst_advantages_is_the_diffusion_dpo_loss():
    err_theta = torch.tensor([0.5, 0.7, 0.4, 0.9, 0.3, 0.6], requires_grad=True)
    err_ref = torch.tensor([0.55, 0.6, 0.45, 0.8, 0.35, 0.5])
    rewards = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.8, 0.3])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    beta = 7.0
    grad_dgpo = torch.autograd.grad(dgpo_loss_exact(best_worst_advantages(rewards, groups), err_theta, err_ref, groups, beta), err_theta)[0]
    delta = err_theta - err_ref
    # Diffusion-DPO: -log sigmoid(-beta * ((l_theta - l_ref)(winner) - (l_theta - l_ref)(loser))), winners 0 and 4, losers 1 and 3.
    dpo = -(F.logsigmoid(-beta * (delta[0] - delta[1])) + F.logsigmoid(-beta * (delta[4] - delta[3]))) / 2
    grad_dpo = torch.autograd.grad(dpo, err_theta)[0]
    torch.testing.assert_close(grad_dgpo, grad_dpo)


def test_flow_grpo_loss_hand_computation():
    log_prob = torch.tensor([0.0, 0.2, -0.3], requires_grad=True)
    old = torch.tensor([0.0, 0.0, 0.0])
    advantages = torch.tensor([1.0, 1.0, -2.0])
    eps = 0.1
    loss, metrics = flow_grpo_loss(log_prob, old, advantages, eps, num_samples=4)
    r = torch.exp(torch.tensor([0.0, 0.2, -0.3]))
    # sample 1: ratio 1.22 > 1.1 with A > 0 -> clipped term -1.1 is larger; sample 2: ratio 0.74, A < 0 -> max(1.48, 1.8) = 1.8
    expected = (-1.0 * r[0] + -1.0 * 1.1 + max(2.0 * r[2].item(), 2.0 * 0.9)) / 4
    torch.testing.assert_close(loss, torch.tensor(float(expected)))
    (grad,) = torch.autograd.grad(loss, log_prob)
    # clipped samples get no gradient; the first gets -A * ratio / N
    torch.testing.assert_close(grad, torch.tensor([-0.25, 0.0, 0.0]))
    assert metrics["clipped_fraction"].item() == pytest.approx(2 / 3)


def test_flow_grpo_loss_at_ratio_one_is_the_policy_gradient():
    log_prob = torch.randn(5, requires_grad=True)
    advantages = torch.randn(5)
    loss, _ = flow_grpo_loss(log_prob, log_prob.detach(), advantages, 1e-4)
    (grad,) = torch.autograd.grad(loss, log_prob)
    torch.testing.assert_close(grad, -advantages / 5)


def test_sde_step_kl_matches_torch_distributions():
    mean_a, mean_b = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    std = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean_a, std.expand_as(mean_a)), torch.distributions.Normal(mean_b, std.expand_as(mean_b)))
    torch.testing.assert_close(sde_step_kl(mean_a, mean_b, std), kl.mean(dim=(1, 2)))


def test_flow_grpo_kl_is_the_reference_codes_form():
    from dgpo.sampling import sde_step_mean_std

    generator = torch.Generator().manual_seed(5)
    # Flow-GRPO's SD3 grid (diffusers' FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(10): 1.0, 0.960, ...,
    # 0.278, 0.0089, 0): it starts at exactly 1, where sigma_max enters.
    base = torch.linspace(1.0, 3e-3 / (1 + 2e-3), 10, dtype=torch.float64)
    sigmas = torch.cat([3 * base / (1 + 2 * base), torch.zeros(1, dtype=torch.float64)])
    index = torch.tensor([0, 3, 8])  # sigma 1 (where sigma_max enters), the middle, the last stochastic step
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    x = torch.randn(3, 2, 4, 4, generator=generator)
    v_theta, v_ref = torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 2, 4, 4, generator=generator)
    a = 0.7
    mean_theta, std = sde_step_mean_std(x, v_theta, sigma, sigma_next, a, sigma_max=sigmas[1])
    mean_ref, _ = sde_step_mean_std(x, v_ref, sigma, sigma_next, a, sigma_max=sigmas[1])

    # Flow-GRPO's sde_step_with_logprob and train_sd3.py, written out:
    s = sigma.view(-1, 1, 1, 1)
    std_dev_t = torch.sqrt(s / (1 - torch.where(s == 1, sigmas[1], s))) * a
    reference = ((mean_theta - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)
    torch.testing.assert_close(flow_grpo_kl(mean_theta, mean_ref, std, sigma_next - sigma), reference.flatten())
    # ... which is |dt| times the exact KL between the two steps' Gaussians (1/|dt| = 3.7 to 25 on this grid's first 9 steps).
    exact = sde_step_kl(mean_theta, mean_ref, std)
    torch.testing.assert_close(reference.flatten(), exact * (sigma - sigma_next))
    assert (exact / reference.flatten()).min() > 3.5
