"""GPU benchmark: one DGPO step on the full SD3.5-Medium transformer (random weights), 512 px, bf16, LoRA.

Runs only where CUDA is present (exits with a message otherwise). Prompt embeddings are random
tensors of SD3.5's shapes (333 tokens x 4096, pooled 2048): the text encoders and VAE are not part of
the timed step. Reports seconds per group for the rollout (Flow-DPM-Solver, 10 steps, CFG 4.5) and for
the update (M training timesteps over the whole group: LoRA policy forward+backward and reference
forward with the adapter disabled, gradient checkpointing), rollout images per second and peak GPU memory; writes results/gpu_sd35m_step.json.

    python benchmarks/gpu_sd35m_step.py [--group-size 16] [--timesteps 4]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from peft import LoraConfig

from dgpo.losses import dgpo_loss, group_advantages, per_sample_mse
from dgpo.models.common import ATTENTION_PROJECTIONS
from dgpo.sampling import cfg_velocity, dpm_solver_sample, flow_sigmas

SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", default="results/gpu_sd35m_step.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU")
        return 0
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**SD35_MEDIUM).to(device, dtype).requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=ATTENTION_PROJECTIONS, init_lora_weights="gaussian"))
    lora = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = p.data.float()
        p.requires_grad_(True)
    transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(lora, lr=3e-4)
    G, latent = args.group_size, (16, 64, 64)

    def velocity(x, sigma, embeddings):
        hidden, pooled = embeddings
        with torch.autocast("cuda", dtype):
            return transformer(hidden_states=x.to(dtype), encoder_hidden_states=hidden, pooled_projections=pooled, timestep=sigma * 1000).sample.float()

    cond = (torch.randn(G, 333, 4096, device=device, dtype=dtype), torch.randn(G, 2048, device=device, dtype=dtype))
    uncond = (torch.randn(G, 333, 4096, device=device, dtype=dtype), torch.randn(G, 2048, device=device, dtype=dtype))
    sigmas = flow_sigmas(10, 3.0, device=device)

    def rollout():
        transformer.eval()
        with torch.no_grad():
            return dpm_solver_sample(cfg_velocity(velocity, cond, uncond, 4.5), torch.randn(G, *latent, device=device), sigmas).sample

    def update(x0):
        """As the trainer does it: the whole group in one micro-step (recipe micro_batch = G)."""
        transformer.train()
        advantages = group_advantages(torch.rand(G, device=device), torch.zeros(G, dtype=torch.long, device=device))
        groups = torch.zeros(G, dtype=torch.long, device=device)
        for _ in range(args.timesteps):
            sigma = torch.full((G,), 0.6 + 0.4 * float(torch.rand(())), device=device)
            eps = torch.randn(1, *latent, device=device).expand(G, *latent)
            xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
            with torch.no_grad():
                transformer.disable_adapters()
                err_ref = per_sample_mse(velocity(xt, sigma, cond), eps - x0)
                transformer.enable_adapters()
            err_theta = per_sample_mse(velocity(xt, sigma, cond), eps - x0)
            loss, _ = dgpo_loss(advantages, err_theta, err_ref, groups, 100.0, num_groups=1)
            (loss / args.timesteps).backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rollout_times, update_times = [], []
    for repeat in range(args.repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        x0 = rollout()
        torch.cuda.synchronize()
        middle = time.perf_counter()
        update(x0)
        torch.cuda.synchronize()
        end = time.perf_counter()
        if repeat:  # the first repeat warms up kernels and the allocator
            rollout_times.append(middle - start)
            update_times.append(end - middle)
    rollout_s, update_s = sum(rollout_times) / len(rollout_times), sum(update_times) / len(update_times)
    summary = {
        "device": torch.cuda.get_device_name(),
        "model": "SD3.5-Medium transformer config, random weights, bf16 autocast, LoRA r=%d on attention projections" % args.lora_rank,
        "resolution": 512, "group_size": G, "training_timesteps": args.timesteps,
        "rollout_seconds_per_group": round(rollout_s, 3),
        "update_seconds_per_group": round(update_s, 3),
        "step_seconds_per_group": round(rollout_s + update_s, 3),
        "rollout_images_per_second": round(G / rollout_s, 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "command": "python benchmarks/gpu_sd35m_step.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    print(json.dumps(summary, indent=1))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
