"""Name -> object registries (models, algorithms, rewards, evaluators, prompt sources, prompt samplers, commands) with did-you-mean errors.

A registry made with ``plugins=True`` loads the plugins on its first lookup (:func:`load_plugins`): the modules
that installed packages declare under the ``dgpo.plugins`` entry point group. dgpo's own plugins are declared
in its pyproject.toml like any outside package's, so that the general code never imports them; importing a
plugin module runs its ``register_*`` calls. The core's own registrants that would import their registry back
(:data:`CORE_REGISTRANTS`) load on the same first lookup.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
from importlib.metadata import EntryPoint, entry_points
from typing import Callable, Generic, TypeVar

from .requirements import Requirement

T = TypeVar("T")

PLUGIN_GROUP = "dgpo.plugins"
CORE_REGISTRANTS: tuple[str, ...] = ("dgpo.prompt_set",)  # the prompt-set evaluator, which imports the evaluator registry
PACKAGE = "dgpo"
_plugins_loaded = False


def declared_plugins() -> list[EntryPoint]:
    """The ``dgpo.plugins`` entry points of every installed distribution."""
    return list(entry_points(group=PLUGIN_GROUP))


def bundled_plugin_modules() -> list[str]:
    """dgpo's own plugins found in its source tree: each subpackage's ``plugin`` module (``dgpo.X.plugin``).

    Read only when the installed dgpo declares no plugin entry point: dgpo run from a source tree that is not
    installed, or installed (editable) before its pyproject.toml declared them; ``pip install -e .`` refreshes that."""
    package = importlib.import_module(PACKAGE)
    return [f"{PACKAGE}.{info.name}.plugin" for info in pkgutil.iter_modules(package.__path__)
            if info.ispkg and importlib.util.find_spec(f"{PACKAGE}.{info.name}.plugin") is not None]


def plugin_modules(declared: list[EntryPoint]) -> list[str]:
    """The modules to import for the ``declared`` entry points, plus dgpo's bundled plugins where its own
    distribution declared none (see :func:`bundled_plugin_modules`)."""
    modules = [entry.module for entry in declared]
    if not any(entry.dist is not None and entry.dist.name == PACKAGE for entry in declared):
        modules += [m for m in bundled_plugin_modules() if m not in modules]
    return modules


def load_plugins() -> None:
    """Import the core registrants and every plugin module (once); each registers what it offers."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in (*CORE_REGISTRANTS, *plugin_modules(declared_plugins())):
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
