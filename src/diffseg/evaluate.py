"""Evaluation: per-image metrics of every method/stage, the Table-1-like ``table.md``, uncertainty AUROC.

Every per-image result file is matched to the dataset's ground truth by image id, never by row
order. The best single timestep is chosen on the validation split and only reported on the
evaluation split, so no choice is ever made on the images the table reports.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from diffseg.atomic import atomic_path
from diffseg.calibration import load_calibration
from diffseg.data import truth_mask_files
from diffseg.export import write_original_size_pngs
from diffseg.h5io import check_resolution, check_split_attr, match_rows, read_h5
from diffseg.imageio import InputError
from diffseg.metrics import METRICS, PNG_SUFFIX, aggregate, auroc, mask_metrics, score_png_pairs
from diffseg.postprocess import binary_outputs, needs_maps
from diffseg.risk import (apply_risk, expected_calibration_error, format_score, load_risk_model, reliability_table,
                          risk_markdown, split_features, write_review_queue)
from diffseg.uncertainty import consistency, ged_kohl, ged_paper, mask_free_scores

logger = logging.getLogger(__name__)

BEST_T_METHOD = "DiffSeg, best single timestep"
MEAN_METHOD = "DiffSeg, mean of outputs thresholded"
FINAL_METHOD = "DiffSeg + CRF fusion"
# The paper's post-processing (identity calibration, raw maps to the CRF) of the SAME maps, shown beside
# the calibrated rows; with the paper's inference settings too (config/ablation/paper.yaml) it is the
# method as written.
PAPER = "DiffSeg, paper post-processing"
PAPER_BEST_T_METHOD = f"{PAPER}, best single timestep"
PAPER_MEAN_METHOD = f"{PAPER}, mean of outputs thresholded"
PAPER_FINAL_METHOD = f"{PAPER} + CRF fusion"
BASELINE_NAMES = {"otsu": "Otsu", "unet": "U-Net (supervised)",
                  "attention_unet": "Attention U-Net (supervised)"}
UNCERTAINTY_COLUMNS = ("ged_paper", "ged_kohl", "ambiguity_area", "crf_disagreement")
METRIC_HEADERS = {"dice": "Dice", "jaccard": "Jaccard", "precision": "Precision", "recall": "Recall",
                  "threshold_jaccard": "threshold Jaccard"}
UNCERTAINTY_SCORES = {"ged_paper": "GED of the outputs (paper eqs. 5-7)",
                      "ambiguity_area": "ambiguity area (fraction of pixels with 0 < consistency < 1)",
                      "crf_disagreement": "CRF disagreement (fraction of pixels where the K rounds differ)"}
# DiffSeg paper, Table 1 (ISIC 2018): Dice, Precision, Recall, Jaccard
PUBLISHED = {"U-Net": (0.838, 0.863, 0.868, 0.724), "Attention U-Net": (0.860, 0.861, 0.884, 0.746),
             "DiffSeg": (0.864, 0.897, 0.882, 0.735)}
PUBLISHED_GED = 0.13  # the paper's mean GED over its test set
OFFICIAL_PREFIX = "official_"  # per-image CSV columns of the official score at the original size


# ----------------------------------------------------------------------------- metrics


def per_image_metrics(ids: Sequence[str], preds: np.ndarray, truth: np.ndarray) -> pd.DataFrame:
    """One row per image: id plus every metric of diffseg.metrics."""
    rows = [{"id": image_id, **mask_metrics(p, t)} for image_id, p, t in zip(ids, preds, truth)]
    return pd.DataFrame(rows, columns=["id", *METRICS])


def mean_dice_per_timestep(binary: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(T,) macro-mean Dice of each timestep's binary output over the images."""
    n, n_t = binary.shape[:2]
    return np.array([np.mean([mask_metrics(binary[i, k], truth[i])["dice"] for i in range(n)])
                     for k in range(n_t)])


# ----------------------------------------------------------------------------- the rows


