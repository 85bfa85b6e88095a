"""Deterministic, resumable pretraining of the ShapesEval base model (SD3 recipe in miniature).

Stage 1 trains the autoencoder (foreground-weighted L1 + small KL) on ground-truth renders, then sets
SD3-style ``shift_factor``/``scaling_factor`` from the latent statistics. Stage 2 trains the MMDiT with
rectified flow (x_t = (1 - t) x + t eps, target v = eps - x, logit-normal t, caption dropout for CFG)
and keeps a weight EMA, which is what gets saved. Its captions are loose (``captions.CaptionModel``),
as web alt-text is, and its text encoder is a fixed one built for the grammar (``FIXED_TEXT_ENCODERS``:
the bidirectional T5-style encoder by default) or, as the first base model had it, a CLIP text encoder
trained jointly.

Every draw of step s is keyed by (seed, s), and stage 2 checkpoints to ``<output>/checkpoints`` every
``save_every`` steps, so a pretraining of several hours can be stopped and continued (``resume``) and ends
bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..seeding import keyed_generator, stable_seed
from ..train.checkpoint import latest_good_checkpoint, load_checkpoint, save_checkpoint
from .captions import CaptionModel, caption_scene
from .model import ShapesModel, WordTokenizer, bidirectional_text_encoder, orthogonal_text_encoder, with_extra_layers, with_text_width
from .prompts import CATEGORIES, PromptSpec, all_specs, scene_for_spec, vocabulary
from .verifier import verify
from .world import BACKGROUND, SceneObject, render_scene

FIXED_TEXT_ENCODERS = {"bidirectional": bidirectional_text_encoder, "orthogonal": orthogonal_text_encoder}
"""Text encoders built for the grammar and never trained; the denoiser is pretrained to read one of them."""
TEXT_ENCODERS = (*FIXED_TEXT_ENCODERS, "trained")
CONFIG_FILE = "pretrain_config.json"


@dataclass
class PretrainConfig:
    output: str = "src/dgpo/assets/shapes-base"
    continue_from: str = ""
    add_layers: int = 0
    seed: int = 0
    pool_size: int = 40000
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5
    vae_foreground_weight: float = 5.0
    dit_steps: int = 3000
    dit_batch: int = 32
    dit_lr: float = 5e-4
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    warmup_steps: int = 200
    threads: int = 2
    text_encoder: str = "bidirectional"
    captions: CaptionModel = field(default_factory=CaptionModel)
    save_every: int = 250
    log_every: int = 200
    resume: bool = False

    def __post_init__(self) -> None:
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder must be one of {', '.join(TEXT_ENCODERS)}, got {self.text_encoder!r}")
        if self.add_layers < 0:
            raise ValueError(f"add_layers must be >= 0, got {self.add_layers}")
        if self.add_layers and not self.continue_from:
            raise ValueError("add_layers grows a continued denoiser; it needs continue_from")
        if self.save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {self.save_every}")

    def recipe(self) -> dict:
        """What determines the trained weights (not where they go, how often they are saved, or resuming)."""
        data = asdict(self)
        for key in ("output", "save_every", "log_every", "resume", "threads"):
            data.pop(key)
        return data


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Pool:
    """Pretraining scenes: the grammar spec each was drawn from, its objects, and its render (N, 3, 32, 32) in [0, 1]."""

    specs: list[PromptSpec]
    scenes: list[list[SceneObject]]
    pixels: torch.Tensor


def build_pool(size: int, seed: int) -> Pool:
    """Scenes of every category, categories equally likely; unspecified colours drawn at random."""
    rng = np.random.default_rng(seed)
    specs_by_category = [all_specs(c) for c in CATEGORIES]
    specs, scenes = [], []
    for _ in range(size):
        category_specs = specs_by_category[int(rng.integers(len(CATEGORIES)))]
        spec = category_specs[int(rng.integers(len(category_specs)))]
        specs.append(spec)
        scenes.append(scene_for_spec(spec, rng))
    pixels = torch.from_numpy(np.stack([render_scene(scene) for scene in scenes])).permute(0, 3, 1, 2).float() / 255.0
    return Pool(specs, scenes, pixels)


def _foreground(batch: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) mask of pixels away from the background: objects are a small share of pixels but all that is scored."""
    background = torch.tensor(BACKGROUND, dtype=batch.dtype).view(1, 3, 1, 1) / 255.0 * 2 - 1
    return ((batch - background).abs().amax(dim=1, keepdim=True) > 0.1).to(batch.dtype)


def train_autoencoder(model: ShapesModel, pixels: torch.Tensor, cfg: PretrainConfig, log=print) -> None:
    vae = model.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    start = time.time()
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup_steps)
        batch = pixels[torch.randint(len(pixels), (cfg.vae_batch,), generator=gen)] * 2 - 1
        weights = 1.0 + (cfg.vae_foreground_weight - 1.0) * _foreground(batch)
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(latents).sample
        loss = (weights * (recon - batch).abs()).mean() + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step:5d} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def reconstruction_pass_rate(model: ShapesModel, specs: list[PromptSpec], pixels: torch.Tensor) -> float:
    """Fraction of autoencoder reconstructions the verifier still passes (the autoencoder's ceiling)."""
    recon = (model.vae(pixels * 2 - 1, sample_posterior=False).sample + 1) / 2
    return float(sum(verify(spec, image).passed for spec, image in zip(specs, recon)) / len(specs))


