"""For judging the risk score and the consistency map over the evaluated set (rule risk_figures): the
risk-coverage curve and the consistency map's reliability diagram."""

from __future__ import annotations

import numpy as np
import pandas as pd

from diffseg.figures_common import new_figure, save_png
from diffseg.imageio import InputError
from diffseg.risk import REVIEW_FRACTIONS, expected_calibration_error, risk_coverage

CURVE_SIZE_IN = (5.5, 4.5)


def draw_risk_coverage(queue: pd.DataFrame, out_png, *, fail_dice: float, dpi: int) -> None:
    """Mean Dice of the kept images against the fraction sent to review (by risk, and the oracle)."""
    n = len(queue)
    fractions = np.arange(n) / n  # every possible number of reviewed images, up to all but one
    curve = risk_coverage(queue["dice"], queue["risk"], queue["id"], fractions)
    fig = new_figure(CURVE_SIZE_IN)
    ax = fig.subplots()
    ax.plot(curve["reviewed_fraction"] * 100, curve["kept_mean_dice"], color="tab:blue", label="by risk score")
    ax.plot(curve["reviewed_fraction"] * 100, curve["oracle_mean_dice"], color="grey", linestyle=":",
            label="oracle (worst reviewed)")
    ax.axhline(float(queue["dice"].mean()), color="tab:red", linestyle="--", linewidth=0.8, label="no review")
    marks = risk_coverage(queue["dice"], queue["risk"], queue["id"], REVIEW_FRACTIONS)
    ax.scatter(marks["reviewed_fraction"] * 100, marks["kept_mean_dice"], color="tab:blue", zorder=3, s=18)
    failures = int((queue["dice"] < fail_dice).sum())
    ax.set(xlabel="images sent to review (%), riskiest first", ylabel="mean Dice of the images kept",
           title=f"Risk-coverage (n = {n}, {failures} with Dice < {fail_dice:g})")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_png(fig, out_png, dpi)


def draw_reliability(bins: pd.DataFrame, out_png, *, ece: float, dpi: int) -> None:
    """Observed lesion fraction per consistency bin against the diagonal, with each bin's pixel share."""
    filled = bins[bins["n_pixels"] > 0]
    fig = new_figure(CURVE_SIZE_IN)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    ax.plot(filled["mean_predicted"], filled["observed_fraction"], marker="o", color="tab:blue",
            label=f"consistency map (ECE {ece:.3f})")
    share = ax.twinx()
    share.bar((bins["bin_low"] + bins["bin_high"]) / 2, bins["n_pixels"] / max(int(bins["n_pixels"].sum()), 1),
              width=(bins["bin_high"] - bins["bin_low"]) * 0.9, color="tab:blue", alpha=0.15)
    share.set_ylabel("share of pixels", fontsize=8)
    ax.set(xlabel="predicted lesion frequency (consistency)", ylabel="observed lesion fraction",
           xlim=(0, 1), ylim=(0, 1), title="Reliability of the consistency map")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_png(fig, out_png, dpi)


def run_risk_figures(review_queue_csv, reliability_csv, risk_coverage_png, reliability_png, *,
                     fail_dice: float = 0.7, dpi: int = 120) -> None:
    """The risk-coverage curve (from review_queue.csv) and the reliability diagram (from reliability.csv)."""
    queue = pd.read_csv(review_queue_csv)
    missing = [c for c in ("id", "risk", "dice") if c not in queue]
    if missing:
        raise InputError(review_queue_csv, f"missing column(s) {missing}: the curve needs the evaluated images' Dice")
    bins = pd.read_csv(reliability_csv)
    missing = [c for c in ("bin_low", "bin_high", "n_pixels", "mean_predicted", "observed_fraction") if c not in bins]
    if missing:
        raise InputError(reliability_csv, f"missing column(s) {missing}: not a reliability table")
    draw_risk_coverage(queue, risk_coverage_png, fail_dice=fail_dice, dpi=dpi)
    draw_reliability(bins, reliability_png, ece=expected_calibration_error(bins), dpi=dpi)
