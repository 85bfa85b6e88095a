#!/bin/bash
# Screens of DGPO recipe changes on ShapesEval (docs/recipe-screens.md): 150 steps each from the shipped base, one seed,
# with the recipe they change (screens/dgpo_baseline.yaml: configs/shapes/dgpo.yaml before the screens) measured the
# same way as the baseline. Evaluated every 50 steps on 48 images per category and on the 660 test images at the end;
# the training reward per category (counting, position, colour attribution) in each run's metrics.jsonl is the quick
# readout. Writes $OUTPUT (default results/recipe_screens; its runs/ subfolder holds the runs: keep it outside the
# repository with OUTPUT=... for long work). --reuse keeps finished screens and resumes an interrupted one from its
# last checkpoint (every 25 steps). THREADS (default 2) sets the torch threads of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/screen_protocol.sh
OUTPUT=${OUTPUT:-results/recipe_screens}
S=configs/shapes/screens
dgpo compare \
  dgpo=$S/dgpo_baseline.yaml \
  t055_k3=$S/dgpo_t055_k3.yaml \
  k4=$S/dgpo_k4.yaml \
  two_updates=$S/dgpo_two_updates.yaml \
  clip_outliers=$S/dgpo_clip_outliers.yaml \
  preference=$S/dgpo_preference.yaml \
  eval_ema=$S/dgpo_eval_ema.yaml \
  clip_p90=$S/dgpo_clip_p90.yaml \
  "$@" \
  --output "$OUTPUT" --threshold 0.75 --threshold 0.8 --threshold 0.85 --baseline dgpo "${SCREEN_PROTOCOL[@]}"
