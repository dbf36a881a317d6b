"""For clinicians: the summary of the evaluated set and one page per chosen image.

The clinician's page holds what a reader needs to judge one mask: the image, the final mask over it
(large), the consistency map with its scale, and the case's GED (and risk, when there is one) placed
in the distribution of the evaluated set. The summary plot shows the final Dice over the set and how
GED goes with it. Torch-free: the method pages (diffseg.figures_method) are the ones that run the model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from diffseg.calibration import load_calibration
from diffseg.evaluate import FINAL_METHOD
from diffseg.figures_common import (FINAL_COLOUR, TRUTH_COLOUR, add_note, colourbar, image_panel, new_figure, outline,
                                    save_png)
from diffseg.h5io import match_rows, read_h5, read_labelled
from diffseg.imageio import InputError
from diffseg.metrics import mask_metrics
from diffseg.postprocess import binary_outputs, needs_maps

logger = logging.getLogger(__name__)

SUMMARY_SIZE_IN = (10.0, 4.0)
CASE_SIZE_IN = (12.0, 6.5)


# ----------------------------------------------------------------------------- inputs


def read_final_rows(per_image_csv: str | os.PathLike) -> pd.DataFrame:
    """The per-image rows of the final DiffSeg masks (id, dice, ged_paper, ...) from evaluate's CSV."""
    table = pd.read_csv(per_image_csv)
    missing = [c for c in ("id", "method", "dice", "ged_paper") if c not in table]
    if missing:
        raise InputError(per_image_csv, f"missing column(s) {missing}: not an evaluate per-image CSV")
    final = table[table["method"] == FINAL_METHOD].reset_index(drop=True)
    if final.empty:
        raise InputError(per_image_csv, f"no rows for method '{FINAL_METHOD}'")
    return final


