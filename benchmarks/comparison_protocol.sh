# The algorithm comparison's protocol for its measured runs (docs/comparison.md), sourced by comparison_arms.sh and
# comparison_ablations.sh so that both train and evaluate alike, which is what lets the ablations reuse the arms' runs
# (`dgpo compare --reuse` takes only a run of the same training): 2.304M model forward-equivalents per run (steps capped
# at 1,000), checkpoints every 25 steps, the common evaluation (CFG 4.5; EVAL_CFG=1 for the CFG-free axis) every 50
# steps on 48 images per category and at the end on 96, thresholds 0.75, 0.80 and 0.85, each crossing confirmed by the
# next evaluation. THREADS (default 2) sets the torch threads of each run.
RUN_PROTOCOL=(--budget-steps 1000 --budget-forwards 2.304e6 --eval-every 50 --eval-images 48 --final-eval-images 96
  --threshold 0.75 --threshold 0.8 --threshold 0.85 --confirm 1 --save-every 25 --set "eval.guidance_scale=${EVAL_CFG:-4.5}"
  --set "run.threads=${THREADS:-2}" --reuse)
