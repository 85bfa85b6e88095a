"""The registries own their variants: an algorithm brings its update, its rollout sampler's kind, its config checks
and its loss curves in one registration; samplers are registered with their kind; the config is frozen once
validated, and what changes during a run lives in the run state; the package has no import cycles."""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides

from dgpo.losses import per_sample_mse
from dgpo.sampling import SAMPLER_REGISTRY, SAMPLERS
from dgpo.train.algorithms import ALGORITHMS, UpdateContext, register_algorithm
from dgpo.train.config import Config, ConfigError, load_config
from dgpo.train.loop import Trainer
from dgpo.train.state import RunState

SRC = Path(__file__).resolve().parents[1] / "src" / "dgpo"


# ----- a toy algorithm, added from outside the package: one function and one registration -------------------


def toy_checks(c) -> list[tuple[bool, str]]:
    return [(c.loss.timesteps == 1, f"loss.algorithm=toy_weighted_matching trains one timestep per step, got loss.timesteps={c.loss.timesteps}")]


def toy_weighted_matching(ctx: UpdateContext) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantage-weighted flow matching at a per-group keyed timestep, with a KL to the reference."""
    sigma = ctx.draws.training_sigmas(ctx.step, ctx.draw_key, ctx.group_ids)
    eps = ctx.draws.group_noise(ctx.step, ctx.draw_key, ctx.group_ids)
    s = sigma.view(-1, 1, 1, 1)
    xt = (1 - s) * ctx.x0 + s * eps
    v_theta = ctx.velocity(xt, sigma, ctx.embeddings).float()
    v_ref = ctx.reference_velocity(xt, sigma, ctx.embeddings).float()
    err = per_sample_mse(v_theta, eps - ctx.x0)
    loss = (ctx.advantages * err).sum() / ctx.samples_per_step
    kl = (v_theta - v_ref).square().flatten(1).mean(dim=1)
    loss = loss + ctx.loss.kl_beta * kl.sum() / ctx.samples_per_step
    ctx.count_forwards(len(ctx.sample_ids) * 4)
    return loss, {"toy_error": float(err.detach().mean()), "kl": float(kl.detach().mean())}


@pytest.fixture
def toy_algorithm():
    register_algorithm("toy_weighted_matching", passes=lambda c: c.loss.timesteps, rollout_sampler="ode", checks=toy_checks,
                       curves=(("toy_error", "velocity error"),))(toy_weighted_matching)
    yield "toy_weighted_matching"
    ALGORITHMS.unregister("toy_weighted_matching")


def test_an_algorithm_registered_from_a_test_module_trains_a_step(toy_algorithm, tiny_model_dir, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, tmp_path, **{"loss.algorithm": toy_algorithm, "loss.timesteps": 1, "run.max_steps": 1})
    trainer = Trainer(load_config(None, overrides))
    before = {n: p.detach().clone() for n, p in trainer.policy.trainable}
    assert trainer.train() == 0
    assert any(not torch.equal(before[n], p) for n, p in trainer.policy.trainable)
    (metrics,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics["toy_error"] > 0 and metrics["kl"] >= 0 and metrics["forward_equivalents"] > 0


def test_a_registered_algorithm_validates_its_settings_and_its_sampler(toy_algorithm):
    with pytest.raises(ConfigError, match="trains one timestep per step, got loss.timesteps=2"):
        load_config(None, [f"loss.algorithm={toy_algorithm}", "loss.timesteps=2"])
    with pytest.raises(ConfigError, match="needs an ODE rollout.sampler"):
        load_config(None, [f"loss.algorithm={toy_algorithm}", "loss.timesteps=1", "rollout.sampler=sde"])
    load_config(None, [f"loss.algorithm={toy_algorithm}", "loss.timesteps=1"])


def test_unknown_algorithm_and_advantage_are_config_errors_with_a_hint():
    with pytest.raises(ConfigError, match="loss.algorithm: .*did you mean 'dgpo'"):
        load_config(None, ["loss.algorithm=dgop"])
    with pytest.raises(ConfigError, match="reward.advantage: .*did you mean 'normalized'"):
        load_config(None, ["reward.advantage=normalised"])


# ----- samplers ---------------------------------------------------------------------------------------------------


def test_samplers_are_registered_with_their_kind():
    assert sorted(SAMPLER_REGISTRY.names()) == ["dpm2m", "euler", "sde"]
    assert SAMPLER_REGISTRY.get("sde").stochastic and not SAMPLER_REGISTRY.get("dpm2m").stochastic
    assert sorted(SAMPLERS) == ["dpm2m", "euler"]  # the deterministic ones


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.sampler=sde"], "eval.sampler must be an ODE sampler"),
        (["eval.sampler=ddim"], "eval.sampler must be one of dpm2m, euler, sde, got 'ddim'"),
        (["rollout.sampler=ddim"], "rollout.sampler must be one of dpm2m, euler, sde, got 'ddim'"),
        (["loss.algorithm=flow_grpo", "loss.ppo_clip_eps=1e-4"], "loss.algorithm=flow_grpo needs rollout.sampler=sde"),
        (["rollout.sde_window=2"], "rollout.sde_window=2 needs rollout.sampler=sde"),
        (["loss.algorithm=flow_grpo", "rollout.sampler=sde", "loss.ppo_clip_eps=1e-4", "rollout.offline_pool=2"], "cannot train offline"),
    ],
)
def test_every_sampler_field_is_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_evaluation_refuses_a_stochastic_sampler():
    from dgpo.generation import generate
    from dgpo.sampler_settings import SamplerSettings

    with pytest.raises(ValueError, match="ODE sampler"):
        generate(None, ["a red circle"], [("k", 0)], SamplerSettings("sde"))


# ----- a frozen config and the run state ---------------------------------------------------------------------------


def test_a_validated_config_is_frozen():
    config = Config()
    config.loss.kl_beta = 0.5  # building it: still open
    config.validate()
    with pytest.raises(dataclasses.FrozenInstanceError, match="RunState"):
        config.loss.kl_beta = 0.04
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.run = None
    assert dataclasses.replace(config.loss, kl_beta=0.04).kl_beta == 0.04 and config.loss.kl_beta == 0.5


def test_run_state_round_trip_and_resume_policy():
    state = RunState.from_config(0.01)
    assert state.raise_kl() == 0.02
    state.guard_stopped = True
    messages = []
    resumed = RunState.from_config(0.01)
    resumed.load_state_dict(state.state_dict(), log=messages.append)
    assert (resumed.kl_beta, resumed.guard_stopped) == (0.02, True) and "restored" in messages[0]
    edited = RunState.from_config(0.5)
    edited.load_state_dict(state.state_dict(), log=messages.append)
    assert edited.kl_beta == 0.5 and "replaces" in messages[1]
    # A checkpoint written before the run state had a class: only the KL weights.
    old = RunState.from_config(0.01)
    old.load_state_dict({"kl_beta": {"configured": 0.01, "in_effect": 0.04}}, log=messages.append)
    assert (old.kl_beta, old.guard_stopped) == (0.04, False)
    RunState.from_config(0.01).load_state_dict({"kl_beta": None})


def test_a_guard_stop_is_checkpointed(tiny_model_dir, tmp_path):
    first = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"run.max_steps": 1})), log=lambda *a: None)
    first.train()
    first.state.guard_stopped = True
    first.save()
    resumed = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **{"run.max_steps": 3})), log=lambda *a: None)
    assert resumed.resume() and resumed.finished()


# ----- no import cycles --------------------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """The dgpo modules a module imports, anywhere in it (TYPE_CHECKING blocks and functions included)."""
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
            found |= {n for n in names if (SRC.parent / (n.replace(".", "/") + ".py")).exists()} or {base}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m.startswith("dgpo")}


def test_the_package_has_no_import_cycles():
    modules = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in SRC.rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    # A package's __init__ is not a dependency of its submodules' contents: drop edges to bare packages.
    graph = {m: {i for i in deps if modules[i].name != "__init__.py"} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
