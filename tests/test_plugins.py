"""Plugins: ShapesEval (dgpo.shapes) registers itself through the ``dgpo.plugins`` entry point as an outside package
would, and no general module names it; a plugin's command, evaluator defaults and legacy entries go through
public registrations."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, PathDistribution, distribution
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import absolute_origin, imports_of, module_names

from dgpo.cli import main
from dgpo.commands import COMMANDS, register_command
from dgpo.evaluators import evaluator_of, get_evaluator
from dgpo.registry import PLUGIN_GROUP, bundled_plugin_modules, plugin_modules
from dgpo.train.compare import curve_rows

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SHAPES = SRC / "dgpo" / "shapes"
DEFAULT_RECIPE = SRC / "dgpo" / "train" / "sections.py"  # the config's defaults: ShapesEval's recipe, by its registered names


def registered_names(package: Path) -> set[str]:
    """The names a package registers: the first argument of every ``register_*("name", ...)`` decorator in it."""
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "").startswith("register_") and node.args:
                if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    names.add(node.args[0].value)
    return names


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions (text, not code)."""
    owners = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return {id(o.body[0].value) for o in owners if o.body and isinstance(o.body[0], ast.Expr) and isinstance(o.body[0].value, ast.Constant)}


def _field_defaults(tree: ast.AST) -> set[int]:
    """ids of the constants inside the annotated class fields of a module (a dataclass's defaults and help)."""
    return {id(c) for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef) for stmt in cls.body if isinstance(stmt, ast.AnnAssign)
            for c in ast.walk(stmt) if isinstance(c, ast.Constant)}