def choose_timestep_on_val(dataset_h5, val_h5) -> tuple[int, np.ndarray, np.ndarray]:
    """(best timestep value, timesteps, mean val Dice per timestep), from the val split only."""
    truth = read_h5(dataset_h5, ["masks"], group="val")
    val = read_h5(val_h5, ["binary", "timesteps"])
    check_split_attr(val_h5, val["attrs"], "val")
    rows = match_rows(truth["ids"], val["ids"], val_h5)
    check_resolution(val["binary"], truth["masks"], val_h5, "binary")
    dice = mean_dice_per_timestep(val["binary"][rows], truth["masks"].astype(bool))
    best = int(val["timesteps"][int(np.argmax(dice))])  # argmax: the earliest t on a tie
    logger.info("best single timestep on val: t=%d (mean Dice %.3f); per t: %s", best, dice.max(),
                dict(zip(val["timesteps"].tolist(), np.round(dice, 3).tolist())))
    return best, val["timesteps"], dice


def _timestep_column(timesteps: np.ndarray, t: int, path) -> int:
    hits = np.flatnonzero(np.asarray(timesteps) == t)
    if hits.size == 0:
        raise InputError(path, f"timestep {t} (chosen on val) not among its timesteps {list(timesteps)}")
    return int(hits[0])


def _uncertainty_columns(ids, binary, truth, ged, cons, rounds) -> pd.DataFrame:
    """ged_paper, ged_kohl, ambiguity_area and crf_disagreement of every image (in ``ids`` order).

    ``ged`` (N,) is the GED of each image's outputs (eqs. 5-7), ``cons`` (N, H, W) their consistency,
    ``rounds`` (N, K, H, W) the CRF rounds of the same path.
    """
    return pd.DataFrame({
        "ged_paper": np.asarray(ged, float),
        "ged_kohl": [ged_kohl(binary[i], truth[i]) for i in range(len(ids))],
        **mask_free_scores(cons, rounds),
    })


def _configured_uncertainty(ids, binary, truth, unc_h5, crf, crf_h5) -> pd.DataFrame:
    """Uncertainty columns of the configured path: GED and consistency from the uncertainty stage."""
    unc = read_h5(unc_h5, ["consistency", "ged"])
    unc_rows = match_rows(ids, unc["ids"], unc_h5)
    rounds = crf["rounds"][match_rows(ids, crf["ids"], crf_h5)]
    return _uncertainty_columns(ids, binary, truth, unc["ged"][unc_rows], unc["consistency"][unc_rows], rounds)


def _paper_uncertainty(ids, paper_binary, truth, paper_crf, crf_h5) -> pd.DataFrame:
    """Uncertainty columns of the paper path (its stored outputs), with the same functions as rule uncertainty."""
    rounds = paper_crf["rounds"][match_rows(ids, paper_crf["ids"], crf_h5)]
    ged = [ged_paper(outputs) for outputs in paper_binary]
    cons = np.stack([consistency(outputs) for outputs in paper_binary])
    return _uncertainty_columns(ids, paper_binary, truth, ged, cons, rounds)


def _method_table(name: str, ids, preds: np.ndarray, truth: np.ndarray, extra: pd.DataFrame | None = None):
    table = per_image_metrics(ids, preds, truth)
    if extra is not None:
        table = pd.concat([table, extra.reset_index(drop=True)], axis=1)
    table.insert(1, "method", name)
    return table


def _read_crf(crf_h5, ids, truth, prefix: str = "") -> tuple[dict, np.ndarray]:
    crf = read_h5(crf_h5, [f"{prefix}fused", f"{prefix}rounds"])
    crf["fused"], crf["rounds"] = crf.pop(f"{prefix}fused"), crf.pop(f"{prefix}rounds")
    fused = crf["fused"][match_rows(ids, crf["ids"], crf_h5)]
    check_resolution(fused, truth, crf_h5, f"{prefix}fused")
    return crf, fused


