"""`dgpo pretrain-shapes`: ShapesEval's own subcommand, registered with ``dgpo.commands.register_command``."""
from __future__ import annotations

import argparse
import dataclasses

from ..commands import key_value, register_command
from .captions import CaptionModel
from .pretrain import PretrainConfig, pretrain, snapshot


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="src/dgpo/assets/shapes-base")
    p.add_argument("--vae-steps", type=int, default=2500)
    p.add_argument("--dit-steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--continue-from", default="", help="train the denoiser of this saved model further (skips the autoencoder)")
    p.add_argument(
        "--add-layers", type=int, default=0, metavar="N",
        help="with --continue-from: grow the denoiser by N joint blocks before its last one, each starting as the identity (default: 0)",
    )
    p.add_argument(
        "--text-encoder", default="bidirectional",
        help="bidirectional: a fixed T5 encoder whose tokens state their word, the word before and the words on either side; "
        "orthogonal: a fixed causal CLIP encoder whose words and positions are distinct (each replaces a continued model's); "
        "trained: a CLIP text encoder trained with the denoiser, as the first base model had (default: bidirectional)",
    )
    p.add_argument(
        "--caption", action="append", type=key_value, metavar="NAME=P",
        help="a caption-model probability (dgpo.shapes.captions.CaptionModel), e.g. swap_relation=0.3; repeatable",
    )
    p.add_argument("--save-every", type=int, default=250, help="denoiser steps between checkpoints in OUTPUT/checkpoints (default: 250)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted pretraining from its newest checkpoint in --output")
    p.add_argument("--snapshot", default="", metavar="DIR", help="save the EMA model of the newest checkpoint of the pretraining in --output to DIR, and exit")


@register_command("pretrain-shapes", help="pretrain the ShapesEval base model from scratch (deterministic)", add_arguments=add_pretrain_arguments)
def pretrain_shapes(args: argparse.Namespace) -> int:
    if args.snapshot:
        snapshot(args.output, args.snapshot)
        return 0
    known = {f.name for f in dataclasses.fields(CaptionModel)}
    unknown = sorted(set(dict(args.caption or [])) - known)
    if unknown:
        raise ValueError(f"unknown caption option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cfg = PretrainConfig(
        output=args.output, vae_steps=args.vae_steps, dit_steps=args.dit_steps, seed=args.seed, continue_from=args.continue_from,
        add_layers=args.add_layers, text_encoder=args.text_encoder, captions=CaptionModel(**dict(args.caption or [])), save_every=args.save_every,
        resume=args.resume,
    )
    pretrain(cfg)
    return 0
