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

from .optim import OPTIMIZERS


class ConfigError(ValueError):
    """A configuration problem, stated in one line."""


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelConfig:
    backend: str = _help("model adapter: shapes (the built-in ShapesEval model), sd3, flux, sana", default="shapes")
    path: str = _help("model directory or hub id; 'shipped' = the ShapesEval model inside the package", default="shipped")
    resolution: int = _help("image size in pixels for diffusers backends (0 = the backend's default: sd3 and flux 512, sana the checkpoint's native size, shapes 32)", default=0)
    lora_rank: int = _help("LoRA rank; 0 trains all transformer weights", default=16)
    lora_alpha: float = _help("LoRA alpha (scale = alpha / rank)", default=32.0)
    lora_targets: list[str] = _help("module names LoRA wraps; empty = the adapter's attention projections", default_factory=list)
    mixed_precision: str = _help("no, fp16 or bf16 (accelerate autocast)", default="no")
    gradient_checkpointing: bool = _help("recompute transformer activations in the backward pass (less memory, ~30% slower)", default=False)
    offload_text_encoders: bool = _help("move the text encoders to the CPU once every training prompt is encoded and cached (accelerator "
                                        "memory then holds the transformer and VAE); a prompt encoded later is encoded on the CPU", default=False)


@dataclass
class DataConfig:
    prompts: str = _help("'shapes:train', or a text file (one prompt per line) or JSONL ({prompt, metadata})", default="shapes:train")
    group_size: int = _help("G: images per prompt (one group)", default=12)
    groups_per_step: int = _help("prompts (groups) per optimizer step, over all processes", default=8)
    micro_batch: int = _help("images per forward/backward per process; processes x micro_batch must hold whole groups", default=24)
    text_dropout: float = _help("probability of training on the empty prompt (paper: 0.05)", default=0.05)


@dataclass
class RolloutConfig:
    sampler: str = _help("rollout sampler: dpm2m (Flow-DPM-Solver ODE), euler (ODE) or sde (Flow-GRPO's SDE)", default="dpm2m")
    num_steps: int = _help("solver steps per rollout", default=10)
    shift: float = _help("SD3 time shift of the sigma schedule", default=3.0)
    guidance_scale: float = _help("CFG scale during rollouts (1 = no CFG; paper mode 1: 4.5)", default=4.5)
    ema_after: int = _help("use an EMA of the policy as rollout model after this many steps (-1: never; paper 200)", default=200)
    ema_decay: float = _help("decay of the rollout EMA (paper 0.3); also the 'old' model of loss.ppo_clip_eps", default=0.3)
    ema_ramp: float = _help("the rollout EMA's decay after step k (0-based) is min(ema_decay, ema_ramp * k), as in the reference "
                            "code (0.001: it follows the policy at first, full decay from step 300); 0 = ema_decay throughout", default=0.001)
    noise_level: float = _help("sde sampler: a in sigma_t = a * sqrt(t / (1 - t)) (Flow-GRPO 0.7)", default=0.7)
    offline_pool: int = _help("offline training: rollouts come from the frozen reference model, generated once for "
                              "this many steps' prompts and reused cyclically (0 = online)", default=0)
    sde_window: int = _help("sde sampler: Flow-GRPO-Fast's window, the number of consecutive SDE steps per sample, the other steps "
                            "following the ODE (Euler); flow_grpo then trains loss.timesteps of the window's steps (0 = SDE at every step)", default=0)
    sde_window_range: tuple[int, int] = _help("sde_window: each sample's window starts at a keyed uniform integer in [lo, hi - sde_window] "
                                              "(Flow-GRPO-Fast: (0, num_steps // 2))", default=(0, 5))


@dataclass
class RewardConfig:
    weights: dict[str, float] = _help("reward name -> weight", default_factory=lambda: {"shapes_partial": 1.0})
    options: dict[str, dict] = _help("reward name -> keyword options for its factory (e.g. {ocr: {lang: eng}})", default_factory=dict)
    advantage: str = _help("advantage function: normalized (paper), rank, best_worst (Diffusion-DPO pair)", default="normalized")
    std_mode: str = _help("advantage normalisation: group, global or none", default="group")
    advantage_clip: float = _help("clip advantages to +-this (0 = off)", default=5.0)
    max_invalid_fraction: float = _help("a step is bad when more than this fraction of its rewards are NaN/inf", default=0.5)
    max_bad_steps: int = _help("stop (with a checkpoint) after this many consecutive bad steps (0 = never)", default=3)
    background: bool = _help("score each rollout micro-batch on a worker thread while the next one is generated "
                             "(a reward sees one micro-batch per call either way)", default=True)


