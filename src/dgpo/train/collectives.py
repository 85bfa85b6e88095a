"""What processes exchange: group sums, the step's rewards, gradients, failures and the run state.

Every function is a collective: all processes call it at the same point of the step, with one
all-reduce, gather or broadcast each; on one process none of them communicates.
"""
from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from .data import GroupLayout


class Collectives:
    def __init__(self, accelerator: Accelerator, layout: GroupLayout):
        self.acc, self.layout = accelerator, layout

    @property
    def distributed(self) -> bool:
        return self.acc.num_processes > 1

    def group_sum(self, values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """Per-sample group totals over every process holding the group (one all-reduce per call)."""
        per_micro = self.layout.groups_per_micro
        first = int(group_ids.min()) // per_micro * per_micro
        slots = torch.zeros(per_micro, dtype=values.dtype, device=values.device)
        slots.index_add_(0, (group_ids - first).to(values.device), values)
        if self.distributed:
            slots = self.acc.reduce(slots, reduction="sum")
        return slots[(group_ids - first).to(values.device)]

    def gather_rewards(self, local_rewards: torch.Tensor, sample_ids: list[int]) -> torch.Tensor:
        """Every process gets the rewards of the whole step, ordered by global sample index (on the CPU)."""
        ids = torch.tensor(sample_ids, device=self.acc.device)
        values = local_rewards.to(self.acc.device)
        if self.distributed:
            ids, values = self.acc.gather(ids), self.acc.gather(values)
        full = torch.full((self.layout.samples_per_step,), float("nan"), device=self.acc.device)
        full[ids] = values
        return full.cpu()

    def failed_processes(self, failed: bool) -> list[int]:
        """The processes where something failed this step (every process learns of every failure)."""
        if not self.distributed:
            return [0] if failed else []
        flags = self.acc.gather(torch.tensor([failed], device=self.acc.device))
        return [rank for rank, flag in enumerate(flags.tolist()) if flag]

    def max(self, value: float) -> float:
        """The largest value over processes (e.g. the slowest process's clock)."""
        if not self.distributed:
            return value
        return float(self.acc.gather(torch.tensor([value], device=self.acc.device)).max())

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over processes in place (one all-reduce of them all, flattened)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.distributed or not grads:
            return
        flat = self.acc.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast(self, value):
        """The main process's ``value`` (a picklable object), on every process."""
        if not self.distributed:
            return value
        return broadcast_object_list([value])[0]

