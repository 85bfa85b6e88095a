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
    holds the mean over informative local groups of -log sigmoid(-S).

    Metrics (detached), over the *informative* groups present in this call, those with
    a nonzero advantage: a group whose rewards are all equal has A = 0, hence S = 0
    exactly and no gradient, and would count as ln 2 and as a miss whatever the
    model does. ``sigmoid_weight_mean`` mean sigmoid(S); ``margin_mean`` mean S;
    ``implicit_accuracy`` fraction of groups with S < 0, i.e. the online model
    already favours the positive-advantage samples more than the reference does;
    ``preference_loss`` mean -log sigmoid(-S). Each is NaN when no group is
    informative. Whether a group is informative is decided over the whole group
    (through ``group_sum``).
    """
    margin = dgpo_group_margin(advantages, err_theta, err_ref, group_ids, beta, group_sum)
    if num_groups is None:
        num_groups = int(torch.unique(group_ids).numel())
    if num_groups <= 0:
        raise ValueError(f"num_groups must be positive, got {num_groups}")

    weight = torch.sigmoid(margin)
    loss = (weight * beta * advantages.detach() * err_theta).sum() / num_groups

    with torch.no_grad():
        informative = informative_groups(advantages, group_ids, group_sum)
        group_informative = _one_value_per_group(informative.to(margin.dtype), group_ids) > 0
        group_margin = _one_value_per_group(margin, group_ids)[group_informative]
        metrics = {
            "sigmoid_weight_mean": torch.sigmoid(group_margin).mean(),
            "margin_mean": group_margin.mean(),
            "implicit_accuracy": (group_margin < 0).to(margin.dtype).mean(),
            "preference_loss": -F.logsigmoid(-group_margin).mean(),
        }
    return loss, metrics


def informative_groups(advantages: Tensor, group_ids: Tensor, group_sum: GroupSum | None = None) -> Tensor:
    """Per sample: does its group carry a preference, i.e. a nonzero advantage?

        informative_i = sum_{j in group(i)} |A_j| > 0

    False for a group whose valid rewards are all equal (zero variance), or that has
    fewer than two valid samples: :func:`group_advantages` gives it A = 0, so its
    margin S is 0 whatever the model. ``group_sum`` as in :func:`dgpo_group_margin`.
    """
    _require_same_shape(advantages=advantages, group_ids=group_ids)
    group_sum = local_group_sum if group_sum is None else group_sum
    with torch.no_grad():
        return group_sum(advantages.detach().abs(), group_ids) > 0


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


def dgpo_kl_term(kl: Tensor, beta: float, kl_beta: float, num_groups: int) -> Tensor:
    """KL to the reference on the scale of :func:`dgpo_loss`, so that ``kl_beta`` is the reference code's beta_kl.

        loss_kl = kl_beta * beta * (1 / num_groups) * sum_i kl_i

    The reference code (DGPO's train_sd3_dgpo.py) minimises, over the N = G * num_groups samples
    of a step,

        L_ref = (1 / N) * sum_i stopgrad(sigmoid(S_g(i))) * A_i * l_theta(x_i) + beta_kl * (1 / N) * sum_i kl_i

    with beta_dpo = beta * G inside S. :func:`dgpo_loss` keeps the paper's exact gradient of
    Eq. 17, which is beta * G (= beta_dpo) times the first term's. Multiplying the KL term by the
    same factor, beta * G * beta_kl * (1 / N) * sum_i kl_i = beta_kl * beta * (1 / num_groups) * sum_i kl_i,
    keeps the ratio of the preference gradient to the KL gradient the reference code's: the total
    gradient is exactly beta_dpo times the reference code's. ``kl`` is the per-sample KL
    (e.g. :func:`velocity_kl`); as in :func:`dgpo_loss`, ``num_groups`` is the global group count
    so that micro-batches and ranks sum to the full-batch gradient.
    """
    if kl.dim() != 1:
        raise ValueError(f"kl must be 1-D (one value per sample), got shape {tuple(kl.shape)}")
    if num_groups <= 0:
        raise ValueError(f"num_groups must be positive, got {num_groups}")
    return kl_beta * beta * kl.sum() / num_groups


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

    Not part of the paper's objective; the reference code adds it. The caller weights it
    (:func:`dgpo_kl_term`) and is responsible for ``v_ref`` carrying no gradient.
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


def _valid_mask(rewards: Tensor, valid: Tensor | None) -> Tensor:
    mask = torch.isfinite(rewards)
    return mask if valid is None else mask & valid.to(torch.bool)


def best_worst_advantages(rewards: Tensor, group_ids: Tensor, valid: Tensor | None = None) -> Tensor:
    """Diffusion-DPO's preference pair drawn from a group, as advantages.

        A_i = +1 for the group's best valid sample, -1 for its worst, 0 otherwise

    (the lowest index wins ties), and A = 0 for the whole group when best and worst
    rewards are equal. With these advantages the DGPO margin of Eq. 17 becomes
    beta * ((l_theta - l_ref)(x_w) - (l_theta - l_ref)(x_l)), the Diffusion-DPO loss
    (Wallace et al. 2024, Eq. 14, with its constant T/2 folded into beta).
    """
    _require_same_shape(rewards=rewards, group_ids=group_ids)
    mask = _valid_mask(rewards, valid)
    advantages = torch.zeros_like(rewards, dtype=torch.promote_types(rewards.dtype, torch.float32))
    for group in torch.unique(group_ids):
        members = torch.nonzero((group_ids == group) & mask).flatten()
        if members.numel() < 2:
            continue
        values = rewards[members]
        best, worst = members[torch.argmax(values)], members[torch.argmin(values)]
        if rewards[best] > rewards[worst]:
            advantages[best], advantages[worst] = 1.0, -1.0
    return advantages


def rank_advantages(rewards: Tensor, group_ids: Tensor, valid: Tensor | None = None) -> Tensor:
    """Centred within-group ranks, an alternative to the weighting w = |A| (paper Sec. 6, open question).

        A_i = 2 * (rank_i - 1) / (n - 1) - 1,   rank_i in 1..n among the group's n valid samples

    with tied rewards sharing their average rank, so A lies in [-1, 1], sums to zero within
    a group, and depends only on the order of the rewards, not on their spread.
    """
    _require_same_shape(rewards=rewards, group_ids=group_ids)
    mask = _valid_mask(rewards, valid)
    advantages = torch.zeros_like(rewards, dtype=torch.promote_types(rewards.dtype, torch.float32))
    for group in torch.unique(group_ids):
        members = torch.nonzero((group_ids == group) & mask).flatten()
        n = members.numel()
        if n < 2:
            continue
        values = rewards[members].double()
        below = (values[None, :] < values[:, None]).sum(dim=1).double()
        ties = (values[None, :] == values[:, None]).sum(dim=1).double()
        average_rank = below + (ties + 1) / 2
        advantages[members] = (2 * (average_rank - 1) / (n - 1) - 1).to(advantages.dtype)
    return advantages


def flow_grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_eps: float,
    num_samples: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow-GRPO's clipped policy objective for one SDE transition per sample (Flow-GRPO Eq. 5, PPO).

        ratio_i = exp(log p_theta(x_next_i | x_i) - log p_old(x_next_i | x_i))
        L = (1 / N) * sum_i max(-A_i * ratio_i, -A_i * clip(ratio_i, 1 - eps, 1 + eps))

    ``N`` is ``num_samples`` (the global sample count, so that micro-batches and ranks sum
    to the full-batch gradient) and defaults to the local count. Metrics: the fraction of
    samples whose ratio was clipped and the mean approximate KL 0.5 * (log ratio)^2.
    """
    _require_same_shape(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages)
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    num_samples = log_prob.numel() if num_samples is None else num_samples
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(unclipped, clipped).sum() / num_samples
    with torch.no_grad():
        metrics = {
            "clipped_fraction": ((ratio - 1.0).abs() > clip_eps).to(ratio.dtype).mean(),
            "approx_kl": (0.5 * log_ratio.square()).mean(),
        }
    return loss, metrics


def sde_step_kl(mean_theta: Tensor, mean_ref: Tensor, std: Tensor | float) -> Tensor:
    """Per-sample KL between two SDE transitions with the same std: the exact per-step KL.

        kl_n = MEAN over non-batch dims of (mean_theta - mean_ref)^2 / (2 std^2)

    The mean over dimensions matches ``sampling.sde_step_log_prob`` and Flow-GRPO's code. Flow-GRPO's
    training loss uses :func:`flow_grpo_kl`, which is this times |dt|.
    """
    if mean_theta.shape != mean_ref.shape:
        raise ValueError(f"shape mismatch: {tuple(mean_theta.shape)} vs {tuple(mean_ref.shape)}")
    squared = (mean_theta - mean_ref).square() / (2.0 * torch.as_tensor(std, dtype=mean_theta.dtype) ** 2)
    return squared.reshape(mean_theta.shape[0], -1).mean(dim=1)


def flow_grpo_kl(mean_theta: Tensor, mean_ref: Tensor, std: Tensor | float, dt: Tensor | float) -> Tensor:
    """Per-sample KL term of Flow-GRPO's loss, in its reference code's form (train_sd3.py).

        kl_n = MEAN over non-batch dims of (mean_theta - mean_ref)^2 / (2 sigma_t^2),   sigma_t = std / sqrt(|dt|)

    A step of the SDE is Gaussian with std ``std`` = sigma_t * sqrt(|dt|) (``sampling.sde_step_mean_std``),
    sigma_t = a * sqrt(t / (1 - t)). The reference code divides by 2 * sigma_t^2, without the
    sqrt(|dt|), so its term is |dt| times the exact KL of :func:`sde_step_kl`: this function returns
    that, so that Flow-GRPO's KL weight (0.04) means what it means there. ``dt`` is a float or one
    value per sample.
    """
    exact = sde_step_kl(mean_theta, mean_ref, std)
    return exact * torch.as_tensor(dt, dtype=exact.dtype, device=exact.device).abs().reshape(-1)


def nft_optimality(advantages: Tensor, advantage_max: float) -> Tensor:
    """DiffusionNFT's optimality probability r in [0, 1] from group advantages (arXiv 2509.16117, Sec. 3).

        r_i = clip(clip(A_i, -A_max, A_max) / A_max / 2 + 1/2, 0, 1)

    The paper writes r = 1/2 + 1/2 clip((r_raw - E[r_raw]) / Z_c, -1, 1) with a normaliser Z_c; the reference code
    (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py, the "normalize advantage" lines of the training loop) divides the
    std-normalised advantage by its clip bound adv_clip_max (5), i.e. Z_c = 5 std. This follows the code.
    """
    if advantage_max <= 0:
        raise ValueError(f"advantage_max must be > 0, got {advantage_max}")
    clipped = advantages.clamp(-advantage_max, advantage_max)
    return (clipped / advantage_max / 2.0 + 0.5).clamp(0.0, 1.0)


def diffusion_nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    sigma: Tensor,
    advantages: Tensor,
    beta: float,
    *,
    advantage_max: float = 5.0,
    num_samples: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT's negative-aware flow-matching loss (arXiv 2509.16117, Eq. 7 with its adaptive weighting).

    With the forward-noised final sample x_t = (1 - t) x0 + t eps, target v = eps - x0, the old (rollout) policy's
    velocity v_old, the trained one v_theta and the guidance strength beta, the implicit positive and negative
    policies are

        v+ = (1 - beta) v_old + beta v_theta,        v- = (1 + beta) v_old - beta v_theta

    and the paper's loss is r ||v+ - v||^2 + (1 - r) ||v- - v||^2 with r = ``nft_optimality(A, A_max)``. The reference
    code (scripts/train_nft_sd3.py, "adaptive weighting") regresses the x0 predictions x0± = x_t - t v± instead, each
    error normalised by its own detached mean absolute error, and scales by A_max / beta:

        e±_i = x0±_i - x0_i   (= t_i (v - v±_i)),     w±_i = stopgrad(max(mean_k |e±_ik|, 1e-5))
        l±_i = mean_k (e±_ik)^2 / w±_i
        L    = (A_max / beta) * (1 / N) * sum_i [ r_i l+_i + (1 - r_i) l-_i ]

    This function is that code form. At v_theta = v_old the gradient is (1/N) sum_i A_i d/dtheta [t_i^2 mean_k
    (v_theta - v)^2 / w_i]: advantage-weighted flow matching, whatever beta. ``N`` is ``num_samples`` (the global
    sample count, so that micro-batches and ranks sum to the full-batch gradient), default the local count. ``v_old``
    must carry no gradient (it is detached here). ``sigma`` is one t per sample.

    Metrics: ``old_deviation`` mean (v_theta - v_old)^2 (the reference's old_deviate), ``positive_loss`` and
    ``negative_loss`` the means of l+ and l-, ``optimality_mean`` the mean r.
    """
    if v_theta.shape != v_old.shape or v_theta.shape != x_t.shape or v_theta.shape != x0.shape:
        raise ValueError(f"shape mismatch: v_theta {tuple(v_theta.shape)}, v_old {tuple(v_old.shape)}, x_t {tuple(x_t.shape)}, x0 {tuple(x0.shape)}")
    _require_same_shape(sigma=sigma, advantages=advantages)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    num_samples = v_theta.shape[0] if num_samples is None else num_samples
    dims = tuple(range(1, v_theta.ndim))
    t = sigma.view(-1, *([1] * (v_theta.ndim - 1))).to(v_theta.dtype)
    v_old = v_old.detach()
    r = nft_optimality(advantages.detach().to(v_theta.dtype), advantage_max)

    def self_normalised(v_implicit: Tensor) -> Tensor:
        error = (x_t - t * v_implicit) - x0
        with torch.no_grad():
            weight = error.double().abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
        return (error.square() / weight).to(v_theta.dtype).mean(dim=dims)

    positive = self_normalised(beta * v_theta + (1.0 - beta) * v_old)
    negative = self_normalised((1.0 + beta) * v_old - beta * v_theta)
    per_sample = r * positive + (1.0 - r) * negative
    loss = (advantage_max / beta) * per_sample.sum() / num_samples
    with torch.no_grad():
        metrics = {
            "old_deviation": (v_theta - v_old).square().mean(),
            "positive_loss": positive.mean(),
            "negative_loss": negative.mean(),
            "optimality_mean": r.mean(),
        }
    return loss, metrics


_AWM_WEIGHTINGS = ("ghuber", "uniform")
_GHUBER_EPS = 1e-10


def awm_matching_loss(err: Tensor, sigma: Tensor, weighting: str = "ghuber", power: float = 0.25) -> Tensor:
    """Per-sample flow-matching loss of AWM (arXiv 2509.25050), the negative of its code's ``log_prob``.

        uniform:  m_i = l_i
        ghuber:   m_i = t_i * ((l_i + 1e-10)^p - (1e-10)^p) / p          (generalised Huber, p = ``power``)

    where l_i = mean_k (v_theta - (eps - x0))^2 is the velocity error at t_i. The paper weights the matching loss by
    w(t); the reference code's configs all use "ghuber" with p = 0.25 (scxue/advantage_weighted_matching,
    scripts/train_sd3_awm.py: compute_log_prob_awm; config/dgx_awm.py: weighting, ghuber_power).
    """
    if weighting not in _AWM_WEIGHTINGS:
        raise ValueError(f"unknown AWM weighting {weighting!r}; expected one of {_AWM_WEIGHTINGS}")
    _require_same_shape(err=err, sigma=sigma)
    if weighting == "uniform":
        return err
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}")
    return sigma.to(err.dtype) * ((err + _GHUBER_EPS).pow(power) - _GHUBER_EPS**power) / power


def awm_loss(
    advantages: Tensor,
    err_theta: Tensor,
    sigma: Tensor,
    *,
    advantage_max: float = 5.0,
    weighting: str = "ghuber",
    power: float = 0.25,
    num_samples: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Advantage Weighted Matching (AWM, arXiv 2509.25050, Sec. 4): the pretraining flow-matching loss on the rollout
    samples, weighted by their advantage.

        L = (1 / N) * sum_i (A_i / A_max) * m_i,        m_i = awm_matching_loss(l_i, t_i)

    The reference code writes it as a PPO surrogate mean(max(-A' ratio, -A' clip(ratio, 1 - c, 1 + c))) with
    ratio = exp(-m - stopgrad(-m)) and A' = clip(A, -5, 5) / 5 * advantage_max (advantage_max = 1); on-policy
    (its train.off_policy False) the "old" value is the current model's own detached one, so the ratio is 1, clip_range 1
    never binds, and the gradient is exactly that of L above, which this function returns (its value differs: the
    reference's is -mean(A')). ``A_max`` is the advantage clip bound (the reference's adv_clip_max, 5); ``N`` the
    global sample count, default the local count.

    Metrics: ``matching_loss`` the mean m_i, ``velocity_error`` the mean l_i.
    """
    _require_same_shape(advantages=advantages, err_theta=err_theta, sigma=sigma)
    if advantage_max <= 0:
        raise ValueError(f"advantage_max must be > 0, got {advantage_max}")
    num_samples = err_theta.numel() if num_samples is None else num_samples
    matching = awm_matching_loss(err_theta, sigma, weighting, power)
    weights = advantages.detach().clamp(-advantage_max, advantage_max) / advantage_max
    loss = (weights * matching).sum() / num_samples
    with torch.no_grad():
        metrics = {"matching_loss": matching.mean(), "velocity_error": err_theta.mean()}
    return loss, metrics
