"""Model backends behind the adapter contract of ``dgpo.models.base``, registered by name.

A backend is a loader ``(path, resolution) -> adapter``; resolution 0 means the backend's default.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..registry import Registry
from .base import FlowModelAdapter

BACKENDS: Registry[Callable[[str, int], FlowModelAdapter]] = Registry("model backend")
register_backend = BACKENDS.register


def load_model(backend: str, path: str, resolution: int = 0) -> FlowModelAdapter:
    return BACKENDS.get(backend)(path, resolution)


def _existing_directory(path: str) -> str:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path {path!r} is not a model directory")
    return path


def _directory_or_hub_id(path: str) -> str:
    """A path that exists must be a model directory; anything else goes to the hub (where there is network)."""
    if not path or path == "shipped":
        raise FileNotFoundError(f"no model given (model.path, --model {path!r}): this backend needs a model directory or hub id; "
                                "'shipped' is the ShapesEval model of the shapes backend")
    return _existing_directory(path) if Path(path).exists() else path


@register_backend("shapes")
def _load_shapes(path: str, resolution: int) -> FlowModelAdapter:
    from .shapes import SHIPPED_MODEL, ShapesModel

    if resolution not in (0, 32):
        raise ValueError(f"the shapes backend draws 32x32 images; model.resolution must be 0 or 32, got {resolution}")
    if path in ("", "shipped"):
        return ShapesModel.from_pretrained(SHIPPED_MODEL)
    return ShapesModel.from_pretrained(_existing_directory(path))


@register_backend("sd3")
def _load_sd3(path: str, resolution: int) -> FlowModelAdapter:
    """SD3 / SD3.5 from a diffusers directory; a hub id is passed through where the network allows."""
    from .sd3 import SD3Model

    return SD3Model.from_pretrained(_directory_or_hub_id(path), resolution or 512)


@register_backend("flux")
def _load_flux(path: str, resolution: int) -> FlowModelAdapter:
    """FLUX.1 dev / schnell from a diffusers directory; a hub id is passed through where the network allows."""
    from .flux import FluxModel

    return FluxModel.from_pretrained(_directory_or_hub_id(path), resolution or 512)


@register_backend("sana")
def _load_sana(path: str, resolution: int) -> FlowModelAdapter:
    """SANA from a diffusers directory (resolution 0: the checkpoint's native size); a hub id is passed
    through where the network allows."""
    from .sana import SanaModel

    return SanaModel.from_pretrained(_directory_or_hub_id(path), resolution)
