#!/bin/bash
# Copy a finished or stopped `dgpo train` / `dgpo compare` run directory into the repository to commit it:
#   bash benchmarks/copy_run.sh RUN_DIR DEST            without checkpoints (a finished run: its adapter/ is kept)
#   KEEP_CHECKPOINT=1 bash benchmarks/copy_run.sh ...   with its newest checkpoint only (a run stopped part-way, which
#                                                       `dgpo compare --reuse` or `dgpo train --resume` continues from there,
#                                                       on this machine or another: the run records each stretch's machine)
# TensorBoard logs are left out; DEST is replaced; the copy's records name DEST as their output_dir
# (benchmarks/relocate_run.py), not the folder the run trained in. Stop a run before copying it: a checkpoint is
# written atomically, but the files beside it move on with the run. The repository ignores results/**/checkpoints/ (a
# finished run is committed without them), so a kept checkpoint gets a .gitignore beside it that re-includes it:
# `git add DEST` then commits it.
set -euo pipefail
if [ $# -ne 2 ]; then echo "usage: [KEEP_CHECKPOINT=1] bash benchmarks/copy_run.sh RUN_DIR DEST" >&2; exit 2; fi
src=$1
dest=$2
if [ ! -f "$src/config.yaml" ]; then echo "copy_run.sh: $src is not a run directory (no config.yaml)" >&2; exit 2; fi
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
cp -r "$src" "$dest"
rm -rf "$dest/tensorboard" "$dest/.gitignore"  # a .gitignore is this script's, from an earlier copy of a stopped run
kept=none
if [ -d "$dest/checkpoints" ]; then
  newest=$(find "$dest/checkpoints" -mindepth 1 -maxdepth 1 -name 'step-*' | sort | tail -n 1)
  if [ "${KEEP_CHECKPOINT:-0}" = 1 ] && [ -n "$newest" ]; then
    find "$dest/checkpoints" -mindepth 1 -maxdepth 1 ! -path "$newest" -exec rm -rf {} +
    kept=$(basename "$newest")
    printf '%s\n' "# written by benchmarks/copy_run.sh: this run stopped part-way, and its newest checkpoint is committed to resume it" \
      '!checkpoints/' > "$dest/.gitignore"
  else
    rm -rf "$dest/checkpoints"
  fi
fi
python "$(dirname "$0")/relocate_run.py" "$dest" > /dev/null
echo "copied $src to $dest (checkpoint kept: $kept)"
