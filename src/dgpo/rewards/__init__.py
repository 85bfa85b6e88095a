"""Rewards: plain callables ``(images, prompts, metadata) -> scores``, registered by name.

``images`` is a float tensor (B, 3, H, W) in [0, 1]; ``metadata`` is one dict per prompt
(may be empty). A reward returns one float per image; NaN (or None) means "not
applicable to this sample". Weighted combination happens outside the reward
(:func:`combine_rewards`), as in TRL.

The contract and registry live in :mod:`dgpo.rewards.base`; importing this package registers the built-in rewards.
"""
from . import builtin, clip, geneval, ocr, remote  # noqa: F401  (register the built-in rewards)
from .base import (  # noqa: F401  (the public names)
    REWARD_CATEGORIES,
    REWARDS,
    RewardCategories,
    RewardFailure,
    RewardFn,
    as_scores,
    available_rewards,
    build_registered,
    category_means,
    combine_rewards,
    get_reward,
    mean_over_categories,
    mean_score,
    register_categories,
    register_reward,
    registered_factory,
    reward_problems,
    score_batch,
    to_pil_images,
)
