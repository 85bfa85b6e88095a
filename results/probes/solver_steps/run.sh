#!/bin/bash
# Training vs test prompts of two categories, the shipped base vs seed 1's hour of the recipe, scored from
# 6-step (the recipe's rollouts) and 10-step (ShapesEval's protocol) Flow-DPM-Solver samples, CFG 4.5.
# Run from the repository root after `python benchmarks/dgpo_shapes_cpu.py --seeds 1 ...` (results/dgpo_hour_2026-11-30/dgpo_shapes_cpu.json)
# has left runs/bench-dgpo-shapes/seed-1/adapter.
set -e
out=runs/probe-split
mkdir -p $out/out
python - <<'PY'
import json
from dgpo.shapes.prompts import _split
for cat in ("colors", "color_attr"):
    for name, specs in zip(("train", "test"), _split(cat)):
        with open(f"runs/probe-split/{name}_{cat}.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": s.prompt, "metadata": s.to_metadata()}) + "\n" for s in specs)
PY
for model in base after; do
  adapter=""; [ $model = after ] && adapter="--adapter runs/bench-dgpo-shapes/seed-1/adapter"
  for steps in 6 10; do for split in train test; do for cat in colors color_attr; do
    dgpo eval --evaluator prompts --prompts $out/${split}_${cat}.jsonl --metrics shapes_partial,shapes_strict \
      --steps $steps --threads 2 --batch-size 48 $adapter --output $out/out/${model}_${steps}_${split}_${cat}.json > /dev/null 2>&1
  done; done; done
done
dgpo eval --threads 2 --adapter runs/bench-dgpo-shapes/seed-1/adapter --output $out/out/failures_hour_seed1.json
