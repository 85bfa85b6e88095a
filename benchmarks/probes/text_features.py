"""Probe: do a ShapesEval model's text features tell apart the words RL must act on?

For pairs of prompts that differ in one thing (the relation, which colour goes with which shape, the
shapes' order, the count, a colour, a shape) it encodes both prompts with the model's own text encoder
and prints the relative difference of their embeddings, ||e(a) - e(b)|| / ||e(a)||, for the token
sequence (what the MMDiT attends to) and the pooled vector (its conditioning on the time embedding).
A difference of 0 means the denoiser cannot tell the two prompts apart from that input at all. With
``--tokens`` it also prints the difference token by token, which shows where in the sequence a word is
visible. Forwards of the text encoder only: it takes seconds. Usage:

    python benchmarks/probes/text_features.py [--model DIR] [--tokens] [--output results/x.json]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from dgpo.models import load_model

PAIRS = {
    "left / right": ("a red circle left of a blue square", "a red circle right of a blue square"),
    "above / below": ("a red circle above a blue square", "a red circle below a blue square"),
    "colour binding": ("a red circle left of a blue square", "a blue circle left of a red square"),
    "shape swap": ("a red circle left of a blue square", "a red square left of a blue circle"),
    "count (two / three)": ("two circles", "three circles"),
    "colour (red / blue)": ("a red circle", "a blue circle"),
    "shape (circle / square)": ("a red circle", "a red square"),
}
"""Prompt pairs that differ in one thing each, in the grammar's words (``dgpo.shapes.prompts``)."""


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||a|| over all elements: 0 when the encoder gives both prompts the same input."""
    return float((a - b).norm() / a.norm())


def token_differences(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """||a_k - b_k|| / ||a_k|| for each token k of one prompt's (tokens, width) sequence (0 where a_k is 0)."""
    norms = a.norm(dim=-1)
    return [float(d / n) if n > 0 else 0.0 for d, n in zip((a - b).norm(dim=-1), norms)]


def text_feature_differences(model, pairs: dict[str, tuple[str, str]] = PAIRS) -> dict[str, dict]:
    """For each pair: the sequence and pooled relative differences, and the per-token ones with the first prompt's words."""
    out = {}
    for name, (first, second) in pairs.items():
        (sequence_a, pooled_a), (sequence_b, pooled_b) = model.encode_prompts([first]), model.encode_prompts([second])
        length = len(first.split()) + 2  # <bos> words <eos>; the padding after them is the same in both
        out[name] = {
            "prompts": [first, second],
            "sequence": relative_difference(sequence_a, sequence_b),
            "pooled": relative_difference(pooled_a, pooled_b),
            "tokens": ["<bos>", *first.split(), "<eos>"],
            "token_differences": token_differences(sequence_a[0, :length], sequence_b[0, :length]),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shipped", help="a ShapesEval model directory (default: the shipped base)")
    parser.add_argument("--tokens", action="store_true", help="also print the difference at each token")
    parser.add_argument("--output", default=None, help="write the differences as JSON here")
    args = parser.parse_args(argv)
    model = load_model("shapes", args.model)
    report = {"command": "python " + shlex.join(["benchmarks/probes/text_features.py", *(sys.argv[1:] if argv is None else argv)]),
              "model": args.model, "pairs": text_feature_differences(model)}
    print(f"{'prompts differ in':<26} sequence / pooled")
    for name, result in report["pairs"].items():
        print(f"{name:<26} {result['sequence']:.3f} / {result['pooled']:.3f}")
        if args.tokens:
            print("    " + " ".join(f"{word}:{d:.2f}" for word, d in zip(result["tokens"], result["token_differences"])))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
