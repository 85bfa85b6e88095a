"""Issue 13: the trainer against the DGPO and Flow-GRPO reference code (its formulas written out here)."""
from __future__ import annotations

import json

import pytest
import torch

from dgpo.train.config import load_config
from dgpo.train.loop import Trainer
from test_train import tiny_overrides

QUIET = {"log": lambda *a: None}


# ----- gradient clipping: the logged norm is the pre-clip one ------------------------------------


def test_grad_norm_in_metrics_is_the_norm_before_clipping(tiny_model_dir, tmp_path):
    norms = {}
    for clip in (0.0, 1e-6):
        out = tmp_path / str(clip)
        trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, out, **{"run.max_steps": 1, "optim.grad_clip": clip})), **QUIET)
        trainer.train()
        norms[clip] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
    # The first step's gradient does not depend on the clip; a post-clip norm would read 1e-6.
    assert norms[1e-6] == norms[0.0] > 1e-3
