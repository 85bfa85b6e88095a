# The DGPO recipe screens' protocol (docs/recipe-screens.md), sourced by recipe_screens.sh and the later rounds'
# scripts (recipe_screens_round2.sh, ...) so that every round trains and evaluates alike: 150 steps, checkpoints every
# 25, evaluations every 50 steps on 48 images per category and at the end on 96 (the 660 test images), each threshold
# crossing confirmed by the next evaluation, finished screens reused and interrupted ones resumed. THREADS (default 2)
# sets the torch threads of each run. Each round names its own thresholds and baseline.
SCREEN_PROTOCOL=(--budget-steps 150 --eval-every 50 --eval-images 48 --final-eval-images 96 --confirm 1 --save-every 25
  --set "run.threads=${THREADS:-2}" --reuse)
