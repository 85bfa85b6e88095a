"""Rewards of a step's samples and what happens when they fail.

Scoring runs chunk by chunk as the rollout decodes (on a worker thread beside generation, or inline).
The failure policy: a reward that raises stops the run naming itself, on every process at once; NaN/inf
scores are masked (NaN) and logged; too many of them for ``reward.max_bad_steps`` steps in a row stop the run.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..rewards import RewardFailure, combine_rewards, mean_score, score_batch
from .config import RewardConfig

__all__ = ["ChunkScoring", "RewardFailure", "Scorer", "rewards_by_category"]


def rewards_by_category(categories: list[str | None], rewards: torch.Tensor, group_size: int) -> dict[str, float]:
    """The step's mean valid reward per prompt category (``reward_by/<category>``), one category per group.

    ``categories[g]`` is group g's prompt ``category`` metadata (None: none), the key
    ``balance_categories`` draws by; ``rewards`` are the whole step's, group-major. Many steps of
    it tell which kind of prompt the policy is learning, far tighter than a periodic evaluation."""
    per_group = rewards.view(len(categories), group_size)
    out = {}
    for category in sorted({c for c in categories if c is not None}):
        chosen = per_group[[c == category for c in categories]]
        valid = chosen[torch.isfinite(chosen)]
        if valid.numel():
            out[f"reward_by/{category}"] = float(valid.mean())
    return out


class ChunkScoring:
    """A step's rewards, scored chunk by chunk as the rollout decodes them: inline, or on a worker
    thread while the next chunk is generated. A failure is held until ``results`` so that every
    process still reaches the step's collective failure check."""

    def __init__(self, score_chunk: Callable, executor: ThreadPoolExecutor | None):
        self._score_chunk = score_chunk
        self._executor = executor
        self._pending: list[Future] = []

    def submit(self, chunk) -> None:
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


class Scorer:
    """The training rewards (name -> reward function) with ``reward``'s weights and failure limits."""

    def __init__(self, rewards: dict[str, Callable], config: RewardConfig, log: Callable[[str], None]):
        self.rewards, self.config, self.log = rewards, config, log
        self._executor: ThreadPoolExecutor | None = None
        self._bad_steps = 0

    def start(self) -> ChunkScoring:
        """Scoring of one step's chunks (each has ``images`` and ``prompts``)."""
        if self.config.background and self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dgpo-reward")
        return ChunkScoring(self.score_chunk, self._executor if self.config.background else None)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def score_chunk(self, chunk) -> dict[str, np.ndarray]:
        """Each reward's scores of one chunk; NaN where a reward does not apply or returned NaN/inf."""
        return score_batch(self.rewards, chunk.images, [p.text for p in chunk.prompts], [p.metadata for p in chunk.prompts])

    def combine(self, chunk_scores: list[dict[str, np.ndarray]]) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted rewards of the local samples (chunks in order); NaN where no reward applies or a reward failed."""
        per_reward, logs = {}, {}
        for name in self.rewards:
            scores = np.concatenate([chunk[name] for chunk in chunk_scores])
            per_reward[name] = scores
            logs[f"invalid/{name}"] = int(np.isnan(scores).sum())
            logs[f"reward/{name}"] = mean_score(scores)
        total = combine_rewards(per_reward, self.config.weights)
        return torch.tensor(total, dtype=torch.float32), logs

    def finish(self, scoring: ChunkScoring, failed_processes: Callable[[bool], list[int]]) -> tuple[torch.Tensor, dict[str, float]]:
        """The local rewards and their logs. Every process learns of a reward failure on any process and raises,
        so all of them reach the same checkpoint save and exit together instead of one waiting in a collective."""
        failure = None
        try:
            local, logs = self.combine(scoring.results())
        except RewardFailure as exc:
            failure = exc
        failed = failed_processes(failure is not None)
        if failure is not None:
            raise failure
        if failed:
            raise RewardFailure(f"a reward failed on process {failed[0]} (its log names the reward)")
        return local, logs

    def check(self, step: int, rewards: torch.Tensor, reward_logs: dict) -> torch.Tensor:
        """The valid (finite) rewards of the whole step; raises when none is, or after run after run of
        mostly invalid ones (masked NaN/inf rewards are fine now and then)."""
        valid = torch.isfinite(rewards)
        if not valid.any():
            raise RewardFailure(f"step {step}: every reward is NaN (no reward applies to these prompts?)")
        rc = self.config
        bad = float((~valid).float().mean()) > rc.max_invalid_fraction
        self._bad_steps = self._bad_steps + 1 if bad else 0
        if rc.max_bad_steps and self._bad_steps >= rc.max_bad_steps:
            counts = ", ".join(f"{k.split('/', 1)[1]}: {v}" for k, v in reward_logs.items() if k.startswith("invalid/"))
            raise RewardFailure(
                f"steps {step - self._bad_steps + 1}-{step}: over {rc.max_invalid_fraction:.0%} of the rewards were NaN/inf "
                f"for {self._bad_steps} steps in a row (NaN/inf scores on this process at the last step: {counts})"
            )
        if valid.sum() > 1 and float(rewards[valid].std()) == 0.0:
            self.log(f"warning: step {step}: all {int(valid.sum())} rewards equal {float(rewards[valid][0]):.4g} (broken reward?)")
        return valid
