"""Tests of keyed randomness: the same key draws the same numbers wherever it is drawn."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dgpo.seeding import keyed_generator, keyed_randn, keyed_uniform, stable_seed


def test_stable_seed_same_keys_same_seed():
    assert stable_seed(0, "noise", 3, 7) == stable_seed(0, "noise", 3, 7)
    assert 0 <= stable_seed(0, "noise", 3, 7) < 2**63


@pytest.mark.parametrize(
    "other",
    [(1, "noise", 3, 7), (0, "noise", 3, 8), (0, "timestep", 3, 7), (0, "noise", 7, 3), (0, "noise", "3", 7), (0, "noise", 3)],
)
def test_stable_seed_different_keys_different_seed(other):
    assert stable_seed(0, "noise", 3, 7) != stable_seed(*other)


def test_stable_seed_does_not_depend_on_python_hash_seed():
    code = "from dgpo.seeding import stable_seed; print(stable_seed(5, 'noise', 2, 'x'))"
    outputs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(int(result.stdout.strip()))
    assert outputs == {stable_seed(5, "noise", 2, "x")}


def test_keyed_generator_reproducible_and_distinct():
    a = torch.randn(16, generator=keyed_generator("k", 1))
    assert torch.equal(a, torch.randn(16, generator=keyed_generator("k", 1)))
    assert not torch.equal(a, torch.randn(16, generator=keyed_generator("k", 2)))


KEYS = [(0, "noise", 4, group, sample) for group in range(3) for sample in range(4)]


def test_keyed_randn_shape_and_dtype():
    out = keyed_randn((2, 5), KEYS)
    assert out.shape == (len(KEYS), 2, 5) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert keyed_randn((3,), KEYS[:2], dtype=torch.float64).dtype == torch.float64


def test_keyed_randn_same_keys_same_numbers_different_keys_different():
    a = keyed_randn((4, 4), KEYS)
    assert torch.equal(a, keyed_randn((4, 4), KEYS))
    b = keyed_randn((4, 4), [(1, *k[1:]) for k in KEYS])  # another run seed
    assert not torch.isclose(a, b).any()
    # every key draws its own noise: no two rows are the same
    flat = a.flatten(1)
    for i in range(len(KEYS)):
        for j in range(i + 1, len(KEYS)):
            assert not torch.equal(flat[i], flat[j])


def test_keyed_randn_stacking_equals_one_at_a_time():
    stacked = keyed_randn((3, 8, 8), KEYS)
    for i, key in enumerate(KEYS):
        assert torch.equal(stacked[i], keyed_randn((3, 8, 8), [key])[0])


def test_keyed_randn_independent_of_order_and_batch_split():
    full = keyed_randn((6,), KEYS)
    # reversed order draws the same rows, reversed
    assert torch.equal(keyed_randn((6,), KEYS[::-1]), full.flip(0))
    # two "processes" each drawing half equal one process drawing all
    half = len(KEYS) // 2
    rank0, rank1 = keyed_randn((6,), KEYS[:half]), keyed_randn((6,), KEYS[half:])
    assert torch.equal(torch.cat([rank0, rank1]), full)
    # interleaved assignment too
    evens, odds = keyed_randn((6,), KEYS[0::2]), keyed_randn((6,), KEYS[1::2])
    assert torch.equal(evens, full[0::2]) and torch.equal(odds, full[1::2])


def test_keyed_randn_ignores_global_rng_state():
    torch.manual_seed(1)
    a = keyed_randn((5,), KEYS[:3])
    torch.manual_seed(2)
    torch.randn(100)
    assert torch.equal(a, keyed_randn((5,), KEYS[:3]))


def test_keyed_uniform_keyed_and_batch_independent():
    u = keyed_uniform(KEYS)
    assert u.shape == (len(KEYS),)
    assert ((u >= 0) & (u < 1)).all()
    assert torch.equal(u, keyed_uniform(KEYS))
    assert torch.equal(keyed_uniform(KEYS[::-1]), u.flip(0))
    for i in (0, 5, len(KEYS) - 1):
        assert keyed_uniform([KEYS[i]])[0] == u[i]
    assert len(set(u.tolist())) == len(KEYS)
    assert not torch.equal(u, keyed_uniform([(9, *k[1:]) for k in KEYS]))
