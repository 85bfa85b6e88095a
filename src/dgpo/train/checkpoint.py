"""Atomic, verified checkpoints with keep-last-N rotation.

A checkpoint is a directory ``step-XXXXXXXX`` holding tensors (safetensors) and the
optimizer state, or with model.sharding=fsdp2 every process's shards of them
(``dgpo.train.sharding``), a JSON state and a ``manifest.json`` with the SHA-256 of every file.
It is written to a temporary sibling and renamed into place, so a killed process
leaves either a complete checkpoint or none. Loading verifies the manifest; a
truncated or corrupt checkpoint is reported and the previous good one is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

MANIFEST = "manifest.json"
STATE = "state.json"
PREFIX = "step-"


class CheckpointError(UserError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start_checkpoint(root: str | Path, step: int) -> Path:
    """An empty temporary sibling of ``root/step-XXXXXXXX`` to write the checkpoint's files into."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_checkpoint(root: str | Path, step: int, tmp: Path, keep: int) -> Path:
    """Write the manifest of every file under ``tmp`` (subfolders too), fsync, rename it to ``root/step-XXXXXXXX``;
    then drop the oldest beyond ``keep`` (never the new one)."""
    root = Path(root)
    final = root / f"{PREFIX}{step:08d}"
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {"step": step, "files": {p.relative_to(tmp).as_posix(): _sha256(p) for p in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for path in (*files, tmp / MANIFEST):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    for folder in {p.parent for p in files}:
        _fsync_dir(folder)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _rotate(root, keep, protect=final)
    return final


def save_checkpoint(
    root: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    optimizer_state: dict,
    state: dict,
    keep: int,
) -> Path:
    """Write ``root/step-XXXXXXXX`` atomically; then drop the oldest beyond ``keep`` (never the new one)."""
    tmp = start_checkpoint(root, step)
    for name, group in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    write_state(tmp, state)
    return commit_checkpoint(root, step, tmp, keep)


def write_state(tmp: Path, state: dict) -> None:
    (tmp / STATE).write_text(json.dumps(state, indent=1))


def load_state(path: str | Path) -> dict:
    """The JSON state (counters, config, run state) of a checkpoint, verified first."""
    path = Path(path)
    verify_checkpoint(path)
    return json.loads((path / STATE).read_text())


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError naming the problem if any file is missing or differs from the manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST} (incomplete write?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not valid JSON (truncated?)") from None
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if _sha256(file) != expected:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its checksum (truncated or corrupt)")


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=lambda p: p.name)


def latest_good_checkpoint(root: str | Path, warn=print) -> Path | None:
    """Newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            warn(f"warning: skipping {exc}")
    return None


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    path = Path(path)
    state = load_state(path)
    tensors = {p.name[: -len(".safetensors")]: load_file(str(p)) for p in path.glob("*.safetensors")}
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=False)
    return tensors, optimizer_state, state


def _rotate(root: Path, keep: int, protect: Path) -> None:
    """Remove the oldest checkpoints beyond ``keep``; the newest good one always stays."""
    checkpoints = list_checkpoints(root)
    good = [p for p in checkpoints if _is_good(p)]
    newest_good = good[-1] if good else protect
    for old in checkpoints[: max(0, len(checkpoints) - keep)]:
        if old not in (protect, newest_good):
            shutil.rmtree(old, ignore_errors=True)


def _is_good(path: Path) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CheckpointError:
        return False