def _diffseg_rows(dataset_h5, inference_h5s, uncertainty_h5, crf_h5, split, ids, truth,
                  calibration_h5=None) -> tuple[dict, dict, dict, int]:
    """The DiffSeg rows: ({method: masks (N, R, R)}, {method: uncertainty columns}, {method: best t}, n outputs).

    The configured rows use the calibration (diffseg.calibration); when it is not the paper's identity,
    the paper-faithful rows (stored binary outputs, CRF on the raw maps) follow. The final row of each
    path carries its uncertainty columns, GED over that path's n outputs (one per timestep).
    """
    if len(inference_h5s) != 2:
        raise ValueError(f"evaluate: inference_h5s must be [val file, {split} file], got {list(inference_h5s)}")
    val_h5, eval_h5 = inference_h5s
    paper_t, _, _ = choose_timestep_on_val(dataset_h5, val_h5)
    cal = load_calibration(calibration_h5) if calibration_h5 is not None else None
    calibrated = needs_maps(cal)
    inf = read_h5(eval_h5, ["binary", "timesteps", *(["maps"] if calibrated else [])])
    check_split_attr(eval_h5, inf["attrs"], split)
    rows = match_rows(ids, inf["ids"], eval_h5)
    paper_binary = inf["binary"][rows]
    check_resolution(paper_binary, truth, eval_h5, "binary")
    binary = binary_outputs(cal, paper_binary, inf["maps"][rows] if calibrated else None)
    best_t = cal.best_timestep if calibrated else paper_t
    crf, fused = _read_crf(crf_h5, ids, truth)
    column = _timestep_column(inf["timesteps"], best_t, eval_h5)
    masks = {BEST_T_METHOD: binary[:, column], MEAN_METHOD: binary.mean(axis=1) >= 0.5, FINAL_METHOD: fused}
    extra = {FINAL_METHOD: _configured_uncertainty(ids, binary, truth, uncertainty_h5, crf, crf_h5)}
    timesteps = {BEST_T_METHOD: best_t}
    if calibrated:
        paper_crf, paper_fused = _read_crf(crf_h5, ids, truth, prefix="paper_")
        paper_column = _timestep_column(inf["timesteps"], paper_t, eval_h5)
        masks.update({PAPER_BEST_T_METHOD: paper_binary[:, paper_column],
                      PAPER_MEAN_METHOD: paper_binary.mean(axis=1) >= 0.5, PAPER_FINAL_METHOD: paper_fused})
        extra[PAPER_FINAL_METHOD] = _paper_uncertainty(ids, paper_binary, truth, paper_crf, crf_h5)
        timesteps[PAPER_BEST_T_METHOD] = paper_t
    return masks, extra, timesteps, len(inf["timesteps"])


def _baseline_masks(path, ids, truth) -> np.ndarray:
    data = read_h5(path, ["masks"])
    masks = data["masks"][match_rows(ids, data["ids"], path)]
    check_resolution(masks, truth, path, "masks")
    return masks


# ----------------------------------------------------------------------------- the official score


def row_png_dir(png_root: str | os.PathLike, method: str) -> Path:
    """Folder of one row's original-size masks: the row name as a file-system-safe slug."""
    return Path(png_root) / re.sub(r"[^a-z0-9]+", "_", method.lower()).strip("_")


def export_rows(masks: dict[str, np.ndarray], ids, orig_sizes: np.ndarray, png_root) -> dict[str, Path]:
    """Every row's masks at each image's original size (diffseg.export.write_original_size_pngs, as rule
    export_masks writes the final masks), one folder per row; returns {method: folder}."""
    folders = {}
    for method, row_masks in masks.items():
        folders[method] = row_png_dir(png_root, method)
        folders[method].mkdir(parents=True, exist_ok=True)
        write_original_size_pngs(ids, np.asarray(row_masks) > 0, orig_sizes, folders[method])
    return folders


