"""Evaluation: per-image metrics of every method/stage, the Table-1-like ``table.md``, uncertainty AUROC.

Every per-image result file is matched to the dataset's ground truth by image id, never by row
order. The best single timestep is chosen on the validation split and only reported on the
evaluation split, so no choice is ever made on the images the table reports. Each row of the table
(a DiffSeg stage or a baseline) is one ``EvalRow``: its display name, its masks' folder name, its masks
and, where it has them, its uncertainty columns and chosen timestep.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from diffseg.atomic import atomic_path
from diffseg.calibration import load_calibration
from diffseg.data import masks_read_line, truth_mask_files
from diffseg.export import write_original_size_pngs
from diffseg.h5io import check_resolution, check_split_attr, match_rows, read_h5, read_labelled
from diffseg.imageio import InputError
from diffseg.metrics import METRICS, OFFICIAL_METRICS, PNG_SUFFIX, aggregate, auroc, mask_metrics, score_png_pairs
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


# ----------------------------------------------------------------------------- rows, inputs, outputs


def row_slug(name: str) -> str:
    """A row's file-system-safe name (its masks' folder under png_dir): lower case, runs of other
    characters as one underscore."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@dataclass(frozen=True, eq=False)
class EvalRow:
    """One row of the evaluation.

    ``name`` is the display string (the per-image CSV's ``method`` value and table.md's label),
    ``slug`` the folder of its original-size masks (row_slug of the name), ``masks`` (N, R, R) the
    row's masks in the evaluated ids' order, ``extra`` the per-image uncertainty columns (the final
    row of each DiffSeg path; None for the others) and ``best_t`` the timestep chosen on val (the
    best-timestep rows; None for the others).
    """

    name: str
    masks: np.ndarray
    extra: pd.DataFrame | None = None
    best_t: int | None = None
    slug: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "slug", row_slug(self.name))

    @property
    def label(self) -> str:
        """The row's label in table.md (a best-timestep row names its timestep)."""
        return self.name if self.best_t is None else f"{self.name} (t = {self.best_t}, chosen on val)"


@dataclass(frozen=True, eq=False)
class RowScores:
    """A row's scores: ``per_image`` (its lines of the per-image CSV), ``means`` (working-resolution
    macro means, and the uncertainty columns' means where the row has them), ``official_means``
    (the official scorer's macro means at the original size)."""

    row: EvalRow
    per_image: pd.DataFrame
    means: dict[str, float]
    official_means: dict[str, float]


@dataclass(frozen=True)
class EvaluateInputs:
    """The files rule evaluate reads.

    ``inference_h5s`` = (val file, evaluated split's file): the paper's best timestep is chosen on the
    first. ``truth_dir`` is the data folder (the original-size ground truth of the official score),
    ``baselines`` {baseline name: its masks file}. ``calibration_h5`` (rule calibrate) turns the maps
    into the configured outputs; None = the paper's identity (the stored binary outputs).
    ``risk_json`` (rule fit_risk, needs ``calibration_h5``): the risk score's section in table.md.
    """

    dataset_h5: str | os.PathLike
    inference_h5s: Sequence[str | os.PathLike]
    uncertainty_h5: str | os.PathLike
    crf_h5: str | os.PathLike
    truth_dir: str | os.PathLike
    baselines: Mapping[str, str | os.PathLike] = field(default_factory=dict)
    calibration_h5: str | os.PathLike | None = None
    risk_json: str | os.PathLike | None = None


@dataclass(frozen=True)
class EvaluateOutputs:
    """The files rule evaluate writes: the per-image CSV, table.md, ``png_dir`` (one folder of
    original-size masks per row), the review queue (written with a risk model only) and the
    consistency map's reliability bins (optional; their expected calibration error is always in table.md)."""

    per_image_csv: str | os.PathLike
    table_md: str | os.PathLike
    png_dir: str | os.PathLike
    review_queue_csv: str | os.PathLike | None = None
    reliability_csv: str | os.PathLike | None = None


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
    truth = read_labelled(dataset_h5, "val")
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


def _read_crf(crf_h5, ids, truth, prefix: str = "") -> tuple[dict, np.ndarray]:
    crf = read_h5(crf_h5, [f"{prefix}fused", f"{prefix}rounds"])
    crf["fused"], crf["rounds"] = crf.pop(f"{prefix}fused"), crf.pop(f"{prefix}rounds")
    fused = crf["fused"][match_rows(ids, crf["ids"], crf_h5)]
    check_resolution(fused, truth, crf_h5, f"{prefix}fused")
    return crf, fused


