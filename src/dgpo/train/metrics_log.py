"""Where a run's per-step metrics go: ``metrics.jsonl`` (always), TensorBoard and wandb (when configured).
Only the main process writes."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError
from .config import Config


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
