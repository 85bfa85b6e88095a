"""A model directory as its configuration files describe it, read without its weights, for ``dgpo check``.

Each component (transformer, VAE, text encoders) is built from its ``config.json`` on the ``meta`` device:
its parameters have shapes but no storage, so counting them costs
seconds and no memory, and a directory whose weight files are absent or corrupt describes as well as a
whole one. A backend registers how its directories describe (``register_backend(..., describe=)``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..requirements import local_model
from .directories import check_model_directory

MODEL_LIBRARIES = ("diffusers", "transformers")
"""Libraries whose components are modules with parameters; the others (tokenizers, schedulers) hold none."""


@dataclass(frozen=True)
class ModelDescription:
    """The components a directory's configs describe, on the meta device, or the problems that kept them from it.

    ``image_tokens``: transformer tokens of one image at the run's resolution (0 when unknown); ``lora_targets``:
    the module names a LoRA wraps by default (the backend adapter's ``lora_target_modules``)."""

    components: dict[str, torch.nn.Module] = field(default_factory=dict)
    lora_targets: tuple[str, ...] = ()
    image_tokens: int = 0
    problems: tuple[str, ...] = ()

    def parameters(self, component: str | None = None) -> int:
        """Parameter count of one component, or of all."""
        modules = [self.components[component]] if component else self.components.values()
        return sum(p.numel() for module in modules for p in module.parameters())


def component_class(library: str, class_name: str) -> type | None:
    """The class a model_index.json entry names, when it is a module with parameters (not a tokenizer or scheduler)."""
    import diffusers
    import transformers

    cls = getattr({"diffusers": diffusers, "transformers": transformers}.get(library), class_name, None)
    return cls if isinstance(cls, type) and issubclass(cls, torch.nn.Module) else None


def meta_module(library: str, class_name: str, directory: Path) -> torch.nn.Module:
    """Component ``class_name`` of ``library`` built from ``directory/config.json`` with meta parameters; a missing
    config is a one-line FileNotFoundError."""
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {directory} has no config.json (the {class_name} component's configuration)")
    cls = component_class(library, class_name)
    # The default device, not accelerate's init_empty_weights: buffers computed in __init__ (SD3's 384 x 384 positional
    # table) are computed on the meta device too, in no time, and tied weights stay tied, counted once as when loaded.
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config(cls.load_config(directory))
        return cls(cls.config_class.from_pretrained(directory))


def image_tokens(components: dict[str, torch.nn.Module], resolution: int, packing: int = 1, native_latent_size: int = 0) -> tuple[int, str | None]:
    """Transformer tokens of one square image: (resolution / the VAE's downsampling / patch size / packing)^2, with the
    VAE's downsampling 2^(levels - 1) as the diffusers pipelines compute it; resolution 0 is the native size, the
    transformer's ``sample_size`` latents (else ``native_latent_size``). Also a one-line problem when ``resolution``
    does not fit the latent grid."""
    vae, transformer = components.get("vae"), components.get("transformer")
    if vae is None or transformer is None:
        return 0, None
    levels = getattr(vae.config, "block_out_channels", None) or vae.config.encoder_block_out_channels
    scale = 2 ** (len(levels) - 1)
    step = scale * transformer.config.patch_size * packing
    latent = resolution // scale if resolution else (getattr(transformer.config, "sample_size", None) or native_latent_size)
    if resolution % step:
        return 0, f"model.resolution {resolution} must be a multiple of {step} for this model (VAE x{scale}, patches of {step // scale} latents)"
    return (latent // (transformer.config.patch_size * packing)) ** 2, None


def describe_components(directory: Path, specs: dict[str, tuple[str, str]], resolution: int, lora_targets: list[str],
                        packing: int = 1, native_latent_size: int = 0) -> ModelDescription:
    """The components ``specs`` (name -> (library, class), each in ``directory/name``), every missing configuration
    a problem of its own."""
    components, problems = {}, []
    for name, (library, class_name) in specs.items():
        try:
            components[name] = meta_module(library, class_name, directory / name)
        except FileNotFoundError as exc:
            problems.append(str(exc))
    tokens, problem = image_tokens(components, resolution, packing, native_latent_size)
    return ModelDescription(components, tuple(lora_targets), tokens, tuple(problems) + ((problem,) if problem else ()))


def describe_pipeline(path: str, resolution: int, backend: str, lora_targets: list[str], packing: int = 1,
                      native_latent_size: int = 0) -> ModelDescription:
    """A diffusers pipeline directory, or a hub id in the local cache: ``model_index.json`` names the components, each
    built from its config. ``packing``: latents per token side beyond the patch (FLUX packs 2x2)."""
    if path in ("", "shipped"):
        return ModelDescription(problems=(f"model.path {path!r}: model.backend {backend} needs a model directory or hub id",))
    directory, problem = local_model(path, "model.path")
    if directory is None:
        return ModelDescription(problems=(problem,))
    try:
        check_model_directory(backend, str(directory))
    except ValueError as exc:
        return ModelDescription(problems=(str(exc),))
    index = json.loads((directory / "model_index.json").read_text())
    specs = {name: tuple(entry) for name, entry in index.items()
             if isinstance(entry, list) and len(entry) == 2 and entry[0] in MODEL_LIBRARIES and component_class(*entry) is not None}
    missing = [f"model.path {path}: model_index.json lists {name}, which has no folder" for name, entry in index.items()
               if isinstance(entry, list) and entry != [None, None] and not name.startswith("_") and not (directory / name).is_dir()]
    described = describe_components(directory, {name: spec for name, spec in specs.items() if (directory / name).is_dir()}, resolution,
                                    lora_targets, packing, native_latent_size)
    return ModelDescription(described.components, described.lora_targets, described.image_tokens, tuple(missing) + described.problems)
