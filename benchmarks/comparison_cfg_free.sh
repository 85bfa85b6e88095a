#!/bin/bash
# The algorithm comparison's CFG-free axis (docs/comparison.md): the four methods rolling out and evaluated at CFG 1, as
# DiffusionNFT's and AWM's code train and evaluate; one training seed each under the protocol of
# benchmarks/comparison_protocol.sh with its evaluation at CFG 1 (the base scores 0.531 there). DiffusionNFT and AWM
# run their shipped, CFG-free recipes; DGPO and Flow-GRPO their measured arms' recipes with CFG-free rollouts. Writes
# $OUTPUT (default results/compare/cfg_free); keep runs in progress outside the repository (OUTPUT=...) and copy each
# finished run in, as for the arms.
set -euo pipefail
cd "$(dirname "$0")/.."
EVAL_CFG=1
source benchmarks/comparison_protocol.sh
OUTPUT=${OUTPUT:-results/compare/cfg_free}
S=configs/shapes/screens
dgpo compare \
  dgpo=$S/dgpo_cfg1.yaml \
  flow_grpo=$S/flow_grpo_half_lr_cfg1.yaml \
  diffusionnft=configs/shapes/diffusionnft.yaml \
  awm=configs/shapes/awm.yaml \
  "$@" \
  --output "$OUTPUT" --seeds 1 --baseline flow_grpo "${RUN_PROTOCOL[@]}"
