#!/bin/bash
# The second round of DGPO recipe screens on ShapesEval (docs/recipe-screens.md): changes on top of the adopted
# recipe (configs/shapes/dgpo.yaml, which trains as the first round's two_updates screen), under the first round's
# protocol: 150 steps from the shipped base, seed 0, evaluations every 50 steps on 48 images per category and on the
# 660 test images at the end. The baseline is the first round's two_updates run, copied in when absent and reused (the
# same training). Writes $OUTPUT (default results/recipe_screens_round2; keep it outside the repository while it runs);
# --reuse resumes an interrupted screen from its last checkpoint. THREADS (default 2) sets the torch threads of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/screen_protocol.sh
OUTPUT=${OUTPUT:-results/recipe_screens_round2}
S=configs/shapes/screens
if [ ! -e "$OUTPUT/runs/dgpo/seed-0" ]; then
  mkdir -p "$OUTPUT/runs/dgpo" && cp -r results/recipe_screens/runs/two_updates/seed-0 "$OUTPUT/runs/dgpo/seed-0"
fi
dgpo compare \
  dgpo=configs/shapes/dgpo.yaml \
  t055_k3=$S/dgpo_two_updates_t055_k3.yaml \
  three_updates=$S/dgpo_three_updates.yaml \
  "$@" \
  --output "$OUTPUT" --threshold 0.75 --threshold 0.8 --threshold 0.85 --baseline dgpo "${SCREEN_PROTOCOL[@]}"
