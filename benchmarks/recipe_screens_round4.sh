#!/bin/bash
# The fourth round of DGPO recipe screens on ShapesEval (docs/recipe-screens.md): the third round's cosine screen
# replicated on the benchmark's seed-1 adapter (plateau_s1, cosine_s1) and more changes at the plateau, under the
# third round's protocol: each screen continues from the recipe benchmark's seed-0 adapter at step 600 (the seed-1
# adapter for plateau_s1 and cosine_s1; model.init_adapter) for 150 steps, seed 0, evaluations every 50 steps on 48
# images per category and on the 660 test images at the end. The baseline is the third round's plateau run, copied in
# when absent and reused (the same training). Writes $OUTPUT (default results/recipe_screens_round4; keep it outside
# the repository while it runs); --reuse resumes an interrupted screen from its last checkpoint. THREADS (default 2)
# sets the torch threads of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/screen_protocol.sh
OUTPUT=${OUTPUT:-results/recipe_screens_round4}
S=configs/shapes/screens
if [ ! -e "$OUTPUT/runs/plateau/seed-0" ]; then
  mkdir -p "$OUTPUT/runs/plateau" && cp -r results/recipe_screens_round3/runs/plateau/seed-0 "$OUTPUT/runs/plateau/seed-0"
fi
dgpo compare \
  plateau=$S/dgpo_plateau.yaml \
  plateau_s1=$S/dgpo_plateau_seed1.yaml \
  cosine_s1=$S/dgpo_plateau_seed1_cosine.yaml \
  preference=$S/dgpo_plateau_preference.yaml \
  t055_k3=$S/dgpo_plateau_t055_k3.yaml \
  three_updates=$S/dgpo_plateau_three_updates.yaml \
  "$@" \
  --output "$OUTPUT" --threshold 0.85 --threshold 0.875 --threshold 0.9 --baseline plateau "${SCREEN_PROTOCOL[@]}"
