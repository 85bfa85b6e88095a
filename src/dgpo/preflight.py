"""The pre-flight check, ``dgpo check CONFIG`` and ``dgpo train CONFIG --dry-run``: every problem that would stop a run,
found in seconds, before any weights load, plus an estimate of the memory each process needs.

It reads the recipe, then runs each registered check (``register_check``): the prompt files, the model directory's
configuration (``dgpo.models.describe_model``: components built on the meta device, never their weights), each
reward's declared requirements (``register_reward(..., requires=)``: packages, binaries, weights paths), the optimizer,
the process layout and the run directory. Every problem is one line; all are reported, none stops the others. A plugin
adds a check with ``register_check``, a reward its requirements where it registers, a backend its ``describe``.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .models import describe_model
from .models.description import ModelDescription
from .registry import Registry
from .train.config import Config, ConfigError, read_config

FLOAT32 = 4  # bytes: the backends load every component in float32 (mixed precision autocasts the forwards)
ACTIVATION_ELEMENT_BYTES = {"no": 4, "fp16": 2, "bf16": 2}  # by model.mixed_precision
BLOCK_ACTIVATIONS = 17  # elements kept per token and width unit of a transformer block for its backward (34 bytes in 16-bit)


@dataclass(frozen=True)
class Preflight:
    """What the checks read: the recipe (validated or not: a check reads only the fields it needs), the process count,
    and the flags ``dgpo train`` would run with."""

    config: Config
    processes: int = 1
    resume: bool = False
    overwrite: bool = False

    @functools.cached_property
    def model(self) -> ModelDescription | None:
        """The model directory as its configs describe it (once, for the model check and the memory estimate)."""
        m = self.config.model
        return describe_model(m.backend, m.path, m.resolution)


CHECKS: Registry[Callable[[Preflight], list[str]]] = Registry("pre-flight check")


def register_check(name: str):
    """Register a check ``(Preflight) -> problems``, one line each (empty when all is well)."""
    return CHECKS.register(name)


@register_check("prompts")
def check_prompts(preflight: Preflight) -> list[str]:
    """data.prompts, and eval.prompts and eval.ood_prompts where set, load as ``dgpo train`` loads them."""
    from .train.data import PromptSource

    d, e = preflight.config.data, preflight.config.eval
    problems = []
    for field, spec in (("data.prompts", d.prompts), ("eval.prompts", e.prompts), ("eval.ood_prompts", e.ood_prompts)):
        if field == "data.prompts" or spec:
            try:
                PromptSource.load(spec)
            except (ValueError, FileNotFoundError) as exc:
                problems.append(f"{field}: {exc}")
    return problems


@register_check("model")
def check_model(preflight: Preflight) -> list[str]:
    """model.path resolves to a directory (or cached hub id) of the backend's kind with every component's config."""
    from .models import BACKENDS

    try:
        BACKENDS.get(preflight.config.model.backend)
    except ValueError as exc:
        return [f"model.backend: {exc}"]
    return list(preflight.model.problems) if preflight.model is not None else []


@register_check("init_adapter")
def check_init_adapter(preflight: Preflight) -> list[str]:
    """model.init_adapter, where set, names a LoRA weights file (its modules and shapes are checked when the model loads)."""
    from .models.merge import find_lora

    path = preflight.config.model.init_adapter
    if not path:
        return []
    try:
        find_lora(path)
    except FileNotFoundError as exc:
        return [f"model.init_adapter: {exc}"]
    return []


@register_check("rewards")
def check_rewards(preflight: Preflight) -> list[str]:
    """Each training reward with its reward.options, and each eval.metrics reward as the trainer builds it (without
    options, unless it is a training reward built without options), meets its declared requirements."""
    from .rewards import reward_problems

    r = preflight.config.reward
    problems = []
    for name in r.weights:
        problems += reward_problems(name, r.options.get(name, {}), f"reward.options.{name}")
    for name in preflight.config.eval.metrics:
        if name not in r.weights or r.options.get(name):
            problems += [f"eval.metrics: {line}" for line in reward_problems(name, {}, f"reward.options.{name}")]
    return problems


@register_check("layout")
def check_layout(preflight: Preflight) -> list[str]:
    """The processes hold whole groups in every micro-step and split a step's groups evenly (``GroupLayout``), and the
    launch asks for no sharding the trainer does not do."""
    from .train.data import GroupLayout, LayoutError
    from .train.sharding import refuse_sharded_launch

    d = preflight.config.data
    problems = []
    try:
        if min(d.group_size, d.groups_per_step, d.micro_batch, preflight.processes) >= 1:  # else the validation names it
            GroupLayout(d.group_size, d.groups_per_step, d.micro_batch, preflight.processes)
    except LayoutError as exc:
        problems.append(f"process layout (data.group_size, data.groups_per_step, data.micro_batch): {exc}")
    try:
        refuse_sharded_launch()
    except UserError as exc:
        problems.append(str(exc))
    return problems


@register_check("optimizer")
def check_optimizer(preflight: Preflight) -> list[str]:
    """optim.optimizer's class imports (adamw8bit: bitsandbytes)."""
    from .train.optim import OPTIMIZERS, optimizer_class

    name = preflight.config.optim.optimizer
    if name not in OPTIMIZERS:
        return []  # the config's validation names it
    try:
        optimizer_class(name)
    except UserError as exc:
        return [str(exc)]
    return []


