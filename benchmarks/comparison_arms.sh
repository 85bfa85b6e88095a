#!/bin/bash
# The algorithm comparison's measured arms (docs/comparison.md): DGPO, Flow-GRPO, DiffusionNFT and AWM, each in the
# form its tuning screens chose, two training seeds each, 2.304M model forward-equivalents per arm (steps capped at
# 1,000), evaluated every 50 steps on 48 images per category and at the end on 96 under the common evaluation (10-step
# solver, CFG 4.5). Writes $OUTPUT (default results/compare): summary.json/md with each recipe's cost to 0.75, 0.80 and
# 0.85 and its ratio to Flow-GRPO with a bootstrap interval or a bound, curves.csv, curves.png. Keep runs in progress
# outside the repository (OUTPUT=...), then copy each finished arm's runs in. --reuse keeps finished runs and resumes an
# unfinished one from its last checkpoint (every 25 steps). DGPO's arm is the recipe benchmark's two seeds
# (benchmarks/dgpo_shapes_cpu.py; the same training config): its committed seeds are copied into $OUTPUT/runs/dgpo
# when absent there, and reused as finished runs. THREADS (default 2) sets the torch threads of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT=${OUTPUT:-results/compare}
S=configs/shapes/screens
for seed in 0 1; do
  kept=results/dgpo_shapes_cpu_runs/seed-$seed
  if [ -f "$kept/results.json" ] && [ ! -e "$OUTPUT/runs/dgpo/seed-$seed" ]; then
    mkdir -p "$OUTPUT/runs/dgpo" && cp -r "$kept" "$OUTPUT/runs/dgpo/seed-$seed"
  fi
done
dgpo compare \
  dgpo=configs/shapes/dgpo.yaml \
  flow_grpo=$S/flow_grpo_half_lr.yaml \
  diffusionnft=$S/diffusionnft_cfg45_half_lr.yaml \
  awm=$S/awm_cfg45.yaml \
  "$@" \
  --output "$OUTPUT" --seeds 2 --budget-steps 1000 --budget-forwards 2.304e6 --eval-every 50 --eval-images 48 \
  --final-eval-images 96 --threshold 0.75 --threshold 0.8 --threshold 0.85 --confirm 1 --baseline flow_grpo \
  --save-every 25 --set eval.guidance_scale=4.5 --set run.threads=${THREADS:-2} --reuse
