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
from .description import ModelDescription, describe_pipeline

BACKENDS: Registry[Callable[[str, int], FlowModelAdapter]] = Registry("model backend")
PIPELINE_CLASSES: dict[str, tuple[str, ...]] = {}  # backend -> the diffusers pipeline classes it loads
DESCRIBERS: dict[str, Callable[[str, int], ModelDescription]] = {}  # backend -> its model directories' description


def register_backend(name: str, pipelines: tuple[str, ...] = (), describe: Callable[[str, int], ModelDescription] | None = None):
    """Register a loader ``(path, resolution) -> adapter`` as backend ``name``; ``pipelines``: the diffusers
    pipeline classes (``model_index.json`` ``_class_name``) its model directories hold, if any; ``describe``:
    ``(path, resolution) -> ModelDescription`` from the directory's configs without its weights, for ``dgpo check``."""
    PIPELINE_CLASSES[name] = pipelines
    if describe is not None:
        DESCRIBERS[name] = describe
    return BACKENDS.register(name)


def describe_model(backend: str, path: str, resolution: int) -> ModelDescription | None:
    """What ``path``'s configs say for ``backend`` (``dgpo.models.description``), or None for a backend that
    registered no ``describe``."""
    BACKENDS.get(backend)
    describe = DESCRIBERS.get(backend)
    return describe(path, resolution) if describe is not None else None


def load_model(backend: str, path: str, resolution: int = 0) -> FlowModelAdapter:
    loader = BACKENDS.get(backend)
    check_model_directory(backend, path)
    return loader(path, resolution)


def check_model_directory(backend: str, path: str) -> None:
    """One-line errors, before anything loads, for a model directory the backend cannot load: a diffusers pipeline
    of another kind (or a diffusers pipeline with model.backend left at its default, shapes), one component
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


def _existing_directory(path: str) -> str:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path {path!r} is not a model directory")
    return path


def _directory_or_hub_id(path: str) -> str:
    """A path that exists must be a model directory; a hub model id goes to the hub (where there is network, or its
    cache holds it); anything else is no model at all."""
    if not path or path == "shipped":
        raise FileNotFoundError(f"no model given (model.path, --model {path!r}): this backend needs a model directory or hub id; "
                                "'shipped' is the ShapesEval model of the shapes backend")
    if Path(path).exists():
        return _existing_directory(path)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise FileNotFoundError(f"model.path {path!r}: no such directory (in {Path.cwd()}), and not a hub model id (owner/name) "
                                "to fetch from the hub either") from None
    return path


def _describe_shapes(path: str, resolution: int) -> ModelDescription:
    from .shapes import describe_shapes

    return describe_shapes(path, resolution)


def _describe_sd3(path: str, resolution: int) -> ModelDescription:
    from .sd3 import SD3Model

    return describe_pipeline(path, resolution, "sd3", SD3Model.lora_target_modules)


def _describe_flux(path: str, resolution: int) -> ModelDescription:
    """FLUX packs 2x2 latents into a token; its pipeline's native size is 128 latents (1024 pixels)."""
    from .flux import FluxModel

    return describe_pipeline(path, resolution, "flux", FluxModel.lora_target_modules, packing=2, native_latent_size=128)


def _describe_sana(path: str, resolution: int) -> ModelDescription:
    from .sana import SanaModel

    return describe_pipeline(path, resolution, "sana", SanaModel.lora_target_modules)


@register_backend("shapes", describe=_describe_shapes)
def _load_shapes(path: str, resolution: int) -> FlowModelAdapter:
    from .shapes import SHIPPED_MODEL, ShapesModel, resolution_problem

    problem = resolution_problem(resolution)
    if problem:
        raise ValueError(problem)
    if path in ("", "shipped"):
        return ShapesModel.from_pretrained(SHIPPED_MODEL)
    return ShapesModel.from_pretrained(_existing_directory(path))


@register_backend("sd3", pipelines=("StableDiffusion3Pipeline",), describe=_describe_sd3)
def _load_sd3(path: str, resolution: int) -> FlowModelAdapter:
    """SD3 / SD3.5 from a diffusers directory; a hub id is passed through where the network allows."""
    from .sd3 import SD3Model

    return SD3Model.from_pretrained(_directory_or_hub_id(path), resolution)


@register_backend("flux", pipelines=("FluxPipeline",), describe=_describe_flux)
def _load_flux(path: str, resolution: int) -> FlowModelAdapter:
    """FLUX.1 dev / schnell from a diffusers directory; a hub id is passed through where the network allows."""
    from .flux import FluxModel

    return FluxModel.from_pretrained(_directory_or_hub_id(path), resolution)


@register_backend("sana", pipelines=("SanaPipeline",), describe=_describe_sana)
def _load_sana(path: str, resolution: int) -> FlowModelAdapter:
    """SANA from a diffusers directory (resolution 0: the checkpoint's native size); a hub id is passed
    through where the network allows."""
    from .sana import SanaModel

    return SanaModel.from_pretrained(_directory_or_hub_id(path), resolution)
