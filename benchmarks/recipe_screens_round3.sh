#!/bin/bash
# The third round of DGPO recipe screens on ShapesEval (docs/recipe-screens.md): changes at the recipe's plateau. Every
# screen continues from the recipe benchmark's seed-0 adapter at step 600 (results/dgpo_shapes_cpu_runs/seed-0/adapter,
# model.init_adapter) for 150 steps, seed 0, evaluations every 50 steps on 48 images per category and on the 660 test
# images at the end; the baseline (plateau) continues under the recipe unchanged. Writes $OUTPUT (default
# results/recipe_screens_round3; keep it outside the repository while it runs); --reuse resumes an interrupted screen
# from its last checkpoint. THREADS (default 2) sets the torch threads of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/screen_protocol.sh
OUTPUT=${OUTPUT:-results/recipe_screens_round3}
S=configs/shapes/screens
dgpo compare \
  plateau=$S/dgpo_plateau.yaml \
  strict=$S/dgpo_plateau_strict.yaml \
  mixed=$S/dgpo_plateau_mixed.yaml \
  cosine=$S/dgpo_plateau_cosine.yaml \
  eval_ema=$S/dgpo_plateau_eval_ema.yaml \
  "$@" \
  --output "$OUTPUT" --threshold 0.85 --threshold 0.875 --threshold 0.9 --baseline plateau "${SCREEN_PROTOCOL[@]}"
