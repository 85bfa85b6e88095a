"""Within-prompt diversity: how different the images of one prompt are from each other.

A policy optimised against a narrow reward tends to collapse to one memorised picture per prompt, which no
reward that scores images one at a time sees; this is the out-of-domain metric that does (0 = every image
of a prompt the same). Backend-agnostic: it only needs the images.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def diversity(images: torch.Tensor) -> float:
    """Mean over unordered pairs of the RMS difference of two images (pixels in [0, 1], so it lies in [0, 1]).

    ``images``: (N, ...) with N >= 2, any layout (the RMS runs over everything but the first dimension)."""
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least 2 images, got {n}")
    flat = images.reshape(n, -1).double()
    total = 0.0
    for i in range(n - 1):  # O(N) memory; exact zeros for identical images
        total += float((flat[i + 1 :] - flat[i]).pow(2).mean(dim=1).sqrt().sum())
    return total / (n * (n - 1) / 2)


def group_diversity(images: torch.Tensor, group_ids: Sequence[Hashable]) -> float:
    """Unweighted mean of :func:`diversity` over the groups (``group_ids[i]``: the prompt of ``images[i]``) with at
    least 2 images; NaN when no group has 2."""
    group_ids = list(group_ids)
    if len(group_ids) != images.shape[0]:
        raise ValueError(f"{len(group_ids)} group ids for {images.shape[0]} images")
    members: dict[Hashable, list[int]] = {}
    for index, gid in enumerate(group_ids):
        members.setdefault(gid, []).append(index)
    scores = [diversity(images[idx]) for idx in members.values() if len(idx) >= 2]
    return sum(scores) / len(scores) if scores else float("nan")