@register_check("run_directory")
def check_run_directory(preflight: Preflight) -> list[str]:
    """run.output_dir is free for a new run, or --resume / --overwrite says what to do with the run in it."""
    from .train.run import check_run_directory as check

    try:
        check(Path(preflight.config.run.output_dir), preflight.resume, preflight.overwrite)
    except ValueError as exc:
        return [str(exc)]
    return []


def lora_parameters(transformer: torch.nn.Module, targets: list[str] | tuple[str, ...], rank: int) -> int:
    """Parameters of rank-``rank`` LoRA on the Linear layers peft's ``target_modules`` match (the module's name, or its
    last dotted parts): rank x (in + out) each."""
    return sum(rank * (module.in_features + module.out_features) for name, module in transformer.named_modules()
               if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process holds on its accelerator during training, by kind, and what each is made of."""

    weights: float
    trainable: float
    activations: float
    weights_detail: str
    trainable_detail: str
    activations_detail: str

    @property
    def total(self) -> float:
        return self.weights + self.trainable + self.activations

    def lines(self, processes: int) -> list[str]:
        rows = [("weights", self.weights, self.weights_detail), ("trainable state", self.trainable, self.trainable_detail),
                ("activations", self.activations, self.activations_detail), ("total", self.total, "")]
        return [f"memory per process (estimate, {processes} process{'es' if processes > 1 else ''}):",
                *(f"  {name:16s}{readable_size(value):>11s}  {detail}".rstrip() for name, value, detail in rows)]


def readable_count(count: int) -> str:
    """A parameter count with three significant digits: 2.47B, 18.9M, 57.9K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


def readable_size(size: float) -> str:
    """Bytes in the largest binary unit that keeps the number at 1 or more."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size:.0f} B"


def estimate_memory(config: Config, model: ModelDescription, processes: int) -> MemoryEstimate:
    """Per process, from the parameter counts of ``model`` and the recipe:

    weights = 4 bytes x every component's parameters (float32); the transformer's / N with model.sharding fsdp2 over N
    processes, none with model.cpu_offload; the text encoders' none with model.offload_text_encoders.
    trainable state, per trainable parameter (LoRA: rank x (in + out) per targeted Linear; else the transformer's):
    4 (the LoRA weight, or full fine-tuning's frozen reference copy) + 4 (gradient) + the optimizer's state (AdamW 8,
    adamw8bit 2) + 4 per EMA (rollout, and eval with eval.ema_decay > 0); / N with fsdp2, none with cpu_offload.
    activations of a training micro-batch of data.micro_batch images: 17 elements per token and width unit of every
    block (34 bytes in 16-bit: Korthikanti et al. 2022 with memory-efficient attention; float32 68); with gradient
    checkpointing each block's input (1 element) plus one block's. Image tokens only: the text tokens, the rollouts
    (no gradients) and the VAE's decode are left out."""
    from .train.optim import OPTIMIZERS
    from .train.sharding import transformer_blocks

    m, d = config.model, config.data
    transformer = model.components["transformer"]
    shards = processes if m.sharding == "fsdp2" else 1
    transformer_share = 0.0 if m.cpu_offload else 1.0 / shards
    counts = {name: model.parameters(name) for name in model.components}
    shares = {name: transformer_share if name == "transformer" else 0.0 if m.offload_text_encoders and name.startswith("text_encoder") else 1.0
              for name in counts}
    weights = sum(counts[name] * FLOAT32 * shares[name] for name in counts)
    lora = m.lora_rank > 0
    trainable = lora_parameters(transformer, m.lora_targets or model.lora_targets, m.lora_rank) if lora else counts["transformer"]
    emas = 1 + (config.eval.ema_decay > 0)
    optimizer = config.optim.optimizer
    per_parameter = FLOAT32 + FLOAT32 + OPTIMIZERS.get(optimizer).state_bytes + FLOAT32 * emas
    blocks = len(transformer_blocks(transformer))
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    element = ACTIVATION_ELEMENT_BYTES[m.mixed_precision]
    block = d.micro_batch * model.image_tokens * width * element
    activations = block * (blocks + BLOCK_ACTIVATIONS if m.gradient_checkpointing else BLOCK_ACTIVATIONS * blocks)
    kept = "inputs of each block + one block's (gradient checkpointing)" if m.gradient_checkpointing else "every block's"
    return MemoryEstimate(
        weights, trainable * per_parameter * transformer_share, activations,
        "float32: " + ", ".join(f"{name} {readable_count(count)}" for name, count in counts.items()) + " parameters"
        + (f"; transformer sharded over {shards}" if shards > 1 else "") + ("; transformer offloaded to CPU" if m.cpu_offload else ""),
        f"{f'LoRA rank {m.lora_rank}' if lora else 'full fine-tuning'}: {readable_count(trainable)} parameters x {per_parameter:g} bytes "
        f"({'weight' if lora else 'reference copy'}, gradient, {optimizer} state, {emas} EMA{'s' if emas > 1 else ''})",
        f"micro_batch {d.micro_batch} x {model.image_tokens} image tokens x width {width} x {blocks} blocks, {kept}, "
        f"mixed_precision {m.mixed_precision}",
    )


def process_count(processes: int | None) -> int:
    """``processes``, or the launcher's WORLD_SIZE (torchrun, accelerate launch), or 1."""
    count = processes or int(os.environ.get("WORLD_SIZE", "1"))
    if count < 1:
        raise UserError(f"--processes must be >= 1, got {count}")
    return count


def run_checks(config: Config, processes: int, resume: bool = False, overwrite: bool = False) -> tuple[list[str], Preflight]:
    """Every registered check's problems, in registration order."""
    preflight = Preflight(config, processes, resume, overwrite)
    return [line for name in CHECKS.names() for line in CHECKS.get(name)(preflight)], preflight


def check_recipe(path: str | None, overrides: list[str], processes: int | None = None, resume: bool = False, overwrite: bool = False,
                 log=print) -> int:
    """``dgpo check``: print every problem of the recipe at ``path`` with ``overrides``, one line each, then the memory
    estimate; 0 when there is none, 2 otherwise. A recipe that cannot be read (YAML, unknown key, wrong type) is one
    problem; one that reads but fails validation is checked on (its validation problem first)."""
    config = read_config(path, overrides)
    problems = []
    try:
        config.validate()
    except ConfigError as exc:
        problems.append(str(exc))
    valid = not problems
    count = process_count(processes)
    found, preflight = run_checks(config, count, resume, overwrite)
    problems += found
    log(f"dgpo check: {path or 'defaults'} on {count} process{'es' if count > 1 else ''}")
    for line in problems:
        log(f"problem: {line}")
    for line in memory_lines(preflight, valid):
        log(line)
    if problems:
        log(f"{len(problems)} problem{'s' if len(problems) > 1 else ''}: dgpo train would fail")
        return 2
    log("no problems found: the recipe is ready to train")
    return 0


def memory_lines(preflight: Preflight, valid: bool) -> list[str]:
    """The memory estimate's lines, or one saying why there is none."""
    from .models import BACKENDS, DESCRIBERS

    backend = preflight.config.model.backend
    if not valid:
        return ["memory: not estimated (the recipe does not validate)"]
    if backend not in BACKENDS or backend not in DESCRIBERS:
        return [f"memory: not estimated (model.backend {backend} registers no description of its model directories)"]
    if "transformer" not in preflight.model.components:
        return ["memory: not estimated (the model's transformer configuration could not be read)"]
    return estimate_memory(preflight.config, preflight.model, preflight.processes).lines(preflight.processes)