@dataclass
class LossConfig:
    algorithm: str = _help("training algorithm (registered variant): dgpo, diffusion_dpo, flow_grpo, diffusionnft, awm", default="dgpo")
    beta: float = _help("beta on the group sum of Eq. 17: the reference code's beta_dpo / G (paper beta_dpo 100 GenEval/OCR, 10 PickScore). "
                        "Default 100 / 12, beta_dpo 100 at the default G = 12; beta 100 on the sum would be beta_dpo 1200 and saturates the sigmoid",
                        default=100 / 12)
    timesteps: int = _help("M: training timesteps per group per step (flow_grpo: trained SDE steps per sample; diffusionnft: "
                           "rollout grid points per sample, a keyed permutation; awm: strata of grid points 1..grid_points-1)", default=2)
    timestep_mode: str = _help("continuous: t ~ U[t_min, t_max]; grid: one of the first grid_points rollout sigmas", default="continuous")
    t_min: float = _help("timestep clipping: lowest training sigma (paper: 0.3-0.6 stable)", default=0.6)
    t_max: float = _help("highest training sigma", default=1.0)
    t_min_end: float = _help("t_min at the last step, moved linearly from loss.t_min over run.max_steps (-1 = fixed)", default=-1.0)
    grid_points: int = _help("grid mode: draw from the first k sigmas of the rollout schedule (awm: from the first k without the first)", default=5)
    grid_draw: str = _help("grid mode: shared = the reference code's draw, loss.timesteps distinct grid points per step, the same for "
                           "every group (pass k trains the k-th); per_group = each group draws its own point, with replacement, "
                           "in every pass", default="shared")
    kl_beta: float = _help("weight of the KL to the reference model, in the reference code's units (paper 0). dgpo: beta_kl of "
                           "mean((v_theta - v_ref)^2) (DGPO code 0.02 GenEval/OCR, 0.001 PickScore); the term is weighted on the "
                           "preference loss's scale (x beta x G), so the ratio of the two gradients is the reference code's. "
                           "flow_grpo: Flow-GRPO's per-step KL weight (0.04). diffusionnft, awm: weight of mean((v_theta - v_ref)^2) "
                           "averaged over samples and timesteps, as in their code (DiffusionNFT 1e-4; AWM 1e-3 GenEval, 3e-3 OCR)", default=0.0)
    reference_guidance_scale: float = _help("CFG of the reference model in training (paper mode 2: 4.5; mode 1: 1)", default=1.0)
    ppo_clip_eps: float = _help("dgpo: PPO-style clip against the rollout EMA model (paper: 1e-3..1e-2; 0 = off); "
                                "flow_grpo: the ratio clip (Flow-GRPO 1e-4, required)", default=0.0)
    nft_beta: float = _help("diffusionnft: guidance strength beta of the implicit policies v+- = v_old +- beta (v_theta - v_old) "
                            "(DiffusionNFT code 1.0; 0.1 OCR)", default=1.0)
    awm_weighting: str = _help("awm: time weighting of the matching loss: ghuber (AWM code: t ((l + 1e-10)^p - 1e-10^p) / p) or uniform (l)", default="ghuber")
    awm_ghuber_power: float = _help("awm: the power p of the ghuber weighting (AWM code 0.25)", default=0.25)
    ema_kl_beta: float = _help("awm: weight of mean((v_theta - v_ema)^2) to the rollout EMA model, AWM's KL-EMA trust region "
                               "(AWM code ema_beta 1; 0 = off)", default=0.0)


@dataclass
class OptimConfig:
    optimizer: str = _help("adamw (torch) or adamw8bit (bitsandbytes' 8-bit AdamW: moments of tensors with 4096+ elements "
                           "kept in 8 bits, about 75% less optimizer memory; pip install bitsandbytes)", default="adamw")
    lr: float = _help("AdamW learning rate", default=3e-4)
    weight_decay: float = _help("AdamW weight decay", default=1e-4)
    betas: tuple[float, float] = _help("AdamW betas", default=(0.9, 0.999))
    grad_clip: float = _help("max gradient norm (0 = off; the pre-clip norm is logged as grad_norm). dgpo's loss has the paper's exact "
                             "gradient, beta x G (= beta_dpo) times the DGPO reference code's, so the reference's max_grad_norm 1.0 is "
                             "beta x G here (100 at the default beta and G, and in the SD3.5-M GenEval recipe); flow_grpo's gradient is Flow-GRPO's "
                             "own, so its recipe sets 1.0", default=100.0)
    updates_per_rollout: int = _help("optimizer steps on each rollout batch (fresh training timesteps and noise each; "
                                     "Flow-GRPO's inner epochs; 1 = the paper's DGPO)", default=1)


