"""The workflow through a cluster executor with jobs that fail on their node: constants and helpers."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from workflow_helpers import REPO

SHARDS = 6  # 4 test images: 2 shards are empty
# Fails on every attempt of the first run: the run stops; the rerun must redo this shard only.
FAILING = "results/inference/test/shard-1-of-6.h5"
FAILING_LOG = "results/logs/infer/test_shard-1.log"  # Snakemake writes an empty one for a failed job
# Fails once: resubmitted within the run, as the SLURM profile's `retries` says.
FLAKY = "results/crf/test/shard-3-of-6.h5"


@dataclass
class ClusterRun:
    wf: Path
    retries: int
    first: object  # CompletedProcess of the run in which the jobs fail
    before: dict  # results/ after the first run: path -> (mtime_ns, sha256)
    rerun: object  # CompletedProcess of the same command again


def slurm_profile() -> dict:
    return yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())


def snapshot(wf: Path) -> dict[str, tuple[int, str]]:
    """Every file under wf/results (path relative to wf) -> (mtime in ns, sha256)."""
    return {str(p.relative_to(wf)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted((wf / "results").rglob("*")) if p.is_file()}


def plan_failures(folder: Path, output: str, times: int) -> None:
    """Make the fake sbatch fail the job writing ``output`` on its next ``times`` submissions."""
    folder.mkdir(exist_ok=True)
    name = re.sub(r"\W", "_", output)
    (folder / f"{name}.fault").write_text(f'"output": ["{output}"]\n{times}\n')
