"""The online training loop: rollout -> reward -> advantages -> update, one named function each.

Runs under ``accelerate`` on one process or many. Every random draw is keyed by
(seed, step, group or sample), so 1 and 2 processes, and a resumed run, compute the
same numbers. Gradients of the trainable (LoRA) parameters are summed across
processes explicitly after the micro-steps, so the loss normalisation is global.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, parse_flag_from_env
from peft import LoraConfig
from tqdm.auto import tqdm

from ..errors import UserError
from ..models import load_model
from ..models.base import PromptEmbeddings, cat_embeddings, index_embeddings
from ..rewards import as_scores, combine_rewards, get_reward
from ..sampling import cfg_velocity, flow_sigmas, get_sampler, sde_sample, sde_window_starts, sde_window_steps
from ..seeding import keyed_generator, keyed_randn, keyed_uniform, stable_seed
from .algorithms import UpdateContext, get_advantage, get_algorithm
from .checkpoint import latest_good_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, save_config
from .data import GroupLayout, Prompt, PromptSource
from .ema import ParameterEMA, eval_ema_decay, ramped_decay
from .optim import optimizer_class

PREEMPTED_EXIT_CODE = 75


class RewardFailure(UserError):
    pass


@dataclass
class Rollout:
    """One step's local samples: latents x0, decoded images, their prompts, and for algorithms
    that need them the SDE trajectory (B, num_steps + 1, ...) and per-step log-probs (B, num_steps)."""

    sample_ids: list[int]
    latents: torch.Tensor
    images: torch.Tensor
    prompts: list[Prompt]
    trajectory: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None

    def split(self, size: int) -> list[Rollout]:
        return [self._part(slice(start, start + size)) for start in range(0, len(self.sample_ids), size)]

    def _part(self, index: slice) -> Rollout:
        def part(tensor):
            return None if tensor is None else tensor[index]

        return Rollout(self.sample_ids[index], self.latents[index], self.images[index], self.prompts[index], part(self.trajectory), part(self.log_probs))

    @staticmethod
    def cat(parts: list[Rollout]) -> Rollout:
        def cat(tensors):
            return None if tensors[0] is None else torch.cat(tensors)

        return Rollout(
            [i for p in parts for i in p.sample_ids], torch.cat([p.latents for p in parts]), torch.cat([p.images for p in parts]),
            [q for p in parts for q in p.prompts], cat([p.trajectory for p in parts]), cat([p.log_probs for p in parts]),
        )


class ChunkScoring:
    """A step's rewards, scored chunk by chunk as the rollout decodes them: inline, or on a worker
    thread while the next chunk is generated. A failure is held until ``results`` so that every
    process still reaches the step's collective failure check."""

    def __init__(self, score_chunk: Callable[[Rollout], dict[str, np.ndarray]], executor: ThreadPoolExecutor | None):
        self._score_chunk = score_chunk
        self._executor = executor
        self._pending: list[Future] = []

    def submit(self, chunk: Rollout) -> None:
        if self._executor is not None:
            self._pending.append(self._executor.submit(self._score_chunk, chunk))
            return
        done: Future = Future()
        try:
            done.set_result(self._score_chunk(chunk))
        except RewardFailure as exc:
            done.set_exception(exc)
        self._pending.append(done)

    def results(self) -> list[dict[str, np.ndarray]]:
        return [future.result() for future in self._pending]


@dataclass
class StepCounters:
    step: int = 0
    forward_equivalents: float = 0.0
    elapsed_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


def attach_trainable(model, cfg) -> list[tuple[str, torch.nn.Parameter]]:
    """LoRA via peft on the transformer (rank > 0) or the whole transformer; returns named trainable params."""
    transformer = model.transformer
    transformer.requires_grad_(False)
    if cfg.lora_rank > 0:
        targets = cfg.lora_targets or model.lora_target_modules
        transformer.add_adapter(
            LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets, init_lora_weights="gaussian")
        )
        named = [(n, p) for n, p in transformer.named_parameters() if "lora_" in n]
        for _, p in named:
            p.requires_grad_(True)
        return named
    transformer.requires_grad_(True)
    return list(transformer.named_parameters())


