"""What a registered variant (a reward, a GenEval detector) needs to run, declared where it registers
(``Registry.register(name, requires=...)``), checked without running it.

``dgpo check`` (``dgpo.preflight``) asks each requirement for its problems, one line each: an importable Python
package, a binary on PATH, a setting (a factory option whose default comes from an environment variable) that
must be given, name an existing file, or name a model, a local directory or a hub id already in the local
Hugging Face cache, or the requirements of the variant an option chooses. No requirement imports the package,
runs the binary, reads weights or uses the network.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol


class Requirement(Protocol):
    def problems(self, owner: str, options: Mapping, options_key: str) -> list[str]:
        """One line per unmet need of ``owner`` (e.g. "reward 'ocr'"), run with factory ``options`` that a recipe
        sets under ``options_key`` (e.g. reward.options.ocr); empty when met."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` could be a Hugging Face hub id (``org/name``), not only a path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def local_snapshot(repo_id: str) -> Path | None:
    """The folder of hub id ``repo_id`` in the local Hugging Face cache, or None; never the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def local_model(path: str, field: str) -> tuple[Path | None, str | None]:
    """``path`` as a local directory: itself, or a hub id's folder in the local cache. Else (None, one line saying why,
    naming ``field``): the check reads no network, so a hub id must be downloaded first."""
    if Path(path).exists():
        if Path(path).is_dir():
            return Path(path), None
        return None, f"{field} {path} is a file, not a model directory"
    if not is_hub_id(path):
        return None, f"{field} {path}: no such directory"
    snapshot = local_snapshot(path)
    if snapshot is not None:
        return snapshot, None
    return None, (f"{field} {path}: no such directory, and no hub id of that name in the local Hugging Face cache "
                  f"(the check uses no network: download it first, `huggingface-cli download {path}`, or give a local directory)")


@dataclass(frozen=True)
class Package:
    """An importable Python package (its top-level module), with the line that installs it."""

    module: str
    install: str

    def problems(self, owner: str, options: Mapping, options_key: str) -> list[str]:
        if importlib.util.find_spec(self.module.split(".")[0]) is None:
            return [f"{owner} needs the Python package {self.module!r}, which is not installed: {self.install}"]
        return []


@dataclass(frozen=True)
class Binary:
    """A program that must be on PATH, with the line that installs it."""

    name: str
    install: str

    def problems(self, owner: str, options: Mapping, options_key: str) -> list[str]:
        if shutil.which(self.name) is None:
            return [f"{owner} needs the {self.name!r} binary on PATH: {self.install}"]
        return []


@dataclass(frozen=True)
class Setting:
    """A factory option whose default comes from environment variable ``env`` (then ``default``). ``kind``: value (must
    be given), file (an existing file, e.g. a checkpoint) or model (a local directory or a cached hub id)."""

    option: str
    env: str
    default: str | None = None
    kind: Literal["value", "file", "model"] = "value"

    def value(self, given: str | None = None) -> str | None:
        """What the factory uses: the option given, else the environment variable, else the default."""
        return given or os.environ.get(self.env) or self.default

    def problems(self, owner: str, options: Mapping, options_key: str) -> list[str]:
        value = self.value(options.get(self.option))
        field = f"{options_key}.{self.option} (or ${self.env})"
        if not value:
            return [f"{owner} needs {self.option}: set {self.env} or {options_key}.{self.option}"]
        if self.kind == "file" and not Path(value).is_file():
            return [f"{owner}: {field} {value} is not a file"]
        if self.kind == "model":
            _, problem = local_model(value, f"{owner}: {field}")
            return [problem] if problem else []
        return []


class Variants(Protocol):
    """What a ``dgpo.registry.Registry`` offers a ``Variant``."""

    def requirements(self, name: str) -> tuple[Requirement, ...]:
        """The requirements variant ``name`` declared; a ValueError for an unknown name."""


@dataclass(frozen=True)
class Variant:
    """The requirements of the variant of ``registry`` that option ``option`` chooses (``default`` when not given),
    e.g. the GenEval reward's ``detector``; an unknown variant is a problem."""

    option: str
    default: str
    registry: Variants

    def problems(self, owner: str, options: Mapping, options_key: str) -> list[str]:
        name = options.get(self.option, self.default)
        try:
            chosen = self.registry.requirements(name)
        except ValueError as exc:
            return [f"{owner}: {options_key}.{self.option}: {exc}"]
        return [line for requirement in chosen for line in requirement.problems(f"{owner} ({self.option} {name})", options, options_key)]
