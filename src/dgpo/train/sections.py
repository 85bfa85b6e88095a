"""The sections of a run's configuration: dataclasses with help text, frozen once validated.

Kept apart from ``dgpo.train.config`` (the whole ``Config``, its validation and parsing) so that the modules the
validation consults, the algorithm and sampler registries, can use these types without importing it back.
"""
from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass, field

from ..sampler_settings import SamplerSettings


class Freezable:
    """A dataclass whose fields cannot be reassigned once ``freeze`` has run (``Config.validate`` freezes
    the config: what changes during a run lives in ``dgpo.train.state.RunState``)."""

    _frozen = False

    def freeze(self) -> None:
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name: str, value) -> None:
        if self._frozen:
            raise FrozenInstanceError(f"cannot assign {type(self).__name__}.{name}: a validated config is frozen "
                                      "(a value that changes during a run belongs in dgpo.train.state.RunState)")
        super().__setattr__(name, value)


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelConfig(Freezable):
    backend: str = _help("model adapter: shapes (the built-in ShapesEval model), sd3, flux, sana", default="shapes")
    path: str = _help("model directory or hub id; 'shipped' = the ShapesEval model inside the package", default="shipped")
    resolution: int = _help("image size in pixels (0 = the checkpoint's native size: sd3 and sana the transformer's sample_size "
                            "latents times the VAE scale, flux 1024, shapes 32)", default=0)
    lora_rank: int = _help("LoRA rank; 0 trains all transformer weights", default=16)
    lora_alpha: float = _help("LoRA alpha (scale = alpha / rank)", default=32.0)
    lora_targets: list[str] = _help("module names LoRA wraps; empty = the adapter's attention projections", default_factory=list)
    init_adapter: str = _help("start the LoRA from a trained one instead of from the run seed: a `dgpo train` run directory, its "
                              "adapter/ directory or the weights file, of the same rank, alpha and modules; the KL reference stays "
                              "the base model (empty = a fresh LoRA)", default="")
    mixed_precision: str = _help("no, fp16 or bf16 (accelerate autocast)", default="no")
    gradient_checkpointing: bool = _help("recompute transformer activations in the backward pass (less memory, ~30% slower)", default=False)
    sharding: str = _help("none (every process holds the whole transformer) or fsdp2 (each transformer block and the root sharded "
                          "over all processes with FSDP2: weights, gradients and optimizer state take 1/N of the memory per process; "
                          "checkpoints are sharded too, and resume on any process count)", default="none")
    cpu_offload: bool = _help("fsdp2: keep the weight shards, their gradients and the optimizer state in CPU memory, copied to the "
                              "accelerator one block at a time (the optimizer steps on the CPU): for full fine-tuning on too few GPUs",
                              default=False)
    offload_text_encoders: bool = _help("move the text encoders to the CPU once every training prompt is encoded and cached (accelerator "
                                        "memory then holds the transformer and VAE); a prompt encoded later is encoded on the CPU", default=False)


@dataclass
class DataConfig(Freezable):
    prompts: str = _help("'shapes:train', or a text file (one prompt per line) or JSONL ({prompt, metadata})", default="shapes:train")
    group_size: int = _help("G: images per prompt (one group)", default=12)
    groups_per_step: int = _help("prompts (groups) per optimizer step, over all processes", default=8)
    micro_batch: int = _help("images per forward/backward per process; processes x micro_batch must hold whole groups", default=24)
    text_dropout: float = _help("probability of training on the empty prompt (paper: 0.05)", default=0.05)
    prompt_sampling: str = _help("how a step draws its prompts (registered, dgpo.train.prompt_sampling): uniform (shuffled passes over the "
                                 "prompts) or preference (more often from the prompt categories whose recent groups had unequal rewards; "
                                 "docs/prompt-sampling.md)", default="uniform")
    prompt_sampling_floor: float = _help("preference: the share of draws kept uniform, so every category gets at least this fraction of "
                                         "its uniform share (0 < floor <= 1; 1 = uniform)", default=0.1)
    prompt_sampling_decay: float = _help("preference: decay per group of a category's moving share of groups with unequal rewards "
                                         "(0.95: about its last 20 groups)", default=0.95)
    prompt_sampling_prior: float = _help("preference: the share of groups with unequal rewards assumed for a category before its first "
                                         "group (1: try every category early)", default=1.0)


