"""Figures: a summary plot, a clinician's page per chosen image, a method page per image, a contact sheet.

The clinician's page holds what a reader needs to judge one mask: the image, the final mask over it
(large), the consistency map with its scale, and the case's GED (and risk, when there is one) placed
in the distribution of the evaluated set. The method page (noise predictions, per-timestep outputs,
ambiguity; paper Figs. 3-6) is for readers of the method.

Uses matplotlib's object API on the Agg canvas (no pyplot state), so it runs headless and never
changes the caller's backend.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter

from diffseg.atomic import atomic_path
from diffseg.calibration import load_calibration
from diffseg.evaluate import FINAL_METHOD
from diffseg.h5io import match_rows, read_h5
from diffseg.imageio import InputError
from diffseg.inference import InferenceSettings, check_timesteps, draw_noise
from diffseg.metrics import mask_metrics
from diffseg.postprocess import binary_outputs, needs_maps
from diffseg.risk import REVIEW_FRACTIONS, expected_calibration_error, risk_coverage
from diffseg.runtime import autocast, resolve_autocast, resolve_device, to_model_range
from diffseg.schedule import Schedule

logger = logging.getLogger(__name__)

SUMMARY_SIZE_IN = (10.0, 4.0)
CASE_SIZE_IN = (12.0, 6.5)
METHOD_SIZE_IN = (12.0, 9.0)
SHEET_TILE_IN = 2.0  # contact sheet: inches per thumbnail
SHEET_THUMB_PX = 256  # longest side of a contact-sheet thumbnail
CURVE_SIZE_IN = (5.5, 4.5)
FINAL_COLOUR, TRUTH_COLOUR = "lime", "yellow"


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
    data = read_h5(dataset_h5, ["images", "masks"], group=split)
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


# ----------------------------------------------------------------------------- the model panels


def predict_noise_pair(model: torch.nn.Module, schedule: Schedule, image: np.ndarray, image_id: str, t: int,
                       *, seed: int, noise_draws: int, device: torch.device,
                       autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """(2, 3, H, W): predicted noise under c0 and c1 on the x_t that inference used (its first noise draw)."""
    x0 = to_model_range(image[None], device)
    noise = draw_noise([image_id], seed, noise_draws, tuple(x0.shape[1:]))[:, 0].to(device)
    t_batch = torch.full((2,), int(t), dtype=torch.long, device=device)
    x_t = schedule.q_sample(x0, t_batch[:1], noise)
    labels = torch.tensor([0, 1], dtype=torch.long, device=device)
    with torch.inference_mode(), autocast(device, autocast_dtype):
        pred = model(torch.cat([x_t, x_t]), t_batch, labels)
    return pred.float().cpu().numpy()


def _load_model(checkpoint, settings: InferenceSettings, resolution: int):
    """(model, schedule, device, autocast dtype) for the checkpoint, on the configured device."""
    from diffseg.ddpm import load_model  # torch model code is only needed for the case pages

    device = resolve_device(settings.device)
    model, cfg = load_model(checkpoint, device=str(device), use_ema=True)
    if int(cfg["image_size"]) != resolution:
        raise InputError(checkpoint, f"model was trained at {cfg['image_size']} px but the images are {resolution} px")
    return model, Schedule.from_config(cfg["diffusion"], device), device, resolve_autocast(device, settings.precision)


# ----------------------------------------------------------------------------- drawing


def _figure(size_in: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size_in)
    FigureCanvasAgg(fig)  # attaches the Agg canvas (tight_layout and savefig need one)
    return fig


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def _panel(ax, array, title: str, fontsize: float = 8, **imshow_kwargs):
    """An image panel without axes; returns the image (for a colour scale)."""
    im = ax.imshow(array, **imshow_kwargs)
    ax.set_title(title, fontsize=fontsize)
    ax.set_axis_off()
    return im


def _noise_rgb(eps: np.ndarray, scale: float) -> np.ndarray:
    """(3, H, W) noise -> (H, W, 3) in [0, 1] on a shared symmetric scale (0 noise = mid grey)."""
    return np.clip(eps / (2.0 * scale) + 0.5, 0.0, 1.0).transpose(1, 2, 0)


def _outline(ax, mask: np.ndarray, colour: str) -> None:
    if 0 < mask.sum() < mask.size:  # a constant mask has no outline (contour would warn)
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.2)


def draw_summary(final: pd.DataFrame, summary_png, *, fail_dice: float, dpi: int, note: str = "") -> None:
    """Histogram of final Dice, and paper GED vs Dice with the failure line."""
    fig = _figure(SUMMARY_SIZE_IN)
    _note(fig, note)
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
    _save(fig, summary_png, dpi)


def _note(fig: Figure, note: str, top: bool = True) -> None:
    """A line in the top-right (or bottom-left) corner saying where the data come from (e.g. synthetic demo data)."""
    if note:
        x, y, ha, va = (0.99, 0.99, "right", "top") if top else (0.01, 0.01, "left", "bottom")
        fig.text(x, y, note, ha=ha, va=va, fontsize=10, color="tab:red", fontweight="bold")


def _colourbar(ax, image, label: str) -> None:
    """A colour scale beside the panel whose label stays inside the figure (saved without cropping)."""
    bar = ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03, format=FormatStrFormatter("%.2g"))
    bar.set_label(label, fontsize=8)  # no offset text ('1e-5') above the bar, where it hits the title
    bar.ax.tick_params(labelsize=7)


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
    fig = _figure(CASE_SIZE_IN)
    grid = fig.add_gridspec(2, 3, width_ratios=[2.0, 1.0, 1.25], left=0.02, right=0.95, top=0.88, bottom=0.1,
                            wspace=0.25, hspace=0.45)
    big = fig.add_subplot(grid[:, 0])
    _panel(big, case["image"], "final mask (green) and ground truth (yellow)", fontsize=11)
    _outline(big, case["fused"], FINAL_COLOUR)
    _outline(big, case["truth"], TRUTH_COLOUR)
    big.legend(handles=[Line2D([], [], color=FINAL_COLOUR, label="final mask"),
                        Line2D([], [], color=TRUTH_COLOUR, label="ground truth")], fontsize=8, loc="lower right")
    _panel(fig.add_subplot(grid[0, 1]), case["image"], "image")
    cons_ax = fig.add_subplot(grid[0, 2])
    im = _panel(cons_ax, case["consistency"], "consistency", fontsize=9, cmap="viridis", vmin=0, vmax=1)
    _colourbar(cons_ax, im, "fraction of outputs\ncalling it lesion")
    scores = [("GED", case["ged"], population["ged"])]
    if case.get("risk") is not None and "risk" in population:
        scores.append(("risk", case["risk"], population["risk"]))
    score_grid = grid[1, 1:].subgridspec(1, len(scores), wspace=0.35)
    for k, (name, value, values) in enumerate(scores):
        _score_panel(fig.add_subplot(score_grid[0, k]), name, value, values, split)
    fig.suptitle(f"{case['id']}: Dice {dice:.3f} against the ground truth", fontsize=12)
    _note(fig, note)
    _save(fig, out_png, dpi)
    return dice


def _method_model_row(grid, image, eps_pair, binary_mid, t_mid: int) -> None:
    axes = grid.subplots()
    scale = max(float(np.abs(eps_pair).max()), 1e-8)
    _panel(axes[0], image, "image")
    _panel(axes[1], _noise_rgb(eps_pair[0], scale), f"predicted noise\nhealthy label, t={t_mid}")
    _panel(axes[2], _noise_rgb(eps_pair[1], scale), f"predicted noise\nlesion label, t={t_mid}")
    im = _panel(axes[3], np.abs(eps_pair[0] - eps_pair[1]).mean(axis=0),
                "difference of the two\npredictions (this draw)", cmap="inferno")
    _colourbar(axes[3], im, "|difference|")
    _panel(axes[4], binary_mid, f"binary output\nt={t_mid} (as evaluated)", cmap="gray", vmin=0, vmax=1)


def _timestep_row(grid, binary: np.ndarray, timesteps: list[int]) -> None:
    axes = np.atleast_1d(grid.subplots())
    for ax, mask, t in zip(axes, binary, timesteps):
        _panel(ax, mask, f"output at t={t}", cmap="gray", vmin=0, vmax=1)


def _method_uncertainty_row(grid, case: dict) -> None:
    axes = grid.subplots()
    for ax, key, cmap, vmax, label in ((axes[0], "consistency", "viridis", 1.0, "mean of the outputs"),
                                       (axes[1], "ambiguity", "magma", 0.25, "variance of the outputs")):
        im = _panel(ax, case[key], key, cmap=cmap, vmin=0, vmax=vmax)
        _colourbar(ax, im, label)
    _panel(axes[2], case["image"], "final mask after CRF fusion")
    _outline(axes[2], case["fused"], FINAL_COLOUR)


def draw_method(case: dict, eps_pair: np.ndarray, timesteps: list[int], t_index: int, out_png, *, dpi: int,
                note: str = "") -> None:
    """The method page of one image: the two noise predictions and their difference, the outputs across
    timesteps, consistency and ambiguity (the paper's Figs. 3-6)."""
    fig = _figure(METHOD_SIZE_IN)
    rows = fig.add_gridspec(3, 1, hspace=0.4, left=0.03, right=0.93, top=0.9, bottom=0.03)
    _method_model_row(rows[0].subgridspec(1, 5, wspace=0.3), case["image"], eps_pair, case["binary"][t_index],
                      timesteps[t_index])
    _timestep_row(rows[1].subgridspec(1, len(timesteps)), case["binary"], timesteps)
    _method_uncertainty_row(rows[2].subgridspec(1, 3, wspace=0.4), case)
    fig.suptitle(f"{case['id']}: how the mask is made")
    _note(fig, note)
    _save(fig, out_png, dpi)


def _thumbnail(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) reduced so the longest side is at most SHEET_THUMB_PX (mask by nearest neighbour)."""
    from PIL import Image

    height, width = image.shape[:2]
    scale = min(1.0, SHEET_THUMB_PX / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
    small_mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)) > 0
    return small, small_mask


def draw_contact_sheet(queue: pd.DataFrame, image_dir, masks_dir, out_png, *, n_total: int, columns: int = 6,
                       dpi: int = 120, note: str = "") -> None:
    """Thumbnails of the queue's images (in queue order) with their predicted mask outlined, rank and score."""
    from diffseg.data import image_files
    from diffseg.imageio import read_mask, read_rgb

    files = image_files(Path(image_dir))
    n = len(queue)
    n_cols = max(1, min(columns, n))
    n_rows = max(1, -(-n // n_cols))
    height_in = SHEET_TILE_IN * n_rows + 1.0  # 0.6 in for the title, 0.4 in for the note
    fig = _figure((max(SHEET_TILE_IN * n_cols, 6.0), height_in))  # 6 in at least: the title fits
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, row in zip(axes, queue.itertuples(index=False)):
        image, mask = _thumbnail(read_rgb(files[row.id]), read_mask(Path(masks_dir) / f"{row.id}_segmentation.png"))
        ax.imshow(image)
        _outline(ax, mask, FINAL_COLOUR)
        score = f"risk {row.risk:.2f}" if row.sorted_by == "risk" else f"GED {row.ged:.3f}"
        ax.set_title(f"#{row.rank} {row.id}\n{score}", fontsize=7)
    shown = f"the {n} most doubtful of {n_total} images" if n < n_total else f"all {n_total} images"
    fig.suptitle(f"Review queue: {shown}\nmost doubtful first, predicted mask in green", fontsize=10)
    _note(fig, note, top=False)
    fig.tight_layout(rect=(0, 0.4 / height_in, 1, 1 - 0.6 / height_in))
    _save(fig, out_png, dpi)


# ----------------------------------------------------------------------------- entry point


def _case(data: dict, i: int, image_id: str) -> dict:
    keys = ("images", "truth", "binary", "consistency", "ambiguity", "ged", "fused")
    case = {k: data[k][i] for k in keys}
    case["image"], case["id"] = case.pop("images"), image_id
    return case


def run_figures(dataset_h5: str | os.PathLike, checkpoint: str | os.PathLike, inference_h5: str | os.PathLike,
                uncertainty_h5: str | os.PathLike, crf_h5: str | os.PathLike, per_image_csv: str | os.PathLike,
                summary_png: str | os.PathLike, cases_dir: str | os.PathLike,
                method_dir: str | os.PathLike | None = None, *, split: str = "test",
                inference: dict | None = None, ids: Sequence[str] = (), dpi: int = 120,
                fail_dice: float = 0.7, calibration_h5: str | os.PathLike | None = None, note: str = "") -> dict:
    """Write the summary PNG, the clinician's <id>.png per chosen image into cases_dir and, with
    ``method_dir``, the method page <id>.png there. ``note`` (e.g. 'synthetic demo data') is printed on
    every page. Returns the paths written."""
    settings = InferenceSettings.from_config(inference)
    final = read_final_rows(per_image_csv)
    draw_summary(final, summary_png, fail_dice=fail_dice, dpi=dpi, note=note)
    chosen = [str(i) for i in ids] or pick_cases(final)
    data = load_case_data(dataset_h5, inference_h5, uncertainty_h5, crf_h5, split, chosen, calibration_h5)
    population = _score_population(final)
    Path(cases_dir).mkdir(parents=True, exist_ok=True)  # a Snakemake directory() output: we create it
    written = {"summary": str(summary_png), "cases": [], "method": []}
    for i, image_id in enumerate(chosen):
        case = _case(data, i, image_id)
        case["risk"] = _risk_of(final, image_id)
        out_png = Path(cases_dir) / f"{image_id}.png"
        dice = draw_case(case, population, out_png, split=split, dpi=dpi, note=note)
        logger.info("figure %s (final Dice %.3f)", out_png, dice)
        written["cases"].append(str(out_png))
    if method_dir is not None:
        written["method"] = _method_pages(data, chosen, checkpoint, settings, inference_h5, method_dir, dpi, note)
    return written


def _score_population(final: pd.DataFrame) -> dict[str, np.ndarray]:
    """The evaluated set's per-image GED (and risk, when evaluate wrote one), for the percentile panels."""
    population = {"ged": final["ged_paper"].to_numpy(float)}
    if "risk" in final and final["risk"].notna().any():
        population["risk"] = final["risk"].to_numpy(float)
    return population


def _risk_of(final: pd.DataFrame, image_id: str) -> float | None:
    if "risk" not in final:
        return None
    value = final.loc[final["id"] == image_id, "risk"]
    return float(value.iloc[0]) if len(value) and np.isfinite(value.iloc[0]) else None


def _method_pages(data: dict, chosen: list[str], checkpoint, settings: InferenceSettings, inference_h5, method_dir,
                  dpi: int, note: str) -> list[str]:
    """One method page per chosen image (the model is run once more for the noise panels)."""
    _warn_if_seed_differs(data["inference_attrs"], settings.seed, inference_h5)
    model, schedule, device, autocast_dtype = _load_model(checkpoint, settings, data["images"].shape[1])
    timesteps = check_timesteps(data["timesteps"], schedule.T)
    t_index = (len(timesteps) - 1) // 2
    Path(method_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for i, image_id in enumerate(chosen):
        case = _case(data, i, image_id)
        eps_pair = predict_noise_pair(model, schedule, case["image"], image_id, timesteps[t_index],
                                      seed=settings.seed, noise_draws=settings.noise_draws, device=device,
                                      autocast_dtype=autocast_dtype)
        out_png = Path(method_dir) / f"{image_id}.png"
        draw_method(case, eps_pair, timesteps, t_index, out_png, dpi=dpi, note=note)
        written.append(str(out_png))
    return written


def _warn_if_seed_differs(attrs: dict, seed: int, inference_h5) -> None:
    """The c0/c1 panels reproduce inference's x_t only with its seed."""
    if "seed" in attrs and int(attrs["seed"]) != int(seed):
        logger.warning("%s was made with seed %s but the figures use seed %s: the noise panels will not "
                       "match the stored outputs", inference_h5, attrs["seed"], seed)


# ----------------------------------------------------------------------------- risk and calibration plots


def draw_risk_coverage(queue: pd.DataFrame, out_png, *, fail_dice: float, dpi: int) -> None:
    """Mean Dice of the kept images against the fraction sent to review (by risk, and the oracle)."""
    n = len(queue)
    fractions = np.arange(n) / n  # every possible number of reviewed images, up to all but one
    curve = risk_coverage(queue["dice"], queue["risk"], queue["id"], fractions)
    fig = _figure(CURVE_SIZE_IN)
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
    _save(fig, out_png, dpi)


def draw_reliability(bins: pd.DataFrame, out_png, *, ece: float, dpi: int) -> None:
    """Observed lesion fraction per consistency bin against the diagonal, with each bin's pixel share."""
    filled = bins[bins["n_pixels"] > 0]
    fig = _figure(CURVE_SIZE_IN)
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
    _save(fig, out_png, dpi)


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
