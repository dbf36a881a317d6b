"""For readers of the method: one page per chosen image showing how its mask is made (the paper's
Figs. 3-6): the noise predicted under the healthy and the lesion label on the x_t inference used,
their difference, the binary outputs across timesteps, consistency and ambiguity.

The only figure module that runs the model (for the noise panels).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from diffseg.figures_clinician import case_of
from diffseg.figures_common import FINAL_COLOUR, add_note, colourbar, image_panel, new_figure, outline, save_png
from diffseg.imageio import InputError
from diffseg.inference import check_timesteps, paired_forward
from diffseg.seeding import image_noise
from diffseg.runtime import resolve_autocast, resolve_device, to_model_range
from diffseg.schedule import Schedule
from diffseg.settings import InferenceSettings

logger = logging.getLogger(__name__)

METHOD_SIZE_IN = (12.0, 9.0)


# ----------------------------------------------------------------------------- the model panels


def predict_noise_pair(model: torch.nn.Module, schedule: Schedule, image: np.ndarray, t: int,
                       *, seed: int, noise_draws: int, device: torch.device,
                       autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """(2, 3, H, W): predicted noise under c0 and c1 on the x_t that inference used (its first noise draw)."""
    x0 = to_model_range(image[None], device)
    noise = image_noise(image[None], seed, noise_draws)[:, 0].to(device)
    pair = paired_forward(model, schedule, x0, [t], noise, autocast_dtype=autocast_dtype)
    return torch.cat([pair.noise_c0, pair.noise_c1]).cpu().numpy()


def _load_model(checkpoint, settings: InferenceSettings, resolution: int):
    """(model, schedule, device, autocast dtype) for the checkpoint, on the configured device."""
    from diffseg.ddpm import load_model  # torch model code is only needed for the method pages

    device = resolve_device(settings.device)
    model, cfg = load_model(checkpoint, device=str(device), use_ema=True)
    if int(cfg["image_size"]) != resolution:
        raise InputError(checkpoint, f"model was trained at {cfg['image_size']} px but the images are {resolution} px")
    return model, Schedule.from_config(cfg["diffusion"], device), device, resolve_autocast(device, settings.precision)


# ----------------------------------------------------------------------------- drawing


def _noise_rgb(eps: np.ndarray, scale: float) -> np.ndarray:
    """(3, H, W) noise -> (H, W, 3) in [0, 1] on a shared symmetric scale (0 noise = mid grey)."""
    return np.clip(eps / (2.0 * scale) + 0.5, 0.0, 1.0).transpose(1, 2, 0)


def _method_model_row(grid, image, eps_pair, binary_mid, t_mid: int) -> None:
    axes = grid.subplots()
    scale = max(float(np.abs(eps_pair).max()), 1e-8)
    image_panel(axes[0], image, "image")
    image_panel(axes[1], _noise_rgb(eps_pair[0], scale), f"predicted noise\nhealthy label, t={t_mid}")
    image_panel(axes[2], _noise_rgb(eps_pair[1], scale), f"predicted noise\nlesion label, t={t_mid}")
    im = image_panel(axes[3], np.abs(eps_pair[0] - eps_pair[1]).mean(axis=0),
                     "difference of the two\npredictions (this draw)", cmap="inferno")
    colourbar(axes[3], im, "|difference|")
    image_panel(axes[4], binary_mid, f"binary output\nt={t_mid} (as evaluated)", cmap="gray", vmin=0, vmax=1)


def _timestep_row(grid, binary: np.ndarray, timesteps: list[int]) -> None:
    axes = np.atleast_1d(grid.subplots())
    for ax, mask, t in zip(axes, binary, timesteps):
        image_panel(ax, mask, f"output at t={t}", cmap="gray", vmin=0, vmax=1)


def _method_uncertainty_row(grid, case: dict) -> None:
    axes = grid.subplots()
    for ax, key, cmap, vmax, label in ((axes[0], "consistency", "viridis", 1.0, "mean of the outputs"),
                                       (axes[1], "ambiguity", "magma", 0.25, "variance of the outputs")):
        im = image_panel(ax, case[key], key, cmap=cmap, vmin=0, vmax=vmax)
        colourbar(ax, im, label)
    image_panel(axes[2], case["image"], "final mask after CRF fusion")
    outline(axes[2], case["fused"], FINAL_COLOUR)


def draw_method(case: dict, eps_pair: np.ndarray, timesteps: list[int], t_index: int, out_png, *, dpi: int,
                note: str = "") -> None:
    """The method page of one image: the two noise predictions and their difference, the outputs across
    timesteps, consistency and ambiguity (the paper's Figs. 3-6)."""
    fig = new_figure(METHOD_SIZE_IN)
    rows = fig.add_gridspec(3, 1, hspace=0.4, left=0.03, right=0.93, top=0.9, bottom=0.03)
    _method_model_row(rows[0].subgridspec(1, 5, wspace=0.3), case["image"], eps_pair, case["binary"][t_index],
                      timesteps[t_index])
    _timestep_row(rows[1].subgridspec(1, len(timesteps)), case["binary"], timesteps)
    _method_uncertainty_row(rows[2].subgridspec(1, 3, wspace=0.4), case)
    fig.suptitle(f"{case['id']}: how the mask is made")
    add_note(fig, note)
    save_png(fig, out_png, dpi)


def draw_method_pages(data: dict, chosen: list[str], checkpoint, settings: InferenceSettings, inference_h5,
                      method_dir, *, dpi: int, note: str) -> list[str]:
    """One method page <id>.png per chosen image (load_case_data's ``data``) in ``method_dir``; the model
    is run once more for the noise panels."""
    _warn_if_seed_differs(data["inference_attrs"], settings.seed, inference_h5)
    model, schedule, device, autocast_dtype = _load_model(checkpoint, settings, data["images"].shape[1])
    timesteps = check_timesteps(data["timesteps"], schedule.T)
    t_index = (len(timesteps) - 1) // 2
    Path(method_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for i, image_id in enumerate(chosen):
        case = case_of(data, i, image_id)
        eps_pair = predict_noise_pair(model, schedule, case["image"], timesteps[t_index],
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
