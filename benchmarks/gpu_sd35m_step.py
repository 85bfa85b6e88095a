"""GPU benchmark: one DGPO step of the trainer's own code on the full SD3.5-Medium transformer (random weights), 512 px, bf16, LoRA.

What is timed is the trainer itself: ``Trainer.rollouts`` (the rollout of ``dgpo.generation.sample``: Flow-DPM-Solver,
10 steps, CFG 4.5, keyed noise) and ``Trainer.update`` (the registered dgpo algorithm: M training timesteps over the
whole group, LoRA policy forward+backward and reference forward with the adapter disabled, gradient checkpointing,
the cross-process gradient sum and the optimizer step). The transformer's weights are float32 under bf16 autocast,
as the trainer keeps a loaded SD3 model. Prompt embeddings are keyed random tensors of SD3.5's shapes (333 tokens x
4096, pooled 2048) and decoding is a stand-in (the first three latent channels through a sigmoid): the text encoders
and the VAE are not part of the timed step, nor is a reward (advantages come from keyed random rewards).
Reports seconds per group for the rollout and the update, rollout images per second and peak GPU memory; writes
results/gpu_sd35m_step.json.

    python benchmarks/gpu_sd35m_step.py [--group-size 16] [--timesteps 4]
    python benchmarks/gpu_sd35m_step.py --tiny    # the same code on the tiny ShapesEval model, on the CPU (a smoke test)

Without CUDA (and without --tiny) it exits with a message.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from dgpo.models.common import ATTENTION_PROJECTIONS
from dgpo.models.sd3 import MMDiTLatents
from dgpo.seeding import keyed_generator, keyed_randn
from dgpo.train.config import load_config
from dgpo.train.loop import Trainer

SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
TEXT_TOKENS = 333


class RandomSD35Medium(MMDiTLatents):
    """SD3.5-Medium's transformer with random weights behind the adapter contract; prompts embed to keyed random
    tensors of SD3.5's shapes and ``decode`` is a cheap stand-in for the VAE."""

    lora_target_modules = ATTENTION_PROJECTIONS

    def __init__(self, latent_size: int = 64):
        from diffusers import SD3Transformer2DModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.transformer = SD3Transformer2DModel(**SD35_MEDIUM)
        self.latent_size = latent_size

    def to(self, device) -> RandomSD35Medium:
        self.transformer.to(device)
        return self

    def text_encoders(self) -> list[torch.nn.Module]:
        return []

    def encode_prompts(self, prompts: list[str]):
        hidden = keyed_randn((TEXT_TOKENS, SD35_MEDIUM["joint_attention_dim"]), [("prompt", p) for p in prompts], device=self.device)
        pooled = keyed_randn((SD35_MEDIUM["pooled_projection_dim"],), [("pooled", p) for p in prompts], device=self.device)
        return hidden, pooled

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(latents[:, :3].float())


def time_step(trainer: Trainer, step: int) -> tuple[float, float]:
    """Seconds of the trainer's rollout and of its update (one optimizer step) for step ``step``'s groups."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    layout, seed = trainer.layout, trainer.config.run.seed
    prompts = trainer.prompt_sampler.draw(seed, step, layout.groups_per_step)
    sample_ids = [i for ids in layout.local_samples() for i in ids]
    rewards = torch.rand(layout.samples_per_step, generator=keyed_generator("benchmark-rewards", seed, step))
    advantages = trainer.advantage_fn(rewards, torch.arange(len(rewards)) // layout.group_size, trainer.config.reward)
    synchronize()
    start = time.perf_counter()
    rollout = trainer.rollouts(step, prompts, sample_ids)
    synchronize()
    middle = time.perf_counter()
    trainer.update(step, rollout, advantages)
    synchronize()
    return middle - start, time.perf_counter() - middle


def build_trainer(args, workdir: Path, extra: dict | None = None) -> Trainer:
    """``extra``: config overrides on top of the benchmark's (gpu_fsdp2_step's modes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    G = args.group_size
    overrides = {
        "data.group_size": G, "data.groups_per_step": 1, "data.micro_batch": G,
        "rollout.sampler": "dpm2m", "rollout.num_steps": 10, "rollout.shift": 3.0, "rollout.guidance_scale": 4.5, "rollout.ema_after": -1,
        "loss.algorithm": "dgpo", "loss.timesteps": args.timesteps, "loss.kl_beta": 0.0,
        "model.lora_rank": args.lora_rank, "model.lora_alpha": 2 * args.lora_rank,
        "reward.weights": "{jpeg_incompressibility: 1.0}", "reward.background": False,
        "run.max_steps": args.repeats + 1, "run.output_dir": str(workdir / "run"), "run.tensorboard": False,
    }
    if args.tiny:
        from dgpo.shapes.model import build_tiny_model

        build_tiny_model().save_pretrained(workdir / "model")
        overrides.update({"model.path": str(workdir / "model"), "rollout.num_steps": 2, "loss.grid_points": 2, "run.threads": 1, **(extra or {})})
        return Trainer(load_config(None, [f"{k}={v}" for k, v in overrides.items()]), log=lambda *a: None)
    prompts = workdir / "prompts.txt"
    prompts.write_text("a photo of a benchmark\n")
    overrides.update({"data.prompts": str(prompts), "model.mixed_precision": "bf16", "model.gradient_checkpointing": True, **(extra or {})})
    return Trainer(load_config(None, [f"{k}={v}" for k, v in overrides.items()]), log=lambda *a: None, model=RandomSD35Medium())


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tiny ShapesEval model on the CPU: checks the code path, times nothing useful")
    parser.add_argument("--results", default="results/gpu_sd35m_step.json")
    args = parser.parse_args(argv)
    if args.tiny:
        args.group_size, args.timesteps, args.lora_rank = min(args.group_size, 4), min(args.timesteps, 2), min(args.lora_rank, 4)
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (--tiny runs its code path on the tiny model)")
        return None
    with tempfile.TemporaryDirectory(prefix="dgpo-bench-") as workdir:
        trainer = build_trainer(args, Path(workdir))
        times = [time_step(trainer, step) for step in range(args.repeats + 1)][1:]  # the first warms up kernels and the allocator
    rollout_s, update_s = (sum(t[i] for t in times) / len(times) for i in range(2))
    G = args.group_size
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": "tiny ShapesEval model (--tiny)" if args.tiny else
                 "SD3.5-Medium transformer config, random weights (float32), bf16 autocast, LoRA r=%d on attention projections" % args.lora_rank,
        "code": "dgpo.train.loop.Trainer: rollouts (dgpo.generation.sample) and update (registered algorithm dgpo)",
        "resolution": 32 if args.tiny else 512, "group_size": G, "training_timesteps": args.timesteps,
        "rollout_seconds_per_group": round(rollout_s, 3),
        "update_seconds_per_group": round(update_s, 3),
        "step_seconds_per_group": round(rollout_s + update_s, 3),
        "rollout_images_per_second": round(G / rollout_s, 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "command": "python benchmarks/gpu_sd35m_step.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
    }
    print(json.dumps(summary, indent=1))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
