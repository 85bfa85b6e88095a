#!/bin/bash
# The comparison's second column (docs/comparison.md): each finished run's final adapter under its method's own
# evaluation, without CFG (10-step solver, CFG 1, as DiffusionNFT's and AWM's code evaluate), and the base model the same
# way. Writes own_eval_cfg1.json into each run folder of $OUTPUT/runs (default results/comparison/screens) and
# base_own_eval_cfg1.json into $OUTPUT; a run that has the file already is skipped. IMAGES (default 96) test images per
# category, THREADS (default 2) torch threads.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT=${OUTPUT:-results/comparison/screens}
common=(--cfg 1 --images-per-category "${IMAGES:-96}" --threads "${THREADS:-2}" --batch-size 64)
[ -f "$OUTPUT/base_own_eval_cfg1.json" ] || dgpo eval "${common[@]}" --output "$OUTPUT/base_own_eval_cfg1.json"
for run in "$OUTPUT"/runs/*/seed-*; do
  [ -f "$run/results.json" ] && [ -d "$run/adapter" ] || continue
  [ -f "$run/own_eval_cfg1.json" ] && continue
  dgpo eval --adapter "$run/adapter" "${common[@]}" --output "$run/own_eval_cfg1.json"
done
