"""Tests of atomic, verified checkpoints with keep-last-N rotation."""
from __future__ import annotations

import json

import pytest
import torch

from dgpo.train import checkpoint as ckpt
from dgpo.train.checkpoint import (
    CheckpointError,
    latest_good_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _payload(seed: int = 0):
    model, optimizer = _trained(seed)
    tensors = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "extra": {
            "ints": torch.arange(7, dtype=torch.int64) * (seed + 1),
            "half": torch.randn(3, 2, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16),
            "strided": torch.randn(4, 6, generator=torch.Generator().manual_seed(seed + 1)).t(),  # non-contiguous
        },
    }
    state = {"step": 3 + seed, "history": [{"loss": 0.5, "reward": None}], "name": "run", "rng": [1, 2, 3]}
    return model, optimizer, tensors, state


def _save(root, step: int, keep: int = 10, seed: int = 0):
    _, optimizer, tensors, state = _payload(seed)
    return save_checkpoint(root, step, tensors, optimizer.state_dict(), state, keep=keep)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _names(root):
    return [p.name for p in list_checkpoints(root)]


# ----------------------------------------------------------------------------- round trip


def test_round_trip_tensors_optimizer_and_state(tmp_path):
    model, optimizer, tensors, state = _payload()
    path = save_checkpoint(tmp_path, 3, tensors, optimizer.state_dict(), state, keep=2)
    assert path == tmp_path / "step-00000003"
    assert list_checkpoints(tmp_path) == [path]

    loaded_tensors, loaded_optimizer, loaded_state = load_checkpoint(path)
    assert set(loaded_tensors) == set(tensors)
    for group, values in tensors.items():
        assert set(loaded_tensors[group]) == set(values)
        for name, value in values.items():
            got = loaded_tensors[group][name]
            assert got.dtype == value.dtype and got.shape == value.shape
            assert torch.equal(got, value), f"{group}.{name}"
    assert loaded_state == state

    # the optimizer state restores exactly: a restored AdamW takes the same next step
    original = optimizer.state_dict()
    for pid, s in original["state"].items():
        for k, v in s.items():
            assert torch.equal(loaded_optimizer["state"][pid][k], v), k
    assert loaded_optimizer["param_groups"] == original["param_groups"]

    restored_model = torch.nn.Linear(4, 3)
    restored_model.load_state_dict(loaded_tensors["model"])
    restored_optimizer = torch.optim.AdamW(restored_model.parameters(), lr=1e-2, weight_decay=0.1)
    restored_optimizer.load_state_dict(loaded_optimizer)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(9))
    for m, opt in ((model, optimizer), (restored_model, restored_optimizer)):
        m(x).pow(2).sum().backward()
        opt.step()
    for a, b in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(a, b)


