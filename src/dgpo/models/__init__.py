"""Model backends behind the adapter contract of ``dgpo.models.base``, registered by name.

A backend is a loader ``(path, resolution) -> adapter``; resolution 0 means the checkpoint's native size. A
backend of a diffusers pipeline names the pipeline classes it loads (``model_index.json``'s ``_class_name``),
so that a model directory of another kind is refused in one line before any weights load.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..registry import Registry
from .base import FlowModelAdapter

BACKENDS: Registry[Callable[[str, int], FlowModelAdapter]] = Registry("model backend", plugins=True)
PIPELINE_CLASSES: dict[str, tuple[str, ...]] = {}  # backend -> the diffusers pipeline classes it loads


def register_backend(name: str, pipelines: tuple[str, ...] = ()):
    """Register a loader ``(path, resolution) -> adapter`` as backend ``name``; ``pipelines``: the diffusers
    pipeline classes (``model_index.json`` ``_class_name``) its model directories hold, if any."""
    PIPELINE_CLASSES[name] = pipelines
    return BACKENDS.register(name)


def load_model(backend: str, path: str, resolution: int = 0) -> FlowModelAdapter:
    loader = BACKENDS.get(backend)
    check_model_directory(backend, path)
    return loader(path, resolution)


def check_model_directory(backend: str, path: str) -> None:
    """One-line errors, before anything loads, for a model directory the backend cannot load: a diffusers pipeline
    of another kind (or any, for a backend that loads none), one component
    folder of a pipeline (DIR/transformer), or no pipeline at all for a pipeline backend."""
    directory = Path(path) if path else None
    if directory is None or not directory.is_dir():
        return
    index = directory / "model_index.json"
    expected = PIPELINE_CLASSES.get(backend, ())
    if index.is_file():
        found = json.loads(index.read_text()).get("_class_name", "")
        if expected and found in expected:
            return
        owners = [name for name, classes in PIPELINE_CLASSES.items() if found in classes]
        hint = f"; set model.backend: {owners[0]} (--backend {owners[0]})" if owners else ""
        raise ValueError(f"model.path {path} holds a diffusers {found or 'pipeline'} (model_index.json), which model.backend "
                         f"{backend} does not load{hint}")
    if (directory.parent / "model_index.json").is_file():
        raise ValueError(f"model.path {path} is the {directory.name!r} component of the diffusers pipeline in {directory.parent}: "
                         f"set model.path to {directory.parent}")
    if expected:
        raise ValueError(f"model.path {path} has no model_index.json, so it is not a diffusers pipeline directory "
                         f"(model.backend {backend} loads {' or '.join(expected)}; write one with pipeline.save_pretrained)")


def existing_directory(path: str) -> str:
    """``path`` when it is a directory, else a one-line error naming model.path (for a backend's loader)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path {path!r} is not a model directory")
    return path


def _directory_or_hub_id(path: str) -> str:
    """A path that exists must be a model directory; anything else goes to the hub (where there is network)."""
    if not path or path == "shipped":
        raise FileNotFoundError(f"no model given (model.path, --model {path!r}): this backend needs a model directory or hub id; "
                                "'shipped' names the model a backend ships inside its package, and this one ships none")
    return existing_directory(path) if Path(path).exists() else path


@register_backend("sd3", pipelines=("StableDiffusion3Pipeline",))
def _load_sd3(path: str, resolution: int) -> FlowModelAdapter:
    """SD3 / SD3.5 from a diffusers directory; a hub id is passed through where the network allows."""
    from .sd3 import SD3Model

    return SD3Model.from_pretrained(_directory_or_hub_id(path), resolution)


@register_backend("flux", pipelines=("FluxPipeline",))
def _load_flux(path: str, resolution: int) -> FlowModelAdapter:
    """FLUX.1 dev / schnell from a diffusers directory; a hub id is passed through where the network allows."""
    from .flux import FluxModel

    return FluxModel.from_pretrained(_directory_or_hub_id(path), resolution)


@register_backend("sana", pipelines=("SanaPipeline",))
def _load_sana(path: str, resolution: int) -> FlowModelAdapter:
    """SANA from a diffusers directory (resolution 0: the checkpoint's native size); a hub id is passed
    through where the network allows."""
    from .sana import SanaModel

    return SanaModel.from_pretrained(_directory_or_hub_id(path), resolution)
