"""Where a run's per-step metrics go: ``metrics.jsonl`` (always), TensorBoard and wandb (when configured),
and the console's progress bar. Only the main process writes."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import UserError
from .config import Config
from .sections import RunConfig
from .state import StepCounters


class MetricsLog:
    def __init__(self, output: Path, config: Config, main_process: bool = True):
        self.output, self.config, self.main = output, config, main_process
        self._writer = None
        self._wandb = None

    def append(self, metrics: dict) -> None:
        if not self.main:
            return
        with open(self.output / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        run = self.config.run
        if run.wandb_project:
            if self._wandb is None:
                try:
                    import wandb
                except ImportError:
                    raise UserError("run.wandb_project is set but wandb is not installed (pip install wandb)") from None
                self._wandb = wandb.init(project=run.wandb_project, config=self.config.to_dict(), dir=str(self.output))
            self._wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        if run.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.output / "tensorboard"))
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value) and key != "step":
                    self._writer.add_scalar(key, value, metrics["step"])

    def rewrite(self, history: list[dict]) -> None:
        """After a resume the JSONL log holds exactly the restored history (later lines were never checkpointed)."""
        if self.main:
            with open(self.output / "metrics.jsonl", "w") as handle:
                handle.writelines(json.dumps(metrics) + "\n" for metrics in history)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()


class BudgetBar:
    """The console's progress: steps out of run.max_steps, or, where a time or compute budget is set (which may
    end the run first), the share of the run's budget spent (StepCounters.budget_spent), with the step beside it."""

    def __init__(self, run: RunConfig, counters: StepCounters, disable: bool = False):
        self.run, self.counters = run, counters
        self.by_steps = not (run.max_seconds or run.max_forward_equivalents)
        if self.by_steps:
            self.bar = tqdm(total=run.max_steps, initial=counters.step, desc="dgpo", disable=disable)
        else:
            self.bar = tqdm(total=100, initial=self.percent_spent(), desc="dgpo", disable=disable,
                            bar_format="{desc}: {percentage:3.0f}% of budget|{bar}| [{elapsed}<{remaining}{postfix}]")

    def percent_spent(self) -> float:
        r = self.run
        return round(100 * min(1.0, self.counters.budget_spent(r.max_steps, r.max_seconds, r.max_forward_equivalents)), 1)

    def advance(self, **shown) -> None:
        """After a step: move the bar and show ``shown`` (and the step, when the bar counts budget)."""
        if self.by_steps:
            self.bar.update(1)
        else:
            self.bar.n = self.percent_spent()
            shown = {"step": self.counters.step, **shown}
        self.bar.set_postfix(ordered_dict=shown)

    def close(self) -> None:
        self.bar.close()

