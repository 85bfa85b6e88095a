"""The online training loop: rollout -> score -> advantages -> update, one named function each.

Runs under ``accelerate`` on one process or many. Every random draw is keyed by (seed, step, group or
sample) (``draws.py``), so 1 and 2 processes, and a resumed run, compute the same numbers (and a checkpoint
needs no random generator state). Gradients of the trainable parameters are summed across processes
explicitly after the micro-steps (``collectives.py``), or with model.sharding=fsdp2 by FSDP2's reduce-scatter
in the backward (``sharding.py``), so the loss normalisation is global. The parts: ``policy.py`` (weights, reference,
prompt embeddings), ``prompt_sampling.py`` (which prompts a step draws), ``rollouts.py`` (sampling), ``scoring.py``
(rewards and their failure policy), ``algorithms.py`` (the losses), ``state.py`` (counters and the run state), ``metrics_log.py``,
``training_checkpoint.py`` (what a checkpoint saves and resume loads).
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from ..machine import describe_machine
from ..models import load_model
from ..models.base import index_embeddings
from ..models.common import check_prompt_lengths
from ..rewards import get_reward
from .algorithms import UpdateContext, get_advantage, get_algorithm
from .checkpoint import latest_good_checkpoint
from .collectives import Collectives
from .config import Config, save_config
from .data import GroupLayout, PromptSource
from .draws import Draws
from .ema import ParameterEMA, eval_ema_decay, eval_ema_updates, ramped_decay
from .metrics_log import BudgetBar, MetricsLog
from .optim import learning_rate, optimizer_class
from .policy import Policy
from .prompt_sampling import PROMPT_SAMPLERS, category_of, informative_groups, sampling_metrics
from .rollouts import Rollout, Rollouts, rollout_autocast
from .scoring import RewardFailure, Scorer, rewards_by_category
from .sharding import SHARDINGS, clip_grad_norm, refuse_sharded_launch
from .state import RunState, StepCounters
from .training_checkpoint import load_training_checkpoint, save_training_checkpoint

__all__ = ["PREEMPTED_EXIT_CODE", "RewardFailure", "Rollout", "Trainer"]

PREEMPTED_EXIT_CODE = 75


class Trainer:
    def __init__(self, config: Config, accelerator: Accelerator | None = None, log=None, model=None):
        """``model``: an adapter to train instead of loading config.model (benchmarks)."""
        self.config = config
        refuse_sharded_launch()
        self.acc = accelerator or Accelerator(mixed_precision=config.model.mixed_precision, cpu=not torch.cuda.is_available())
        self.log = log or self.acc.print
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        d, r = config.data, config.rollout
        self.layout = GroupLayout(d.group_size, d.groups_per_step, d.micro_batch, self.acc.num_processes, self.acc.process_index)
        self.algorithm = get_algorithm(config.loss.algorithm)
        self.advantage_fn = get_advantage(self.algorithm.advantages or config.reward.advantage)
        make_optimizer = optimizer_class(config.optim.optimizer)
        self.prompts = PromptSource.load(d.prompts)
        self.prompt_sampler = PROMPT_SAMPLERS.get(d.prompt_sampling)(self.prompts, d)
        self.scorer = Scorer({name: get_reward(name, **config.reward.options.get(name, {})) for name in config.reward.weights}, config.reward, self.log)
        # An eval.metrics reward that is also a training reward built without options is that same instance: a reward model loads once.
        plain = {name: fn for name, fn in self.scorer.rewards.items() if not config.reward.options.get(name)}
        self.eval_rewards = {name: plain[name] if name in plain else get_reward(name) for name in config.eval.metrics}
        self.output = Path(config.run.output_dir)
        model = model or load_model(config.model.backend, config.model.path, config.model.resolution)
        check_prompt_lengths(model, [p.text for p in self.prompts.prompts], f"data.prompts {d.prompts}")
        self.sharding = SHARDINGS.get(config.model.sharding)
        shard = self.sharding.wrapper(self.acc.device, config.model.mixed_precision, config.model.cpu_offload)
        self.policy = Policy(model.to(self.acc.device), config, [p.text for p in self.prompts.prompts], shard)
        o = config.optim
        self.optimizer = make_optimizer(self.policy.parameters, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.draws = Draws(config.run.seed, r, config.loss, config.run.max_steps, model.latent_shape, self.acc.device)
        self.collectives = Collectives(self.acc, self.layout)
        self.rollouts = Rollouts(self.policy, self.draws, r, d.group_size, d.micro_batch, self.algorithm.needs_trajectory,
                                 rollout_autocast(r.mixed_precision, self.acc),
                                 self.count_forwards)
        self.counters = StepCounters()
        self.state = RunState.from_config(config.loss.kl_beta)
        self.metrics_log = MetricsLog(self.output, config, self.acc.is_main_process)
        self._stop_requested = False

    def count_forwards(self, local_forwards: float) -> None:
        """Add model forward-equivalents done on this process (a backward counts as two forwards)."""
        self.counters.forward_equivalents += local_forwards * self.acc.num_processes

    # ----- the step --------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        step = self.counters.step
        start = time.perf_counter()
        step_prompts = self.prompt_sampler.draw(self.config.run.seed, self.rollouts.prompt_step(step), self.layout.groups_per_step)
        sample_ids = [i for ids in self.layout.local_samples() for i in ids]
        scoring = self.scorer.start()
        rollout = self.rollouts(step, step_prompts, sample_ids, on_chunk=scoring.submit)
        t_rollout = time.perf_counter()
        local_rewards, reward_logs = self.scorer.finish(scoring, self.collectives.failed_processes)
        rewards = self.collectives.gather_rewards(local_rewards, sample_ids)
        valid = self.scorer.check(step, rewards, reward_logs)
        advantages = self.advantage_fn(rewards, torch.arange(len(rewards)) // self.layout.group_size, self.config.reward)
        t_reward = time.perf_counter()
        for update_index in range(self.config.optim.updates_per_rollout):
            metrics = self.update(step, rollout, advantages, update_index)
        r, e = self.config.rollout, self.config.eval
        self.policy.rollout_ema.update(ramped_decay(step, r.ema_decay, r.ema_ramp))
        eval_decay = eval_ema_decay(step + 1, e.ema_decay, e.ema_every)
        if self.policy.eval_ema is not None and eval_decay is not None:
            self.policy.eval_ema.update(eval_decay)
        # Every process must agree on run.max_seconds; the slowest one's clock counts.
        elapsed = self.collectives.max(time.perf_counter() - start)
        self.counters.step += 1
        self.counters.elapsed_seconds += elapsed
        metrics.update(reward_logs)
        metrics.update(rewards_by_category([p.metadata.get("category") for p in step_prompts], rewards, self.layout.group_size))
        # The gathered rewards are the same on every process, so every process's sampler takes the same state.
        categories, informative = [category_of(p) for p in step_prompts], informative_groups(rewards.view(-1, self.layout.group_size)).tolist()
        metrics.update(sampling_metrics(categories, informative, self.prompt_sampler.weights()))
        self.prompt_sampler.observe(categories, informative)
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

    def update(self, step: int, rollout: Rollout, advantages: torch.Tensor, update_index: int = 0) -> dict[str, float]:
        """The algorithm's passes (DGPO: M training timesteps) x micro-steps, then one optimizer step."""
        c, layout, policy = self.config, self.layout, self.policy
        texts = [p.text for p in rollout.prompts]
        if self.algorithm.text_dropout:
            texts = ["" if drop else text for drop, text in zip(self.draws.text_dropout(step, rollout.sample_ids, c.data.text_dropout), texts)]
        embeddings = policy.embed(texts)
        loss_config = dataclasses.replace(c.loss, kl_beta=self.state.kl_beta)  # the KL weight in effect
        loss_config.freeze()
        common = dict(
            step=step, update_index=update_index, loss=loss_config, rollout=c.rollout, reward=c.reward,
            draws=self.draws, velocity=policy.velocity, old_velocity=policy.old_velocity, reference_velocity=policy.reference_velocity,
            empty_embeddings=policy.empty, group_sum=self.collectives.group_sum, groups_per_step=layout.groups_per_step,
            samples_per_step=layout.samples_per_step, count_forwards=self.count_forwards,
        )
        # Per metric: sum and count of the micro-steps where it is defined (the DGPO metrics over
        # informative groups are NaN in a micro-step without one).
        totals: dict[str, list[float]] = {}
        passes = self.algorithm.passes(c)
        for k in range(passes):
            for m, ids in enumerate(layout.local_samples()):
                local = slice(m * layout.micro_batch, (m + 1) * layout.micro_batch)
                ctx = UpdateContext(
                    pass_index=k, sample_ids=torch.tensor(ids), group_ids=torch.tensor(ids) // layout.group_size, x0=rollout.latents[local],
                    embeddings=index_embeddings(embeddings, local), advantages=advantages[ids].to(self.acc.device),
                    trajectory=None if rollout.trajectory is None else rollout.trajectory[local],
                    log_probs=None if rollout.log_probs is None else rollout.log_probs[local], **common,
                )
                with self.acc.autocast():
                    loss, metrics = self.algorithm.update(ctx)
                (loss / passes).backward()
                for key, value in metrics.items():
                    total = totals.setdefault(key, [0.0, 0])
                    if not math.isnan(float(value)):
                        total[0] += float(value)
                        total[1] += 1
        self.sharding.reduce_gradients(self.collectives, policy.parameters)
        grad_norm = clip_grad_norm(policy.parameters, c.optim.grad_clip if c.optim.grad_clip > 0 else float("inf"))
        lr = learning_rate(step, c.optim.lr, c.optim.lr_schedule, c.optim.warmup_steps, c.run.max_steps, c.optim.decay_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {key: value / count if count else float("nan") for key, (value, count) in totals.items()}
        out["grad_norm"] = grad_norm  # the total norm before clipping
        out["lr"] = lr
        return out

    # ----- checkpoints, resume, signals ------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.output / "checkpoints"

    def save(self) -> Path | None:
        """Checkpoint the step (every process calls it; ``training_checkpoint.py``)."""
        c = self.counters
        state = {"step": c.step, "forward_equivalents": c.forward_equivalents, "elapsed_seconds": c.elapsed_seconds, "history": c.history,
                 "machines": c.machines,
                 "config": self.config.to_dict(), "run_state": self.state.state_dict(), "prompt_sampler": self.prompt_sampler.state_dict()}
        path = save_training_checkpoint(self.checkpoint_dir, c.step, state, self.policy, self.optimizer, self._emas(), self.sharding.sharded,
                                        self.collectives, self.acc.is_main_process, self.config.run.keep_checkpoints)
        self.acc.wait_for_everyone()
        return path

    def _emas(self) -> dict[str, ParameterEMA]:
        p = self.policy
        return {"rollout_ema": p.rollout_ema, **({"eval_ema": p.eval_ema} if p.eval_ema is not None else {})}

    def resume(self) -> bool:
        path = latest_good_checkpoint(self.checkpoint_dir, warn=self.log)
        if path is None:
            self.log(f"no checkpoint in {self.checkpoint_dir}; starting from step 0")
            return False
        state = load_training_checkpoint(path, self.policy, self.optimizer, self._emas(), self.sharding.sharded, self.config.model.sharding)
        # Checkpoints written before the machines were recorded start the list at the resume.
        self.counters = StepCounters(state["step"], state["forward_equivalents"], state["elapsed_seconds"], state["history"],
                                     state.get("machines", []))
        # Checkpoints written before RunState kept only the KL weights, at the top level.
        self.state.load_state_dict(state.get("run_state", {"kl_beta": state.get("kl_beta")}), log=self.log)
        self.prompt_sampler.load_state_dict(state.get("prompt_sampler", {}))
        self.log(f"resumed from {path} at step {self.counters.step}")
        return True

    def share_run_state(self) -> None:
        """The reward-hacking guard is evaluated on the main process; every process must stop, or train with
        the raised KL weight, with it (otherwise the others wait in a collective)."""
        self.state = self.collectives.broadcast(self.state)

    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self._stop_requested:
                raise SystemExit(128 + signum)
            self._stop_requested = True
            self.log(f"signal {signum}: saving a checkpoint at the end of this step (send again to exit at once)")

        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def export_adapter(self, path: Path) -> None:
        """LoRA in diffusers' format, and with an evaluation EMA (eval.ema_decay) also its weights beside it as
        ``<path>_ema`` (the reference code saves the EMA as its checkpoint), unless the EMA has had no update: it would
        be the base model, so it is not written and a warning says why. Every process calls it (sharded weights are
        gathered); the main process writes."""
        e, steps = self.config.eval, self.counters.step
        unmoved = self.policy.eval_ema is not None and eval_ema_updates(steps, e.ema_every) == 0
        if unmoved and self.acc.is_main_process:
            self.log(f"warning: {path.name}_ema/ not written: the evaluation EMA had no update in {steps} steps (eval.ema_every="
                     f"{e.ema_every}), so it holds the base model; {path.name}/ holds the trained policy")
        self.policy.export(path, write=self.acc.is_main_process, with_ema=not unmoved)

    def finished(self) -> bool:
        """run.max_steps reached, or run.max_seconds or run.max_forward_equivalents of training spent, or the guard stopped the run."""
        r = self.config.run
        return self.counters.budget_spent(r.max_steps, r.max_seconds, r.max_forward_equivalents) >= 1 or self.state.guard_stopped

    def train(self, resume: bool = False, on_step=None) -> int:
        """Run to ``run.max_steps``; returns 0, or PREEMPTED_EXIT_CODE after a signal-triggered checkpoint."""
        self.output.mkdir(parents=True, exist_ok=True)
        if self.acc.is_main_process:
            save_config(self.config, self.output / "config.yaml")
        if resume:
            self.resume()
        self.counters.enter_machine(describe_machine())
        self.metrics_log.rewrite(self.counters.history)
        previous = self._install_signal_handlers()
        r = self.config.run
        progress = self.algorithm.curves[0] if self.algorithm.curves else None
        bar = BudgetBar(r, self.counters, disable=not self.acc.is_main_process)
        try:
            while not self.finished():
                try:
                    metrics = self.train_step()
                except RewardFailure:
                    # Keep the work done so far: checkpoint the last completed step, then stop with the reward's name.
                    self.save()
                    raise
                self.metrics_log.append(metrics)
                shown = {progress[0]: f"{metrics.get(progress[0], float('nan')):.3g}"} if progress else {}
                bar.advance(reward=f"{metrics['reward_mean']:.3f}", **shown)
                if on_step is not None:
                    on_step(self, metrics)
                done = self.finished()
                if self._stop_requested or done or (r.save_every and self.counters.step % r.save_every == 0):
                    self.save()
                if self._stop_requested and not done:
                    self.log(f"stopped at step {self.counters.step}; resume with --resume")
                    return PREEMPTED_EXIT_CODE
        finally:
            # Closed before an error propagates, so that the error's message prints below the bar, not under it.
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.metrics_log.flush()
            self.scorer.close()
        return 0
