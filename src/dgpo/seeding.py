"""Randomness keyed by what a number is for, not by where it is computed.

Every random tensor of a run is drawn from a generator seeded by a stable hash of
(run seed, purpose, step, group or sample index), in the spirit of EDM's
``StackedRandomGenerator``: one process or many, any micro-batch layout, and a
resumed run all draw exactly the same numbers for the same sample.
"""
from __future__ import annotations

import hashlib

import torch


def stable_seed(*keys: object) -> int:
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_generator(*keys: object) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*keys))


def keyed_randn(shape: tuple[int, ...], keys: list[tuple], device=None, dtype=torch.float32) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per key, stacked: (len(keys), *shape)."""
    samples = [torch.randn(shape, generator=keyed_generator(*k), dtype=dtype) for k in keys]
    return torch.stack(samples).to(device)


def keyed_uniform(keys: list[tuple], device=None) -> torch.Tensor:
    """One U[0, 1) number per key, shape (len(keys),)."""
    return torch.tensor([torch.rand((), generator=keyed_generator(*k)).item() for k in keys], device=device)
