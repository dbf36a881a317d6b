"""Wall time of the demo's per-image stages (inference, uncertainty, CRF, with calibration and gathers)
for 1, 2 and 4 shards.

    .venv/bin/python bench/shards_demo.py [--shards 1 2 4] [--cores 2] [--workdir DIR] [--configfile F ...]

Trains the demo model once in a scratch copy of the workflow (or reuses --workdir), then, for each
shard count, forces the per-image rules to rerun and times the whole Snakemake call.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ["Snakefile", "rules", "workflow", "config", "envs", "profiles", "report"]
PER_IMAGE_RULES = ["infer", "uncertainty", "crf_fusion"]
TARGETS = ["results/crf/test.h5", "results/uncertainty/test.h5"]


def snakemake(workdir: Path, cores: int, configfiles: list[str], *args: str) -> float:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(cores), *args,
                          "--configfile", *configfiles], cwd=workdir, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"snakemake failed in {workdir}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="keep the scratch copy here (reused if it exists)")
    parser.add_argument("--configfile", nargs="+", default=["config/config.yaml"])
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="shards-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        if not (work / part).exists():
            (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(REPO / part, work / part)
    setup = snakemake(work, args.cores, args.configfile, "results/models/ddpm.pt")
    print(f"setup (demo data, prepare, train; 0 if reused): {setup:.1f} s")
    print("| shards | per-image stages wall time (s) |\n|---|---|")
    for n in args.shards:
        wall = snakemake(work, args.cores, args.configfile, *TARGETS, "--config", f"shards={n}",
                         "--forcerun", *PER_IMAGE_RULES)
        print(f"| {n} | {wall:.1f} |", flush=True)
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