def pick_cases(final: pd.DataFrame) -> list[str]:
    """Ids of the best, median and worst final Dice (fewer when images coincide)."""
    ranked = final.sort_values(["dice", "id"], kind="stable").reset_index(drop=True)
    picks = [ranked["id"].iloc[-1], ranked["id"].iloc[(len(ranked) - 1) // 2], ranked["id"].iloc[0]]
    return list(dict.fromkeys(str(p) for p in picks))


def load_case_data(dataset_h5, inference_h5, uncertainty_h5, crf_h5, split: str, ids: Sequence[str],
                   calibration_h5=None) -> dict:
    """Arrays of the chosen images, in ``ids`` order; an unknown id is an error naming it and the split.

    The binary outputs are the calibration's (diffseg.postprocess.binary_outputs: inference's stored
    ones for None or the paper's identity), as uncertainty and evaluation score them.
    """
    data = read_labelled(dataset_h5, split, ["images"])
    rows = match_rows(ids, data["ids"], dataset_h5, f" from split '{split}'")
    cal = load_calibration(calibration_h5) if calibration_h5 is not None else None
    inf = read_h5(inference_h5, ["binary", "timesteps", *(["maps"] if needs_maps(cal) else [])])
    inf["binary"] = binary_outputs(cal, inf["binary"], inf.get("maps"))
    unc = read_h5(uncertainty_h5, ["consistency", "ambiguity", "ged"])
    crf = read_h5(crf_h5, ["fused"])
    inf_rows = match_rows(ids, inf["ids"], inference_h5)
    unc_rows = match_rows(ids, unc["ids"], uncertainty_h5)
    return {
        "images": data["images"][rows], "truth": data["masks"][rows].astype(bool),
        "binary": inf["binary"][inf_rows], "timesteps": [int(t) for t in inf["timesteps"]],
        "inference_attrs": inf["attrs"],
        "consistency": unc["consistency"][unc_rows], "ambiguity": unc["ambiguity"][unc_rows],
        "ged": unc["ged"][unc_rows], "fused": crf["fused"][match_rows(ids, crf["ids"], crf_h5)].astype(bool),
    }


def case_of(data: dict, i: int, image_id: str) -> dict:
    """The ``i``-th chosen image's arrays (load_case_data's) as one case: image, truth, outputs, maps, id."""
    keys = ("images", "truth", "binary", "consistency", "ambiguity", "ged", "fused")
    case = {k: data[k][i] for k in keys}
    case["image"], case["id"] = case.pop("images"), image_id
    return case


def score_population(final: pd.DataFrame) -> dict[str, np.ndarray]:
    """The evaluated set's per-image GED (and risk, when evaluate wrote one), for the percentile panels."""
    population = {"ged": final["ged_paper"].to_numpy(float)}
    if "risk" in final and final["risk"].notna().any():
        population["risk"] = final["risk"].to_numpy(float)
    return population


def risk_of(final: pd.DataFrame, image_id: str) -> float | None:
    if "risk" not in final:
        return None
    value = final.loc[final["id"] == image_id, "risk"]
    return float(value.iloc[0]) if len(value) and np.isfinite(value.iloc[0]) else None


# ----------------------------------------------------------------------------- the summary


def draw_summary(final: pd.DataFrame, summary_png, *, fail_dice: float, dpi: int, note: str = "") -> None:
    """Histogram of final Dice, and paper GED vs Dice with the failure line."""
    fig = new_figure(SUMMARY_SIZE_IN)
    add_note(fig, note)
    hist_ax, scatter_ax = fig.subplots(1, 2)
    hist_ax.hist(final["dice"], bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    hist_ax.axvline(fail_dice, color="tab:red", linestyle="--", label=f"Dice = {fail_dice:g}")
    hist_ax.set(xlabel="Dice of the final mask", ylabel="images", title=f"Final DiffSeg masks (n = {len(final)})")
    hist_ax.legend(fontsize=8)
    scatter_ax.scatter(final["ged_paper"], final["dice"], s=12, color="tab:blue")
    scatter_ax.axhline(fail_dice, color="tab:red", linestyle="--", label=f"failure: Dice < {fail_dice:g}")
    scatter_ax.set(xlabel="GED (disagreement between the outputs)", ylabel="Dice", ylim=(-0.02, 1.02),
                   title="Does uncertainty flag the failures?")
    scatter_ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95 if note else 1))
    save_png(fig, summary_png, dpi)


# ----------------------------------------------------------------------------- the case pages


def percentile_of(value: float, population: Sequence[float]) -> float:
    """Percent of the population at or below value (0-100); the case itself counts when it belongs to it."""
    population = np.asarray(population, float)
    population = population[np.isfinite(population)]
    if population.size == 0:
        raise ValueError("percentile_of: empty population")
    return float(100.0 * np.mean(population <= value))


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def score_caption(name: str, value: float, population: Sequence[float]) -> str:
    """'GED 0.270, 64th percentile of 120 images' (higher = more doubtful)."""
    pct = percentile_of(value, population)
    return f"{name} {value:.3f}, {_ordinal(int(round(pct)))} percentile of {np.isfinite(population).sum()} images"


def _score_panel(ax, name: str, value: float, population: Sequence[float], split: str) -> None:
    """Histogram of the evaluated set's scores with this case marked and its percentile written out."""
    population = np.asarray(population, float)
    ax.hist(population[np.isfinite(population)], bins=20, color="0.75", edgecolor="white")
    ax.axvline(value, color="tab:red", linewidth=2)
    ax.set_title(score_caption(name, value, population), fontsize=9)
    ax.set_xlabel(f"{name} of the {split} images (higher = outputs disagree more: review)", fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    ax.tick_params(labelsize=7)


def draw_case(case: dict, population: dict[str, np.ndarray], out_png, *, split: str, dpi: int,
              note: str = "") -> float:
    """The clinician's page of one image: image, final mask over it (large), consistency with its scale,
    and the case's GED (and risk when ``case`` has one) within the evaluated set. Returns the Dice."""
    dice = mask_metrics(case["fused"], case["truth"])["dice"]
    fig = new_figure(CASE_SIZE_IN)
    grid = fig.add_gridspec(2, 3, width_ratios=[2.0, 1.0, 1.25], left=0.02, right=0.95, top=0.88, bottom=0.1,
                            wspace=0.25, hspace=0.45)
    big = fig.add_subplot(grid[:, 0])
    image_panel(big, case["image"], "final mask (green) and ground truth (yellow)", fontsize=11)
    outline(big, case["fused"], FINAL_COLOUR)
    outline(big, case["truth"], TRUTH_COLOUR)
    big.legend(handles=[Line2D([], [], color=FINAL_COLOUR, label="final mask"),
                        Line2D([], [], color=TRUTH_COLOUR, label="ground truth")], fontsize=8, loc="lower right")
    image_panel(fig.add_subplot(grid[0, 1]), case["image"], "image")
    cons_ax = fig.add_subplot(grid[0, 2])
    im = image_panel(cons_ax, case["consistency"], "consistency", fontsize=9, cmap="viridis", vmin=0, vmax=1)
    colourbar(cons_ax, im, "fraction of outputs\ncalling it lesion")
    scores = [("GED", case["ged"], population["ged"])]
    if case.get("risk") is not None and "risk" in population:
        scores.append(("risk", case["risk"], population["risk"]))
    score_grid = grid[1, 1:].subgridspec(1, len(scores), wspace=0.35)
    for k, (name, value, values) in enumerate(scores):
        _score_panel(fig.add_subplot(score_grid[0, k]), name, value, values, split)
    fig.suptitle(f"{case['id']}: Dice {dice:.3f} against the ground truth", fontsize=12)
    add_note(fig, note)
    save_png(fig, out_png, dpi)
    return dice


def draw_case_pages(data: dict, chosen: list[str], final: pd.DataFrame, cases_dir, *, split: str, dpi: int,
                    note: str) -> list[str]:
    """The clinician's <id>.png of every chosen image (load_case_data's ``data``) in ``cases_dir``."""
    population = score_population(final)
    Path(cases_dir).mkdir(parents=True, exist_ok=True)  # a Snakemake directory() output: we create it
    written = []
    for i, image_id in enumerate(chosen):
        case = case_of(data, i, image_id)
        case["risk"] = risk_of(final, image_id)
        out_png = Path(cases_dir) / f"{image_id}.png"
        dice = draw_case(case, population, out_png, split=split, dpi=dpi, note=note)
        logger.info("figure %s (final Dice %.3f)", out_png, dice)
        written.append(str(out_png))
    return written
