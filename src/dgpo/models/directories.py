"""Which model directories a backend loads: the diffusers pipeline classes each backend registered, and the
one-line refusal of a directory of another kind, shared by loading (``dgpo.models.load_model``) and by
``dgpo check``'s description of a pipeline (``dgpo.models.description``)."""
from __future__ import annotations

import json
from pathlib import Path

PIPELINE_CLASSES: dict[str, tuple[str, ...]] = {}  # backend -> the diffusers pipeline classes it loads (dgpo.models.register_backend)


def check_model_directory(backend: str, path: str) -> None:
    """One-line errors, before anything loads, for a model directory the backend cannot load: a diffusers pipeline
    of another kind (or any, for a backend that loads none), one component
    folder of a pipeline (DIR/transformer), or no pipeline at all for a pipeline backend."""
    directory = Path(path) if path else None
    if directory is None or not directory.is_dir():
        return
    index = directory / "model_index.json"
    expected = PIPELINE_CLASSES.get(backend, ())
    if index.is_file():
        found = json.loads(index.read_text()).get("_class_name", "")
        if expected and found in expected:
            return
        owners = [name for name, classes in PIPELINE_CLASSES.items() if found in classes]
        hint = f"; set model.backend: {owners[0]} (--backend {owners[0]})" if owners else ""
        raise ValueError(f"model.path {path} holds a diffusers {found or 'pipeline'} (model_index.json), which model.backend "
                         f"{backend} does not load{hint}")
    if (directory.parent / "model_index.json").is_file():
        raise ValueError(f"model.path {path} is the {directory.name!r} component of the diffusers pipeline in {directory.parent}: "
                         f"set model.path to {directory.parent}")
    if expected:
        raise ValueError(f"model.path {path} has no model_index.json, so it is not a diffusers pipeline directory "
                         f"(model.backend {backend} loads {' or '.join(expected)}; write one with pipeline.save_pretrained)")
