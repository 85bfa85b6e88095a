"""Shared fixtures: a tiny randomly initialised ShapesEval model built from configs (no downloads)."""
from __future__ import annotations

import pytest
import torch

from dgpo.models.shapes import ShapesModel
from dgpo.shapes.prompts import vocabulary

TINY_VAE = dict(block_out_channels=(8, 16, 16), norm_num_groups=4)
TINY_TRANSFORMER = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32)


def build_tiny_model(seed: int = 0) -> ShapesModel:
    torch.manual_seed(seed)
    return ShapesModel.from_config(vocabulary(), vae=TINY_VAE, transformer=TINY_TRANSFORMER).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-shapes-model")
    build_tiny_model().save_pretrained(path)
    return path
