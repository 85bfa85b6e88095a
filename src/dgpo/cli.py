"""`dgpo` command line: train, check, eval, sample, rewards, prompts, serve-reward, merge-lora, and the commands plugins register.

Errors a user can fix (config typos, missing files, bad prompts, corrupt checkpoints, a missing
package or server: ``dgpo.errors.UserError``, ``ValueError``, ``FileNotFoundError``) are printed as
one line, ``dgpo: error: ...``, with exit status 2. Anything else (a bug, running out of memory)
keeps its traceback and Python's exit status 1.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from . import registry
from .commands import COMMANDS, key_value
from .errors import UserError
from .sampler_settings import SamplerSettings
from .train.compare_budget import Budget
from .train.sections import ModelConfig


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    d = SamplerSettings
    p.add_argument("--sampler", default=d.sampler, help=f"ODE solver: dpm2m (Flow-DPM-Solver) or euler (default: {d.sampler})")
    p.add_argument("--steps", type=int, default=d.num_steps, help=f"solver steps (default: {d.num_steps})")
    p.add_argument("--shift", type=float, default=d.shift, help=f"SD3 time shift (default: {d.shift})")
    p.add_argument("--cfg", type=float, default=d.guidance_scale, help=f"classifier-free guidance scale (default: {d.guidance_scale})")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .models import BACKENDS

    p.add_argument("--backend", default=ModelConfig.backend, help=f"model backend: {', '.join(BACKENDS.names())} (default: {ModelConfig.backend})")
    p.add_argument("--model", default="", help="model directory (a diffusers pipeline for sd3/flux/sana; default: the model the backend ships, if any)")
    p.add_argument("--adapter", default=None, help="LoRA adapter written by `dgpo train`: run_dir/adapter, the run directory or the weights file")
    p.add_argument("--resolution", type=int, default=0, help="image size in pixels (default 0: the model's native size)")
    p.add_argument("--batch-size", type=int, default=8, help="images generated at once (default: 8)")


def _load_model(args):
    from .models import load_model
    from .models.merge import load_adapter

    model = load_model(args.backend, args.model, args.resolution)
    if args.adapter:
        load_adapter(model, args.adapter)
    return model


def _settings(args) -> SamplerSettings:
    return SamplerSettings(args.sampler, args.steps, args.shift, args.cfg)


def cmd_train(args) -> int:
    from .train.config import config_help, load_config
    from .train.run import run_training

    if args.help_config:
        print(config_help())
        return 0
    if args.config is None:
        raise ValueError("train needs a CONFIG recipe (e.g. configs/shapes/dgpo.yaml)")
    if args.dry_run:
        from .preflight import check_recipe

        return check_recipe(args.config, args.set or [], resume=args.resume, overwrite=args.overwrite)
    config = load_config(args.config, args.set or [])
    # run_training prints the summary: evaluation before -> after and where the report, adapter and curves are.
    return run_training(config, resume=args.resume, overwrite=args.overwrite)["status"]


def cmd_check(args) -> int:
    from .preflight import check_recipe

    return check_recipe(args.config, args.set or [], args.processes, args.resume, args.overwrite)


def cmd_compare(args) -> int:
    from .train.compare import markdown_summary, parse_recipe, run_comparison

    recipes = [parse_recipe(text) for text in args.recipes]
    budget = Budget(args.budget_steps, args.budget_seconds, args.budget_forwards, args.eval_every, args.eval_images, args.seeds,
                    args.final_eval_images, args.save_every)
    summary = run_comparison(recipes, Path(args.output), budget, args.threshold, args.set or [], args.baseline, args.reuse,
                             confirmations=args.confirm, recipe_seeds=dict(args.recipe_seeds or []))
    print(markdown_summary(summary))
    print(f"\nwrote {args.output}/curves.csv, curves.png, summary.json, summary.md")
    return 0


def _eval_config(args):
    """The evaluation settings of `dgpo eval` as a run config, so an evaluator is built as in training
    (``Evaluator.from_config``): --metrics are the rewards the prompts evaluator scores (reward.weights, equally)."""
    from .train.config import load_config

    metrics = [m for m in (args.metrics or "").split(",") if m]
    options: dict[str, dict] = {}
    for reward, key, value in args.reward_option or []:
        if reward not in metrics:
            raise UserError(f"--reward-option {reward}.{key}: {reward} is not one of --metrics ({', '.join(metrics) or 'none'})")
        options.setdefault(reward, {})[key] = value
    overrides = {
        "model.backend": args.backend, "model.resolution": args.resolution, "eval.evaluator": args.evaluator,
        "eval.prompts": args.prompts or "", "eval.ood_prompts": args.ood_prompts or "",
        "data.micro_batch": args.batch_size,
    }
    if metrics:
        overrides["reward.weights"] = {m: 1.0 for m in metrics}
        overrides["reward.options"] = options
    config = load_config(None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()])
    return config, metrics


def cmd_eval(args) -> int:
    import torch

    from .evaluators import NONE, PROMPT_SET, get_evaluator, metric_means, resolve_evaluator
    from .image_grid import save_grid
    from .rewards import get_reward

    if args.threads:
        torch.set_num_threads(args.threads)
    config, metrics = _eval_config(args)
    name, why = resolve_evaluator(args.evaluator, args.backend, args.prompts or "")
    if name == NONE:
        raise UserError(f"nothing to evaluate: {why}; pass --prompts FILE (a held-out prompt file) and --metrics REWARD[,REWARD]")
    if name == PROMPT_SET and not metrics:
        raise UserError("--prompts needs --metrics, the registered rewards to score the images with (see `dgpo rewards`)")
    model = _load_model(args)
    settings = _settings(args)
    evaluator = get_evaluator(name).from_config(config, model)
    result = evaluator.evaluate(model, settings, args.images_per_category, seed=args.seed)
    rows = [f"| {name} | {value:.3f} |" for name, value in result.scores.items()]
    print("\n".join([f"| {evaluator.score_label} | score |", "|---|---|", *rows, f"| **overall** | **{result.overall:.3f}** |"]))
    print("  ".join(f"{name} {value:.4f}" for name, value in result.out_of_domain.items()) + f"  ({result.num_images} images)")
    # A metric the evaluator scored already (the prompts evaluator's rewards) is not built or scored again.
    extra_metrics = metric_means({m: get_reward(m, **config.reward.options.get(m, {})) for m in metrics if m not in result.scores}, result)
    scored = {m: result.scores[m] if m in result.scores else extra_metrics[m] for m in metrics}
    if extra_metrics:
        print("  ".join(f"{m} {v:.4f}" for m, v in extra_metrics.items()) + "  (--metrics)")
    extra, text = evaluator.diagnostics(result, seed=args.seed)
    if text:
        print(text)
    out = {"evaluator": name, **result.to_dict()}
    if scored:
        out["metrics"] = scored
    out.update(
        **extra,
        sampler=vars(settings),
        model=args.model,
        adapter=args.adapter,
        command="dgpo " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.output}")
    if args.grid and result.grid is not None:
        save_grid(result.grid.images, result.grid.labels, args.grid, passed=result.grid.passed)
        print(f"wrote {args.grid}")
    return 0


def cmd_sample(args) -> int:
    from .generation import generate
    from .image_grid import save_grid
    from .models.common import check_prompt_lengths

    model = _load_model(args)
    check_prompt_lengths(model, args.prompt, "dgpo sample")
    prompts = [p for p in args.prompt for _ in range(args.num)]
    keys = [("sample", args.seed, i) for i in range(len(prompts))]
    images = generate(model, prompts, keys, _settings(args), args.batch_size)
    save_grid(images, prompts, args.output, columns=args.num)
    print(f"wrote {args.output}")
    return 0


def cmd_rewards(args) -> int:
    from .rewards import REWARDS

    for name in REWARDS.names():
        print(f"{name:24s} {(REWARDS.get(name).__doc__ or '').strip().splitlines()[0]}")
    return 0


def cmd_prompts(args) -> int:
    from .prompt_catalog import PROMPT_SETS, fetch_prompt_sets, select

    if args.action == "list":
        for s in PROMPT_SETS:
            count = f"{s.count} prompts" if s.count is not None else "count unknown until fetched"
            print(f"{s.file:24s} {count:28s} {s.repository}@{s.commit[:7]}:{s.path} ({s.license})")
        return 0
    fetch_prompt_sets(select(args.names), args.dir)
    return 0


def _reward_option(text: str) -> tuple[str, str, object]:
    """REWARD.KEY=VALUE: ``key_value``'s KEY=VALUE with the reward's name before the key."""
    key, value = key_value(text)
    reward, sep, name = key.partition(".")
    if not sep or not reward or not name:
        raise argparse.ArgumentTypeError(f"expected REWARD.KEY=VALUE, got {text!r}")
    return reward, name, value


def _recipe_seeds(text: str) -> tuple[str, int]:
    """NAME=N: a recipe's own count of training seeds in `dgpo compare`."""
    name, sep, count = text.partition("=")
    if not sep or not name or not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=N (a recipe and its number of seeds), got {text!r}")
    return name, int(count)


