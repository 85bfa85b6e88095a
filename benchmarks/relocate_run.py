"""Make a copied run's records name where the copy lies.

A run's config.yaml, results.json, report.md and checkpoints' state.json name the ``run.output_dir`` it trained in,
often a folder outside the repository (runs in progress are kept under $HOME so that they survive a fresh checkout).
After a copy into the repository (benchmarks/copy_run.sh) that path points nowhere a reader has; this rewrites it to
the copy's path, relative to the root of the git repository holding it (absolute when none does). ``output_dir`` is bookkeeping:
`dgpo compare --reuse` and `dgpo train --resume` ignore it when they match a run's training, so nothing the records
describe changes.

    python benchmarks/relocate_run.py RUN_DIR [RUN_DIR ...]
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

RECORDS = ("config.yaml", "results.json", "report.md", "checkpoints/*/state.json")


def repository_path(folder: Path) -> str:
    """``folder`` relative to the root of the git repository holding it, or absolute outside any."""
    folder = folder.resolve()
    found = subprocess.run(["git", "-C", str(folder), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if found.returncode != 0:
        return str(folder)
    return str(folder.relative_to(Path(found.stdout.strip()).resolve()))


def relocate(run: Path) -> tuple[str, str] | None:
    """Rewrite the run's recorded output_dir to where ``run`` lies; returns the path it replaced and the new one (None:
    nothing to do)."""
    recorded = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("run", {}).get("output_dir")
    here = repository_path(run)
    if not recorded or recorded == here:
        return None
    # The whole path only: not a longer one it begins (seed-1 in seed-10).
    pattern = re.compile(re.escape(recorded) + r"(?![\w./-])")
    for record in (found for name in RECORDS for found in run.glob(name)):
        record.write_text(pattern.sub(lambda _: here, record.read_text()))
    return recorded, here


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: " + __doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for run in map(Path, argv):
        if not (run / "config.yaml").is_file():
            print(f"relocate_run.py: {run} is not a run directory (no config.yaml)", file=sys.stderr)
            return 2
        moved = relocate(run)
        if moved:
            print(f"{run}: output_dir {moved[0]} -> {moved[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
