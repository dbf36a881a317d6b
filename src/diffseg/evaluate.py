"""Evaluation: per-image metrics of every method/stage, the Table-1-like ``table.md``, uncertainty AUROC.

Every per-image result file is matched to the dataset's ground truth by image id, never by row
order. The best single timestep is chosen on the validation split and only reported on the
evaluation split, so no choice is ever made on the images the table reports.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from diffseg.atomic import atomic_path
from diffseg.calibration import load_calibration
from diffseg.h5io import check_resolution, check_split_attr, match_rows, read_h5
from diffseg.imageio import InputError
from diffseg.metrics import METRICS, aggregate, mask_metrics
from diffseg.postprocess import binary_outputs, needs_maps
from diffseg.uncertainty import ged_kohl

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
UNCERTAINTY_SCORES = {"ged_paper": "GED (paper, eqs. 5-7)",
                      "ambiguity_area": "ambiguity area (fraction of pixels with 0 < consistency < 1)",
                      "crf_disagreement": "CRF disagreement (fraction of pixels where the K rounds differ)"}
# DiffSeg paper, Table 1 (ISIC 2018): Dice, Precision, Recall, Jaccard
PUBLISHED = {"U-Net": (0.838, 0.863, 0.868, 0.724), "Attention U-Net": (0.860, 0.861, 0.884, 0.746),
             "DiffSeg": (0.864, 0.897, 0.882, 0.735)}


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


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """AUROC of ``scores`` ranking positives above negatives (rank formula, ties averaged); None if a class is empty."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)  # average ranks for ties: a tie counts as half a correct ordering
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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


def _uncertainty_columns(ids, binary, truth, unc, unc_h5, crf, crf_h5) -> pd.DataFrame:
    """ged_paper, ged_kohl, ambiguity_area and crf_disagreement of every image (in ``ids`` order)."""
    unc_rows = match_rows(ids, unc["ids"], unc_h5)
    crf_rows = match_rows(ids, crf["ids"], crf_h5)
    cons = unc["consistency"][unc_rows]
    rounds = crf["rounds"][crf_rows]
    return pd.DataFrame({
        "ged_paper": unc["ged"][unc_rows].astype(float),
        "ged_kohl": [ged_kohl(binary[i], truth[i]) for i in range(len(ids))],
        "ambiguity_area": ((cons > 0) & (cons < 1)).mean(axis=(1, 2)),
        "crf_disagreement": (rounds.min(axis=1) != rounds.max(axis=1)).mean(axis=(1, 2)),
    })


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