def refuse_sharded_launch() -> None:
    """The trainer never hands its model to ``accelerator.prepare``, so under an FSDP or DeepSpeed launch config
    (``accelerate launch`` sets these flags from its distributed_type) it would train unsharded without a word: refuse."""
    for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if parse_flag_from_env(flag):
            raise UserError(f"the accelerate launch config asks for {name}, which dgpo does not support (it would train unsharded); "
                               "launch with a MULTI_GPU config such as configs/accelerate/multi_gpu.yaml")


class Trainer:
    def __init__(self, config: Config, accelerator: Accelerator | None = None, log=None):
        self.config = config
        refuse_sharded_launch()
        self.acc = accelerator or Accelerator(mixed_precision=config.model.mixed_precision, cpu=not torch.cuda.is_available())
        self.log = log or self.acc.print
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        d = config.data
        self.layout = GroupLayout(d.group_size, d.groups_per_step, d.micro_batch, self.acc.num_processes, self.acc.process_index)
        self.algorithm = get_algorithm(config.loss.algorithm)
        self.advantage_fn = get_advantage(self.algorithm.advantages or config.reward.advantage)
        make_optimizer = optimizer_class(config.optim.optimizer)
        if self.algorithm.needs_trajectory and config.rollout.offline_pool:
            raise ValueError(f"loss.algorithm={config.loss.algorithm} needs the rollout model's own log-probs; it cannot train offline (rollout.offline_pool)")
        self._offline_rollouts: dict[int, Rollout] = {}
        self.prompts = PromptSource.load(d.prompts)
        self.rewards = {name: get_reward(name, **config.reward.options.get(name, {})) for name in config.reward.weights}
        self.eval_rewards = {name: get_reward(name) for name in config.eval.metrics}
        self.output = Path(config.run.output_dir)
        self.model = load_model(config.model.backend, config.model.path, config.model.resolution).to(self.acc.device)
        self._embedding_cache: dict[str, PromptEmbeddings] = {}
        self._embed([p.text for p in self.prompts.prompts] + [""])
        if config.model.offload_text_encoders:
            for encoder in self.model.text_encoders():
                encoder.to("cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed("adapter-init", config.run.seed))
            self.trainable = attach_trainable(self.model, config.model)
        if config.model.gradient_checkpointing:
            self.model.transformer.enable_gradient_checkpointing()
        self.reference_transformer = None if config.model.lora_rank > 0 else copy.deepcopy(self.model.transformer).requires_grad_(False)
        o = config.optim
        self.optimizer = make_optimizer([p for _, p in self.trainable], lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.rollout_ema = ParameterEMA(self.trainable, config.rollout.ema_decay)
        self.eval_ema = ParameterEMA(self.trainable, config.eval.ema_decay) if config.eval.ema_decay > 0 else None
        self.counters = StepCounters()
        self._stop_requested = False
        self._bad_reward_steps = 0
        self.guard_stopped = False
        # The reward-hacking guard may raise loss.kl_beta mid-run; a resume restores the raised value.
        self._configured_kl_beta = config.loss.kl_beta
        self._writer = None
        self._wandb = None
        self._reward_executor: ThreadPoolExecutor | None = None

    # ----- helpers -------------------------------------------------------------------------
    def _embed(self, texts: list[str]) -> PromptEmbeddings:
        missing = sorted({t for t in texts if t not in self._embedding_cache})
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            embeddings = self.model.encode_prompts(chunk)
            for i, text in enumerate(chunk):
                self._embedding_cache[text] = index_embeddings(embeddings, slice(i, i + 1))
        return cat_embeddings([self._embedding_cache[t] for t in texts])

    @contextlib.contextmanager
    def reference_model(self):
        """The frozen reference: the same transformer with LoRA disabled (no second copy), or the frozen copy."""
        if self.reference_transformer is None:
            self.model.transformer.disable_adapters()
            try:
                yield
            finally:
                self.model.transformer.enable_adapters()
        else:
            live, self.model.transformer = self.model.transformer, self.reference_transformer
            try:
                yield
            finally:
                self.model.transformer = live

    def _sample_keys(self, purpose: str, step: int, ids: list[int]) -> list[tuple]:
        return [(purpose, self.config.run.seed, step, i) for i in ids]

    def count_forwards(self, local_forwards: float) -> None:
        """Add model forward-equivalents done on this process (a backward counts as two forwards)."""
        self.counters.forward_equivalents += local_forwards * self.acc.num_processes

    def rollout_sigmas(self) -> torch.Tensor:
        r = self.config.rollout
        return flow_sigmas(r.num_steps, r.shift, device=self.acc.device)

    def empty_embeddings(self, count: int) -> PromptEmbeddings:
        return self._embed([""] * count)

    # ----- the four phases -------------------------------------------------------------------
    def rollout(self, step: int, step_prompts: list[Prompt], sample_ids: list[int], on_chunk: Callable[[Rollout], None] | None = None) -> Rollout:
        """This process's samples: online from the policy (its EMA after ema_after steps), or offline
        from a pool of reference-model samples generated once (rollout.offline_pool). Generated one
        micro-batch at a time; ``on_chunk`` receives each chunk as soon as it is decoded."""
        on_chunk = on_chunk or (lambda chunk: None)
        pool = self.config.rollout.offline_pool
        if not pool:
            use_ema = 0 <= self.config.rollout.ema_after <= step
            with self.rollout_ema.swapped_in() if use_ema else contextlib.nullcontext():
                return self._generate(step, step_prompts, sample_ids, on_chunk)
        slot = step % pool
        if slot not in self._offline_rollouts:
            slot_prompts = self.prompts.for_step(self.config.run.seed, slot, self.layout.groups_per_step)
            with self.reference_model():
                self._offline_rollouts[slot] = self._generate(slot, slot_prompts, sample_ids, on_chunk)
            return self._offline_rollouts[slot]
        for chunk in self._offline_rollouts[slot].split(self.layout.micro_batch):
            on_chunk(chunk)
        return self._offline_rollouts[slot]

    def _generate(self, step: int, step_prompts: list[Prompt], sample_ids: list[int], on_chunk: Callable[[Rollout], None]) -> Rollout:
        chunks = []
        for start in range(0, len(sample_ids), self.layout.micro_batch):
            chunks.append(self._generate_chunk(step, step_prompts, sample_ids[start : start + self.layout.micro_batch]))
            on_chunk(chunks[-1])
        return Rollout.cat(chunks)

    @torch.no_grad()
    def _generate_chunk(self, step: int, step_prompts: list[Prompt], sample_ids: list[int]) -> Rollout:
        """Sample with the current weights: an ODE solver, or the SDE with per-step noise keyed per sample."""
        r = self.config.rollout
        G = self.layout.group_size
        prompts = [step_prompts[i // G] for i in sample_ids]
        noise = keyed_randn(self.model.latent_shape, self._sample_keys("rollout", step, sample_ids), device=self.acc.device)
        cond = self._embed([p.text for p in prompts])
        uncond = self.empty_embeddings(len(prompts))
        sigmas = self.rollout_sigmas()
        with self.acc.autocast():
            velocity_fn = cfg_velocity(self.model.velocity, cond, uncond, r.guidance_scale)
            if r.sampler == "sde":
                keep = self.algorithm.needs_trajectory
                step_noise = keyed_randn((r.num_steps, *self.model.latent_shape), self._sample_keys("sde-noise", step, sample_ids), device=self.acc.device)
                window = None
                if r.sde_window > 0:
                    window = sde_window_steps(self.sde_window_starts(step, sample_ids), r.sde_window, r.num_steps)
                out = sde_sample(velocity_fn, noise, sigmas, r.noise_level, step_noise=step_noise, return_trajectory=keep, sde_steps=window)
            else:
                out = get_sampler(r.sampler)(velocity_fn, noise, sigmas)
            latents = out.sample.float()
            images = self.model.decode(latents).float()
        cfg_factor = 2 if r.guidance_scale != 1 else 1
        self.count_forwards(len(sample_ids) * r.num_steps * cfg_factor)
        trajectory = torch.stack(out.trajectory, dim=1).float() if out.trajectory is not None else None
        log_probs = out.log_probs.float() if out.log_probs is not None else None
        return Rollout(sample_ids, latents, images, prompts, trajectory, log_probs)

    def start_scoring(self) -> ChunkScoring:
        executor = None
        if self.config.reward.background:
            if self._reward_executor is None:
                self._reward_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dgpo-reward")
            executor = self._reward_executor
        return ChunkScoring(self.score_chunk, executor)

    def score_chunk(self, chunk: Rollout) -> dict[str, np.ndarray]:
        """Each reward's scores of one chunk; NaN where a reward does not apply or returned NaN/inf."""
        texts = [p.text for p in chunk.prompts]
        metadata = [p.metadata for p in chunk.prompts]
        per_reward = {}
        for name, fn in self.rewards.items():
            try:
                scores = as_scores(fn(chunk.images, texts, metadata), len(texts), name)
            except Exception as exc:  # a crashing reward must name itself, never poison advantages
                raise RewardFailure(f"reward {name!r} failed: {type(exc).__name__}: {exc}") from exc
            per_reward[name] = np.where(np.isfinite(scores), scores, np.nan)
        return per_reward

    def score(self, chunk_scores: list[dict[str, np.ndarray]]) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted rewards of the local samples (chunks in order); NaN where no reward applies or a reward failed."""
        per_reward, logs = {}, {}
        for name in self.rewards:
            scores = np.concatenate([chunk[name] for chunk in chunk_scores])
            per_reward[name] = scores
            logs[f"invalid/{name}"] = int(np.isnan(scores).sum())
            logs[f"reward/{name}"] = float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")
        total = combine_rewards(per_reward, self.config.reward.weights)
        return torch.tensor(total, dtype=torch.float32), logs

    def raise_if_any_process_failed(self, failure: RewardFailure | None) -> None:
        """Every process learns of a reward failure on any process and raises, so all of them reach
        the same checkpoint save and exit together instead of one waiting forever in a collective."""
        if self.acc.num_processes > 1:
            flags = self.acc.gather(torch.tensor([failure is not None], device=self.acc.device))
            failed = [rank for rank, flag in enumerate(flags.tolist()) if flag]
            if failed and failure is None:
                raise RewardFailure(f"a reward failed on process {failed[0]} (its log names the reward)")
        if failure is not None:
            raise failure

    def _check_invalid_rewards(self, step: int, valid: torch.Tensor, reward_logs: dict) -> None:
        """Masked NaN/inf rewards are fine now and then; run after run of them means a broken reward."""
        rc = self.config.reward
        bad = float((~valid).float().mean()) > rc.max_invalid_fraction
        self._bad_reward_steps = self._bad_reward_steps + 1 if bad else 0
        if rc.max_bad_steps and self._bad_reward_steps >= rc.max_bad_steps:
            counts = ", ".join(f"{k.split('/', 1)[1]}: {v}" for k, v in reward_logs.items() if k.startswith("invalid/"))
            raise RewardFailure(
                f"steps {step - self._bad_reward_steps + 1}-{step}: over {rc.max_invalid_fraction:.0%} of the rewards were NaN/inf "
                f"for {self._bad_reward_steps} steps in a row (NaN/inf scores on this process at the last step: {counts})"
            )

    def gather_rewards(self, local_rewards: torch.Tensor, sample_ids: list[int]) -> torch.Tensor:
        """Every process gets the rewards of the whole step, ordered by global sample index."""
        ids = torch.tensor(sample_ids, device=self.acc.device)
        values = local_rewards.to(self.acc.device)
        if self.acc.num_processes > 1:
            ids, values = self.acc.gather(ids), self.acc.gather(values)
        full = torch.full((self.layout.samples_per_step,), float("nan"), device=self.acc.device)
        full[ids] = values
        return full.cpu()

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        group_ids = torch.arange(len(rewards)) // self.layout.group_size
        return self.advantage_fn(rewards, group_ids, self.config.reward)

    def update(self, step: int, rollout: Rollout, advantages: torch.Tensor, update_index: int = 0) -> dict[str, float]:
        """The algorithm's passes (DGPO: M training timesteps) x micro-steps, then one optimizer step."""
        c = self.config
        micro_lists = self.layout.local_samples()
        # Per metric: sum and count of the micro-steps where it is defined (the DGPO metrics over
        # informative groups are NaN in a micro-step without one).
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        texts = [p.text for p in rollout.prompts]
        if self.algorithm.text_dropout:
            dropout = keyed_uniform(self._sample_keys("text-dropout", step, rollout.sample_ids)) < c.data.text_dropout
            texts = ["" if drop else text for drop, text in zip(dropout.tolist(), texts)]
        embeddings = self._embed(texts)
        passes = self.algorithm.passes(c)
        for k in range(passes):
            for m, ids in enumerate(micro_lists):
                local = slice(m * self.layout.micro_batch, (m + 1) * self.layout.micro_batch)
                ctx = UpdateContext(
                    trainer=self,
                    step=step,
                    pass_index=k,
                    update_index=update_index,
                    sample_ids=torch.tensor(ids),
                    group_ids=torch.tensor(ids) // self.layout.group_size,
                    x0=rollout.latents[local],
                    embeddings=index_embeddings(embeddings, local),
                    advantages=advantages[ids].to(self.acc.device),
                    trajectory=None if rollout.trajectory is None else rollout.trajectory[local],
                    log_probs=None if rollout.log_probs is None else rollout.log_probs[local],
                )
                with self.acc.autocast():
                    loss, metrics = self.algorithm.update(ctx)
                (loss / passes).backward()
                for key, value in metrics.items():
                    if not math.isnan(float(value)):
                        totals[key] = totals.get(key, 0.0) + float(value)
                        counts[key] = counts.get(key, 0) + 1
                    else:
                        totals.setdefault(key, 0.0)
                        counts.setdefault(key, 0)
        grads = [p.grad for _, p in self.trainable if p.grad is not None]
        if self.acc.num_processes > 1 and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            flat = self.acc.reduce(flat, reduction="sum")
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        params = [p for _, p in self.trainable]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c.optim.grad_clip if c.optim.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {key: value / counts[key] if counts[key] else float("nan") for key, value in totals.items()}
        out["grad_norm"] = float(grad_norm)  # clip_grad_norm_ returns the total norm before clipping
        return out

    # ----- timestep and noise draws shared by algorithms ------------------------------------
    def t_min(self, step: int) -> float:
        """Timestep clipping bound at ``step``: fixed, or moved linearly to loss.t_min_end over the run."""
        l = self.config.loss
        if l.t_min_end < 0:
            return l.t_min
        progress = min(step / max(self.config.run.max_steps - 1, 1), 1.0)
        return l.t_min + progress * (l.t_min_end - l.t_min)

    def training_sigmas(self, step: int, k: tuple[int, int], group_ids: torch.Tensor) -> torch.Tensor:
        """One training sigma per sample for pass ``k = (update_index, pass_index)``: timestep clipping to
        [t_min, t_max] (one draw per group), or one of the first grid points of the rollout schedule."""
        l = self.config.loss
        if l.timestep_mode == "grid" and l.grid_draw == "shared":
            grid = self.rollout_sigmas()[: l.grid_points]
            update_index, pass_index = k
            point = self.shared_grid_points(step, update_index)[pass_index]
            return grid[point].expand(len(group_ids)).clone()
        u = keyed_uniform([("timestep", self.config.run.seed, step, int(g), k) for g in group_ids], device=self.acc.device)
        if l.timestep_mode == "continuous":
            t_min = self.t_min(step)
            return t_min + u * (l.t_max - t_min)
        grid = self.rollout_sigmas()[: l.grid_points]
        return grid[(u * l.grid_points).long().clamp(max=l.grid_points - 1)]

    def shared_grid_points(self, step: int, update_index: int = 0) -> torch.Tensor:
        """The reference code's grid draw: loss.timesteps distinct indices into the first loss.grid_points
        rollout sigmas, one set for the whole step (every group, micro-batch and process), pass k training
        entry k. Keyed by seed and step (and the update on this rollout, so that each of
        optim.updates_per_rollout draws afresh, as the reference's inner epochs do)."""
        l = self.config.loss
        order = torch.randperm(l.grid_points, generator=keyed_generator("grid-timesteps", self.config.run.seed, step, update_index))
        return order[: l.timesteps]

    def sde_window_starts(self, step: int, sample_ids) -> torch.Tensor:
        """Flow-GRPO-Fast: the first SDE step of each sample's window (rollout.sde_window), keyed per sample."""
        r = self.config.rollout
        u = keyed_uniform(self._sample_keys("sde-window", step, [int(i) for i in sample_ids]))
        return sde_window_starts(u, r.sde_window, tuple(r.sde_window_range))

    def trajectory_steps(self, step: int, k: int, sample_ids: torch.Tensor, update_index: int = 0, n: int | None = None) -> torch.Tensor:
        """The step each sample trains in pass k: entry k of a keyed permutation of the rollout's steps
        (of range(n) when given, e.g. the steps of an SDE window)."""
        n = self.config.rollout.num_steps if n is None else n
        orders = [torch.randperm(n, generator=torch.Generator().manual_seed(stable_seed("sde-steps", self.config.run.seed, step, update_index, int(i)))) for i in sample_ids]
        return torch.stack([order[k] for order in orders])

    def group_noise(self, step: int, k: object, group_ids: torch.Tensor) -> torch.Tensor:
        """Re-noising noise shared by all samples of a group (variance reduction)."""
        keys = [("renoise", self.config.run.seed, step, int(g), k) for g in group_ids]
        return keyed_randn(self.model.latent_shape, keys, device=self.acc.device)

    def group_sum(self, values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """Per-sample group totals over every process holding the group (one all-reduce per call)."""
        first = int(group_ids.min()) // self.layout.groups_per_micro * self.layout.groups_per_micro
        slots = torch.zeros(self.layout.groups_per_micro, dtype=values.dtype, device=values.device)
        slots.index_add_(0, (group_ids - first).to(values.device), values)
        if self.acc.num_processes > 1:
            slots = self.acc.reduce(slots, reduction="sum")
        return slots[(group_ids - first).to(values.device)]

    def reference_velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeddings: PromptEmbeddings) -> torch.Tensor:
        scale = self.config.loss.reference_guidance_scale
        with torch.no_grad(), self.reference_model():
            if scale == 1:
                return self.model.velocity(x, sigma, embeddings)
            uncond = self._embed([""] * x.shape[0])
            return cfg_velocity(self.model.velocity, embeddings, uncond, scale)(x, sigma)

    # ----- the step --------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        step = self.counters.step
        start = time.perf_counter()
        step_prompts = self.prompts.for_step(self.config.run.seed, step, self.layout.groups_per_step)
        sample_ids = [i for ids in self.layout.local_samples() for i in ids]
        scoring = self.start_scoring()
        rollout = self.rollout(step, step_prompts, sample_ids, on_chunk=scoring.submit)
        t_rollout = time.perf_counter()
        failure = None
        try:
            local_rewards, reward_logs = self.score(scoring.results())
        except RewardFailure as exc:
            failure = exc
        self.raise_if_any_process_failed(failure)
        rewards = self.gather_rewards(local_rewards, sample_ids)
        valid = torch.isfinite(rewards)
        if not valid.any():
            raise RewardFailure(f"step {step}: every reward is NaN (no reward applies to these prompts?)")
        self._check_invalid_rewards(step, valid, reward_logs)
        if valid.sum() > 1 and float(rewards[valid].std()) == 0.0:
            self.log(f"warning: step {step}: all {int(valid.sum())} rewards equal {float(rewards[valid][0]):.4g} (broken reward?)")
        advantages = self.advantages(rewards)
        t_reward = time.perf_counter()
        for update_index in range(self.config.optim.updates_per_rollout):
            metrics = self.update(step, rollout, advantages, update_index)
        r = self.config.rollout
        self.rollout_ema.update(ramped_decay(step, r.ema_decay, r.ema_ramp))
        if self.eval_ema is not None:
            e = self.config.eval
            eval_decay = eval_ema_decay(step + 1, e.ema_decay, e.ema_every)
            if eval_decay is not None:
                self.eval_ema.update(eval_decay)
        elapsed = time.perf_counter() - start
        if self.acc.num_processes > 1:
            # Every process must agree on run.max_seconds; the slowest one's clock counts.
            elapsed = float(self.acc.gather(torch.tensor([elapsed], device=self.acc.device)).max())
        self.counters.step += 1
        self.counters.elapsed_seconds += elapsed
        metrics.update(reward_logs)
        metrics.update(
            {
                "step": self.counters.step,
                "reward_mean": float(rewards[valid].mean()),
                "reward_std": float(rewards[valid].std()) if valid.sum() > 1 else 0.0,
                # Groups with no preference to learn (equal rewards): the share that tells a reward has saturated.
                "zero_variance_groups": float((advantages.view(-1, self.layout.group_size).abs().sum(dim=1) == 0).float().mean()),
                "invalid_rewards": int((~valid).sum()),
                "time/rollout": t_rollout - start,
                "time/reward": t_reward - t_rollout,
                "time/update": elapsed - (t_reward - start),
                "forward_equivalents": self.counters.forward_equivalents,
                "elapsed_seconds": self.counters.elapsed_seconds,
            }
        )
        self.counters.history.append(metrics)
        return metrics

    # ----- checkpoints, resume, signals ------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.output / "checkpoints"

    def save(self) -> Path | None:
        path = None
        if self.acc.is_main_process:
            tensors = {"trainable": {n: p for n, p in self.trainable}, "rollout_ema": self.rollout_ema.state_dict()}
            if self.eval_ema is not None:
                tensors["eval_ema"] = self.eval_ema.state_dict()
            state = {
                "step": self.counters.step,
                "forward_equivalents": self.counters.forward_equivalents,
                "elapsed_seconds": self.counters.elapsed_seconds,
                "history": self.counters.history,
                "config": self.config.to_dict(),
                "kl_beta": {"configured": self._configured_kl_beta, "in_effect": self.config.loss.kl_beta},
            }
            path = save_checkpoint(self.checkpoint_dir, self.counters.step, tensors, self.optimizer.state_dict(), state, self.config.run.keep_checkpoints)
        self.acc.wait_for_everyone()
        return path

    def resume(self) -> bool:
        path = latest_good_checkpoint(self.checkpoint_dir, warn=self.log)
        if path is None:
            self.log(f"no checkpoint in {self.checkpoint_dir}; starting from step 0")
            return False
        tensors, optimizer_state, state = load_checkpoint(path)
        with torch.no_grad():
            for name, p in self.trainable:
                p.copy_(tensors["trainable"][name].to(p.device, p.dtype))
        self.rollout_ema.load_state_dict(tensors["rollout_ema"])
        if self.eval_ema is not None:
            self.eval_ema.load_state_dict(tensors["eval_ema"])
        self.optimizer.load_state_dict(optimizer_state)
        self.counters = StepCounters(state["step"], state["forward_equivalents"], state["elapsed_seconds"], state["history"])
        self._restore_kl_beta(state.get("kl_beta"))
        self.log(f"resumed from {path} at step {self.counters.step}")
        return True

    def _restore_kl_beta(self, saved: dict | None) -> None:
        """Keep a KL weight the guard raised, unless this run's config sets a different one on purpose."""
        if saved is None or saved["in_effect"] == self.config.loss.kl_beta:
            return
        if self.config.loss.kl_beta == saved["configured"]:
            self.config.loss.kl_beta = saved["in_effect"]
            self.log(f"loss.kl_beta {saved['in_effect']:g} restored from the checkpoint (the guard raised it from {saved['configured']:g})")
        else:
            self.log(f"loss.kl_beta {self.config.loss.kl_beta:g} from this run's config replaces {saved['in_effect']:g} from the checkpoint")

    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self._stop_requested:
                raise SystemExit(128 + signum)
            self._stop_requested = True
            self.log(f"signal {signum}: saving a checkpoint at the end of this step (send again to exit at once)")

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        return previous

    def export_adapter(self, path: Path) -> None:
        """LoRA in diffusers' format (``pipe.load_lora_weights`` / ``transformer.load_lora_adapter``); with an
        evaluation EMA (eval.ema_decay) also its weights, beside it as ``<path>_ema`` (the reference code
        saves the EMA as its checkpoint)."""
        self._export_weights(path)
        if self.eval_ema is not None:
            with self.eval_ema.swapped_in():
                self._export_weights(path.with_name(path.name + "_ema"))

    def _export_weights(self, path: Path) -> None:
        if self.config.model.lora_rank > 0:
            self.model.save_lora(path)
        else:
            self.model.transformer.save_pretrained(str(path))

    # ----- logging -----------------------------------------------------------------------------
    def _log_metrics(self, metrics: dict) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.output / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self.config.run.wandb_project:
            if self._wandb is None:
                try:
                    import wandb
                except ImportError:
                    raise UserError("run.wandb_project is set but wandb is not installed (pip install wandb)") from None
                self._wandb = wandb.init(project=self.config.run.wandb_project, config=self.config.to_dict(), dir=str(self.output))
            self._wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        if self.config.run.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.output / "tensorboard"))
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value) and key != "step":
                    self._writer.add_scalar(key, value, metrics["step"])

    def _rewrite_metrics_log(self) -> None:
        """After a resume the JSONL log holds exactly the restored history (later lines were never checkpointed)."""
        if self.acc.is_main_process:
            with open(self.output / "metrics.jsonl", "w") as handle:
                handle.writelines(json.dumps(metrics) + "\n" for metrics in self.counters.history)

    def share_guard_decision(self) -> None:
        """The reward-hacking guard is evaluated on the main process; every process must stop, or
        train with the raised KL weight, with it (otherwise the others wait in a collective)."""
        if self.acc.num_processes > 1:
            state = broadcast_object_list([self.guard_stopped, self.config.loss.kl_beta])
            self.guard_stopped, self.config.loss.kl_beta = state

    def finished(self) -> bool:
        """run.max_steps reached, or run.max_seconds or run.max_forward_equivalents of training spent."""
        r = self.config.run
        out_of_time = r.max_seconds > 0 and self.counters.elapsed_seconds >= r.max_seconds
        out_of_compute = r.max_forward_equivalents > 0 and self.counters.forward_equivalents >= r.max_forward_equivalents
        return self.counters.step >= r.max_steps or out_of_time or out_of_compute or self.guard_stopped

    def train(self, resume: bool = False, on_step=None) -> int:
        """Run to ``run.max_steps``; returns 0, or PREEMPTED_EXIT_CODE after a signal-triggered checkpoint."""
        self.output.mkdir(parents=True, exist_ok=True)
        if self.acc.is_main_process:
            save_config(self.config, self.output / "config.yaml")
        if resume:
            self.resume()
        self._rewrite_metrics_log()
        previous = self._install_signal_handlers()
        r = self.config.run
        try:
            bar = tqdm(total=r.max_steps, initial=self.counters.step, desc="dgpo", disable=not self.acc.is_main_process)
            while not self.finished():
                try:
                    metrics = self.train_step()
                except RewardFailure:
                    # Keep the work done so far: checkpoint the last completed step, then stop with the reward's name.
                    self.save()
                    raise
                self._log_metrics(metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics.get('implicit_accuracy', float('nan')):.2f}")
                if on_step is not None:
                    on_step(self, metrics)
                done = self.finished()
                if self._stop_requested or done or (r.save_every and self.counters.step % r.save_every == 0):
                    self.save()
                if self._stop_requested and not done:
                    self.log(f"stopped at step {self.counters.step}; resume with --resume")
                    return PREEMPTED_EXIT_CODE
            bar.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._writer is not None:
                self._writer.flush()
            if self._reward_executor is not None:
                self._reward_executor.shutdown(wait=True)
                self._reward_executor = None
        return 0
