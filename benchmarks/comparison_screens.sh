#!/bin/bash
# The baselines' tuning screens of the algorithm comparison (docs/comparison.md): 150 steps each from the shipped base,
# one seed, evaluated every 25 steps on 48 images per category (96 at the end) under the common evaluation (10-step
# solver, CFG 4.5, whatever the recipe rolls out with). The best screen of each method by confirmed score enters the
# measured arms. Writes $OUTPUT (default results/comparison/screens; its runs/ subfolder holds the runs, keep it
# outside the repository with OUTPUT=... for long work). Screens train in the order listed (Flow-GRPO's before
# DiffusionNFT's last one: Flow-GRPO's rate also sets Flow-GRPO-Fast's). --reuse keeps finished screens, so an
# interrupted set resumes at the screen it was in, from its last checkpoint (every 25 steps). THREADS (default 2) sets
# the torch threads of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT=${OUTPUT:-results/comparison/screens}
S=configs/shapes/screens
dgpo compare \
  awm_cfg1=configs/shapes/awm.yaml \
  awm_cfg45=$S/awm_cfg45.yaml \
  awm_cfg45_half_lr=$S/awm_cfg45_half_lr.yaml \
  diffusionnft_cfg1=configs/shapes/diffusionnft.yaml \
  diffusionnft_cfg45=$S/diffusionnft_cfg45.yaml \
  flow_grpo=configs/shapes/flow_grpo.yaml \
  flow_grpo_half_lr=$S/flow_grpo_half_lr.yaml \
  diffusionnft_cfg45_half_lr=$S/diffusionnft_cfg45_half_lr.yaml \
  "$@" \
  --output "$OUTPUT" --budget-steps 150 --eval-every 25 --eval-images 48 --final-eval-images 96 \
  --threshold 0.75 --threshold 0.8 --threshold 0.85 --confirm 1 --baseline flow_grpo --save-every 25 \
  --set eval.guidance_scale=4.5 --set run.threads=${THREADS:-2} --reuse