@dataclass
class RolloutConfig(Freezable):
    sampler: str = _help("rollout sampler (registered, dgpo.sampling): dpm2m (Flow-DPM-Solver ODE), euler (ODE) or sde (Flow-GRPO's SDE)",
                         default=SamplerSettings.sampler)
    num_steps: int = _help("solver steps per rollout", default=SamplerSettings.num_steps)
    shift: float = _help("SD3 time shift of the sigma schedule", default=SamplerSettings.shift)
    guidance_scale: float = _help("CFG scale during rollouts (1 = no CFG; paper mode 1: 4.5)", default=SamplerSettings.guidance_scale)
    ema_after: int = _help("use an EMA of the policy as rollout model after this many steps (-1: never; paper 200)", default=200)
    ema_decay: float = _help("decay of the rollout EMA (paper 0.3); also the 'old' model of loss.ppo_clip_eps", default=0.3)
    ema_ramp: float = _help("the rollout EMA's decay after step k (0-based) is min(ema_decay, ema_ramp * k), as in the reference "
                            "code (0.001: it follows the policy at first, full decay from step 300); 0 = ema_decay throughout", default=0.001)
    noise_level: float = _help("sde sampler: a in sigma_t = a * sqrt(t / (1 - t)) (Flow-GRPO 0.7)", default=SamplerSettings.noise_level)
    mixed_precision: str = _help("autocast of the rollouts' forwards: model (= model.mixed_precision), no, fp16 or bf16. bf16 here with "
                                 "model.mixed_precision no samples in bfloat16 and trains in float32: on a CPU with AMX bfloat16 speeds up "
                                 "the sampling forwards (the ShapesEval recipe's rollouts by 18%) but not the backward", default="model")
    offline_pool: int = _help("offline training: rollouts come from the frozen reference model, generated once for "
                              "this many steps' prompts and reused cyclically (0 = online)", default=0)
    sde_window: int = _help("sde sampler: Flow-GRPO-Fast's window, the number of consecutive SDE steps per sample, the other steps "
                            "following the ODE (Euler); flow_grpo then trains loss.timesteps of the window's steps (0 = SDE at every step)", default=0)
    sde_window_range: tuple[int, int] = _help("sde_window: each sample's window starts at a keyed uniform integer in [lo, hi - sde_window] "
                                              "(Flow-GRPO-Fast: (0, num_steps // 2))", default=(0, 5))

    @property
    def sampler_settings(self) -> SamplerSettings:
        """The rollouts' sampler, grid and CFG as one value (``SamplerSettings.of``)."""
        return SamplerSettings.of(self)


@dataclass
class RewardConfig(Freezable):
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
class LossConfig(Freezable):
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
    ema_reference: bool = _help("dgpo, diffusion_dpo: the preference loss's reference is the rollout EMA (the old policy) instead of the "
                                "frozen base, the reference code's use_ema_ref (paper: beta_dpo 2000-5000 with it); the KL stays to the base",
                                default=False)
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
class OptimConfig(Freezable):
    optimizer: str = _help("registered (dgpo.train.optim.OPTIMIZERS): adamw (torch) or adamw8bit (bitsandbytes' 8-bit AdamW: moments of "
                           "tensors with 4096+ elements "
                           "kept in 8 bits, about 75% less optimizer memory; pip install bitsandbytes)", default="adamw")
    lr: float = _help("AdamW learning rate", default=3e-4)
    weight_decay: float = _help("AdamW weight decay", default=1e-4)
    betas: tuple[float, float] = _help("AdamW betas", default=(0.9, 0.999))
    grad_clip: float = _help("max gradient norm (0 = off; the pre-clip norm is logged as grad_norm). dgpo's loss has the paper's exact "
                             "gradient, beta x G (= beta_dpo) times the DGPO reference code's, so the reference's max_grad_norm 1.0 is "
                             "beta x G here (100 at the default beta and G, and in the SD3.5-M GenEval recipe); flow_grpo's gradient is Flow-GRPO's "
                             "own, so its recipe sets 1.0", default=100.0)
    lr_schedule: str = _help("learning-rate schedule over run.max_steps (registered, dgpo.train.optim.LR_SCHEDULES): constant, "
                             "cosine (to 0) or linear (to 0); a run stopped by run.max_seconds ends before the schedule does", default="constant")
    warmup_steps: int = _help("linear learning-rate warm-up over the first N steps (0 = none)", default=0)
    decay_steps: int = _help("run optim.lr_schedule over the last N steps of run.max_steps only, the rate held at optim.lr before "
                             "them (a warm-up, stable, decay schedule); 0 = over every step after the warm-up", default=0)
    updates_per_rollout: int = _help("optimizer steps on each rollout batch (fresh training timesteps and noise each; "
                                     "Flow-GRPO's inner epochs; 1 = the paper's DGPO)", default=1)