def cmd_serve_reward(args) -> int:
    from .rewards.remote import serve

    serve(args.name, args.host, args.port, **dict(args.option or []))
    return 0


def cmd_merge_lora(args) -> int:
    import torch

    from .models.merge import merge_lora

    output = merge_lora(args.backend, args.model, args.lora, args.output, getattr(torch, args.dtype))
    print(f"wrote {output}")
    return 0


def _add_import_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--import", dest="imports", action="append", metavar="MODULE",
        help="import a module that registers your own reward, algorithm or backend (repeatable), e.g. --import my_rewards",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgpo", description="Direct Group Preference Optimization for flow-matching text-to-image models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with a YAML recipe", description="Online DGPO training: rollout -> reward -> advantages -> update.")
    p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/shapes/dgpo.yaml")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a config field (repeatable), e.g. --set loss.beta=100")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in run.output_dir")
    p.add_argument("--overwrite", action="store_true", help="delete what run.output_dir holds and start a new run there")
    p.add_argument("--help-config", action="store_true", help="list every config field with its default and meaning")
    p.add_argument("--dry-run", action="store_true", help="check the recipe and estimate its memory without training (as `dgpo check`)")
    _add_import_arg(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("check", help="find every problem of a recipe in seconds, before any weights load, and estimate its memory",
                       description="Read the recipe, its prompt files, the model's configuration (not its weights), the rewards' "
                                   "requirements and the process layout; print every problem, one line each, and the memory per "
                                   "process. Exit status 0 when dgpo train would start, 2 otherwise.")
    p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/shapes/dgpo.yaml (default: the defaults, with --set)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a config field (repeatable)")
    p.add_argument("--processes", type=int, default=0, help="processes the run will launch (default: $WORLD_SIZE, else 1)")
    p.add_argument("--resume", action="store_true", help="the run will continue the one in run.output_dir")
    p.add_argument("--overwrite", action="store_true", help="the run will replace the one in run.output_dir")
    _add_import_arg(p)
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("compare", help="run several recipes under one budget and evaluation protocol",
                       description="Train each recipe from the same base model, seed and test prompts; evaluate every N steps; "
                                   "write curves.csv, curves.png, summary.json and summary.md with the time and model "
                                   "forward-equivalents each recipe needed to reach the score thresholds, and ratios to the baseline.")
    p.add_argument("recipes", nargs="+", metavar="NAME=RECIPE", help="recipes to compare, e.g. dgpo=configs/shapes/dgpo.yaml")
    p.add_argument("--output", default="results/compare", help="output directory (default: results/compare)")
    p.add_argument("--budget-steps", type=int, default=Budget.steps, help=f"optimizer steps per recipe (default: {Budget.steps})")
    p.add_argument("--budget-seconds", type=float, default=0.0, help="also stop each recipe after this much training time (default: no limit)")
    p.add_argument("--budget-forwards", type=float, default=0.0,
                   help="also stop each recipe after this many model forward-equivalents, a budget that means the same on any "
                        "hardware (default: no limit)")
    p.add_argument("--eval-every", type=int, default=Budget.eval_every, help=f"evaluate every N steps (default: {Budget.eval_every})")
    p.add_argument("--eval-images", type=int, default=Budget.eval_images_per_category,
                   help=f"test images per category per evaluation (default: {Budget.eval_images_per_category})")
    p.add_argument("--final-eval-images", type=int, default=Budget.final_eval_images_per_category,
                   help="test images per category at the last evaluation (default: as --eval-images)")
    p.add_argument("--save-every", type=int, default=Budget.save_every,
                   help="checkpoint each run every N steps, so that --reuse resumes an interrupted run there (default: 0, "
                        "a checkpoint only when a run is stopped by a signal)")
    p.add_argument("--confirm", type=int, default=1,
                   help="a threshold counts as reached at an evaluation only if the next N evaluations reach it too, so one "
                        "lucky evaluation does not count (default: 1; 0 takes the first evaluation reaching it)")
    p.add_argument("--threshold", type=float, action="append", help="overall scores to time (repeatable; default: the evaluator's own default_thresholds)")
    p.add_argument("--baseline", help="recipe the ratios are relative to (default: the first)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override applied to every recipe (repeatable)")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs in OUTPUT/runs whose config matches")
    p.add_argument("--seeds", type=int, default=Budget.seeds,
                   help="training seeds per recipe (run.seed 0..N-1); the summary gives mean +- se and bootstrap intervals (default: 1)")
    p.add_argument("--recipe-seeds", action="append", type=_recipe_seeds, metavar="NAME=N",
                   help="seeds of one recipe instead of --seeds (repeatable), e.g. a baseline measured with two seeds beside "
                        "one-seed ablations")
    _add_import_arg(p)
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser(
        "eval", help="evaluate a model (plus optional LoRA adapter)",
        description="Evaluate a model (plus optional LoRA adapter) with its backend's own evaluator, or "
                    "any backend on a held-out prompt file scored with registered rewards (--prompts FILE --metrics R1,R2).",
    )
    _add_model_args(p)
    p.add_argument("--prompts", help="held-out prompt file (one per line, or JSONL {prompt, metadata}) for the prompts evaluator")
    p.add_argument("--ood-prompts", help="a second, out-of-domain prompt file (prompts evaluator)")
    p.add_argument("--metrics", help="comma-separated registered rewards to score the images with (see `dgpo rewards`)")
    p.add_argument("--reward-option", action="append", type=_reward_option, metavar="REWARD.KEY=VALUE",
                   help="an option of a --metrics reward's factory (repeatable), e.g. --reward-option geneval.strict=true for GenEval's "
                        "pass/fail accuracy (its paper's table) instead of partial credit")
    p.add_argument("--images-per-category", type=int, default=96,
                   help="test images per category (default: 96; prompts evaluator: images over the prompt file, at least 2 per prompt)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--output", help="write the results JSON here")
    p.add_argument("--grid", help="write an image grid PNG here")
    p.add_argument("--evaluator", default="",
                   help="registered evaluator (dgpo.evaluators; default: the one registered for the backend, else prompts with --prompts)")
    _add_sampler_args(p)
    _add_import_arg(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("sample", help="generate images for prompts into a PNG grid")
    p.add_argument("prompt", nargs="+", help="prompt text(s)")
    p.add_argument("--num", type=int, default=8, help="images per prompt (default: 8)")
    _add_model_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="samples.png")
    _add_sampler_args(p)
    _add_import_arg(p)
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("rewards", help="list the registered rewards")
    _add_import_arg(p)
    p.set_defaults(fn=cmd_rewards)

    p = sub.add_parser("prompts", help="list or fetch the paper recipes' prompt sets (GenEval, OCR, PickScore)",
                       description="fetch downloads each set from its repository at a fixed commit, checks its git blob hash, "
                                   "converts it to JSONL {prompt, metadata} and writes it where the recipes read it (prompts/). "
                                   "Sources and licenses: prompts/README.md.")
    p.add_argument("action", choices=["list", "fetch"])
    p.add_argument("names", nargs="*", help="sets to fetch (a file name or prefix, e.g. geneval; a training set brings its test "
                                            "set; default: all)")
    p.add_argument("--dir", default="prompts", help="where to write them (default: prompts, as the recipes read them from the repository root)")
    p.set_defaults(fn=cmd_prompts)

    p = sub.add_parser("serve-reward", help="serve a registered reward over HTTP (for the `remote` reward)",
                       description="Expose reward NAME at POST /score and GET /health (JSON schema version 1).")
    p.add_argument("name", help="registered reward, e.g. ocr or pickscore (see `dgpo rewards`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; the server has no authentication)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    p.add_argument(
        "--option", action="append", type=key_value, metavar="KEY=VALUE", help="reward factory option (repeatable), e.g. --option model=/weights/pickscore"
    )
    _add_import_arg(p)
    p.set_defaults(fn=cmd_serve_reward)

    p = sub.add_parser("merge-lora", help="fuse a trained LoRA into its base model and save the whole pipeline",
                       description="Load the diffusers pipeline, fuse the LoRA into its transformer and save_pretrained the result, "
                                   "which DiffusionPipeline.from_pretrained loads without dgpo or peft.")
    p.add_argument("--backend", required=True, help="the model's backend: sd3, flux or sana")
    p.add_argument("--model", required=True, help="base model directory (diffusers format)")
    p.add_argument("--lora", required=True, help="pytorch_lora_weights.safetensors, the adapter directory holding it, or a `dgpo train` run directory")
    p.add_argument("--output", required=True, help="directory to write the merged pipeline to")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="precision of the saved weights; the fusion itself is done in float32 (default: float32)")
    p.set_defaults(fn=cmd_merge_lora)

    for name in COMMANDS.names():  # the plugins' commands
        command = COMMANDS.get(name)
        p = sub.add_parser(name, help=command.help)
        command.add_arguments(p)
        p.set_defaults(fn=command.run)
    return parser


