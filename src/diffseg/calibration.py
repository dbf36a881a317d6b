"""Calibration fitted on the validation split: the settings that turn normalised maps into probabilities.

How a calibration is applied (the paper identity, or bias map + blur + threshold + clean-up +
sigmoid) is ``diffseg.postprocess.apply_calibration``; this module fits one on the VALIDATION maps
(:func:`fit_calibration`) and reads/writes it.

``results/calibration/calibration.h5`` (rule ``calibrate``) holds the fitted settings: attributes
``method``, ``threshold``, ``sigmoid_scale``, ``blur_sigma``, ``closing_px``, ``fill_holes``,
``largest_component``, ``bias`` (bool), ``best_timestep``, ``val_dice``, the ``precision`` and
``device_type`` the val inference resolved to (copied from its file: the bundle records them, prediction
must resolve to the same) and datasets ``timesteps`` and ``bias_map`` ``(T, R, R)`` float32 (zeros when
the bias map is off).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Sequence

import h5py
import numpy as np

from diffseg.atomic import atomic_path
from diffseg.h5io import check_split_attr, match_rows, read_h5, read_labelled
from diffseg.imageio import InputError
from diffseg.metrics import dice
from diffseg.postprocess import Calibration, calibrated_outputs, corrected_maps, vote
from diffseg.settings import RUNTIME_DEFINING

logger = logging.getLogger(__name__)

THRESHOLD_STEPS = 40  # candidate thresholds (quantiles of the val maps) tried by choose_threshold
SCALE_GRID = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5)


# ----------------------------------------------------------------------------- fitting on val


def bias_map(val_maps: np.ndarray, val_truth: np.ndarray | None = None) -> np.ndarray:
    """(T, H, W) per-pixel median over the validation images' maps (N, T, H, W), background pixels only.

    With ``val_truth`` (N, H, W), a pixel's median runs over the images where it is NOT lesion (lesions
    sit near the centre of most dermoscopy images, so a plain median would subtract the lesion
    signal itself); a pixel that is lesion in every val image gets the median of all background
    pixels of that timestep. Without ``val_truth``: the plain per-pixel median.
    """
    val_maps = np.asarray(val_maps, np.float32)
    if val_maps.ndim != 4 or len(val_maps) == 0:
        raise ValueError(f"bias_map: expected non-empty (N, T, H, W) validation maps, got {val_maps.shape}")
    if val_truth is None:
        return np.median(val_maps, axis=0).astype(np.float32)
    background = ~np.asarray(val_truth, bool)[:, None]  # (N, 1, H, W)
    masked = np.where(np.broadcast_to(background, val_maps.shape), val_maps, np.nan)
    with np.errstate(all="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels are filled below
            out = np.nanmedian(masked, axis=0)
            fallback = np.nanmedian(masked.reshape(len(val_maps), val_maps.shape[1], -1).transpose(1, 0, 2)
                                    .reshape(val_maps.shape[1], -1), axis=1)
    fallback = np.nan_to_num(fallback, nan=0.0)
    out = np.where(np.isnan(out), fallback[:, None, None], out)
    return out.astype(np.float32)


def _val_dice(maps: np.ndarray, truth: np.ndarray, cal: Calibration) -> tuple[float, np.ndarray]:
    """(mean Dice of the vote, mean Dice per timestep) of a calibration on the validation images."""
    vote_dice, per_t = [], []
    for m, y in zip(maps, truth):
        binary = calibrated_outputs(m, cal)
        vote_dice.append(dice(vote(binary), y))
        per_t.append([dice(b, y) for b in binary])
    return float(np.mean(vote_dice)), np.mean(per_t, axis=0)


def threshold_grid(corrected: np.ndarray, n: int = THRESHOLD_STEPS) -> list[float]:
    """Candidate thresholds: ``n`` quantiles (20th to 99.5th percentile) of the corrected val maps.

    Quantiles adapt the grid to the maps' range (bias-corrected maps of different inference methods
    live on different scales); values are rounded to 4 decimals and de-duplicated, ascending.
    """
    qs = np.linspace(20.0, 99.5, n)
    return sorted({round(float(v), 4) for v in np.percentile(corrected, qs)})


def choose_threshold(maps: np.ndarray, truth: np.ndarray, base: Calibration,
                     grid: Sequence[float] | None = None) -> tuple[float, float]:
    """(threshold, mean val Dice of the vote) maximising that Dice over ``grid``; the lowest on a tie.

    ``grid`` defaults to :func:`threshold_grid` of the corrected maps. ``maps`` and ``truth`` must be
    the VALIDATION split: the chosen threshold is then applied unchanged to the test split.
    """
    if grid is None:
        grid = threshold_grid(np.stack([corrected_maps(m, base) for m in maps]))
    best = (float(grid[0]), -1.0)
    for thr in grid:
        score, _ = _val_dice(maps, truth, base.replace(threshold=float(thr)))
        if score > best[1] + 1e-12:
            best = (float(thr), score)
    return best


def fit_sigmoid_scale(maps: np.ndarray, truth: np.ndarray, cal: Calibration,
                      grid: Sequence[float] = SCALE_GRID) -> float:
    """Scale of sigmoid((map - threshold) / scale) minimising pixel log-loss on the validation images."""
    corrected = np.stack([corrected_maps(m, cal) for m in maps])  # (N, T, H, W)
    labels = np.broadcast_to(np.asarray(truth, bool)[:, None], corrected.shape)
    z = corrected - cal.threshold
    losses = []
    for s in grid:
        logit = z / s
        # log(1 + exp(-x)) for the positives, log(1 + exp(x)) for the negatives, numerically stable
        loss = np.where(labels, np.logaddexp(0, -logit), np.logaddexp(0, logit)).mean()
        losses.append(float(loss))
    return float(grid[int(np.argmin(losses))])


def fit_calibration(val_maps: np.ndarray, val_truth: np.ndarray, timesteps: Sequence[int], *,
                    method: str = "paper", threshold: float | str = 0.5, bias: bool = False,
                    blur_sigma: float = 1.0, closing_px: int = 1, fill_holes: bool = True,
                    largest_component: bool = True, sigmoid_scale: float | None = None) -> tuple[Calibration, dict]:
    """Fit a calibration on the VALIDATION maps (N, T, H, W) and masks (N, H, W). Returns (calibration, report).

    ``method="paper"``: identity with ``threshold`` (inference's); only the best timestep is chosen.
    ``method="calibrated"``: bias map (if ``bias``), threshold chosen on val, sigmoid scale fitted on
    val unless given.
    """
    val_maps = np.asarray(val_maps, np.float32)
    val_truth = np.asarray(val_truth, bool)
    if val_maps.ndim != 4 or val_maps.shape[0] != val_truth.shape[0] or val_maps.shape[2:] != val_truth.shape[1:]:
        raise ValueError(f"fit_calibration: val maps {val_maps.shape} and masks {val_truth.shape} do not match")
    if len(val_maps) == 0:
        raise ValueError("fit_calibration: the validation split holds no images")
    timesteps = [int(t) for t in timesteps]
    if method == "paper":
        cal = Calibration(method="paper", threshold=threshold, timesteps=timesteps)
    else:
        cal = Calibration(method="calibrated", threshold=0.5, blur_sigma=float(blur_sigma),
                          bias_map=bias_map(val_maps, val_truth) if bias else None, closing_px=int(closing_px),
                          fill_holes=bool(fill_holes), largest_component=bool(largest_component),
                          timesteps=timesteps)
        thr, _ = choose_threshold(val_maps, val_truth, cal)
        cal = cal.replace(threshold=thr)
        scale = sigmoid_scale if sigmoid_scale is not None else fit_sigmoid_scale(val_maps, val_truth, cal)
        cal = cal.replace(sigmoid_scale=float(scale))
    vote_dice, per_t = _val_dice(val_maps, val_truth, cal)
    cal = cal.replace(best_timestep=timesteps[int(np.argmax(per_t))])  # earliest t on a tie
    report = {"method": cal.method, "threshold": cal.threshold, "sigmoid_scale": cal.sigmoid_scale,
              "best_timestep": cal.best_timestep, "val_dice_vote": vote_dice,
              "val_dice_per_t": dict(zip(timesteps, np.round(per_t, 4).tolist()))}
    logger.info("calibration fitted on val: %s", report)
    return cal, report


# ----------------------------------------------------------------------------- calibration.h5


def save_calibration(path: str | os.PathLike, cal: Calibration, shape: tuple[int, int, int], report: dict,
                     runtime: dict | None = None) -> None:
    """Write calibration.h5 (layout in the module docstring); ``runtime``: the val inference's precision and
    device type (diffseg.settings.RUNTIME_DEFINING)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("timesteps", data=np.asarray(cal.timesteps, np.int32))
        bias = cal.bias_map if cal.bias_map is not None else np.zeros(shape, np.float32)
        f.create_dataset("bias_map", data=np.asarray(bias, np.float32))
        scale = np.nan if cal.sigmoid_scale is None else cal.sigmoid_scale  # HDF5 attributes hold no None
        f.attrs.update({"method": cal.method, "threshold": cal.threshold, "sigmoid_scale": scale,
                        "blur_sigma": cal.blur_sigma, "closing_px": cal.closing_px, "fill_holes": cal.fill_holes,
                        "largest_component": cal.largest_component, "bias": cal.bias_map is not None,
                        "best_timestep": -1 if cal.best_timestep is None else cal.best_timestep,
                        "report": json.dumps(report), **(runtime or {})})


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Read calibration.h5 back into a Calibration; a missing key is an error naming it."""
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise InputError(path, f"cannot open calibration file ({err})") from err
    with f:
        for key in ("method", "threshold", "sigmoid_scale", "blur_sigma", "closing_px", "fill_holes",
                    "largest_component", "bias", "best_timestep"):
            if key not in f.attrs:
                raise InputError(path, f"missing attribute '{key}' (expected calibration.h5 layout)")
        a = f.attrs
        threshold = a["threshold"]
        threshold = str(threshold) if isinstance(threshold, (str, bytes)) else float(threshold)
        best, scale = int(a["best_timestep"]), float(a["sigmoid_scale"])
        return Calibration(method=str(a["method"]), threshold=threshold,
                           sigmoid_scale=None if np.isnan(scale) else scale,
                           blur_sigma=float(a["blur_sigma"]), closing_px=int(a["closing_px"]),
                           fill_holes=bool(a["fill_holes"]), largest_component=bool(a["largest_component"]),
                           bias_map=f["bias_map"][()] if bool(a["bias"]) else None,
                           best_timestep=None if best < 0 else best, timesteps=f["timesteps"][()].tolist())


def run_calibrate(dataset_h5: str | os.PathLike, val_inference_h5: str | os.PathLike,
                  out_h5: str | os.PathLike, *, method: str = "paper", threshold: float | str = 0.5,
                  bias: bool = False, blur_sigma: float = 1.0, closing_px: int = 1, fill_holes: bool = True,
                  largest_component: bool = True, sigmoid_scale: float | None = None) -> dict:
    """Fit the calibration on the val split's inference file and the val masks; write calibration.h5."""
    truth = read_labelled(dataset_h5, "val")  # only the val images whose masks were read
    inf = read_h5(val_inference_h5, ["maps", "timesteps"])
    check_split_attr(val_inference_h5, inf["attrs"], "val")
    maps = inf["maps"][match_rows(truth["ids"], inf["ids"], val_inference_h5)].astype(np.float32)
    cal, report = fit_calibration(maps, truth["masks"], inf["timesteps"], method=method, threshold=threshold,
                                  bias=bias, blur_sigma=blur_sigma, closing_px=closing_px, fill_holes=fill_holes,
                                  largest_component=largest_component, sigmoid_scale=sigmoid_scale)
    runtime = {key: inf["attrs"][key] for key in RUNTIME_DEFINING if key in inf["attrs"]}
    save_calibration(out_h5, cal, maps.shape[1:], report, runtime)
    return report
