#!/usr/bin/env bash
# Train every variant in this folder side by side on one machine (one process each, as many at once
# as PARALLEL), all under the same forward-equivalent budget, then combine them into one comparison.
#
#   bash benchmarks/shapes_sweep/run.sh [OUTPUT] [VARIANT.yaml ...]
#
# Environment: FORWARDS (budget per variant, default 650000: what one hour of this repo's 2-core CPU
# spent on the recipe before the sweep; the current default spends about 7.9e5), SECONDS_CAP (training seconds cap per variant, default 0 = none),
# PARALLEL (default: all variants), THREADS (CPU threads per process, default 1), EVAL_EVERY and
# EVAL_IMAGES (evaluation interval and test images per category, default 50 and 48), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUTPUT=${1:-results/shapes_sweep}
shift || true
VARIANTS=("$@")
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=(benchmarks/shapes_sweep/*.yaml)
PARALLEL=${PARALLEL:-${#VARIANTS[@]}}
PYTHON=${PYTHON:-python}
PROTOCOL=(--budget-steps 100000 --budget-forwards "${FORWARDS:-650000}" --budget-seconds "${SECONDS_CAP:-0}"
          --eval-every "${EVAL_EVERY:-50}" --eval-images "${EVAL_IMAGES:-48}" --set "run.threads=${THREADS:-1}")
mkdir -p "$OUTPUT/logs"
recipes=()
for variant in "${VARIANTS[@]}"; do
    name=$(basename "$variant" .yaml)
    recipes+=("$name=$variant")
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n; done
    "$PYTHON" -m dgpo.cli compare "$name=$variant" --output "$OUTPUT" "${PROTOCOL[@]}" > "$OUTPUT/logs/$name.log" 2>&1 &
done
failed=0
for job in $(jobs -p); do wait "$job" || failed=1; done
[ $failed = 0 ] || echo "some variants failed; see $OUTPUT/logs" >&2
"$PYTHON" -m dgpo.cli compare "${recipes[@]}" --output "$OUTPUT" "${PROTOCOL[@]}" --reuse --threshold 0.45 --threshold 0.5 --threshold 0.6
