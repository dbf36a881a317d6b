"""Figures for clinicians: a summary plot and one page per chosen image (paper Figs. 3-6).

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

from diffseg.atomic import atomic_path
from diffseg.calibration import load_calibration
from diffseg.evaluate import FINAL_METHOD
from diffseg.h5io import match_rows, read_h5
from diffseg.imageio import InputError
from diffseg.inference import InferenceSettings, check_timesteps, draw_noise
from diffseg.metrics import mask_metrics
from diffseg.postprocess import binary_outputs, needs_maps
from diffseg.runtime import autocast, resolve_device, to_model_range
from diffseg.schedule import Schedule

logger = logging.getLogger(__name__)

SUMMARY_SIZE_IN = (10.0, 4.0)
CASE_SIZE_IN = (12.0, 9.0)
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
    return model, Schedule.from_config(cfg["diffusion"], device), device, settings.autocast_dtype(device)


# ----------------------------------------------------------------------------- drawing


def _figure(size_in: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size_in)
    FigureCanvasAgg(fig)  # attaches the Agg canvas (tight_layout and savefig need one)
    return fig


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def _panel(ax, array, title: str, colorbar: bool = False, **imshow_kwargs) -> None:
    im = ax.imshow(array, **imshow_kwargs)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)


def _noise_rgb(eps: np.ndarray, scale: float) -> np.ndarray:
    """(3, H, W) noise -> (H, W, 3) in [0, 1] on a shared symmetric scale (0 noise = mid grey)."""
    return np.clip(eps / (2.0 * scale) + 0.5, 0.0, 1.0).transpose(1, 2, 0)


def _outline(ax, mask: np.ndarray, colour: str) -> None:
    if 0 < mask.sum() < mask.size:  # a constant mask has no outline (contour would warn)
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.2)


def draw_summary(final: pd.DataFrame, summary_png, *, fail_dice: float, dpi: int) -> None:
    """Histogram of final Dice, and paper GED vs Dice with the failure line."""
    fig = _figure(SUMMARY_SIZE_IN)
    hist_ax, scatter_ax = fig.subplots(1, 2)
    hist_ax.hist(final["dice"], bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    hist_ax.axvline(fail_dice, color="tab:red", linestyle="--", label=f"Dice = {fail_dice:g}")
    hist_ax.set(xlabel="Dice of the final mask", ylabel="images", title=f"Final DiffSeg masks (n = {len(final)})")
    hist_ax.legend(fontsize=8)
    scatter_ax.scatter(final["ged_paper"], final["dice"], s=12, color="tab:blue")
    scatter_ax.axhline(fail_dice, color="tab:red", linestyle="--", label=f"failure: Dice < {fail_dice:g}")
    scatter_ax.set(xlabel="GED (paper, eqs. 5-7)", ylabel="Dice", ylim=(-0.02, 1.02),
                   title="Does uncertainty flag the failures?")
    scatter_ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, summary_png, dpi)


def _model_row(fig, grid, image, eps_pair, binary_mid, t_mid: int) -> None:
    axes = grid.subplots()
    scale = max(float(np.abs(eps_pair).max()), 1e-8)
    _panel(axes[0], image, "image")
    _panel(axes[1], _noise_rgb(eps_pair[0], scale), f"predicted noise\nc0 (healthy), t={t_mid}")
    _panel(axes[2], _noise_rgb(eps_pair[1], scale), f"predicted noise\nc1 (lesion), t={t_mid}")
    _panel(axes[3], np.abs(eps_pair[0] - eps_pair[1]).mean(axis=0), "|eps_c0 - eps_c1|\n(eq. 2, this draw)",
           colorbar=True, cmap="inferno")
    _panel(axes[4], binary_mid, f"binary output\nt={t_mid} (as evaluated)", cmap="gray", vmin=0, vmax=1)


def _timestep_row(fig, grid, binary: np.ndarray, timesteps: list[int]) -> None:
    axes = np.atleast_1d(grid.subplots())
    for ax, mask, t in zip(axes, binary, timesteps):
        _panel(ax, mask, f"t={t}", cmap="gray", vmin=0, vmax=1)


def _uncertainty_row(fig, grid, case: dict, dice: float) -> None:
    axes = grid.subplots()
    _panel(axes[0], case["consistency"], "consistency (eq. 3)", colorbar=True, cmap="viridis", vmin=0, vmax=1)
    _panel(axes[1], case["ambiguity"], "ambiguity (eq. 4)", colorbar=True, cmap="magma", vmin=0, vmax=0.25)
    _panel(axes[2], case["image"], f"final (green), truth (yellow)\nDice {dice:.3f}, GED {case['ged']:.3f}")
    _outline(axes[2], case["fused"], FINAL_COLOUR)
    _outline(axes[2], case["truth"], TRUTH_COLOUR)
    axes[2].legend(handles=[Line2D([], [], color=FINAL_COLOUR, label="final mask"),
                            Line2D([], [], color=TRUTH_COLOUR, label="ground truth")],
                   fontsize=7, loc="lower right")


def draw_case(case: dict, eps_pair: np.ndarray, timesteps: list[int], t_index: int, out_png, *, dpi: int) -> float:
    """One page per image: model panels (Fig. 3), outputs across t (Fig. 4), uncertainty (Figs. 5-6)."""
    dice = mask_metrics(case["fused"], case["truth"])["dice"]
    fig = _figure(CASE_SIZE_IN)
    rows = fig.add_gridspec(3, 1, hspace=0.35, left=0.03, right=0.95, top=0.9, bottom=0.03)
    _model_row(fig, rows[0].subgridspec(1, 5), case["image"], eps_pair, case["binary"][t_index], timesteps[t_index])
    _timestep_row(fig, rows[1].subgridspec(1, len(timesteps)), case["binary"], timesteps)
    _uncertainty_row(fig, rows[2].subgridspec(1, 3), case, dice)
    fig.suptitle(f"{case['id']}: final Dice {dice:.3f}, GED (paper) {case['ged']:.3f}")
    _save(fig, out_png, dpi)
    return dice


# ----------------------------------------------------------------------------- entry point


def _case(data: dict, i: int, image_id: str) -> dict:
    keys = ("images", "truth", "binary", "consistency", "ambiguity", "ged", "fused")
    case = {k: data[k][i] for k in keys}
    case["image"], case["id"] = case.pop("images"), image_id
    return case


def run_figures(dataset_h5: str | os.PathLike, checkpoint: str | os.PathLike, inference_h5: str | os.PathLike,
                uncertainty_h5: str | os.PathLike, crf_h5: str | os.PathLike, per_image_csv: str | os.PathLike,
                summary_png: str | os.PathLike, cases_dir: str | os.PathLike, *, split: str = "test",
                inference: dict | None = None, ids: Sequence[str] = (), dpi: int = 120,
                fail_dice: float = 0.7, calibration_h5: str | os.PathLike | None = None) -> dict:
    """Write the summary PNG and one <id>.png per chosen image into cases_dir. Returns the paths written."""
    settings = InferenceSettings.from_config(inference)
    final = read_final_rows(per_image_csv)
    draw_summary(final, summary_png, fail_dice=fail_dice, dpi=dpi)
    chosen = [str(i) for i in ids] or pick_cases(final)
    data = load_case_data(dataset_h5, inference_h5, uncertainty_h5, crf_h5, split, chosen, calibration_h5)
    _warn_if_seed_differs(data["inference_attrs"], settings.seed, inference_h5)
    model, schedule, device, autocast_dtype = _load_model(checkpoint, settings, data["images"].shape[1])
    timesteps = check_timesteps(data["timesteps"], schedule.T)
    t_index = (len(timesteps) - 1) // 2
    Path(cases_dir).mkdir(parents=True, exist_ok=True)  # a Snakemake directory() output: we create it
    written = []
    for i, image_id in enumerate(chosen):
        case = _case(data, i, image_id)
        eps_pair = predict_noise_pair(model, schedule, case["image"], image_id, timesteps[t_index],
                                      seed=settings.seed, noise_draws=settings.noise_draws, device=device,
                                      autocast_dtype=autocast_dtype)
        out_png = Path(cases_dir) / f"{image_id}.png"
        dice = draw_case(case, eps_pair, timesteps, t_index, out_png, dpi=dpi)
        logger.info("figure %s (final Dice %.3f)", out_png, dice)
        written.append(str(out_png))
    return {"summary": str(summary_png), "cases": written}


def _warn_if_seed_differs(attrs: dict, seed: int, inference_h5) -> None:
    """The c0/c1 panels reproduce inference's x_t only with its seed."""
    if "seed" in attrs and int(attrs["seed"]) != int(seed):
        logger.warning("%s was made with seed %s but the figures use seed %s: the noise panels will not "
                       "match the stored outputs", inference_h5, attrs["seed"], seed)
