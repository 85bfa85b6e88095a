"""DGPO losses as pure functions of tensors.

Notation (DGPO paper, arXiv 2510.08425): a group is the set of G samples drawn for
one prompt; ``A_i`` is the group-normalised advantage of sample i; ``l_theta`` and
``l_ref`` are the per-sample denoising errors of the online and reference models at
the same re-noised point ``x_t = (1 - t) x + t * eps``.

Nothing here talks to other processes. Where a quantity needs every sample of a
group and a group may be spread over micro-batches or ranks, the caller passes a
``group_sum(values, group_ids)`` callable that returns each sample's group total
(for example one that all-reduces the per-group partial sums).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

GroupSum = Callable[[Tensor, Tensor], Tensor]

_STD_MODES = ("group", "global", "none")


def _require_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first_name, first_shape = next(iter(shapes.items()))
    if len(first_shape) != 1:
        raise ValueError(f"{first_name} must be 1-D (one value per sample), got shape {first_shape}")
    mismatched = {name: shape for name, shape in shapes.items() if shape != first_shape}
    if mismatched:
        raise ValueError(f"shape mismatch: expected every input to have shape {first_shape}, got {shapes}")


def local_group_sum(values: Tensor, group_ids: Tensor) -> Tensor:
    """Per-sample group total over the samples present in this call.

        out_i = sum_{j : group_ids_j == group_ids_i} values_j

    Group ids may be any integers, in any order. Differentiable in ``values``.
    """
    _require_same_shape(values=values, group_ids=group_ids)
    unique_ids, sample_to_group = torch.unique(group_ids, return_inverse=True)
    totals = values.new_zeros(unique_ids.numel()).index_add(0, sample_to_group, values)
    return totals[sample_to_group]


def _one_value_per_group(per_sample: Tensor, group_ids: Tensor) -> Tensor:
    """Collapse a per-sample tensor that is constant within each group to one entry per local group."""
    unique_ids, sample_to_group = torch.unique(group_ids, return_inverse=True)
    return per_sample.new_zeros(unique_ids.numel()).scatter_reduce(
        0, sample_to_group, per_sample, reduce="amax", include_self=False
    )


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std_mode: str = "group",
    eps: float = 1e-4,
    clip: float | None = 5.0,
    valid: Tensor | None = None,
) -> Tensor:
    """Group-normalised advantages (DGPO paper, Sec. 3, the A_i entering Eq. 17).

        A_i = clip((r_i - mean_{g(i)}(r)) / (std + eps), -clip, clip)

    ``std`` is the population standard deviation of the valid rewards of sample i's
    group (``std_mode="group"``) or of all valid rewards in the batch
    (``std_mode="global"``); ``std_mode="none"`` only centres (A_i = r_i - mean).

    A sample counts as valid when ``valid`` (default: all) is true and its reward
    is finite. Invalid samples are left out of every mean and std and get A = 0;
    so does every sample of a group with fewer than two valid samples, since a
    single sample carries no preference.
    """
    if std_mode not in _STD_MODES:
        raise ValueError(f"unknown std_mode {std_mode!r}; expected one of {_STD_MODES}")
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    _require_same_shape(rewards=rewards, group_ids=group_ids, valid=valid)

    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    valid = valid.to(torch.bool) & torch.isfinite(rewards)
    valid_weight = valid.to(rewards.dtype)
    # Zero the invalid rewards before summing: NaN * 0 is still NaN.
    clean_rewards = torch.where(valid, rewards, torch.zeros_like(rewards))

    valid_count = local_group_sum(valid_weight, group_ids)
    group_mean = local_group_sum(clean_rewards, group_ids) / valid_count.clamp_min(1.0)
    # Invalid samples, and the lone valid sample of a group, come out exactly 0 here,
    # and stay 0 through the division and clipping below.
    centred = (clean_rewards - group_mean) * valid_weight

    if std_mode == "group":
        std = torch.sqrt(local_group_sum(centred.square(), group_ids) / valid_count.clamp_min(1.0))
    elif std_mode == "global":
        num_valid = valid_weight.sum().clamp_min(1.0)
        batch_mean = clean_rewards.sum() / num_valid
        std = torch.sqrt((((clean_rewards - batch_mean) * valid_weight).square()).sum() / num_valid)
    else:
        std = None

    if std is None:
        advantages = centred
    else:
        denominator = std + eps
        # A zero-spread group with eps == 0 would give 0 / 0.
        advantages = torch.where(denominator > 0, centred / denominator, 0.0)

    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages


def dgpo_group_margin(
    advantages: Tensor,
    err_theta: Tensor,
    err_ref: Tensor,
    group_ids: Tensor,
    beta: float,
    group_sum: GroupSum | None = None,
) -> Tensor:
    """Group preference margin, broadcast to every sample of the group (DGPO Eq. 17).

        S_i = beta * sum_{j in group(i)} A_j * (l_theta(x_j) - l_ref(x_j))

    Computed without gradient: the surrogate in :func:`dgpo_loss` uses S only as a
    weight. ``group_sum`` defaults to :func:`local_group_sum`; pass one that sums
    across ranks when a group's samples are not all in this call.
    """
    _require_same_shape(advantages=advantages, err_theta=err_theta, err_ref=err_ref, group_ids=group_ids)
    group_sum = local_group_sum if group_sum is None else group_sum
    with torch.no_grad():
        contributions = advantages.detach() * (err_theta.detach() - err_ref.detach())
        group_totals = group_sum(contributions, group_ids)
    if group_totals.shape != advantages.shape:
        raise ValueError(
            f"group_sum must return one total per sample, shape {tuple(advantages.shape)}; "
            f"got {tuple(group_totals.shape)}"
        )
    return (beta * group_totals).detach()


def dgpo_loss(
    advantages: Tensor,
    err_theta: Tensor,
    err_ref: Tensor,
    group_ids: Tensor,
    beta: float,
    *,
    group_sum: GroupSum | None = None,
    num_groups: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DGPO loss (paper Eq. 17) as a surrogate with the same gradient.

    The objective per group is

        L_group = -log sigmoid(-S),   S = beta * sum_i A_i * (l_theta(x_i) - l_ref(x_i)),

    whose gradient is dL/dtheta = sigmoid(S) * beta * sum_i A_i * dl_theta(x_i)/dtheta.
    This function returns

        loss = (1 / num_groups) * sum_i stopgrad(sigmoid(S_group(i))) * beta * A_i * l_theta(x_i),

    i.e. the gradient of the mean over groups of L_group. Only S needs the whole
    group (through ``group_sum``); the rest is a per-sample sum, so splitting a group
    over micro-batches or ranks and summing their gradients reproduces the
    full-batch gradient, provided ``num_groups`` is the global group count. It
    defaults to the number of distinct group ids in this call.

    The loss value itself is not the objective; ``metrics["preference_loss"]``
    holds the mean over local groups of -log sigmoid(-S).

    Metrics (detached, over the groups present in this call):
    ``sigmoid_weight_mean`` mean sigmoid(S); ``margin_mean`` mean S;
    ``implicit_accuracy`` fraction of groups with S < 0, i.e. the online model
    already favours the positive-advantage samples more than the reference does;
    ``preference_loss`` mean -log sigmoid(-S).
    """
    margin = dgpo_group_margin(advantages, err_theta, err_ref, group_ids, beta, group_sum)
    if num_groups is None:
        num_groups = int(torch.unique(group_ids).numel())
    if num_groups <= 0:
        raise ValueError(f"num_groups must be positive, got {num_groups}")

    weight = torch.sigmoid(margin)
    loss = (weight * beta * advantages.detach() * err_theta).sum() / num_groups

    with torch.no_grad():
        group_margin = _one_value_per_group(margin, group_ids)
        metrics = {
            "sigmoid_weight_mean": torch.sigmoid(group_margin).mean(),
            "margin_mean": group_margin.mean(),
            "implicit_accuracy": (group_margin < 0).to(margin.dtype).mean(),
            "preference_loss": -F.logsigmoid(-group_margin).mean(),
        }
    return loss, metrics


