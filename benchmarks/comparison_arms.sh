#!/bin/bash
# The algorithm comparison's measured arms (docs/comparison.md): DGPO, Flow-GRPO, DiffusionNFT and AWM, each in the
# form its tuning screens chose, two training seeds each under the protocol of benchmarks/comparison_protocol.sh
# (2.304M forward-equivalents a run, the common CFG-4.5 evaluation). Writes $OUTPUT (default results/compare):
# summary.json/md with each recipe's cost to 0.75, 0.80 and 0.85 and its ratio to Flow-GRPO with a bootstrap interval or
# a bound, curves.csv, curves.png. Keep runs in progress outside the repository (OUTPUT=...), then copy each finished
# arm's runs in; --reuse keeps finished runs and resumes an unfinished one from its last checkpoint. DGPO's arm is the
# recipe benchmark's two seeds (benchmarks/dgpo_shapes_cpu.py, the same training): its committed seeds are copied into
# $OUTPUT/runs/dgpo when absent there, and reused as finished runs.
# Copy a finished run into results/compare/runs with benchmarks/copy_run.sh (KEEP_CHECKPOINT=1 for one stopped
# part-way, so that a later run of this script resumes it from its newest checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/comparison_protocol.sh
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
  --output "$OUTPUT" --seeds 2 --baseline flow_grpo "${RUN_PROTOCOL[@]}"