@dataclass
class EvalConfig:
    every: int = _help("evaluate on the test prompts every N steps (0 = only before and after)", default=0)
    images_per_category: int = _help("test images per category for periodic evaluation", default=96)
    final_images_per_category: int = _help("test images per category for the before/after evaluation", default=96)
    ema_decay: float = _help("decay of the evaluation EMA of the policy (0 = evaluate the raw policy; reference code 0.9). After n steps "
                             "it updates with decay min(ema_decay, (1 + n) / (10 + n)), as the reference's EMA warms up; it is "
                             "evaluated, checkpointed and exported beside the adapter (adapter_ema/)", default=0.0)
    ema_every: int = _help("update the evaluation EMA after every N-th optimizer step (when (n + 1) % N == 0; reference code 8)", default=1)
    metrics: list[str] = _help("registered rewards scored on the evaluation images as evaluation-only metrics (never trained on)", default_factory=list)
    guard_metric: str = _help("reward-hacking guard: an out-of-domain metric watched at each evaluation "
                              "(artifact, diversity, or a name in eval.metrics; empty = off)", default="")
    guard_max_drop: float = _help("guard trips when the metric is worse than at step 0 by more than this fraction of its step-0 value", default=0.1)
    guard_action: str = _help("when the guard trips: stop (end the run, evaluated and reported) or raise_kl (double loss.kl_beta; 0.01 when it is 0)", default="stop")
    sampler: str = _help("ODE solver for evaluation", default="dpm2m")
    num_steps: int = _help("solver steps for evaluation", default=10)
    shift: float = _help("time shift for evaluation", default=3.0)
    guidance_scale: float = _help("CFG scale for evaluation", default=4.5)


