"""The risk score over several finished runs (e.g. the quick benchmark's 3 seeds): one row per run and the mean.

Reads each run's ``metrics/review_queue.csv`` and ``calibration/risk.json`` (rules evaluate and
fit_risk) and prints a markdown table: failures, AUROC and average precision of the risk for
Dice < fail_dice, mean Dice of all images and of the 80 % least risky, and every single feature's
AUROC (each read in its val direction), then the mean over the runs.

    .venv/bin/python bench/risk_seeds.py /work/runs/h15_seed0 /work/runs/h15_seed1 /work/runs/h15_seed2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from diffseg.risk import FEATURES, load_risk_model, risk_coverage, score_rankings


def run_row(results_dir: Path) -> dict:
    queue = pd.read_csv(results_dir / "metrics" / "review_queue.csv")
    model = load_risk_model(results_dir / "calibration" / "risk.json")
    rankings = score_rankings(queue, queue["risk"].to_numpy(), model, model.fail_dice).set_index("score")
    coverage = risk_coverage(queue["dice"], queue["risk"], queue["id"], (0.0, 0.2)).set_index("reviewed_fraction")
    row = {"run": results_dir.name, "n": len(queue), "failures": int((queue["dice"] < model.fail_dice).sum()),
           "risk AUROC": rankings.loc["risk", "auroc"], "risk AP": rankings.loc["risk", "average_precision"],
           "mean Dice": coverage.loc[0.0, "kept_mean_dice"], "Dice of 80 % least risky": coverage.loc[0.2, "kept_mean_dice"]}
    row["gain"] = row["Dice of 80 % least risky"] - row["mean Dice"]
    row.update({f"AUROC {name}": rankings.loc[name, "auroc"] for name in FEATURES if name in rankings.index})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    table = pd.DataFrame([run_row(d) for d in args.results_dirs])
    if len(table) > 1:
        mean = table.drop(columns="run").mean(numeric_only=True)
        table = pd.concat([table, pd.DataFrame([{"run": "mean", **mean.to_dict()}])], ignore_index=True)
    table = table.set_index("run").T
    print(table.to_markdown(floatfmt=".3f") if _has_tabulate() else table.round(3).to_string())


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
