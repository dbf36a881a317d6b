"""Wall time of the demo's per-image stages (inference, uncertainty, CRF, gathers) for 1, 2 and 4 shards.

    .venv/bin/python bench/shards_demo.py [--shards 1 2 4] [--cores 2] [--n-images 60]

Runs the demo workflow once in a scratch copy up to the trained model, then, for each shard count,
forces the per-image stages to rerun and times the whole Snakemake call.
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
PER_IMAGE_RULES = ["noise_difference", "uncertainty", "crf_fusion"]


def snakemake(workdir: Path, cores: int, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(cores), "all", *args],
                   cwd=workdir, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--n-images", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for part in PARTS:
            (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(REPO / part, work / part)
        def configure(shards: int) -> list[str]:
            (work / "bench.yaml").write_text(f"demo: {{n_images: {args.n_images}}}\nshards: {shards}\n")
            return ["--configfile", "config/config.yaml", "bench.yaml"]

        setup = snakemake(work, args.cores, "--until", "train_ddpm", *configure(1))
        print(f"setup (demo data, prepare, train): {setup:.1f} s")
        print("| shards | per-image stages wall time (s) |\n|---|---|")
        for n in args.shards:
            wall = snakemake(work, args.cores, "--until", "gather_crf", "gather_uncertainty", "gather_inference",
                             "--forcerun", *PER_IMAGE_RULES, *configure(n))
            print(f"| {n} | {wall:.1f} |")


if __name__ == "__main__":
    main()