@dataclass
class EvalConfig(Freezable):
    evaluator: str = _help("registered evaluator run before, during (eval.every) and after training (dgpo.evaluators.EVALUATORS); "
                           "empty = the one registered as the default for model.backend, else prompts when eval.prompts "
                           "is set, else none; none = no evaluation", default="")
    prompts: str = _help("held-out prompt file (one prompt per line, or JSONL {prompt, metadata}) or registered prompt source for "
                         "the prompt-set evaluator (prompts): it scores the training rewards (reward.weights) on these prompts, "
                         "overall = their weighted sum, and within-prompt diversity as an out-of-domain metric", default="")
    ood_prompts: str = _help("prompts evaluator: a second, out-of-domain prompt file; its reward (ood_reward) and diversity "
                             "(ood_diversity) are out-of-domain metrics (empty = none)", default="")
    every: int = _help("evaluate on the test prompts every N steps (0 = only before and after)", default=0)
    images_per_category: int = _help("test images per category for periodic evaluation (prompts evaluator: images over the whole "
                                     "prompt file, at least 2 per prompt)", default=96)
    final_images_per_category: int = _help("test images per category for the before/after evaluation (prompts evaluator: as "
                                           "images_per_category)", default=96)
    ema_decay: float = _help("decay of the evaluation EMA of the policy (0 = evaluate the raw policy; reference code 0.9). After n steps "
                             "it updates with decay min(ema_decay, (1 + n) / (10 + n)), as the reference's EMA warms up; it is "
                             "evaluated, checkpointed and exported beside the adapter (adapter_ema/; not written while it has had no "
                             "update, being the base model then)", default=0.0)
    ema_every: int = _help("update the evaluation EMA after every N-th optimizer step (when (n + 1) % N == 0; reference code 8)", default=1)
    metrics: list[str] = _help("registered rewards scored on the evaluation images as evaluation-only metrics (never trained on)", default_factory=list)
    guard_metric: str = _help("reward-hacking guard: an out-of-domain metric watched at each evaluation "
                              "(one the evaluator reports, e.g. ShapesEval's artifact or diversity, or a name in eval.metrics; empty = off)", default="")
    guard_max_drop: float = _help("guard trips when the metric is worse than at step 0 by more than this fraction of its step-0 value", default=0.1)
    guard_action: str = _help("when the guard trips: stop (end the run, evaluated and reported) or raise_kl (double the KL weight "
                              "loss.kl_beta; 0.01 when it is 0)", default="stop")
    sampler: str = _help("ODE solver for evaluation: dpm2m or euler (deterministic; not the SDE)", default=SamplerSettings.sampler)
    num_steps: int = _help("solver steps for evaluation", default=SamplerSettings.num_steps)
    shift: float = _help("time shift for evaluation", default=SamplerSettings.shift)
    guidance_scale: float = _help("CFG scale for evaluation", default=SamplerSettings.guidance_scale)

    @property
    def sampler_settings(self) -> SamplerSettings:
        """The evaluation's solver, grid and CFG as one value (``SamplerSettings.of``)."""
        return SamplerSettings.of(self)


@dataclass
class RunConfig(Freezable):
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