def _diffseg_rows(inputs: EvaluateInputs, split: str, ids, truth) -> tuple[list[EvalRow], int]:
    """The DiffSeg rows and the number of outputs per image (one per timestep).

    The configured rows use the calibration (diffseg.calibration); when it is not the paper's identity,
    the paper-faithful rows (stored binary outputs, CRF on the raw maps) follow. The final row of each
    path carries its uncertainty columns, GED over that path's n outputs.
    """
    if len(inputs.inference_h5s) != 2:
        raise ValueError(f"evaluate: inference_h5s must be [val file, {split} file], "
                         f"got {list(inputs.inference_h5s)}")
    val_h5, eval_h5 = inputs.inference_h5s
    paper_t, _, _ = choose_timestep_on_val(inputs.dataset_h5, val_h5)
    cal = load_calibration(inputs.calibration_h5) if inputs.calibration_h5 is not None else None
    calibrated = needs_maps(cal)
    inf = read_h5(eval_h5, ["binary", "timesteps", *(["maps"] if calibrated else [])])
    check_split_attr(eval_h5, inf["attrs"], split)
    order = match_rows(ids, inf["ids"], eval_h5)
    paper_binary = inf["binary"][order]
    check_resolution(paper_binary, truth, eval_h5, "binary")
    binary = binary_outputs(cal, paper_binary, inf["maps"][order] if calibrated else None)
    best_t = cal.best_timestep if calibrated else paper_t
    crf, fused = _read_crf(inputs.crf_h5, ids, truth)
    column = _timestep_column(inf["timesteps"], best_t, eval_h5)
    rows = [EvalRow(BEST_T_METHOD, binary[:, column], best_t=best_t),
            EvalRow(MEAN_METHOD, binary.mean(axis=1) >= 0.5),
            EvalRow(FINAL_METHOD, fused,
                    extra=_configured_uncertainty(ids, binary, truth, inputs.uncertainty_h5, crf, inputs.crf_h5))]
    if calibrated:
        paper_crf, paper_fused = _read_crf(inputs.crf_h5, ids, truth, prefix="paper_")
        paper_column = _timestep_column(inf["timesteps"], paper_t, eval_h5)
        rows += [EvalRow(PAPER_BEST_T_METHOD, paper_binary[:, paper_column], best_t=paper_t),
                 EvalRow(PAPER_MEAN_METHOD, paper_binary.mean(axis=1) >= 0.5),
                 EvalRow(PAPER_FINAL_METHOD, paper_fused,
                         extra=_paper_uncertainty(ids, paper_binary, truth, paper_crf, inputs.crf_h5))]
    return rows, len(inf["timesteps"])


def _baseline_rows(baselines: Mapping[str, str | os.PathLike], ids, truth) -> list[EvalRow]:
    """One row per baseline ({name: its masks file}), named for the table (BASELINE_NAMES)."""
    return [EvalRow(BASELINE_NAMES.get(name, name), _baseline_masks(path, ids, truth))
            for name, path in baselines.items()]


def _baseline_masks(path, ids, truth) -> np.ndarray:
    data = read_h5(path, ["masks"])
    masks = data["masks"][match_rows(ids, data["ids"], path)]
    check_resolution(masks, truth, path, "masks")
    return masks


def _check_unique_slugs(rows: Sequence[EvalRow]) -> None:
    """Two rows with one slug would write their masks into one folder."""
    seen = {}
    for row in rows:
        if row.slug in seen:
            raise ValueError(f"evaluate: rows '{seen[row.slug]}' and '{row.name}' share the folder name '{row.slug}'")
        seen[row.slug] = row.name


# ----------------------------------------------------------------------------- the official score


def export_row(row: EvalRow, ids, orig_sizes: np.ndarray, png_root: str | os.PathLike) -> Path:
    """The row's masks at each image's original size (diffseg.export.write_original_size_pngs, as rule
    export_masks writes the final masks) in ``png_root/<row.slug>``; returns that folder."""
    folder = Path(png_root) / row.slug
    folder.mkdir(parents=True, exist_ok=True)
    write_original_size_pngs(ids, np.asarray(row.masks) > 0, orig_sizes, folder)
    return folder


