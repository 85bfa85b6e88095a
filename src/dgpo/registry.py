"""Name -> object registries (models, algorithms, rewards, evaluators, prompt sources, prompt samplers) with did-you-mean errors.

A registry made with ``plugins=True`` imports the modules in :data:`PLUGINS` on its first lookup: the
hook through which packages such as ShapesEval (``dgpo.shapes``) register their evaluator and prompt
sources without the general code importing them.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, TypeVar

from .requirements import Requirement

T = TypeVar("T")

PLUGINS: tuple[str, ...] = ("dgpo.shapes.plugin", "dgpo.prompt_set")
_plugins_loaded = False


def load_plugins() -> None:
    """Import the plugin modules (once); each registers what it offers."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in PLUGINS:
        importlib.import_module(module)


class Registry(Generic[T]):
    """Named variants, each with the requirements it declared (``dgpo.requirements``: packages, binaries, settings),
    which ``dgpo check`` checks without building it."""

    def __init__(self, kind: str, plugins: bool = False):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._requirements: dict[str, tuple[Requirement, ...]] = {}
        self._plugins = plugins

    def _load(self) -> None:
        if self._plugins:
            load_plugins()

    def register(self, name: str, requires: tuple[Requirement, ...] = ()) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            self._requirements[name] = tuple(requires)
            return item

        return decorator

    def requirements(self, name: str) -> tuple[Requirement, ...]:
        """What variant ``name`` declared it needs (a ValueError for an unknown name, as ``get``)."""
        self.get(name)
        return self._requirements[name]

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            hint = difflib.get_close_matches(name, self._items, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"unknown {self.kind} {name!r}{suggestion}; available: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def unregister(self, name: str) -> None:
        del self._items[name]
        del self._requirements[name]