@dataclass
class RunConfig:
    seed: int = _help("seed of every random draw (keyed per group and sample)", default=0)
    max_steps: int = _help("optimizer steps", default=100)
    max_seconds: float = _help("also stop (with a checkpoint) once training has taken this many seconds (0 = no limit)", default=0.0)
    max_forward_equivalents: float = _help("also stop once training has spent this many model forward-equivalents (a backward counts as two; "
                                           "0 = no limit): a compute budget that means the same on any hardware", default=0.0)
    output_dir: str = _help("where logs, checkpoints, grids and the report go", default="runs/dgpo-shapes")
    save_every: int = _help("checkpoint every N steps (0 = only at the end)", default=25)
    keep_checkpoints: int = _help("checkpoints kept (oldest removed first; the newest good one is never removed)", default=2)
    tensorboard: bool = _help("write TensorBoard logs", default=True)
    wandb_project: str = _help("log to this wandb project too (empty = off)", default="")
    threads: int = _help("CPU threads per process (0 = torch default)", default=0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        d, r, l, m = self.data, self.rollout, self.loss, self.model
        checks = [
            (d.group_size >= 2, f"data.group_size must be >= 2 (a group needs two samples to compare), got {d.group_size}"),
            (d.groups_per_step >= 1, f"data.groups_per_step must be >= 1, got {d.groups_per_step}"),
            (d.micro_batch >= 1, f"data.micro_batch must be >= 1, got {d.micro_batch}"),
            (0 <= d.text_dropout < 1, f"data.text_dropout must be in [0, 1), got {d.text_dropout}"),
            (r.num_steps >= 1, f"rollout.num_steps must be >= 1, got {r.num_steps}"),
            (r.shift > 0, f"rollout.shift must be > 0, got {r.shift}"),
            (r.guidance_scale >= 1, f"rollout.guidance_scale must be >= 1, got {r.guidance_scale}"),
            (r.sampler in ("dpm2m", "euler", "sde"), f"rollout.sampler must be dpm2m, euler or sde, got {r.sampler!r}"),
            (r.noise_level > 0, f"rollout.noise_level must be > 0, got {r.noise_level}"),
            (r.offline_pool >= 0, f"rollout.offline_pool must be >= 0 (0 = online), got {r.offline_pool}"),
            (0 <= r.ema_decay < 1, f"rollout.ema_decay must be in [0, 1), got {r.ema_decay}"),
            (r.ema_ramp >= 0, f"rollout.ema_ramp must be >= 0 (0 = fixed rollout.ema_decay), got {r.ema_ramp}"),
            (0 <= self.eval.ema_decay < 1, f"eval.ema_decay must be in [0, 1), got {self.eval.ema_decay}"),
            (self.eval.ema_every >= 1, f"eval.ema_every must be >= 1, got {self.eval.ema_every}"),
            (l.beta > 0, f"loss.beta must be > 0, got {l.beta}"),
            (l.timesteps >= 1, f"loss.timesteps must be >= 1, got {l.timesteps}"),
            (l.timestep_mode in ("continuous", "grid"), f"loss.timestep_mode must be continuous or grid, got {l.timestep_mode!r}"),
            (0 <= l.t_min < l.t_max <= 1, f"need 0 <= loss.t_min < loss.t_max <= 1, got t_min={l.t_min}, t_max={l.t_max}"),
            (l.t_min_end == -1 or 0 <= l.t_min_end < l.t_max, f"loss.t_min_end must be -1 (fixed t_min) or in [0, t_max={l.t_max}), got {l.t_min_end}"),
            (l.algorithm != "flow_grpo" or r.sampler == "sde", f"loss.algorithm=flow_grpo needs rollout.sampler=sde (its log-probs come from the SDE), got {r.sampler!r}"),
            (l.algorithm != "flow_grpo" or l.ppo_clip_eps > 0, "loss.algorithm=flow_grpo needs loss.ppo_clip_eps > 0 (its ratio clip; Flow-GRPO uses 1e-4)"),
            (l.algorithm != "flow_grpo" or l.timesteps <= r.num_steps, f"flow_grpo trains loss.timesteps={l.timesteps} of the rollout.num_steps={r.num_steps} SDE steps; it cannot exceed them"),
            (1 <= l.grid_points <= r.num_steps, f"loss.grid_points must be in [1, rollout.num_steps={r.num_steps}], got {l.grid_points}"),
            (r.sde_window >= 0, f"rollout.sde_window must be >= 0 (0 = SDE at every step), got {r.sde_window}"),
            (r.sde_window == 0 or r.sampler == "sde", f"rollout.sde_window={r.sde_window} needs rollout.sampler=sde, got {r.sampler!r}"),
            (r.sde_window == 0 or 0 <= r.sde_window_range[0] <= r.sde_window_range[1] - r.sde_window <= r.num_steps - r.sde_window,
             f"rollout.sde_window_range={list(r.sde_window_range)} must hold a window of {r.sde_window} steps within the {r.num_steps} rollout steps"),
            (l.algorithm != "flow_grpo" or r.sde_window == 0 or l.timesteps <= r.sde_window,
             f"flow_grpo trains loss.timesteps={l.timesteps} of the rollout.sde_window={r.sde_window} SDE steps; it cannot exceed them"),
            (l.algorithm != "diffusionnft" or r.ema_after == 0, f"loss.algorithm=diffusionnft needs rollout.ema_after=0 (its old policy is the "
             f"rollout model, an EMA of the policy; rollout.ema_decay 0 is on-policy), got {r.ema_after}"),
            (l.algorithm != "diffusionnft" or r.offline_pool == 0, "loss.algorithm=diffusionnft needs online rollouts: its old policy "
             "is the rollout EMA, not the reference model of rollout.offline_pool"),
            (l.algorithm != "diffusionnft" or l.timesteps <= r.num_steps,
             f"diffusionnft trains loss.timesteps={l.timesteps} of the rollout.num_steps={r.num_steps} grid points; it cannot exceed them"),
            (l.algorithm != "awm" or l.timesteps <= l.grid_points - 1, f"awm draws one timestep per stratum of the rollout grid points "
             f"1..loss.grid_points-1 ({l.grid_points - 1} points); loss.timesteps={l.timesteps} is more"),
            (l.algorithm not in ("diffusionnft", "awm") or self.reward.advantage_clip > 0,
             f"loss.algorithm={l.algorithm} normalises advantages by reward.advantage_clip; it must be > 0"),
            (l.nft_beta > 0, f"loss.nft_beta must be > 0, got {l.nft_beta}"),
            (l.awm_weighting in ("ghuber", "uniform"), f"loss.awm_weighting must be ghuber or uniform, got {l.awm_weighting!r}"),
            (l.awm_ghuber_power > 0, f"loss.awm_ghuber_power must be > 0, got {l.awm_ghuber_power}"),
            (l.ema_kl_beta >= 0, f"loss.ema_kl_beta must be >= 0 (0 = off), got {l.ema_kl_beta}"),
            (l.grid_draw in ("shared", "per_group"), f"loss.grid_draw must be shared or per_group, got {l.grid_draw!r}"),
            (l.timestep_mode != "grid" or l.grid_draw != "shared" or l.algorithm == "flow_grpo" or l.timesteps <= l.grid_points,
             f"loss.grid_draw=shared trains loss.timesteps={l.timesteps} distinct grid points; loss.grid_points={l.grid_points} "
             "has fewer (raise grid_points or use grid_draw=per_group)"),
            (l.kl_beta >= 0, f"loss.kl_beta must be >= 0, got {l.kl_beta}"),
            (l.ppo_clip_eps >= 0, f"loss.ppo_clip_eps must be >= 0 (0 = off), got {l.ppo_clip_eps}"),
            (l.reference_guidance_scale >= 1, f"loss.reference_guidance_scale must be >= 1, got {l.reference_guidance_scale}"),
            (self.reward.std_mode in ("group", "global", "none"), f"reward.std_mode must be group, global or none, got {self.reward.std_mode!r}"),
            (bool(self.reward.weights), "reward.weights is empty: name at least one reward"),
            (sum(self.reward.weights.values()) != 0, f"reward.weights sum to zero: {self.reward.weights}"),
            (set(self.reward.options) <= set(self.reward.weights), f"reward.options names rewards without a weight: {sorted(set(self.reward.options) - set(self.reward.weights))}"),
            (m.resolution >= 0, f"model.resolution must be >= 0 (0 = the backend's default), got {m.resolution}"),
            (m.lora_rank >= 0, f"model.lora_rank must be >= 0, got {m.lora_rank}"),
            (m.mixed_precision in ("no", "fp16", "bf16"), f"model.mixed_precision must be no, fp16 or bf16, got {m.mixed_precision!r}"),
            (self.optim.optimizer in OPTIMIZERS, f"optim.optimizer must be {' or '.join(OPTIMIZERS)}, got {self.optim.optimizer!r}"),
            (self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}"),
            (self.run.max_seconds >= 0, f"run.max_seconds must be >= 0 (0 = no limit), got {self.run.max_seconds}"),
            (self.run.max_forward_equivalents >= 0, f"run.max_forward_equivalents must be >= 0 (0 = no limit), got {self.run.max_forward_equivalents}"),
            (self.run.max_steps >= 0, f"run.max_steps must be >= 0, got {self.run.max_steps}"),
            (self.run.save_every >= 0, f"run.save_every must be >= 0, got {self.run.save_every}"),
            (self.eval.every >= 0, f"eval.every must be >= 0, got {self.eval.every}"),
            (self.eval.guard_action in ("stop", "raise_kl"), f"eval.guard_action must be stop or raise_kl, got {self.eval.guard_action!r}"),
            (self.eval.guard_max_drop > 0, f"eval.guard_max_drop must be > 0, got {self.eval.guard_max_drop}"),
            (self.eval.guard_metric in ("", "artifact", "diversity", *self.eval.metrics),
             f"eval.guard_metric {self.eval.guard_metric!r} must be artifact, diversity or one of eval.metrics {self.eval.metrics}"),
            (self.eval.num_steps >= 1, f"eval.num_steps must be >= 1, got {self.eval.num_steps}"),
            (self.eval.images_per_category >= 1, f"eval.images_per_category must be >= 1, got {self.eval.images_per_category}"),
            (self.eval.final_images_per_category >= 1, f"eval.final_images_per_category must be >= 1, got {self.eval.final_images_per_category}"),
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


def _apply_recipe(path: Path, config: Config, chain: tuple[Path, ...] = ()) -> None:
    """Apply a YAML recipe; ``inherit: other.yaml`` (relative to the recipe) is applied first."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (inherited by {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"recipe inheritance loops: {' -> '.join(str(p) for p in (*chain, path.resolve()))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and INHERIT_KEY in data:
        data = dict(data)
        parent = data.pop(INHERIT_KEY)
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: '{INHERIT_KEY}' must be a recipe path, got {parent!r}")
        _apply_recipe(path.parent / parent, config, (*chain, path.resolve()))
    config_from_dict(data, config)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML recipe at ``path`` (after any recipe it inherits), then
    ``section.field=value`` overrides; validated."""
    config = Config()
    if path is not None:
        _apply_recipe(Path(path), config)
    for text in overrides:
        _apply(config, *parse_override(text))
    return config.validate()


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