def dgpo_loss_exact(
    advantages: Tensor,
    err_theta: Tensor,
    err_ref: Tensor,
    group_ids: Tensor,
    beta: float,
) -> Tensor:
    """The literal DGPO objective (paper Eq. 17), differentiated as written.

        L = mean_groups -log sigmoid(-beta * sum_{i in group} A_i * (l_theta(x_i) - l_ref(x_i)))

    Every sample of each group must be in this call. Its gradient equals that of
    :func:`dgpo_loss` with the default ``num_groups``.
    """
    _require_same_shape(advantages=advantages, err_theta=err_theta, err_ref=err_ref, group_ids=group_ids)
    unique_ids, sample_to_group = torch.unique(group_ids, return_inverse=True)
    contributions = advantages.detach() * (err_theta - err_ref.detach())
    group_margin = beta * contributions.new_zeros(unique_ids.numel()).index_add(0, sample_to_group, contributions)
    return -F.logsigmoid(-group_margin).mean()


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error over all non-batch dims.

        out_n = mean_k (pred_{n,k} - target_{n,k})^2

    With ``target = eps - x`` this is the velocity error l(x) of DGPO Eq. 17.
    """
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    return (pred - target).square().reshape(pred.shape[0], -1).mean(dim=1)


def velocity_kl(v_theta: Tensor, v_ref: Tensor) -> Tensor:
    """Per-sample KL surrogate to the reference, as in the DGPO reference code.

        kl_n = mean_k (v_theta_{n,k} - v_ref_{n,k})^2

    Not part of the paper's objective; the reference code adds it. The caller
    multiplies by beta_kl and is responsible for ``v_ref`` carrying no gradient.
    """
    return per_sample_mse(v_theta, v_ref)


def ppo_clip_mask(advantages: Tensor, err_theta: Tensor, err_old: Tensor, clip_eps: float) -> Tensor:
    """Samples whose error has moved past the trust region (DGPO reference code).

        ratio_i = exp(l_old(x_i) - l_theta(x_i))
        clipped_i = (A_i > 0 and ratio_i > 1 + clip_eps) or (A_i <= 0 and ratio_i < 1 - clip_eps)

    ``ratio`` plays the role of the PPO likelihood ratio, since a lower denoising
    error means a higher likelihood. A clipped sample has already moved in the
    direction its advantage asks for, so the caller stops its gradient
    (:func:`apply_clip`). Returns a bool tensor.
    """
    _require_same_shape(advantages=advantages, err_theta=err_theta, err_old=err_old)
    with torch.no_grad():
        ratio = torch.exp(err_old - err_theta)
        positive = advantages > 0
        return (positive & (ratio > 1 + clip_eps)) | (~positive & (ratio < 1 - clip_eps))


def apply_clip(err_theta: Tensor, mask: Tensor) -> Tensor:
    """Detach ``err_theta`` where ``mask`` is true; the value is unchanged."""
    return torch.where(mask, err_theta.detach(), err_theta)