def _diffseg_tables(dataset_h5, inference_h5s, uncertainty_h5, crf_h5, split, ids, truth,
                    calibration_h5=None) -> tuple[list, dict]:
    """Per-image tables of the DiffSeg rows (configured rows first, final row third), timestep per best-t row.

    The configured rows use the calibration (diffseg.calibration); when it is not the paper's identity,
    the paper-faithful rows (stored binary outputs, CRF on the raw maps) follow.
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
    unc = read_h5(uncertainty_h5, ["consistency", "ged"])
    extra = _uncertainty_columns(ids, binary, truth, unc, uncertainty_h5, crf, crf_h5)
    column = _timestep_column(inf["timesteps"], best_t, eval_h5)
    tables = [_method_table(BEST_T_METHOD, ids, binary[:, column], truth),
              _method_table(MEAN_METHOD, ids, binary.mean(axis=1) >= 0.5, truth),
              _method_table(FINAL_METHOD, ids, fused, truth, extra)]
    timesteps = {BEST_T_METHOD: best_t}
    if calibrated:
        _, paper_fused = _read_crf(crf_h5, ids, truth, prefix="paper_")
        paper_column = _timestep_column(inf["timesteps"], paper_t, eval_h5)
        tables += [_method_table(PAPER_BEST_T_METHOD, ids, paper_binary[:, paper_column], truth),
                   _method_table(PAPER_MEAN_METHOD, ids, paper_binary.mean(axis=1) >= 0.5, truth),
                   _method_table(PAPER_FINAL_METHOD, ids, paper_fused, truth)]
        timesteps[PAPER_BEST_T_METHOD] = paper_t
    return tables, timesteps


def _baseline_table(name: str, path, ids, truth) -> pd.DataFrame:
    data = read_h5(path, ["masks"])
    masks = data["masks"][match_rows(ids, data["ids"], path)]
    check_resolution(masks, truth, path, "masks")
    return _method_table(BASELINE_NAMES.get(name, name), ids, masks, truth)


# ----------------------------------------------------------------------------- table.md


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def _results_table(means: dict, best_t: dict) -> list[str]:
    headers = [*METRIC_HEADERS.values(), "GED (Kohl, vs truth)", "GED (paper)"]
    lines = ["| method | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    for method, m in means.items():
        label = f"{method} (t = {best_t[method]}, chosen on val)" if method in best_t else method
        cells = [_fmt(m[k]) for k in METRIC_HEADERS] + [_fmt(m.get("ged_kohl")), _fmt(m.get("ged_paper"))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _warning_section(final: pd.DataFrame, fail_dice: float) -> list[str]:
    failed = final["dice"].to_numpy() < fail_dice
    lines = ["## Does uncertainty warn where the mask is wrong?", "",
             f"{int(failed.sum())} of {len(final)} images have a final Dice < {fail_dice:g}. AUROC of each "
             "per-image score for ranking those failures above the other images (0.5 = chance, 1 = perfect; "
             "n/a when either group is empty):", "",
             "| uncertainty score | AUROC |", "|---|---|"]
    for column, label in UNCERTAINTY_SCORES.items():
        lines.append(f"| {label} | {_fmt(auroc(final[column], failed))} |")
    return lines


def _published_section() -> list[str]:
    lines = ["## Reference only: published numbers (DiffSeg paper, Table 1)", "",
             "Published, other splits, not comparable with the rows above.", "",
             "| method (published) | Dice | Precision | Recall | Jaccard |", "|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for name, values in PUBLISHED.items()]
    return lines


def render_table(means: dict, final: pd.DataFrame, split: str, best_t: dict, fail_dice: float) -> str:
    """The markdown of table.md."""
    lines = [f"# Segmentation results on split '{split}' (n = {len(final)} images)", "",
             "Per-image metrics, macro-averaged (ISIC 2018 conventions).", ""]
    lines += _results_table(means, best_t)
    lines += ["", f"Mean GED of the final DiffSeg masks over {len(final)} images: paper definition "
              f"(eqs. 5-7, among the outputs) {_fmt(final['ged_paper'].mean())}; standard (Kohl et al., "
              f"outputs vs ground truth, d = 1 - IoU) {_fmt(final['ged_kohl'].mean())}.", ""]
    lines += _warning_section(final, fail_dice) + [""] + _published_section()
    return "\n".join(lines) + "\n"


def _macro_means(tables: list[pd.DataFrame]) -> dict[str, dict[str, float]]:
    means = {}
    for table in tables:
        m = aggregate(table).to_dict()
        m.update({c: float(table[c].mean()) for c in UNCERTAINTY_COLUMNS if c in table})
        means[table["method"].iloc[0]] = m
    return means


def run_evaluate(dataset_h5: str | os.PathLike, inference_h5s: Sequence[str | os.PathLike],
                 uncertainty_h5: str | os.PathLike, crf_h5: str | os.PathLike, baselines: dict,
                 per_image_csv: str | os.PathLike, table_md: str | os.PathLike, *, split: str = "test",
                 fail_dice: float = 0.7, calibration_h5: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """Score every method on ``split``; write the per-image CSV and table.md. Returns macro means per method.

    ``calibration_h5`` (rule calibrate) turns the maps into the configured outputs; None = the paper's
    identity (the stored binary outputs). Each best-timestep row's dict also holds its ``timestep``
    (chosen on val).
    """
    if split == "val":
        logger.warning("evaluating on 'val', the split the best timestep is chosen on: that row is optimistic")
    truth_data = read_h5(dataset_h5, ["masks"], group=split)
    ids, truth = truth_data["ids"], truth_data["masks"].astype(bool)
    if not ids:
        raise InputError(dataset_h5, f"split '{split}' holds no images")
    tables, best_t = _diffseg_tables(dataset_h5, inference_h5s, uncertainty_h5, crf_h5, split, ids, truth,
                                     calibration_h5)
    tables += [_baseline_table(name, path, ids, truth) for name, path in baselines.items()]
    per_image = pd.concat(tables, ignore_index=True)
    means = _macro_means(tables)
    final = tables[2]
    with atomic_path(per_image_csv) as tmp:
        per_image.to_csv(tmp, index=False)
    with atomic_path(table_md) as tmp:
        tmp.write_text(render_table(means, final, split, best_t, fail_dice))
    for method, t in best_t.items():
        means[method]["timestep"] = t
    logger.info("evaluate %s: %s", split, {k: round(v["dice"], 3) for k, v in means.items()})
    return means
