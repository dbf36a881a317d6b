"""docs/RESULTS.md's ablation rows on a trained quick-benchmark run, one overlay after another.

Each overlay runs in its own copy of the trained run (data/ and models/ less the features head, so everything from
rule infer on is computed for that overlay and the trained DDPM is reused), sequentially, with

    snakemake --cores 2 --rerun-triggers mtime input --configfile <base> <run.yaml> <overlay>

(base: config/isic2018_quick.yaml unless --base says otherwise)

and one markdown row per overlay is printed: val Dice of the vote (what the calibration maximises),
test Dice of the three DiffSeg rows (official score at the original size, then the working
resolution), the mean GED of the N outputs of the paper path, the uncertainty AUROCs and the number
of failures (final working-resolution Dice < evaluate.fail_dice).

    .venv/bin/python bench/ablation_rows.py --trained /work/runs/h14_seed0 --seed 0 \
        --overlays paper a1_val_threshold a2_bias a3_blur a4_cleanup
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import h5py
import pandas as pd
import yaml

from scale_ladder import copy_trained  # bench/ is on sys.path when this script runs

from diffseg.evaluate import (BEST_T_METHOD, FINAL_METHOD, MEAN_METHOD, OFFICIAL_PREFIX, PAPER_FINAL_METHOD,
                              UNCERTAINTY_SCORES, auroc)

REPO = Path(__file__).resolve().parents[1]
ROWS = (BEST_T_METHOD, MEAN_METHOD, FINAL_METHOD)


def run_overlay(trained: Path, workdir: Path, seed: int, overlay: str, base: str) -> Path:
    """Copy the trained run's data and model into workdir/<overlay>, run the overlay there; its results folder."""
    out = workdir / overlay
    if out.exists():
        shutil.rmtree(out)
    copy_trained(trained, out)  # data and DDPM with their file times (no retraining); never the features head
    run_yaml = out / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"results_dir": str(out), "train": {"seed": seed},
                                        "baselines": {"seed": seed}}))
    overlay_file = [] if overlay == "default" else [f"config/ablation/{overlay}.yaml"]
    command = [sys.executable, "-m", "snakemake", "--cores", "2", "--rerun-triggers", "mtime", "input",
               "--configfile", base, str(run_yaml), *overlay_file]
    print("$", " ".join(command), file=sys.stderr, flush=True)
    with open(out / "snakemake.log", "w") as log:
        subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    return out


def row(results: Path, fail_dice: float) -> dict:
    """The ablation table's numbers of one finished run."""
    table = pd.read_csv(results / "metrics" / "test.csv")
    with h5py.File(results / "calibration" / "calibration.h5", "r") as f:
        report = json.loads(f.attrs["report"])
    means = table.groupby("method").mean(numeric_only=True)
    final = table[table["method"] == FINAL_METHOD]
    failed = final["dice"].to_numpy() < fail_dice
    paper_final = PAPER_FINAL_METHOD if PAPER_FINAL_METHOD in means.index else FINAL_METHOD
    out = {"val Dice (vote)": report["val_dice_vote"]}
    out.update({f"official {m}": means.loc[m, f"{OFFICIAL_PREFIX}dice"] for m in ROWS})
    out.update({f"working {m}": means.loc[m, "dice"] for m in ROWS})
    out["GED of the outputs, paper path"] = means.loc[paper_final, "ged_paper"]
    out.update({f"AUROC {c}": auroc(final[c], failed) for c in UNCERTAINTY_SCORES})
    out["failures"] = int(failed.sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", type=Path, required=True, help="a finished quick run (data/, models/ddpm.pt)")
    parser.add_argument("--seed", type=int, required=True, help="its train/baselines seed")
    parser.add_argument("--workdir", type=Path, help="where the copies go (default: <trained>_ablation)")
    parser.add_argument("--overlays", nargs="+", default=["paper"], help="config/ablation/<name>.yaml, or default")
    parser.add_argument("--base", default="config/isic2018_quick.yaml", help="the base config the run was trained with")
    parser.add_argument("--fail-dice", type=float, default=0.7)
    args = parser.parse_args()
    workdir = args.workdir or args.trained.with_name(args.trained.name + "_ablation")
    rows = {}
    for overlay in args.overlays:
        results = run_overlay(args.trained.resolve(), workdir.resolve(), args.seed, overlay, args.base)
        rows[overlay] = row(results, args.fail_dice)
    frame = pd.DataFrame(rows).T
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, trained run {args.trained}, seed {args.seed}")
    print(frame.to_markdown(floatfmt=".3f"))


if __name__ == "__main__":
    main()
