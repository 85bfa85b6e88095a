"""Model backends behind the adapter contract of ``dgpo.models.base``, registered by name."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..registry import Registry
from .base import FlowModelAdapter

BACKENDS: Registry[Callable[[str], FlowModelAdapter]] = Registry("model backend")
register_backend = BACKENDS.register


def load_model(backend: str, path: str) -> FlowModelAdapter:
    return BACKENDS.get(backend)(path)


@register_backend("shapes")
def _load_shapes(path: str) -> FlowModelAdapter:
    from .shapes import SHIPPED_MODEL, ShapesModel

    if path in ("", "shipped"):
        return ShapesModel.from_pretrained(SHIPPED_MODEL)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path {path!r} is not a model directory (or use 'shipped', the built-in ShapesEval model)")
    return ShapesModel.from_pretrained(path)