def official_score(folder: Path, truth_files: dict[str, Path]) -> pd.DataFrame:
    """Per-image official scores of one row's PNG folder against the original ground truth."""
    return score_png_pairs([(image_id, folder / f"{image_id}{PNG_SUFFIX}", truth)
                            for image_id, truth in truth_files.items()])


def _per_image_table(row: EvalRow, ids, truth: np.ndarray, official: pd.DataFrame) -> pd.DataFrame:
    """One row per image: working-resolution metrics, uncertainty columns (final rows), official_* metrics."""
    table = per_image_metrics(ids, row.masks, truth)
    if row.extra is not None:
        table = pd.concat([table, row.extra.reset_index(drop=True)], axis=1)
    table.insert(1, "method", row.name)
    official = official.set_index("id").loc[list(ids), list(OFFICIAL_METRICS)].add_prefix(OFFICIAL_PREFIX)
    return pd.concat([table, official.reset_index(drop=True)], axis=1)


def _macro_means(per_image: pd.DataFrame) -> dict[str, float]:
    """Macro means of the working-resolution metrics and of the uncertainty columns the table holds."""
    means = aggregate(per_image).to_dict()
    means.update({c: float(per_image[c].mean()) for c in UNCERTAINTY_COLUMNS if c in per_image})
    return means


def score_row(row: EvalRow, ids, truth: np.ndarray, orig_sizes: np.ndarray, png_root, truth_files) -> RowScores:
    """Write the row's original-size masks, score them there (official) and at the working resolution."""
    official = official_score(export_row(row, ids, orig_sizes, png_root), truth_files)
    per_image = _per_image_table(row, ids, truth, official)
    return RowScores(row, per_image, _macro_means(per_image), aggregate(official).to_dict())


# ----------------------------------------------------------------------------- table.md


