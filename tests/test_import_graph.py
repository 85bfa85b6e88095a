"""No import circles in src/dgpo: the graph of imports between dgpo's modules has no cycle.

What counts as an edge (the choice this test makes): every import statement in a module, at module level
(including those inside a module-level ``if``/``try``/``with`` and the relative forms ``from . import x``,
``from ..rewards import y``) and inside functions and methods too: a deferred import still makes the two
modules depend on each other, and a circle through one is as hard to read as any. An ``if TYPE_CHECKING:``
block never runs and does not count; nor does ``importlib.import_module`` of a name held in data (how the
plugin registries load their modules, dgpo.registry). ``from P import x`` is an edge to the module ``P.x``
when ``x`` is a submodule of P, else to ``P`` (where the name ``x`` is read). Importing ``P.x`` also runs
``P/__init__.py`` first; that implicit edge to a parent package is left out, since the parent always
finishes before the submodule starts unless the parent itself imports back, which is then an explicit edge.
"""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import absolute_origin, imports_of, module_names

SRC = Path(__file__).resolve().parents[1] / "src"


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (see the module docstring for what counts)."""
    modules = module_names(src, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in imports_of(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                origin = absolute_origin(name, path.name == "__init__.py", node)
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None when it has none (depth-first search, white-grey-black)."""
    state: dict[str, int] = {}  # absent: unvisited, 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"y"}}) == ["y", "z", "y"]


def test_the_graph_reads_relative_nested_deferred_and_skipped_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .sub import b\nimport pkg.sub.c\ndef f():\n    from . import late\n")
    (pkg / "late.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import a\n"
                                      "try:\n    from ..a import f\nexcept ImportError:\n    pass\n")
    (pkg / "sub" / "c.py").write_text("from . import b, missing\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b", "pkg.sub.c", "pkg.late"}, "pkg.late": set(), "pkg.sub": set(),
                     "pkg.sub.b": {"pkg.a"}, "pkg.sub.c": {"pkg.sub.b", "pkg.sub"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_dgpo_has_no_import_cycle():
    graph = import_graph(SRC, "dgpo")
    assert {"dgpo.evaluators", "dgpo.rewards", "dgpo.train.data"} <= graph["dgpo.prompt_set"]  # the graph sees dgpo's imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
