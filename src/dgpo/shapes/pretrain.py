"""Deterministic pretraining of the ShapesEval base model (SD3 recipe in miniature).

Stage 1 trains the autoencoder (foreground-weighted L1 + small KL) on ground-truth renders, then sets
SD3-style ``shift_factor``/``scaling_factor`` from the latent statistics. Stage 2
trains the MMDiT and the text encoder jointly with rectified flow
(x_t = (1 - t) x + t eps, target v = eps - x, logit-normal t, caption dropout for CFG)
and keeps a weight EMA, which is what gets saved.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.shapes import ShapesModel
from .prompts import CATEGORIES, PromptSpec, all_specs, scene_for_spec, vocabulary
from .verifier import verify
from .world import BACKGROUND, render_scene


@dataclass
class PretrainConfig:
    output: str = "src/dgpo/assets/shapes-base"
    continue_from: str = ""
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


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_pool(size: int, seed: int) -> tuple[list[PromptSpec], torch.Tensor]:
    """Specs and renders (N, 3, 32, 32) in [0, 1]; categories equally likely."""
    rng = np.random.default_rng(seed)
    specs_by_category = [all_specs(c) for c in CATEGORIES]
    chosen, images = [], []
    for _ in range(size):
        specs = specs_by_category[int(rng.integers(len(CATEGORIES)))]
        spec = specs[int(rng.integers(len(specs)))]
        chosen.append(spec)
        images.append(render_scene(scene_for_spec(spec, rng)))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return chosen, pixels


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
def set_latent_scaling(model: ShapesModel, pixels: torch.Tensor) -> torch.Tensor:
    """Set SD3-style shift/scale so latents are ~zero-mean, unit-std. Returns the scaled posterior means."""
    mean = torch.cat([model.vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in pixels.split(1024)])
    shift = mean.mean().item()
    scale = 1.0 / mean.std().item()
    model.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return (mean - shift) * scale


def train_denoiser(model: ShapesModel, prompts: list[str], latent_mean: torch.Tensor, cfg: PretrainConfig, log=print) -> None:
    transformer = model.transformer.train().requires_grad_(True)
    text_encoder = model.text_encoder.train().requires_grad_(True)
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, weight_decay=1e-4)
    token_ids = model.tokenizer(prompts)
    empty_ids = model.tokenizer([""])
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    start = time.time()
    for step in range(cfg.dit_steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, cfg.dit_steps, cfg.dit_lr, cfg.warmup_steps)
        idx = torch.randint(len(prompts), (cfg.dit_batch,), generator=gen)
        # The posterior mean, not a sample: channels the autoencoder leaves unused have posterior std ~1,
        # and sampling them would spend the denoiser on modelling pure noise.
        x0 = latent_mean[idx]
        ids = token_ids[idx].clone()
        dropped = torch.rand(cfg.dit_batch, generator=gen) < cfg.caption_dropout
        ids[dropped] = empty_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(cfg.dit_batch, generator=gen))
        tb = t.view(-1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * noise
        v = model.velocity(xt, t, model.text_features(ids))
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - decay)
        if step % 200 == 0 or step == cfg.dit_steps - 1:
            log(f"dit step {step:5d} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    transformer.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


def pretrain(cfg: PretrainConfig, log=print) -> ShapesModel:
    """Both stages from scratch, or (``continue_from``) more denoiser training of a saved model on a fresh pool."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    specs, pixels = build_pool(cfg.pool_size, cfg.seed)
    log(f"pool of {len(specs)} renders built")
    if cfg.continue_from:
        model = ShapesModel.from_pretrained(cfg.continue_from)
        with torch.no_grad():
            latent_mean = torch.cat([model.encode_images(chunk) for chunk in pixels.split(1024)])
    else:
        model = ShapesModel.from_config(vocabulary())
        train_autoencoder(model, pixels, cfg, log)
        log(f"verifier passes {reconstruction_pass_rate(model, specs[:1000], pixels[:1000]):.3f} of reconstructions")
        latent_mean = set_latent_scaling(model, pixels)
    log(f"latent shift {model.vae.config.shift_factor:.4f} scale {model.vae.config.scaling_factor:.4f}")
    train_denoiser(model, [s.prompt for s in specs], latent_mean, cfg, log)
    model.save_pretrained(Path(cfg.output))
    log(f"saved to {cfg.output}")
    return model
