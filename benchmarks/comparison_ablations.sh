#!/bin/bash
# The paper's ablations on ShapesEval (docs/comparison.md), one training seed each under the arms' protocol
# (benchmarks/comparison_protocol.sh): Flow-GRPO-Fast, online Diffusion-DPO (group best vs worst), offline DGPO, DGPO on
# SDE rollouts, DGPO without timestep clipping; Flow-GRPO and Flow-GRPO-Fast at the rate Flow-GRPO's tuning screens chose
# (half the shipped one). DGPO's two seeds and Flow-GRPO's seed 0 (benchmarks/comparison_arms.sh, $ARMS, default
# results/compare) are copied in as the references when absent, and reused as finished runs. Writes $OUTPUT (default
# results/compare/ablations), DGPO (both seeds) its baseline; --reuse resumes an interrupted ablation from its last
# checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/comparison_protocol.sh
OUTPUT=${OUTPUT:-results/compare/ablations}
ARMS=${ARMS:-results/compare}
for run in dgpo/seed-0 dgpo/seed-1 flow_grpo/seed-0; do
  if [ -f "$ARMS/runs/$run/results.json" ] && [ ! -e "$OUTPUT/runs/$run" ]; then
    mkdir -p "$OUTPUT/runs/$(dirname "$run")" && cp -r "$ARMS/runs/$run" "$OUTPUT/runs/$run"
  fi
done
C=configs/shapes
S=configs/shapes/screens
dgpo compare \
  dgpo=$C/dgpo.yaml \
  dgpo_sde=$C/dgpo_sde.yaml \
  dgpo_no_tclip=$C/dgpo_no_tclip.yaml \
  dpo_online=$C/dpo_online.yaml \
  dgpo_offline=$C/dgpo_offline.yaml \
  flow_grpo=$S/flow_grpo_half_lr.yaml \
  flow_grpo_fast=$S/flow_grpo_fast_half_lr.yaml \
  "$@" \
  --output "$OUTPUT" --seeds 1 --recipe-seeds dgpo=2 --baseline dgpo "${RUN_PROTOCOL[@]}"
