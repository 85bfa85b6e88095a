"""The budget and evaluation protocol of `dgpo compare`, apart from ``compare.py`` so that the command line reads its
defaults without importing the comparison (matplotlib, the trainer)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """What each recipe of a comparison gets: its training budget, the evaluation protocol and the seeds. The defaults
    are `dgpo compare`'s."""

    steps: int = 100
    seconds: float = 0.0
    forwards: float = 0.0
    eval_every: int = 10
    eval_images_per_category: int = 24
    seeds: int = 1
    final_eval_images_per_category: int = 0  # 0: as eval_images_per_category
    save_every: int = 0  # checkpoint every N steps (0: only when stopped), so that --reuse resumes an interrupted run

    @property
    def final_images(self) -> int:
        return self.final_eval_images_per_category or self.eval_images_per_category
