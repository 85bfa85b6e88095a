#!/bin/bash
# The paper's comparisons on ShapesEval, on this CPU: DGPO vs Flow-GRPO, ODE vs SDE rollouts, timestep
# clipping, DGPO vs online Diffusion-DPO, online vs offline. Each recipe gets the same wall-clock budget
# of training (evaluation excluded), the same seed, prompts and evaluation protocol. Writes results/compare/.
# --reuse keeps recipes that already finished, so an interrupted comparison can be continued.
set -euo pipefail
cd "$(dirname "$0")/.."
dgpo compare \
  dgpo=configs/shapes/dgpo.yaml \
  flow_grpo=configs/shapes/flow_grpo.yaml \
  dgpo_sde=configs/shapes/dgpo_sde.yaml \
  dgpo_no_tclip=configs/shapes/dgpo_no_tclip.yaml \
  dpo_online=configs/shapes/dpo_online.yaml \
  dgpo_offline=configs/shapes/dgpo_offline.yaml \
  --output results/compare --budget-steps 200 --budget-seconds "${BUDGET_SECONDS:-420}" \
  --eval-every 10 --eval-images 48 --threshold 0.47 --threshold 0.5 \
  --set optim.lr=1e-3 --set run.threads=2 --reuse "$@"
