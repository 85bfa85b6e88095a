"""GPU benchmark: an FSDP2 full fine-tuning DGPO step against today's LoRA step, on the SD3.5-Medium transformer config.

The step is the trainer's own (``gpu_sd35m_step.time_step``: ``Trainer.rollouts`` then ``Trainer.update``, random
weights, keyed random prompt embeddings and rewards, 512 px, bf16, gradient checkpointing). Modes, each timed in turn
in the same processes:

    lora                 model.sharding=none, LoRA (today's step; the whole transformer on every GPU)
    fsdp2-full           model.sharding=fsdp2, full fine-tuning (weights, gradients, AdamW state and the frozen
                         reference copy sharded over the processes)
    fsdp2-full-offload   the same with model.cpu_offload (shards and optimizer state in CPU memory); only on 1 process,
                         where it says how much GPU memory offloading saves against fsdp2-full

Reports seconds per group (rollout, update, step) and peak GPU memory per mode (the largest over processes), and
for offload the GiB it saves; writes results/gpu_fsdp2_step.json.

    torchrun --nproc_per_node 8 benchmarks/gpu_fsdp2_step.py            # 1 node x 8 GPUs: lora vs fsdp2-full
    python benchmarks/gpu_fsdp2_step.py                                  # 1 GPU: all three modes
    python benchmarks/gpu_fsdp2_step.py --tiny                           # the tiny ShapesEval model on the CPU (a smoke test)

Without CUDA (and without --tiny) it exits with a message.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from dgpo.train.process_group import leave_process_group

MODES = ("lora", "fsdp2-full", "fsdp2-full-offload")
MODE_OVERRIDES = {
    "lora": {"model.sharding": "none"},
    "fsdp2-full": {"model.sharding": "fsdp2", "model.lora_rank": 0},
    "fsdp2-full-offload": {"model.sharding": "fsdp2", "model.lora_rank": 0, "model.cpu_offload": True},
}


def load_step_benchmark():
    """``gpu_sd35m_step`` beside this file: the model, the trainer it builds and the timed step."""
    spec = importlib.util.spec_from_file_location("gpu_sd35m_step", Path(__file__).resolve().parent / "gpu_sd35m_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_gib() -> float | None:
    """This process's peak GPU memory since the last reset, the largest over processes."""
    if not torch.cuda.is_available():
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return round(float(peak), 2)


def run_mode(step_benchmark, args, mode: str, workdir: Path) -> dict:
    """Build the mode's trainer, time ``args.repeats`` steps after a warm-up one, free it."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = step_benchmark.build_trainer(args, workdir / mode, MODE_OVERRIDES[mode])
    times = [step_benchmark.time_step(trainer, step) for step in range(args.repeats + 1)][1:]
    rollout_s, update_s = (sum(t[i] for t in times) / len(times) for i in range(2))
    result = {
        "rollout_seconds_per_group": round(rollout_s, 3), "update_seconds_per_group": round(update_s, 3),
        "step_seconds_per_group": round(rollout_s + update_s, 3), "peak_gpu_memory_gib": peak_gib(),
    }
    del trainer
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=64, help="rank of the lora mode")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--tiny", action="store_true", help="the tiny ShapesEval model on the CPU: checks the code path, times nothing useful")
    parser.add_argument("--results", default="results/gpu_fsdp2_step.json")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    if args.tiny:
        args.group_size, args.timesteps, args.lora_rank = min(args.group_size, 4), min(args.timesteps, 2), min(args.lora_rank, 4)
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (--tiny runs its code path on the tiny model)")
        return None
    step_benchmark = load_step_benchmark()
    results, notes = {}, []
    with tempfile.TemporaryDirectory(prefix="dgpo-bench-") as workdir:
        for mode in modes:
            # Offloading is measured against fsdp2-full on one process, where it is what makes full fine-tuning fit.
            if mode == "fsdp2-full-offload" and dist.is_initialized() and dist.get_world_size() > 1:
                notes.append("fsdp2-full-offload skipped: it is measured on 1 process")
                continue
            results[mode] = run_mode(step_benchmark, args, mode, Path(workdir))
    main_process = not dist.is_initialized() or dist.get_rank() == 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "processes": world,
        "model": "tiny ShapesEval model (--tiny)" if args.tiny else
                 "SD3.5-Medium transformer config, random weights (float32), bf16 (autocast for lora; FSDP2 bf16 params, fp32 reduce)",
        "code": "dgpo.train.loop.Trainer: rollouts (dgpo.generation.sample) and update (registered algorithm dgpo); model.sharding per mode",
        "lora_rank": args.lora_rank, "group_size": args.group_size, "training_timesteps": args.timesteps,
        "modes": results, "notes": notes,
        "command": "python benchmarks/gpu_fsdp2_step.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
    }
    full, offload = results.get("fsdp2-full", {}), results.get("fsdp2-full-offload", {})
    if full.get("peak_gpu_memory_gib") is not None and offload.get("peak_gpu_memory_gib") is not None:
        summary["offload_saves_gib"] = round(full["peak_gpu_memory_gib"] - offload["peak_gpu_memory_gib"], 2)
    if main_process:
        print(json.dumps(summary, indent=1))
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
    leave_process_group()