def _metric_rows(labelled_means: Sequence[tuple[str, dict]], extra_columns=()) -> list[str]:
    """One markdown row per (label, means): the metrics and then ``extra_columns`` (keys of the means)."""
    lines = []
    for label, m in labelled_means:
        cells = [format_score(m[k]) for k in METRIC_HEADERS] + [format_score(m.get(k)) for k in extra_columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _header(headers) -> list[str]:
    return ["| method | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]


def _official_table(scores: Sequence[RowScores], sizes: str) -> list[str]:
    lines = ["## Official ISIC 2018 Task 1 score (masks at each image's original size)", "",
             f"Every row's masks resized to the image's original size ({sizes}; bilinear, cut at 0.5) and "
             "scored by the official scorer, isic-challenge-scoring (its loading, binarisation and metrics); "
             "per-image metrics, macro-averaged; HD95 in pixels at the original size, over the images where neither "
             "mask is empty.", ""]
    return lines + _header([*METRIC_HEADERS.values(), "HD95 (px)"]) + _metric_rows(
        [(s.row.label, s.official_means) for s in scores], ("hd95",))


def _working_table(scores: Sequence[RowScores], resolution: int, n_outputs: int) -> list[str]:
    lines = [f"## At the model's working resolution ({resolution} x {resolution} px; not the official score)", "",
             "The same masks before resizing, scored against the ground truth resized to the working resolution.", ""]
    headers = [*METRIC_HEADERS.values(), "GED (Kohl, vs truth)", f"GED of the {n_outputs} outputs (paper eqs. 5-7)"]
    return lines + _header(headers) + _metric_rows([(s.row.label, s.means) for s in scores],
                                                   ("ged_kohl", "ged_paper"))


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


def _final_scores(scores: Sequence[RowScores]) -> RowScores:
    return next(s for s in scores if s.row.name == FINAL_METHOD)


def render_table(scores: Sequence[RowScores], split: str, fail_dice: float, *, resolution: int, n_outputs: int,
                 sizes: str, risk_lines: list[str] | None = None, calibration_lines: Sequence[str] = (),
                 masks_line: str | None = None) -> str:
    """The markdown of table.md: the official score first, the working-resolution numbers second.

    ``risk_lines`` (the risk score's section) replace the single-score AUROC list. ``masks_line`` (a
    ``prepare.labelled`` run: how many masks it read) follows the title.
    """
    final = _final_scores(scores).per_image
    lines = [f"# Segmentation results on split '{split}' (n = {len(final)} images; the model worked at "
             f"{resolution} x {resolution} px)", ""]
    lines += [masks_line, ""] if masks_line else []
    lines += _official_table(scores, sizes) + [""]
    lines += _working_table(scores, resolution, n_outputs) + [""]
    lines += _ged_line({s.row.name: s.means for s in scores}, len(final), n_outputs) + [""]
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


def _risk_section(inputs: EvaluateInputs, review_queue_csv, split: str, fail_dice: float) -> list[str]:
    """The risk score on the evaluation split: rankings, risk-coverage (table.md lines) and the review queue."""
    if inputs.calibration_h5 is None:
        raise ValueError("evaluate: the risk score needs the calibration file (calibration_h5)")
    model = load_risk_model(inputs.risk_json)
    table = split_features(inputs.dataset_h5, inputs.inference_h5s[1], inputs.crf_h5, inputs.calibration_h5, split)
    risk = apply_risk(model, table)
    if review_queue_csv is not None:
        write_review_queue(review_queue_csv, table, risk)
    if model.fail_dice != fail_dice:
        logger.warning("%s was fitted for Dice < %g but the table reports failures as Dice < %g",
                       inputs.risk_json, model.fail_dice, fail_dice)
    return risk_markdown(table, risk, model, fail_dice)


def _returned_means(scores: Sequence[RowScores]) -> dict[str, dict]:
    """{row name: working-resolution means, ``official`` (the official means), ``timestep`` (best-t rows)}."""
    means = {}
    for s in scores:
        means[s.row.name] = {**s.means, "official": s.official_means}
        if s.row.best_t is not None:
            means[s.row.name]["timestep"] = s.row.best_t
    return means


def run_evaluate(inputs: EvaluateInputs, outputs: EvaluateOutputs, *, split: str = "test",
                 fail_dice: float = 0.7) -> dict[str, dict[str, float]]:
    """Score every row on ``split``; write the per-image CSV and table.md. Returns macro means per row name.

    Every row's masks are written at each image's original size under ``outputs.png_dir`` (one folder
    per row) and scored there by the official scorer against the original masks of
    ``inputs.truth_dir``; the working-resolution scores follow. Each row's dict holds the
    working-resolution metrics, ``official`` (the official ones) and, for the best-timestep rows,
    ``timestep`` (chosen on val). With ``inputs.risk_json`` table.md holds the risk score's section and
    ``outputs.review_queue_csv`` is written.
    """
    if split == "val":
        logger.warning("evaluating on 'val', the split the best timestep is chosen on: that row is optimistic")
    truth_data = read_labelled(inputs.dataset_h5, split, ["orig_size"])
    ids, truth = truth_data["ids"], truth_data["masks"].astype(bool)
    if not ids:
        raise InputError(inputs.dataset_h5, f"split '{split}' holds no images")
    truth_files = truth_mask_files(inputs.truth_dir, ids)
    rows, n_outputs = _diffseg_rows(inputs, split, ids, truth)
    rows += _baseline_rows(inputs.baselines, ids, truth)
    _check_unique_slugs(rows)
    scores = [score_row(row, ids, truth, truth_data["orig_size"], outputs.png_dir, truth_files) for row in rows]
    risk_lines = None
    if inputs.risk_json is not None:
        risk_lines = _risk_section(inputs, outputs.review_queue_csv, split, fail_dice)
    reliability = reliability_table(_consistency(inputs.uncertainty_h5, ids), truth)
    if outputs.reliability_csv is not None:
        with atomic_path(outputs.reliability_csv) as tmp:
            reliability.to_csv(tmp, index=False)
    with atomic_path(outputs.per_image_csv) as tmp:
        pd.concat([s.per_image for s in scores], ignore_index=True).to_csv(tmp, index=False)
    markdown = render_table(scores, split, fail_dice, resolution=truth.shape[-1], n_outputs=n_outputs,
                            sizes=size_range(truth_data["orig_size"]), risk_lines=risk_lines,
                            calibration_lines=_calibration_lines(reliability),
                            masks_line=masks_read_line(inputs.dataset_h5))
    with atomic_path(outputs.table_md) as tmp:
        tmp.write_text(markdown)
    logger.info("evaluate %s (official, original size): %s", split,
                {s.row.name: round(s.official_means["dice"], 3) for s in scores})
    return _returned_means(scores)
