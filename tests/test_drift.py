"""Velocity-norm drift: mean ||v_theta|| / mean ||v_ref|| on evaluation images, logged for every algorithm."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_overrides

from dgpo.drift import velocity_drift
from dgpo.train.config import load_config
from dgpo.train.loop import Trainer
from dgpo.train.run import evaluation_drift, run_training


def _reference(x, sigma, embeddings):
    return x * (1 + sigma.view(-1, 1, 1, 1)) + embeddings[0].mean()


def test_drift_is_the_ratio_of_mean_velocity_norms():
    latents = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    embeddings = (torch.randn(5, 2, 8), torch.randn(5, 8))
    keys = [("k", i) for i in range(5)]
    assert velocity_drift(_reference, _reference, latents, embeddings, keys) == pytest.approx(1.0)
    assert velocity_drift(lambda *a: 3.0 * _reference(*a), _reference, latents, embeddings, keys) == pytest.approx(3.0)
    # Only the norms count: a rotated velocity of the same length does not drift.
    assert velocity_drift(lambda *a: -_reference(*a), _reference, latents, embeddings, keys) == pytest.approx(1.0)
    # The same keys draw the same noise.
    noisy = velocity_drift(lambda x, s, e: x.abs() + 1, _reference, latents, embeddings, keys)
    assert velocity_drift(lambda x, s, e: x.abs() + 1, _reference, latents, embeddings, keys) == noisy != pytest.approx(1.0)


def test_a_fresh_lora_has_no_drift_and_a_trained_one_does(tiny_model_dir, tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, tmp_path)))
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = ["a photo of a red circle", "a photo of two squares", "a photo of a cross above a circle"] * 2
    assert evaluation_drift(trainer, images, prompts) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        for name, param in trainer.policy.trainable:
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    assert abs(evaluation_drift(trainer, images, prompts) - 1.0) > 1e-3


def test_every_evaluation_logs_the_drift(tiny_model_dir, tmp_path):
    overrides = {"eval.every": 1, "eval.images_per_category": 1, "eval.final_images_per_category": 1, "run.max_steps": 2}
    run_training(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **overrides)), log=lambda *a: None)
    evals = json.loads((tmp_path / "evals.json").read_text())
    assert [e["step"] for e in evals] == [0, 1, 2]
    assert evals[0]["velocity_drift"] == pytest.approx(1.0, abs=1e-6)
    assert all(e["velocity_drift"] > 0 for e in evals)
