"""One typed configuration for a run: dataclasses with help text, YAML recipes, dotted overrides.

A recipe sets a few fields in YAML; ``--set section.field=value`` overrides them on the
command line. Every value is checked when the config is built: an unknown key (with a
did-you-mean), a wrong type or an out-of-range value is a one-line ``ConfigError``
before any model is loaded. Quantities are *global* (groups per step, group size);
per-rank values are derived at run time from the process count.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..evaluators import EVALUATORS, NONE, PROMPT_SET, resolve_evaluator
from ..sampling import SAMPLER_REGISTRY, sampler_check
from .algorithms import ADVANTAGES, ALGORITHMS
from .optim import LR_SCHEDULES, OPTIMIZERS
from .prompt_sampling import PROMPT_SAMPLERS
from .sections import (
    DataConfig,
    EvalConfig,
    Freezable,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
)
from .sharding import SHARDINGS

PRECISIONS = ("no", "fp16", "bf16")
"""What model.mixed_precision (and rollout.mixed_precision, besides "model") may be: accelerate's names."""


class ConfigError(ValueError):
    """A configuration problem, stated in one line."""


def evaluator_metrics(eval_config: EvalConfig, backend: str) -> tuple[str, ...]:
    """The out-of-domain metrics the run's evaluator reports (what eval.guard_metric may watch besides eval.metrics)."""
    name, _ = resolve_evaluator(eval_config.evaluator, backend, eval_config.prompts)
    return () if name == NONE else EVALUATORS.get(name).reported_metrics(eval_config)