@torch.no_grad()
def set_latent_scaling(model: ShapesModel, pixels: torch.Tensor) -> None:
    """Set SD3-style shift/scale so latents are ~zero-mean, unit-std."""
    mean = torch.cat([model.vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in pixels.split(1024)])
    shift = mean.mean().item()
    scale = 1.0 / mean.std().item()
    model.vae.register_to_config(shift_factor=shift, scaling_factor=scale)


@torch.no_grad()
def pool_latents(model: ShapesModel, pixels: torch.Tensor) -> torch.Tensor:
    """The scaled posterior means of the pool's renders, what the denoiser learns to generate."""
    return torch.cat([model.encode_images(chunk) for chunk in pixels.split(1024)])


def draw_captions(scenes: list[list[SceneObject]], model: CaptionModel, seed: int, step: int) -> list[str]:
    """One loose caption per scene of a batch, keyed by (seed, step, slot): a fresh description each time a scene is drawn."""
    return [caption_scene(scene, model, np.random.default_rng(stable_seed(seed, "caption", step, slot))) for slot, scene in enumerate(scenes)]


class DenoiserTraining:
    """Stage 2's state (denoiser, text encoder if trained, their EMA, optimizer) and one keyed step."""

    def __init__(self, model: ShapesModel, cfg: PretrainConfig):
        self.model, self.cfg = model, cfg
        self.modules = {"transformer": model.transformer}
        if cfg.text_encoder == "trained":
            self.modules["text_encoder"] = model.text_encoder
        for module in self.modules.values():
            module.train().requires_grad_(True)
        self.params = [p for module in self.modules.values() for p in module.parameters()]
        self.ema = {name: {k: v.detach().clone() for k, v in module.state_dict().items()} for name, module in self.modules.items()}
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.dit_lr, weight_decay=1e-4)
        self.empty_ids = model.tokenizer([""])
        self.step = 0

    def train_step(self, pool: Pool, latent_mean: torch.Tensor) -> float:
        cfg, model = self.cfg, self.model
        for group in self.optimizer.param_groups:
            group["lr"] = _cosine_lr(self.step, cfg.dit_steps, cfg.dit_lr, cfg.warmup_steps)
        gen = keyed_generator(cfg.seed, "denoiser", self.step)
        idx = torch.randint(len(pool.scenes), (cfg.dit_batch,), generator=gen)
        ids = model.tokenizer(draw_captions([pool.scenes[i] for i in idx.tolist()], cfg.captions, cfg.seed, self.step))
        ids[torch.rand(cfg.dit_batch, generator=gen) < cfg.caption_dropout] = self.empty_ids
        # The posterior mean, not a sample: channels the autoencoder leaves unused have posterior std ~1,
        # and sampling them would spend the denoiser on modelling pure noise.
        x0 = latent_mean[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(cfg.dit_batch, generator=gen))
        tb = t.view(-1, 1, 1, 1)
        with torch.set_grad_enabled(cfg.text_encoder == "trained"):
            features = model.text_features(ids)
        loss = F.mse_loss(model.velocity((1 - tb) * x0 + tb * noise, t, features), noise - x0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for name, module in self.modules.items():
                for key, value in module.state_dict().items():
                    if value.is_floating_point():
                        self.ema[name][key].lerp_(value, 1 - decay)
        self.step += 1
        return loss.item()

    def save(self, root: Path) -> None:
        tensors = {name: module.state_dict() for name, module in self.modules.items()}
        tensors.update({f"ema_{name}": ema for name, ema in self.ema.items()})
        save_checkpoint(root, self.step, tensors, self.optimizer.state_dict(), {"step": self.step, "recipe": self.cfg.recipe()}, keep=2)

    def load(self, path: Path) -> None:
        tensors, optimizer_state, state = load_checkpoint(path)
        for name, module in self.modules.items():
            module.load_state_dict(tensors[name])
            self.ema[name] = tensors[f"ema_{name}"]
        self.optimizer.load_state_dict(optimizer_state)
        self.step = state["step"]

    def finish(self) -> None:
        """Copy the EMA weights into the model, which is what gets saved."""
        for name, module in self.modules.items():
            module.load_state_dict(self.ema[name])
            module.eval().requires_grad_(False)


def train_denoiser(model: ShapesModel, pool: Pool, latent_mean: torch.Tensor, cfg: PretrainConfig, checkpoints: Path, log=print) -> None:
    training = DenoiserTraining(model, cfg)
    latest = latest_good_checkpoint(checkpoints, warn=log) if cfg.resume else None
    if latest is not None:
        training.load(latest)
        log(f"resumed the denoiser from {latest} (step {training.step} of {cfg.dit_steps})")
    start = time.time()
    while training.step < cfg.dit_steps:
        step = training.step
        loss = training.train_step(pool, latent_mean)
        if step % cfg.log_every == 0 or training.step == cfg.dit_steps:
            log(f"dit step {step:5d} loss {loss:.4f} ({time.time() - start:.0f}s)")
        if training.step % cfg.save_every == 0 and training.step < cfg.dit_steps:
            training.save(checkpoints)
    training.finish()


def _starting_model(cfg: PretrainConfig, pool: Pool, log) -> ShapesModel:
    """The model stage 2 starts from: a saved one, or a new one with a freshly trained autoencoder."""
    if cfg.continue_from:
        model = ShapesModel.from_pretrained(cfg.continue_from)
    else:
        model = ShapesModel.from_config(vocabulary())
        train_autoencoder(model, pool.pixels, cfg, log)
        log(f"verifier passes {reconstruction_pass_rate(model, pool.specs[:1000], pool.pixels[:1000]):.3f} of reconstructions")
        set_latent_scaling(model, pool.pixels)
    if cfg.text_encoder in FIXED_TEXT_ENCODERS:
        # Deterministic: continuing a model that already has this encoder rebuilds the very same one.
        model.tokenizer = WordTokenizer(vocabulary(), model.tokenizer.max_length)
        model.text_encoder = FIXED_TEXT_ENCODERS[cfg.text_encoder](model.tokenizer)
        model.transformer = with_text_width(model.transformer, model.text_encoder.config.hidden_size)  # T5's config maps hidden_size to d_model
    model.transformer = with_extra_layers(model.transformer, cfg.add_layers)
    return model


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """``saved`` with every key it lacks taken from ``defaults``, at every level of nesting."""
    return {key: _with_defaults(saved[key], value) if isinstance(value, dict) and isinstance(saved.get(key), dict)
            else saved.get(key, value) for key, value in defaults.items()} | {k: v for k, v in saved.items() if k not in defaults}


def pretrain(cfg: PretrainConfig, log=print) -> ShapesModel:
    """Both stages from scratch, or (``continue_from``) the denoiser of a saved model trained further on a fresh pool.

    Stage 2's starting model and checkpoints live in ``<output>/checkpoints`` until the run ends; with ``resume``
    a run continues from the newest good checkpoint, and the recipe must match the interrupted run's.
    """
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    output = Path(cfg.output)
    checkpoints = output / "checkpoints"
    start_dir = checkpoints / "start"
    if start_dir.is_dir() and not cfg.resume:
        raise ValueError(f"{output} holds an unfinished pretraining; pass --resume to continue it, or choose another --output")
    if cfg.resume:
        if not start_dir.is_dir():
            raise FileNotFoundError(f"nothing to resume in {output} (no {start_dir})")
        # A field added since the interrupted run started was its default then.
        saved = _with_defaults(json.loads((checkpoints / CONFIG_FILE).read_text()), json.loads(json.dumps(PretrainConfig().recipe())))
        current = json.loads(json.dumps(cfg.recipe()))
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            raise ValueError(f"--resume with a different recipe than the interrupted pretraining: {', '.join(changed)}")
    pool = build_pool(cfg.pool_size, cfg.seed)
    log(f"pool of {len(pool.scenes)} renders built")
    if cfg.resume:
        model = ShapesModel.from_pretrained(start_dir)
    else:
        model = _starting_model(cfg, pool, log)
        model.save_pretrained(start_dir)
        (checkpoints / CONFIG_FILE).write_text(json.dumps(cfg.recipe(), indent=1))
    latent_mean = pool_latents(model, pool.pixels)
    log(f"latent shift {model.vae.config.shift_factor:.4f} scale {model.vae.config.scaling_factor:.4f}")
    train_denoiser(model, pool, latent_mean, cfg, checkpoints, log)
    model.save_pretrained(output)
    (output / CONFIG_FILE).write_text(json.dumps(cfg.recipe(), indent=1))
    shutil.rmtree(checkpoints)
    log(f"saved to {output}")
    return model


def snapshot(output: str | Path, destination: str | Path, log=print) -> ShapesModel:
    """Save the EMA model of an unfinished pretraining's newest checkpoint to ``destination``, to evaluate it meanwhile."""
    checkpoints = Path(output) / "checkpoints"
    latest = latest_good_checkpoint(checkpoints, warn=log)
    if latest is None:
        raise FileNotFoundError(f"no pretraining checkpoint in {checkpoints}")
    model = ShapesModel.from_pretrained(checkpoints / "start")
    tensors, _, state = load_checkpoint(latest)
    for name in ("transformer", "text_encoder"):
        if f"ema_{name}" in tensors:
            getattr(model, name).load_state_dict(tensors[f"ema_{name}"])
    model.save_pretrained(destination)
    log(f"saved the EMA model of step {state['step']} to {destination}")
    return model