def official_scores(folders: dict[str, Path], truth_files: dict[str, Path]) -> dict[str, pd.DataFrame]:
    """{method: per-image official scores} of every row's PNG folder against the original ground truth."""
    return {method: score_png_pairs([(image_id, folder / f"{image_id}{PNG_SUFFIX}", truth)
                                     for image_id, truth in truth_files.items()])
            for method, folder in folders.items()}


# ----------------------------------------------------------------------------- table.md


def _metric_rows(means: dict, best_t: dict, extra_columns=()) -> list[str]:
    """One markdown row per method: the metrics of ``means`` and then ``extra_columns`` (keys)."""
    lines = []
    for method, m in means.items():
        label = f"{method} (t = {best_t[method]}, chosen on val)" if method in best_t else method
        cells = [format_score(m[k]) for k in METRIC_HEADERS] + [format_score(m.get(k)) for k in extra_columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _header(headers) -> list[str]:
    return ["| method | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]


def _official_table(official_means: dict, best_t: dict, sizes: str) -> list[str]:
    lines = ["## Official ISIC 2018 Task 1 score (masks at each image's original size)", "",
             f"Every row's masks resized to the image's original size ({sizes}; bilinear, cut at 0.5) and "
             "scored by the official scorer, isic-challenge-scoring (its loading, binarisation and metrics); "
             "per-image metrics, macro-averaged.", ""]
    return lines + _header(METRIC_HEADERS.values()) + _metric_rows(official_means, best_t)


def _working_table(means: dict, best_t: dict, resolution: int, n_outputs: int) -> list[str]:
    lines = [f"## At the model's working resolution ({resolution} x {resolution} px; not the official score)", "",
             "The same masks before resizing, scored against the ground truth resized to the working resolution.", ""]
    headers = [*METRIC_HEADERS.values(), "GED (Kohl, vs truth)", f"GED of the {n_outputs} outputs (paper eqs. 5-7)"]
    return lines + _header(headers) + _metric_rows(means, best_t, ("ged_kohl", "ged_paper"))


def _ged_line(means: dict, n_images: int, n_outputs: int) -> list[str]:
    """The paper path's mean GED beside the paper's (and the calibrated path's, when there is one)."""
    paper_final = PAPER_FINAL_METHOD if PAPER_FINAL_METHOD in means else FINAL_METHOD
    line = (f"Mean GED of the {n_outputs} outputs (paper eqs. 5-7) over {n_images} images, the paper's "
            f"path: {format_score(means[paper_final]['ged_paper'])} (the paper reports {PUBLISHED_GED:.2f})")
    if paper_final != FINAL_METHOD:
        line += f"; the calibrated path: {format_score(means[FINAL_METHOD]['ged_paper'])}"
    line += (f". Standard GED (Kohl et al., outputs vs ground truth, d = 1 - IoU) of the configured path: "
             f"{format_score(means[FINAL_METHOD]['ged_kohl'])}.")
    return [line]


def _warning_section(final: pd.DataFrame, fail_dice: float) -> list[str]:
    failed = final["dice"].to_numpy() < fail_dice
    lines = ["## Does uncertainty warn where the mask is wrong?", "",
             f"{int(failed.sum())} of {len(final)} images have a final Dice < {fail_dice:g} (working resolution). "
             "AUROC of each per-image score of the configured path for ranking those failures above the other "
             "images (0.5 = chance, 1 = perfect; n/a when either group is empty):", "",
             "| uncertainty score | AUROC |", "|---|---|"]
    for column, label in UNCERTAINTY_SCORES.items():
        lines.append(f"| {label} | {format_score(auroc(final[column], failed))} |")
    return lines


def _published_section() -> list[str]:
    lines = ["## Reference only: published numbers (DiffSeg paper, Table 1)", "",
             "Published, other splits, not comparable with the rows above.", "",
             "| method (published) | Dice | Precision | Recall | Jaccard |", "|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for name, values in PUBLISHED.items()]
    return lines


def size_range(orig_sizes: np.ndarray) -> str:
    """'W x H px' or 'from W x H to W x H px' (by area) of the (N, 2) (height, width) original sizes."""
    area = orig_sizes[:, 0].astype(np.int64) * orig_sizes[:, 1]
    (h0, w0), (h1, w1) = orig_sizes[int(np.argmin(area))], orig_sizes[int(np.argmax(area))]
    return f"{w0} x {h0} px" if (h0, w0) == (h1, w1) else f"from {w0} x {h0} to {w1} x {h1} px"


def render_table(means: dict, official_means: dict, final: pd.DataFrame, split: str, best_t: dict,
                 fail_dice: float, *, resolution: int, n_outputs: int, sizes: str, risk_lines: list[str] | None = None,
                 calibration_lines: Sequence[str] = ()) -> str:
    """The markdown of table.md: the official score first, the working-resolution numbers second.

    ``risk_lines`` (the risk score's section) replace the single-score AUROC list.
    """
    lines = [f"# Segmentation results on split '{split}' (n = {len(final)} images; the model worked at "
             f"{resolution} x {resolution} px)", ""]
    lines += _official_table(official_means, best_t, sizes) + [""]
    lines += _working_table(means, best_t, resolution, n_outputs) + [""]
    lines += _ged_line(means, len(final), n_outputs) + [""]
    lines += (risk_lines or _warning_section(final, fail_dice)) + [""]
    lines += [*calibration_lines, ""] if calibration_lines else []
    lines += _published_section()
    return "\n".join(lines) + "\n"


def _consistency(uncertainty_h5, ids) -> np.ndarray:
    """(N, H, W) consistency maps of ``ids`` from the uncertainty file."""
    unc = read_h5(uncertainty_h5, ["consistency"])
    return unc["consistency"][match_rows(ids, unc["ids"], uncertainty_h5)]


def _calibration_lines(reliability: pd.DataFrame) -> list[str]:
    return ["## Pixel level: is the consistency map a calibrated lesion probability?", "",
            "Pixels binned by consistency (the fraction of outputs calling them lesion) against the fraction that "
            f"is lesion in the ground truth (reliability diagram: figures/reliability.png). Expected calibration "
            f"error over {int(reliability['n_pixels'].sum())} pixels, {len(reliability)} equal bins: "
            f"{format_score(expected_calibration_error(reliability))} (0 = calibrated)."]


def _risk_section(dataset_h5, eval_inference_h5, crf_h5, calibration_h5, risk_json, split: str, fail_dice: float,
                  review_queue_csv) -> list[str]:
    """The risk score on the evaluation split: rankings, risk-coverage (table.md lines) and the review queue."""
    if calibration_h5 is None:
        raise ValueError("evaluate: the risk score needs the calibration file (calibration_h5)")
    model = load_risk_model(risk_json)
    table = split_features(dataset_h5, eval_inference_h5, crf_h5, calibration_h5, split)
    risk = apply_risk(model, table)
    if review_queue_csv is not None:
        write_review_queue(review_queue_csv, table, risk)
    if model.fail_dice != fail_dice:
        logger.warning("%s was fitted for Dice < %g but the table reports failures as Dice < %g",
                       risk_json, model.fail_dice, fail_dice)
    return risk_markdown(table, risk, model, fail_dice)


def _macro_means(tables: list[pd.DataFrame]) -> dict[str, dict[str, float]]:
    means = {}
    for table in tables:
        m = aggregate(table).to_dict()
        m.update({c: float(table[c].mean()) for c in UNCERTAINTY_COLUMNS if c in table})
        means[table["method"].iloc[0]] = m
    return means


def _per_image_table(method: str, ids, masks, truth, extra: pd.DataFrame | None, official: pd.DataFrame):
    """One row per image: working-resolution metrics, uncertainty columns (final rows), official_* metrics."""
    table = _method_table(method, ids, masks, truth, extra)
    official = official.set_index("id").loc[list(ids), list(METRICS)].add_prefix(OFFICIAL_PREFIX)
    return pd.concat([table, official.reset_index(drop=True)], axis=1)


def run_evaluate(dataset_h5: str | os.PathLike, inference_h5s: Sequence[str | os.PathLike],
                 uncertainty_h5: str | os.PathLike, crf_h5: str | os.PathLike, baselines: dict,
                 per_image_csv: str | os.PathLike, table_md: str | os.PathLike, *, truth_dir: str | os.PathLike,
                 png_dir: str | os.PathLike, split: str = "test", fail_dice: float = 0.7,
                 calibration_h5: str | os.PathLike | None = None, risk_json: str | os.PathLike | None = None,
                 review_queue_csv: str | os.PathLike | None = None,
                 reliability_csv: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """Score every method on ``split``; write the per-image CSV and table.md. Returns macro means per method.

    Every row's masks are written at each image's original size under ``png_dir`` (one folder per
    row) and scored there by the official scorer against the original masks of ``truth_dir`` (the
    data folder); the working-resolution scores follow. ``calibration_h5`` (rule calibrate) turns the
    maps into the configured outputs; None = the paper's identity (the stored binary outputs). Each
    method's dict holds the working-resolution metrics, ``official`` (the official ones) and, for the
    best-timestep rows, ``timestep`` (chosen on val). ``risk_json`` (rule fit_risk, needs
    ``calibration_h5``): the risk score's section in table.md and ``review_queue_csv``.
    ``reliability_csv``: the consistency map's reliability bins (their expected calibration error is
    always in table.md).
    """
    if split == "val":
        logger.warning("evaluating on 'val', the split the best timestep is chosen on: that row is optimistic")
    truth_data = read_h5(dataset_h5, ["masks", "orig_size"], group=split)
    ids, truth = truth_data["ids"], truth_data["masks"].astype(bool)
    if not ids:
        raise InputError(dataset_h5, f"split '{split}' holds no images")
    truth_files = truth_mask_files(truth_dir, ids)
    masks, extra, best_t, n_outputs = _diffseg_rows(dataset_h5, inference_h5s, uncertainty_h5, crf_h5, split,
                                                    ids, truth, calibration_h5)
    masks.update({BASELINE_NAMES.get(name, name): _baseline_masks(path, ids, truth)
                  for name, path in baselines.items()})
    official = official_scores(export_rows(masks, ids, truth_data["orig_size"], png_dir), truth_files)
    tables = [_per_image_table(m, ids, masks[m], truth, extra.get(m), official[m]) for m in masks]
    means = _macro_means(tables)
    official_means = {m: aggregate(table).to_dict() for m, table in official.items()}
    final = tables[list(masks).index(FINAL_METHOD)]
    risk_lines = None
    if risk_json is not None:
        risk_lines = _risk_section(dataset_h5, inference_h5s[1], crf_h5, calibration_h5, risk_json, split,
                                   fail_dice, review_queue_csv)
    reliability = reliability_table(_consistency(uncertainty_h5, ids), truth)
    if reliability_csv is not None:
        with atomic_path(reliability_csv) as tmp:
            reliability.to_csv(tmp, index=False)
    with atomic_path(per_image_csv) as tmp:
        pd.concat(tables, ignore_index=True).to_csv(tmp, index=False)
    markdown = render_table(means, official_means, final, split, best_t, fail_dice, resolution=truth.shape[-1],
                            n_outputs=n_outputs, sizes=size_range(truth_data["orig_size"]), risk_lines=risk_lines,
                            calibration_lines=_calibration_lines(reliability))
    with atomic_path(table_md) as tmp:
        tmp.write_text(markdown)
    for method in means:
        means[method]["official"] = official_means[method]
        if method in best_t:
            means[method]["timestep"] = best_t[method]
    logger.info("evaluate %s (official, original size): %s", split,
                {k: round(v["dice"], 3) for k, v in official_means.items()})
    return means