@dataclass
class Config(Freezable):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> Config:
        """Check every field, then freeze the config. The registries check their own variants: the algorithm its
        settings (``Algorithm.checks``) and its rollout sampler's kind, the sampler names their samplers, the prompt sampler
        its knobs (``PromptSampler.checks``)."""
        d, r, loss, m, e = self.data, self.rollout, self.loss, self.model, self.eval
        for field_name, registry, name in (("loss.algorithm", ALGORITHMS, loss.algorithm), ("reward.advantage", ADVANTAGES, self.reward.advantage),
                                           ("data.prompt_sampling", PROMPT_SAMPLERS, d.prompt_sampling)):
            if name not in registry:
                try:
                    registry.get(name)
                except ValueError as exc:
                    raise ConfigError(f"{field_name}: {exc}") from None
        if e.evaluator not in ("", NONE):
            try:
                EVALUATORS.get(e.evaluator)
            except ValueError as exc:
                raise ConfigError(f"eval.evaluator: {exc} (or none)") from None
        algorithm = ALGORITHMS.get(loss.algorithm)
        evaluator_name, why_no_evaluation = resolve_evaluator(e.evaluator, m.backend, e.prompts)
        rollout_sampler = sampler_check("rollout.sampler", r.sampler)
        eval_sampler = sampler_check("eval.sampler", e.sampler, deterministic=True)
        stochastic = rollout_sampler is None and SAMPLER_REGISTRY.get(r.sampler).stochastic
        sde_names = " or ".join(n for n in SAMPLER_REGISTRY.names() if SAMPLER_REGISTRY.get(n).stochastic)
        ode_names = ", ".join(n for n in SAMPLER_REGISTRY.names() if not SAMPLER_REGISTRY.get(n).stochastic)
        checks = [
            (d.group_size >= 2, f"data.group_size must be >= 2 (a group needs two samples to compare), got {d.group_size}"),
            (d.groups_per_step >= 1, f"data.groups_per_step must be >= 1, got {d.groups_per_step}"),
            (d.micro_batch >= 1, f"data.micro_batch must be >= 1, got {d.micro_batch}"),
            (0 <= d.text_dropout < 1, f"data.text_dropout must be in [0, 1), got {d.text_dropout}"),
            (r.num_steps >= 1, f"rollout.num_steps must be >= 1, got {r.num_steps}"),
            (r.mixed_precision in ("model", *PRECISIONS),
             f"rollout.mixed_precision must be model, {', '.join(PRECISIONS)}, got {r.mixed_precision!r}"),
            (r.shift > 0, f"rollout.shift must be > 0, got {r.shift}"),
            (r.guidance_scale >= 1, f"rollout.guidance_scale must be >= 1, got {r.guidance_scale}"),
            (rollout_sampler is None, rollout_sampler),
            (eval_sampler is None, eval_sampler),
            (algorithm.rollout_sampler != "sde" or stochastic, f"loss.algorithm={loss.algorithm} needs rollout.sampler={sde_names} "
             f"(it trains on the SDE's log-probs), got {r.sampler!r}"),
            (algorithm.rollout_sampler != "ode" or not stochastic, f"loss.algorithm={loss.algorithm} needs an ODE rollout.sampler "
             f"({ode_names}), got {r.sampler!r}"),
            (not algorithm.needs_trajectory or r.offline_pool == 0, f"loss.algorithm={loss.algorithm} needs the rollout model's own "
             "log-probs; it cannot train offline (rollout.offline_pool)"),
            (r.sde_window == 0 or stochastic, f"rollout.sde_window={r.sde_window} needs rollout.sampler={sde_names}, got {r.sampler!r}"),
            (r.noise_level > 0, f"rollout.noise_level must be > 0, got {r.noise_level}"),
            (r.offline_pool >= 0, f"rollout.offline_pool must be >= 0 (0 = online), got {r.offline_pool}"),
            (0 <= r.ema_decay < 1, f"rollout.ema_decay must be in [0, 1), got {r.ema_decay}"),
            (r.ema_ramp >= 0, f"rollout.ema_ramp must be >= 0 (0 = fixed rollout.ema_decay), got {r.ema_ramp}"),
            (0 <= e.ema_decay < 1, f"eval.ema_decay must be in [0, 1), got {e.ema_decay}"),
            (e.ema_every >= 1, f"eval.ema_every must be >= 1, got {e.ema_every}"),
            (loss.beta > 0, f"loss.beta must be > 0, got {loss.beta}"),
            (loss.timesteps >= 1, f"loss.timesteps must be >= 1, got {loss.timesteps}"),
            (loss.timestep_mode in ("continuous", "grid"), f"loss.timestep_mode must be continuous or grid, got {loss.timestep_mode!r}"),
            (0 <= loss.t_min < loss.t_max <= 1, f"need 0 <= loss.t_min < loss.t_max <= 1, got t_min={loss.t_min}, t_max={loss.t_max}"),
            (loss.t_min_end == -1 or 0 <= loss.t_min_end < loss.t_max,
             f"loss.t_min_end must be -1 (fixed t_min) or in [0, t_max={loss.t_max}), got {loss.t_min_end}"),
            (1 <= loss.grid_points <= r.num_steps, f"loss.grid_points must be in [1, rollout.num_steps={r.num_steps}], got {loss.grid_points}"),
            *algorithm.checks(self),
            *PROMPT_SAMPLERS.get(d.prompt_sampling).checks(self),
            (r.sde_window >= 0, f"rollout.sde_window must be >= 0 (0 = SDE at every step), got {r.sde_window}"),
            (r.sde_window == 0 or 0 <= r.sde_window_range[0] <= r.sde_window_range[1] - r.sde_window <= r.num_steps - r.sde_window,
             f"rollout.sde_window_range={list(r.sde_window_range)} must hold a window of {r.sde_window} steps within the {r.num_steps} rollout steps"),
            (loss.nft_beta > 0, f"loss.nft_beta must be > 0, got {loss.nft_beta}"),
            (loss.awm_weighting in ("ghuber", "uniform"), f"loss.awm_weighting must be ghuber or uniform, got {loss.awm_weighting!r}"),
            (loss.awm_ghuber_power > 0, f"loss.awm_ghuber_power must be > 0, got {loss.awm_ghuber_power}"),
            (loss.ema_kl_beta >= 0, f"loss.ema_kl_beta must be >= 0 (0 = off), got {loss.ema_kl_beta}"),
            (loss.grid_draw in ("shared", "per_group"), f"loss.grid_draw must be shared or per_group, got {loss.grid_draw!r}"),
            (loss.kl_beta >= 0, f"loss.kl_beta must be >= 0, got {loss.kl_beta}"),
            (loss.ppo_clip_eps >= 0, f"loss.ppo_clip_eps must be >= 0 (0 = off), got {loss.ppo_clip_eps}"),
            (loss.reference_guidance_scale >= 1, f"loss.reference_guidance_scale must be >= 1, got {loss.reference_guidance_scale}"),
            (self.reward.std_mode in ("group", "global", "none"), f"reward.std_mode must be group, global or none, got {self.reward.std_mode!r}"),
            (bool(self.reward.weights), "reward.weights is empty: name at least one reward"),
            (sum(self.reward.weights.values()) != 0, f"reward.weights sum to zero: {self.reward.weights}"),
            (set(self.reward.options) <= set(self.reward.weights),
             f"reward.options names rewards without a weight: {sorted(set(self.reward.options) - set(self.reward.weights))}"),
            (m.resolution >= 0, f"model.resolution must be >= 0 (0 = the backend's default), got {m.resolution}"),
            (m.lora_rank >= 0, f"model.lora_rank must be >= 0, got {m.lora_rank}"),
            (not m.init_adapter or m.lora_rank > 0, "model.init_adapter starts a LoRA from trained weights: it needs model.lora_rank > 0"),
            (m.mixed_precision in PRECISIONS, f"model.mixed_precision must be {', '.join(PRECISIONS)}, got {m.mixed_precision!r}"),
            (m.sharding in SHARDINGS, f"model.sharding must be {' or '.join(SHARDINGS.names())}, got {m.sharding!r}"),
            (not m.cpu_offload or m.sharding == "fsdp2", "model.cpu_offload needs model.sharding=fsdp2"),
            (m.sharding == "none" or self.optim.optimizer not in OPTIMIZERS or OPTIMIZERS.get(self.optim.optimizer).takes_sharded_parameters,
             f"model.sharding={m.sharding} needs an optim.optimizer that takes sharded (DTensor) parameters "
             f"({', '.join(n for n in OPTIMIZERS.names() if OPTIMIZERS.get(n).takes_sharded_parameters)}), got {self.optim.optimizer!r}"),
            (self.optim.optimizer in OPTIMIZERS, f"optim.optimizer must be one of {', '.join(OPTIMIZERS.names())}, got {self.optim.optimizer!r}"),
            (self.optim.lr_schedule in LR_SCHEDULES, f"optim.lr_schedule must be one of {', '.join(LR_SCHEDULES.names())}, got {self.optim.lr_schedule!r}"),
            (self.optim.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.optim.warmup_steps}"),
            (0 <= self.optim.decay_steps <= self.run.max_steps,
             f"optim.decay_steps must be between 0 and run.max_steps ({self.run.max_steps}), got {self.optim.decay_steps}"),
            (self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}"),
            (self.run.max_seconds >= 0, f"run.max_seconds must be >= 0 (0 = no limit), got {self.run.max_seconds}"),
            (self.run.max_forward_equivalents >= 0, f"run.max_forward_equivalents must be >= 0 (0 = no limit), got {self.run.max_forward_equivalents}"),
            (self.run.max_steps >= 1, f"run.max_steps must be >= 1 (a run of 0 steps trains nothing; evaluate a model or adapter "
                                     f"with `dgpo eval`), got {self.run.max_steps}"),
            (self.run.save_every >= 0, f"run.save_every must be >= 0, got {self.run.save_every}"),
            (e.every >= 0, f"eval.every must be >= 0, got {e.every}"),
            (e.guard_action in ("stop", "raise_kl"), f"eval.guard_action must be stop or raise_kl, got {e.guard_action!r}"),
            (e.guard_max_drop > 0, f"eval.guard_max_drop must be > 0, got {e.guard_max_drop}"),
            (not e.guard_metric or evaluator_name != NONE, f"eval.guard_metric {e.guard_metric!r} watches the evaluations, but evaluation "
             f"is off: {why_no_evaluation}; set eval.prompts to a held-out prompt file (or eval.evaluator to a registered evaluator)"),
            (e.guard_metric in ("", *evaluator_metrics(e, self.model.backend), *e.metrics),
             f"eval.guard_metric {e.guard_metric!r} must be one of the evaluator's metrics "
             f"{list(evaluator_metrics(e, self.model.backend))} or of eval.metrics {e.metrics}"),
            (evaluator_name != PROMPT_SET or bool(e.prompts),
             f"eval.evaluator={PROMPT_SET} needs eval.prompts, a held-out prompt file"),
            (not e.ood_prompts or bool(e.prompts), "eval.ood_prompts needs eval.prompts (the prompts evaluator's held-out prompt file)"),
            (e.num_steps >= 1, f"eval.num_steps must be >= 1, got {e.num_steps}"),
            (e.images_per_category >= 1, f"eval.images_per_category must be >= 1, got {e.images_per_category}"),
            (e.final_images_per_category >= 1, f"eval.final_images_per_category must be >= 1, got {e.final_images_per_category}"),
            (all(0 <= b < 1 for b in self.optim.betas), f"optim.betas must each be in [0, 1), got {self.optim.betas}"),
            (self.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.optim.weight_decay}"),
            (self.optim.updates_per_rollout >= 1, f"optim.updates_per_rollout must be >= 1, got {self.optim.updates_per_rollout}"),
            (self.optim.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = off), got {self.optim.grad_clip}"),
            (0 <= self.reward.max_invalid_fraction < 1, f"reward.max_invalid_fraction must be in [0, 1), got {self.reward.max_invalid_fraction}"),
            (self.reward.max_bad_steps >= 0, f"reward.max_bad_steps must be >= 0 (0 = never stop), got {self.reward.max_bad_steps}"),
            (self.reward.advantage_clip >= 0, f"reward.advantage_clip must be >= 0 (0 = off), got {self.reward.advantage_clip}"),
            (self.run.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {self.run.keep_checkpoints}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for section in (self, *(getattr(self, f.name) for f in dataclasses.fields(self))):
            section.freeze()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, annotation, key: str):
    """Check/convert a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, bool):
            # YAML 1.1 reads a bare no/yes/off/on as a boolean; for a text field the user meant the word.
            return "yes" if value else "no"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(annotation)):
            raise ConfigError(f"{key} must be a list of {len(typing.get_args(annotation))} values, got {value!r}")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, typing.get_args(annotation))))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        key_type, value_type = typing.get_args(annotation)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if isinstance(annotation, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")
    return value


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    hint = difflib.get_close_matches(key, known, n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(f"unknown config key {where}{key!r}{suggestion} (known: {', '.join(known)})")


def _apply(config: Config, section: str, name: str, value) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise _unknown_key(section, list(sections), "section ")
    target = getattr(config, section)
    hints = typing.get_type_hints(type(target))
    if name not in hints:
        raise _unknown_key(name, list(hints), f"{section}.")
    if hints[name] is str and isinstance(value, RawText):
        value = str(value)
    setattr(target, name, _coerce(value, hints[name], f"{section}.{name}"))


def config_from_dict(data: dict, config: Config | None = None) -> Config:
    config = config or Config()
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} must be a mapping of fields, got {values!r}")
        for name, value in values.items():
            _apply(config, section, name, value)
    return config


class RawText(str):
    """An override's text as typed; text fields take it verbatim (so `output_dir=true` is the word)."""


def _parse_override_value(raw: str):
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return RawText(raw)
    return RawText(raw) if isinstance(value, (str, bool)) else value


def parse_override(text: str) -> tuple[str, str, object]:
    """'section.field=value'; the value is parsed as YAML, except that text fields take it verbatim."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.field=value (e.g. loss.beta=100)")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    return section, name, _parse_override_value(raw.strip())


INHERIT_KEY = "inherit"


def yaml_error_message(path: Path, exc: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: ``FILE:LINE:COLUMN`` (1-based, as editors count) and the parser's problem,
    with what it was parsing (``while parsing a flow sequence``); the first line of the error when it has no position."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}"
    context = f" ({exc.context})" if getattr(exc, "context", None) else ""
    return f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {exc.problem}{context}"


def _apply_recipe(path: Path, config: Config, chain: tuple[Path, ...] = ()) -> None:
    """Apply a YAML recipe; ``inherit: other.yaml`` (relative to the recipe) is applied first."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (inherited by {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"recipe inheritance loops: {' -> '.join(str(p) for p in (*chain, path.resolve()))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_message(path, exc)) from None
    if isinstance(data, dict) and INHERIT_KEY in data:
        data = dict(data)
        parent = data.pop(INHERIT_KEY)
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: '{INHERIT_KEY}' must be a recipe path, got {parent!r}")
        _apply_recipe(path.parent / parent, config, (*chain, path.resolve()))
    config_from_dict(data, config)


def read_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML recipe at ``path`` (after any recipe it inherits), then
    ``section.field=value`` overrides; each value type-checked, the whole not yet validated."""
    config = Config()
    if path is not None:
        _apply_recipe(Path(path), config)
    for text in overrides:
        _apply(config, *parse_override(text))
    return config


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """``read_config``, validated."""
    return read_config(path, overrides).validate()


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_help() -> str:
    """Every field with its default and help text, for `dgpo train --help-config`."""
    lines = []
    for section in dataclasses.fields(Config):
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(section.default_factory()):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