def load_plugins(modules: list[str]) -> None:
    """Load the installed ``dgpo.plugins`` entry points (``dgpo.registry.load_plugins``) and import the ``--import``
    modules: importing one runs its ``register_reward`` / ``register_algorithm`` / ``register_backend`` calls.
    Modules are found on sys.path and in the current directory."""
    registry.load_plugins()
    if modules and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name and not name.startswith(f"{exc.name}."):
                raise
            raise UserError(f"--import {name}: no module named {exc.name!r} on the path or in {os.getcwd()}") from None


OPTIONAL_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
OPTIONAL_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_optional_kernel_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(OPTIONAL_KERNEL_WARNING)


def silence_optional_kernel_warning() -> None:
    """Drop the one warning bitsandbytes logs on import (peft imports it) on a CPU with AVX512-BF16 when its optional
    4-bit matmul kernel cannot be fetched from the kernels hub: dgpo runs no 4-bit CPU matmul, and users read the
    line, printed before anything of dgpo's, as an error. Every other message of that logger still shows."""
    logging.getLogger(OPTIONAL_KERNEL_LOGGER).addFilter(_not_the_optional_kernel_warning)


def main(argv: list[str] | None = None) -> int:
    silence_optional_kernel_warning()
    args = build_parser().parse_args(argv)
    try:
        load_plugins(getattr(args, "imports", None) or [])
        status = args.fn(args)
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"dgpo: error: {exc}", file=sys.stderr)
        return 2
    # Only after a command returned: on an error another process may still wait in a collective.
    from .train.process_group import leave_process_group

    leave_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
