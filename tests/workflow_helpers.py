"""Run the real workflow in a scratch copy, so tests never touch the user's results/ or .snakemake/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_PARTS = ["Snakefile", "rules", "workflow", "config", "envs", "profiles", "report"]

# Smallest settings that still exercise every rule for real (a few seconds of training).
TINY_CONFIG = {
    "demo": {"n_images": 16, "image_size": 64, "seed": 0},
    "prepare": {"resolution": 16, "dilate_px": 1, "split_fractions": {"train": 0.5, "val": 0.25, "test": 0.25}},
    "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
              "dropout": 0.0, "num_heads": 1},
    "train": {"steps": 6, "batch_size": 4, "warmup_steps": 2, "checkpoint_every": 3, "log_every": 2},
    "inference": {"timesteps": [60, 100, 150], "batch_images": 1},
    "crf": {"subset_size": 2, "rounds": 2, "bilateral_sxy": 10},
    "baselines": {"base_channels": 4, "depth": 2, "steps": 4, "batch_size": 4, "eval_every": 2, "patience": 2},
}


def workflow_copy(dest: Path, config: dict | None = None) -> Path:
    """Copy the workflow into ``dest``; write ``config`` (merged over the tiny one) as test.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / part)
    merged = {**TINY_CONFIG, **(config or {})}
    (dest / "test.yaml").write_text(yaml.safe_dump(merged))
    return dest


def snakemake(workdir: Path, *args: str, configfiles: tuple[str, ...] = ("test.yaml",), timeout: int = 900,
              env: dict[str, str] | None = None):
    """Run Snakemake in ``workdir``; the config files go last so they never swallow a target.

    ``env``: variables added to this process's environment for the run.
    """
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args, "--configfile", *configfiles]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