def test_manifest_lists_every_file(tmp_path):
    path = _save(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 1
    on_disk = {p.name for p in path.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {"model.safetensors", "extra.safetensors", "optimizer.pt", "state.json"} <= on_disk


def test_saving_the_same_step_again_replaces_it(tmp_path):
    _save(tmp_path, 4, seed=0)
    path = _save(tmp_path, 4, seed=1)
    assert _names(tmp_path) == ["step-00000004"]
    _, _, state = load_checkpoint(path)
    assert state["step"] == 4  # seed=1 payload
    tensors, _, _ = load_checkpoint(path)
    assert torch.equal(tensors["extra"]["ints"], torch.arange(7) * 2)


# ----------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("name", ["model.safetensors", "extra.safetensors", "optimizer.pt", "state.json"])
@pytest.mark.parametrize("damage", [_truncate, _flip_byte], ids=["truncated", "flipped"])
def test_manifest_detects_damage_naming_the_file(tmp_path, name, damage):
    path = _save(tmp_path, 2)
    verify_checkpoint(path)  # intact
    damage(path / name)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as info:
        verify_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(path)


def test_missing_file_is_reported(tmp_path):
    path = _save(tmp_path, 2)
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"missing optimizer\.pt"):
        verify_checkpoint(path)


def test_missing_or_truncated_manifest_is_reported(tmp_path):
    path = _save(tmp_path, 2)
    _truncate(path / "manifest.json")
    with pytest.raises(CheckpointError, match=r"manifest\.json"):
        verify_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json"):
        verify_checkpoint(path)


def test_latest_good_skips_corrupt_newest(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    warnings: list[str] = []
    assert latest_good_checkpoint(tmp_path, warn=warnings.append) == tmp_path / "step-00000003"
    assert warnings == []

    _flip_byte(tmp_path / "step-00000003" / "model.safetensors")
    assert latest_good_checkpoint(tmp_path, warn=warnings.append) == tmp_path / "step-00000002"
    assert len(warnings) == 1
    assert "step-00000003" in warnings[0] and "model.safetensors" in warnings[0]


def test_latest_good_none_when_all_corrupt_or_empty(tmp_path):
    assert latest_good_checkpoint(tmp_path / "absent", warn=pytest.fail) is None
    assert list_checkpoints(tmp_path / "absent") == []
    for step in (1, 2):
        _save(tmp_path, step)
        _truncate(tmp_path / f"step-{step:08d}" / "state.json")
    warnings: list[str] = []
    assert latest_good_checkpoint(tmp_path, warn=warnings.append) is None
    assert len(warnings) == 2


# ----------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_rotation_keeps_newest_n(tmp_path, keep):
    for step in range(1, 6):
        _save(tmp_path, step * 10, keep=keep)
        assert len(list_checkpoints(tmp_path)) == min(step, keep)
    assert _names(tmp_path) == [f"step-{s * 10:08d}" for s in range(6 - keep, 6)]
    for path in list_checkpoints(tmp_path):
        verify_checkpoint(path)


def test_rotation_with_corrupt_newest_keeps_a_good_checkpoint(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=3)
    for step in (2, 3):
        _flip_byte(tmp_path / f"step-{step:08d}" / "optimizer.pt")
    _save(tmp_path, 4, keep=1)
    warnings: list[str] = []
    good = latest_good_checkpoint(tmp_path, warn=warnings.append)
    assert good == tmp_path / "step-00000004"
    assert warnings == []


def test_rotation_never_removes_a_resumed_save_behind_corrupt_newer_ones(tmp_path):
    # step 1 good; steps 5 and 6 corrupt; the run resumes from step 1 and saves step 2.
    for step in (1, 5, 6):
        _save(tmp_path, step, keep=10)
    for step in (5, 6):
        _truncate(tmp_path / f"step-{step:08d}" / "model.safetensors")
    _save(tmp_path, 2, keep=1)
    assert (tmp_path / "step-00000002").is_dir()
    warnings: list[str] = []
    assert latest_good_checkpoint(tmp_path, warn=warnings.append) == tmp_path / "step-00000002"
    assert warnings and "step-00000006" in warnings[0]


def test_rotation_keeps_newest_good_even_if_protected_one_is_corrupt(tmp_path):
    # The invariant of _rotate: the newest *good* checkpoint always stays.
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=10)
    _flip_byte(tmp_path / "step-00000003" / "state.json")
    ckpt._rotate(tmp_path, keep=1, protect=tmp_path / "step-00000003")
    assert _names(tmp_path) == ["step-00000002", "step-00000003"]
    assert latest_good_checkpoint(tmp_path, warn=lambda _: None) == tmp_path / "step-00000002"


# ----------------------------------------------------------------------------- crashes mid-write


def test_leftover_tmp_directory_is_ignored(tmp_path):
    good = _save(tmp_path, 1)
    leftover = tmp_path / ".tmp-step-00000002-99999"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\x00" * 10)
    assert list_checkpoints(tmp_path) == [good]
    assert latest_good_checkpoint(tmp_path, warn=pytest.fail) == good
    # later saves and rotation are not confused by it
    _save(tmp_path, 3, keep=1)
    assert _names(tmp_path) == ["step-00000003"]


def test_crash_before_rename_leaves_previous_checkpoint(tmp_path, monkeypatch):
    good = _save(tmp_path, 1)

    def crash(src, dst):
        raise OSError("killed")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # the crash left a partial write
    assert list_checkpoints(tmp_path) == [good]
    assert latest_good_checkpoint(tmp_path, warn=pytest.fail) == good
    load_checkpoint(good)