def names_of_plugin_outside(src: Path, plugin: Path, allowed_defaults: Path | None = None) -> list[str]:
    """Where modules of ``src`` outside ``plugin`` name it: an import of it (at any depth), a string naming its module,
    or a string equal to one of the names it registers (except in the field defaults of ``allowed_defaults``)."""
    module = ".".join(plugin.relative_to(src).parts)
    registered = registered_names(plugin)
    found = []
    for name, path in module_names(src, module.split(".")[0]).items():
        if plugin in path.parents:
            continue
        tree = ast.parse(path.read_text())
        where = path.relative_to(src)
        for node in imports_of(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                origin = absolute_origin(name, path.name == "__init__.py", node)
                targets = [origin, *(f"{origin}.{a.name}" for a in node.names)]
            found += [f"{where}:{node.lineno} import {t}" for t in targets if t == module or t.startswith(f"{module}.")][:1]
        skip = _docstrings(tree) | (_field_defaults(tree) if path == allowed_defaults else set())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                if module in node.value or node.value in registered:
                    found.append(f"{where}:{node.lineno} {node.value!r}")
    return found


def test_no_general_module_names_shapeseval():
    assert {"shapes", "shapes_partial", "shapes:train", "pretrain-shapes"} <= registered_names(SHAPES)
    offenders = names_of_plugin_outside(SRC, SHAPES, allowed_defaults=DEFAULT_RECIPE)
    assert not offenders, f"general modules naming ShapesEval: {offenders}"


def test_the_check_finds_a_general_module_that_names_a_plugin(tmp_path):
    plugin = tmp_path / "pkg" / "toy"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("")
    (plugin / "register.py").write_text("@register_reward('toy_score')\ndef toy():\n    pass\n")
    (tmp_path / "pkg" / "core.py").write_text('"""Mentions pkg.toy in prose."""\nfrom .toy import register\n')
    (tmp_path / "pkg" / "loop.py").write_text("def f():\n    from .toy.register import toy\n    return 'toy_score', 'pkg.toy.register'\n")
    (tmp_path / "pkg" / "config.py").write_text("class C:\n    reward: str = 'toy_score'\n")
    found = names_of_plugin_outside(tmp_path, plugin, allowed_defaults=tmp_path / "pkg" / "config.py")
    assert found == ["pkg/core.py:2 import pkg.toy", "pkg/loop.py:2 import pkg.toy.register", "pkg/loop.py:3 'toy_score'",
                     "pkg/loop.py:3 'pkg.toy.register'"]
    assert "pkg/config.py:2 'toy_score'" in names_of_plugin_outside(tmp_path, plugin)


def test_shapeseval_is_declared_as_a_dgpo_plugin_entry_point(tmp_path):
    """pyproject.toml declares it, and metadata installed from that declaration loads it through the entry point alone."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["entry-points"][PLUGIN_GROUP]
    assert declared["shapes"] == "dgpo.shapes.plugin"
    # the metadata `pip install` writes from it (entry_points.txt), read the way the registry reads installed metadata
    info = tmp_path / f"{project['name']}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in declared.items()))
    installed = list(PathDistribution(info).entry_points.select(group=PLUGIN_GROUP))
    assert [e.dist.name for e in installed] == ["dgpo"]  # dgpo's own: the bundled fallback stays off
    assert plugin_modules(installed) == ["dgpo.shapes.plugin"] == bundled_plugin_modules()


def test_loading_the_plugin_module_registers_all_of_shapeseval():
    """In a fresh interpreter: nothing of ShapesEval is registered or imported until the plugins load, then all of it is."""
    script = """
import sys
from dgpo import commands, evaluators, models, rewards, train
from dgpo.train import data
from dgpo.registry import load_plugins
before = [name for reg in (models.BACKENDS, evaluators.EVALUATORS, rewards.REWARDS, data.PROMPT_SOURCES, commands.COMMANDS)
          for name in reg._items if "shapes" in name]
assert not before and not [m for m in sys.modules if m.startswith("dgpo.shapes")], (before, sorted(sys.modules))
load_plugins()
assert "shapes" in models.BACKENDS and evaluators.resolve_evaluator("", "shapes")[0] == "shapes"
assert {"shapes_partial", "shapes_strict", "shapes_focused"} <= set(rewards.REWARDS.names())
assert {"shapes:train", "shapes:test"} <= set(data.PROMPT_SOURCES.names()) and "pretrain-shapes" in commands.COMMANDS
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_the_bundled_plugins_load_only_when_dgpos_own_entry_points_are_missing():
    assert bundled_plugin_modules() == ["dgpo.shapes.plugin"]
    own = SimpleNamespace(module="dgpo.shapes.plugin", dist=SimpleNamespace(name="dgpo"))
    outside = SimpleNamespace(module="their_package.plugin", dist=SimpleNamespace(name="their-package"))
    assert plugin_modules([own, outside]) == ["dgpo.shapes.plugin", "their_package.plugin"]
    # an install older than the entry point (or none): the bundled plugin still loads, once
    assert plugin_modules([outside]) == ["their_package.plugin", "dgpo.shapes.plugin"]
    assert plugin_modules([]) == ["dgpo.shapes.plugin"]


def test_the_installed_metadata_declares_the_plugin():
    """The path every command takes once dgpo is installed; skipped (not failed) on an install older than the entry point."""
    try:
        declared = {e.name: e.value for e in distribution("dgpo").entry_points if e.group == PLUGIN_GROUP}
    except PackageNotFoundError:
        pytest.skip("dgpo is not installed")
    if not declared:
        pytest.skip("the installed dgpo metadata predates its dgpo.plugins entry points: rerun pip install -e .")
    assert declared["shapes"] == "dgpo.shapes.plugin"


def test_a_plugin_command_runs_from_the_command_line(capsys):
    def add_arguments(parser):
        parser.add_argument("--times", type=int, default=1)

    @register_command("toy-echo", help="print toy", add_arguments=add_arguments)
    def toy_echo(args) -> int:
        print("toy " * args.times)
        return 0 if args.times < 3 else 1

    try:
        assert main(["toy-echo", "--times", "2"]) == 0 and capsys.readouterr().out.strip() == "toy toy"
        assert main(["toy-echo", "--times", "3"]) == 1
    finally:
        COMMANDS.unregister("toy-echo")


def test_an_evaluation_entry_from_before_the_evaluator_key_is_read_by_the_evaluator_whose_scores_it_holds():
    shapes = get_evaluator("shapes")
    legacy = {"step": 0, "overall": 0.5, "categories": {"counting": 0.5}, "artifact": 0.001234567, "diversity": 0.2}
    assert evaluator_of(legacy) is shapes and evaluator_of({**legacy, "evaluator": "prompts"}) is get_evaluator("prompts")
    assert evaluator_of({"overall": 0.5}) is None
    row = curve_rows("dgpo", [legacy])[0]
    assert row["counting"] == 0.5 and row["artifact"] == 0.001234567 and row["diversity"] == 0.2
