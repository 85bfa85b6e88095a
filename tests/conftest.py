"""Shared fixtures: a tiny randomly initialised ShapesEval model built from configs (no downloads)."""
from __future__ import annotations

import pytest

from dgpo.shapes.model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-shapes-model")
    build_tiny_model().save_pretrained(path)
    return path
