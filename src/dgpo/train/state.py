"""What changes during a run besides the weights and the optimizer: the step counters and the run state.

The configuration is frozen once validated; a decision taken mid-run (the reward-hacking guard raising the
KL weight or stopping the run) is recorded here, broadcast to every process and saved in checkpoints.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class StepCounters:
    step: int = 0
    forward_equivalents: float = 0.0
    elapsed_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    # Which machine trained which steps: one stretch per start or resume on a machine unlike the last one's
    # ({"from_step", "from_seconds", "machine"}), so seconds summed over a resumed run say what they add up.
    machines: list[dict] = field(default_factory=list)

    def enter_machine(self, machine: dict) -> None:
        """Training goes on from here on ``machine`` (dgpo.machine.describe_machine)."""
        if not self.machines or self.machines[-1]["machine"] != machine:
            self.machines.append({"from_step": self.step, "from_seconds": self.elapsed_seconds, "machine": machine})

    def budget_spent(self, max_steps: int, max_seconds: float = 0.0, max_forward_equivalents: float = 0.0) -> float:
        """The largest share spent of the run's budgets: steps, and training seconds and forward equivalents
        where nonzero (0 = no limit). 1 or more: the run is done."""
        spent = [self.step / max_steps if max_steps else 1.0]
        if max_seconds:
            spent.append(self.elapsed_seconds / max_seconds)
        if max_forward_equivalents:
            spent.append(self.forward_equivalents / max_forward_equivalents)
        return max(spent)


@dataclass
class RunState:
    """configured_kl_beta: loss.kl_beta of this run's config; kl_beta: the weight in effect (the guard's
    raise_kl doubles it); guard_stopped: the guard ended the run."""

    configured_kl_beta: float
    kl_beta: float
    guard_stopped: bool = False

    @classmethod
    def from_config(cls, kl_beta: float) -> RunState:
        return cls(configured_kl_beta=kl_beta, kl_beta=kl_beta)

    def raise_kl(self) -> float:
        """Double the KL weight (0.01 from 0): doubling keeps the recipe's scale, which may be far below 0.01
        in the reference code's units."""
        self.kl_beta = 2 * self.kl_beta if self.kl_beta > 0 else 0.01
        return self.kl_beta

    def state_dict(self) -> dict:
        # "kl_beta" keeps the layout of the checkpoints written before this state had a class.
        return {"kl_beta": {"configured": self.configured_kl_beta, "in_effect": self.kl_beta}, "guard_stopped": self.guard_stopped}

    def load_state_dict(self, saved: dict, log: Callable[[str], None] = print) -> None:
        """Restore a checkpoint's state. A KL weight the guard raised is kept unless this run's config sets a
        different loss.kl_beta from the one the checkpointed run was configured with (a deliberate change)."""
        self.guard_stopped = bool(saved.get("guard_stopped", False))
        kl = saved.get("kl_beta")
        if kl is None or kl["in_effect"] == self.configured_kl_beta:
            return
        if self.configured_kl_beta == kl["configured"]:
            self.kl_beta = kl["in_effect"]
            log(f"loss.kl_beta {kl['in_effect']:g} restored from the checkpoint (the guard raised it from {kl['configured']:g})")
        else:
            log(f"loss.kl_beta {self.configured_kl_beta:g} from this run's config replaces {kl['in_effect']:g} from the checkpoint")
