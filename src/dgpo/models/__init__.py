"""Model backends behind the adapter contract of ``dgpo.models.base``, registered by name.

A backend is a loader ``(path, resolution) -> adapter``; resolution 0 means the checkpoint's native size. A
backend of a diffusers pipeline names the pipeline classes it loads (``model_index.json``'s ``_class_name``),
so that a model directory of another kind is refused in one line before any weights load.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..registry import Registry
from .base import FlowModelAdapter
from .description import ModelDescription, describe_pipeline
from .directories import PIPELINE_CLASSES, check_model_directory

BACKENDS: Registry[Callable[[str, int], FlowModelAdapter]] = Registry("model backend", plugins=True)
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


def existing_directory(path: str) -> str:
    """``path`` when it is a directory, else a one-line error naming model.path (for a backend's loader)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path {path!r} is not a model directory")
    return path


def _directory_or_hub_id(path: str) -> str:
    """A path that exists must be a model directory; a hub model id goes to the hub (where there is network, or its
    cache holds it); anything else is no model at all."""
    if not path or path == "shipped":
        raise FileNotFoundError(f"no model given (model.path, --model {path!r}): this backend needs a model directory or hub id; "
                                "'shipped' names the model a backend ships inside its package, and this one ships none")
    if Path(path).exists():
        return existing_directory(path)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise FileNotFoundError(f"model.path {path!r}: no such directory (in {Path.cwd()}), and not a hub model id (owner/name) "
                                "to fetch from the hub either") from None
    return path


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
