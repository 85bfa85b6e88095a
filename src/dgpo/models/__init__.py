"""Model backends behind the adapter contract of ``dgpo.models.base``, registered by name."""
from __future__ import annotations

import difflib
from typing import Callable

from .base import FlowModelAdapter

_BACKENDS: dict[str, Callable[[str], FlowModelAdapter]] = {}


def register_backend(name: str):
    def decorator(loader: Callable[[str], FlowModelAdapter]):
        _BACKENDS[name] = loader
        return loader

    return decorator


def load_model(backend: str, path: str) -> FlowModelAdapter:
    if backend not in _BACKENDS:
        hint = difflib.get_close_matches(backend, _BACKENDS, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown model backend {backend!r}{suggestion}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[backend](path)


@register_backend("shapes")
def _load_shapes(path: str) -> FlowModelAdapter:
    from .shapes import SHIPPED_MODEL, ShapesModel

    return ShapesModel.from_pretrained(SHIPPED_MODEL if path in ("", "shipped") else path)
