"""Agreement of the geneval reward's two detectors, ``transformers`` and ``mmdet``, on one folder of images.

NOBODY HAS RUN THIS SCRIPT (as of 2026-12-06): GenEval's mmdet stack does not install where dgpo is
developed, so how often the two detectors' GenEval verdicts agree is unmeasured. The detectors are two
trainings of one architecture (mmdet's Mask2Former Swin-S checkpoint, and the Mask2Former authors'
checkpoint in its HF port); both feed the same CLIP colour classifier and GenEval's rules.

Inputs: a folder of images and a JSONL file with one GenEval metadata line per image, either GenEval's own
``evaluation_metadata.jsonl`` lines or dgpo prompt lines (``{"prompt", "metadata"}``). The i-th line goes
with the i-th image in natural file-name order (2.png before 10.png). Prints, per GenEval category (tag),
the images, each detector's pass rate, the fraction of images whose pass/fail verdicts agree, and the mean
absolute difference of the partial credit; then GenEval's overall score (the mean over categories) for
each. Needs both stacks in one environment: the weights of each (``$DGPO_GENEVAL_MODEL``,
``$DGPO_GENEVAL_CHECKPOINT``) and mmdet 2.x with mmcv-full 1.7 (``pip install --no-build-isolation
'dgpo[geneval-mmdet]'``), which must then build against a torch dgpo accepts (>= 2.3; GenEval's own
environment used torch 2.1): whether it does is also unconfirmed. Usage:

    DGPO_GENEVAL_MODEL=/models/mask2former-swin-small-coco-instance \\
    DGPO_GENEVAL_CHECKPOINT=/models/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth \\
    python benchmarks/geneval_agreement.py IMAGES METADATA.jsonl [--batch 16] [--json agreement.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dgpo.rewards import get_reward
from dgpo.rewards.geneval import is_geneval_metadata

DETECTORS = ("transformers", "mmdet")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def read_metadata(path: Path) -> list[dict]:
    """GenEval metadata lines, unwrapping dgpo's {"prompt", "metadata"} lines."""
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        row = json.loads(text)
        row = row["metadata"] if is_geneval_metadata(row.get("metadata")) else row
        if not is_geneval_metadata(row):
            raise SystemExit(f"geneval_agreement: {path}:{number}: not a GenEval metadata line (needs an 'include' list)")
        lines.append(row)
    return lines


def agreement_table(verdicts: dict[str, list], tags: list[str]) -> list[dict]:
    """Per tag (and 'overall'): images, each detector's pass rate, verdict agreement, mean |partial difference|."""
    rows = []
    for tag in sorted(set(tags)) + ["overall"]:
        chosen = [i for i, t in enumerate(tags) if tag in (t, "overall")]
        passed = {name: np.array([verdicts[name][i].correct for i in chosen]) for name in DETECTORS}
        partial = {name: np.array([verdicts[name][i].partial for i in chosen]) for name in DETECTORS}
        rows.append({
            "tag": tag,
            "images": len(chosen),
            **{f"{name}_pass": float(passed[name].mean()) for name in DETECTORS},
            "agreement": float((passed["transformers"] == passed["mmdet"]).mean()),
            "partial_abs_diff": float(np.abs(partial["transformers"] - partial["mmdet"]).mean()),
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", type=Path)
    parser.add_argument("metadata", type=Path)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    missing = [name for name in ("mmdet", "mmcv") if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"geneval_agreement: {' and '.join(missing)} not installed; this script compares against GenEval's mmdet stack: "
                 "pip install --no-build-isolation 'dgpo[geneval-mmdet]'")
    paths = sorted((p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
    metadata = read_metadata(args.metadata)
    if len(paths) != len(metadata):
        sys.exit(f"geneval_agreement: {len(paths)} images in {args.images} but {len(metadata)} metadata lines in {args.metadata}")
    verdicts = {}
    for name in DETECTORS:
        reward = get_reward("geneval", detector=name, device=args.device, batch_size=args.batch, strict=True)
        verdicts[name] = []
        for start in range(0, len(paths), args.batch):
            pictures = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths[start : start + args.batch]]
            verdicts[name].extend(reward.verdicts(pictures, metadata[start : start + args.batch]))
    rows = agreement_table(verdicts, [m.get("tag", "untagged") for m in metadata])
    print("| tag | images | transformers pass | mmdet pass | verdicts agree | mean abs partial diff |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = [row["tag"], str(row["images"])] + [f"{row[key]:.3f}" for key in ("transformers_pass", "mmdet_pass", "agreement", "partial_abs_diff")]
        print(f"| {' | '.join(cells)} |")
    per_tag = [row for row in rows if row["tag"] != "overall"]
    for name in DETECTORS:
        print(f"GenEval score ({name}): {np.mean([row[f'{name}_pass'] for row in per_tag]):.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
