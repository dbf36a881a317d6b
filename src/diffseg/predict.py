"""Prediction on new images (no masks): per image the mask at original size, the uncertainty maps, GED,
a review queue and a contact sheet; where masks of the images are given, their official score.

The per-image stages are the workflow's own (inference, calibration, uncertainty, CRF fusion, run on
the ``predict`` group made by diffseg.data.prepare_images with a model bundle's checkpoint and
calibration); this module only writes what a reader of the results needs from their outputs.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from diffseg.atomic import atomic_path
from diffseg.data import PREDICT, mask_files
from diffseg.h5io import match_rows, read_h5
from diffseg.export import export_masks
from diffseg.imageio import InputError, resize_float, write_grey_png
from diffseg.bundle import optional_member
from diffseg.metrics import PNG_SUFFIX, aggregate, auroc, score_png_pairs
from diffseg.review import write_review_queue
from diffseg.risk import apply_risk, format_score, load_risk_model, split_features
from diffseg.uncertainty import mask_free_scores

logger = logging.getLogger(__name__)

AMBIGUITY_MAX = 0.25  # variance of 0/1 outputs peaks at 0.25 (half of them disagree): white in the PNG
MIN_GROUP = 5  # failures and successes each needed before the risk score's AUROC is reported


@dataclass(frozen=True)
class PredictionFiles:
    """The files of rule predict_outputs: the per-image stages' outputs and the image folder it reads, and
    the masks, maps, review queue and contact sheet it writes."""

    images_h5: str | os.PathLike
    uncertainty_h5: str | os.PathLike
    crf_h5: str | os.PathLike
    image_dir: str | os.PathLike
    masks_dir: str | os.PathLike
    maps_dir: str | os.PathLike
    queue_csv: str | os.PathLike
    sheet_png: str | os.PathLike


def prediction_scores(images_h5, uncertainty_h5, crf_h5, split: str = PREDICT) -> tuple[pd.DataFrame, dict]:
    """One row per image (id, ged, ambiguity_area, crf_disagreement, lesion_fraction, width, height), and
    the arrays the outputs are drawn from, all in the images' order."""
    data = read_h5(images_h5, ["orig_size"], group=split)
    unc = read_h5(uncertainty_h5, ["consistency", "ambiguity", "ged"])
    crf = read_h5(crf_h5, ["fused", "rounds"])
    ids = data["ids"]
    unc_rows, crf_rows = match_rows(ids, unc["ids"], uncertainty_h5), match_rows(ids, crf["ids"], crf_h5)
    arrays = {"consistency": unc["consistency"][unc_rows], "ambiguity": unc["ambiguity"][unc_rows],
              "fused": crf["fused"][crf_rows] > 0, "orig_size": data["orig_size"]}
    scores = pd.DataFrame({
        "id": ids,
        "ged": unc["ged"][unc_rows].astype(float),
        **mask_free_scores(arrays["consistency"], crf["rounds"][crf_rows]),
        "lesion_fraction": arrays["fused"].mean(axis=(1, 2)),
        "height": data["orig_size"][:, 0],
        "width": data["orig_size"][:, 1],
    })
    return scores, arrays


def bundle_risk(bundle, images_h5, inference_h5, crf_h5, calibration_h5, ids, split: str = PREDICT) -> np.ndarray | None:
    """Each image's risk (in ``ids``' order) from the bundle's risk model, or None when the bundle has none."""
    text = optional_member(bundle, "risk.json")
    if text is None:
        return None
    model = load_risk_model(f"{bundle}:risk.json", text)
    features = split_features(images_h5, inference_h5, crf_h5, calibration_h5, split).set_index("id")
    return apply_risk(model, features.loc[list(ids)])


def write_uncertainty_maps(ids, arrays: dict, maps_dir: str | os.PathLike) -> None:
    """<id>_consistency.png (0..1 -> 0..255) and <id>_ambiguity.png (0..0.25 -> 0..255) at original size."""
    maps_dir = Path(maps_dir)
    maps_dir.mkdir(parents=True, exist_ok=True)  # a Snakemake directory() output: we create it
    for i, image_id in enumerate(ids):
        height, width = (int(v) for v in arrays["orig_size"][i])
        write_grey_png(maps_dir / f"{image_id}_consistency.png",
                       resize_float(arrays["consistency"][i], height, width), vmax=1.0)
        write_grey_png(maps_dir / f"{image_id}_ambiguity.png",
                       resize_float(arrays["ambiguity"][i], height, width), vmax=AMBIGUITY_MAX)


def _training_note(manifest_json) -> str:
    if manifest_json is None:
        return ""
    data = json.loads(Path(manifest_json).read_text()).get("training_data", "")
    return f"model trained on {data}" if data == "synthetic demo data" else ""


def write_predictions(files: PredictionFiles, *, split: str = PREDICT, manifest_json: str | os.PathLike | None = None,
                      risk_inputs: tuple | None = None, sheet_images: int = 48, dpi: int = 120) -> dict:
    """Masks at original size, uncertainty maps, review_queue.csv and the contact sheet (rule predict_outputs).

    ``files.image_dir`` is the folder the images came from (the contact sheet shows them at their own
    resolution); ``manifest_json`` is the unpacked bundle's manifest: a model trained on the synthetic
    demo data says so on the sheet. ``risk_inputs`` = (bundle, inference_h5, calibration_h5): when the
    bundle holds a risk model, each image's risk joins the queue, which is then sorted by it.
    """
    from diffseg.figures_review import draw_contact_sheet  # matplotlib: only for the sheet

    n = export_masks(files.images_h5, files.crf_h5, files.masks_dir, split=split)
    scores, arrays = prediction_scores(files.images_h5, files.uncertainty_h5, files.crf_h5, split)
    write_uncertainty_maps(scores["id"], arrays, files.maps_dir)
    risk = None if risk_inputs is None else bundle_risk(risk_inputs[0], files.images_h5, risk_inputs[1],
                                                        files.crf_h5, risk_inputs[2], scores["id"], split)
    if risk is not None:
        scores.insert(1, "risk", risk)
    scores["mask"] = [f"{Path(files.masks_dir).name}/{i}_segmentation.png" for i in scores["id"]]
    queue = write_review_queue(scores, files.queue_csv)
    draw_contact_sheet(queue.head(sheet_images), files.image_dir, files.masks_dir, files.sheet_png,
                       n_total=len(queue), dpi=dpi, note=_training_note(manifest_json))
    logger.info("predictions for %d images: queue %s (sorted by %s), sheet %s", n, files.queue_csv,
                queue["sorted_by"].iloc[0], files.sheet_png)
    return {"n_images": n, "sorted_by": str(queue["sorted_by"].iloc[0]), "first": str(queue["id"].iloc[0])}


# ----------------------------------------------------------------------------- scoring against given masks


def score_predictions(images_h5: str | os.PathLike, image_dir: str | os.PathLike, truth_dir: str | os.PathLike,
                      masks_dir: str | os.PathLike, queue_csv: str | os.PathLike, metrics_csv: str | os.PathLike,
                      table_md: str | os.PathLike, *, fail_dice: float = 0.7, split: str = PREDICT) -> pd.DataFrame:
    """Score the final masks of the predicted images against their masks in ``truth_dir`` (rule score_predictions).

    The masks are found as the dataset's are (diffseg.data.mask_files: ``<id>_segmentation.<ext>`` or
    ``<id>.<ext>``; an image without one is an error naming the image file). Each image's final mask
    (``masks_dir``, at its original size) is scored by the official ISIC scorer with HD95
    (diffseg.metrics.score_png_pairs). Writes metrics.csv (one row per image, with the risk where the
    review queue has one) and table.md; returns the per-image table.
    """
    ids = read_h5(images_h5, [], group=split)["ids"]
    truth = mask_files(image_dir, truth_dir)
    absent = [image_id for image_id in ids if image_id not in truth]
    if absent:
        raise InputError(images_h5, f"image id {absent[0]} is not in {image_dir} any more ({len(absent)} of "
                         f"{len(ids)}): rerun rule prepare_images")
    table = score_png_pairs([(image_id, Path(masks_dir) / f"{image_id}{PNG_SUFFIX}", truth[image_id])
                             for image_id in ids])
    queue = pd.read_csv(queue_csv, dtype={"id": str})
    if "risk" in queue:
        table["risk"] = queue["risk"].to_numpy()[match_rows(table["id"], queue["id"].tolist(), queue_csv)]
    with atomic_path(metrics_csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(table_md) as tmp:
        tmp.write_text(score_markdown(table, truth_dir, fail_dice))
    logger.info("%d predictions scored against %s: %s", len(table), truth_dir,
                {k: round(float(v), 3) for k, v in aggregate(table).items()})
    return table


def score_markdown(table: pd.DataFrame, truth_dir, fail_dice: float) -> str:
    """table.md of the scored predictions: macro means, the images without HD95, the risk score's AUROC."""
    means = aggregate(table)
    no_hd95 = int(table["hd95"].isna().sum())
    lines = [f"# Predictions scored against the masks of {truth_dir} (n = {len(table)} images)", "",
             "Each image's final mask at its original size scored by the official ISIC 2018 scorer "
             "(isic-challenge-scoring); per-image metrics in metrics.csv, macro-averaged here.", "",
             "| Dice | Jaccard | threshold Jaccard | HD95 (px) |", "|---|---|---|---|",
             "| " + " | ".join(format_score(means.get(k)) for k in ("dice", "jaccard", "threshold_jaccard", "hd95"))
             + " |", "",
             f"HD95: 95th-percentile symmetric surface distance in pixels at each image's original size, averaged "
             f"over the {len(table) - no_hd95} images where neither mask is empty. Images without an HD95 (empty "
             f"ground truth or empty prediction): {no_hd95}.", ""]
    return "\n".join(lines + _risk_lines(table, fail_dice)) + "\n"


def _risk_lines(table: pd.DataFrame, fail_dice: float) -> list[str]:
    failed = table["dice"].to_numpy() < fail_dice
    n_failed, n_ok = int(failed.sum()), int((~failed).sum())
    lines = ["## Does the risk score warn where the mask is wrong?", "",
             f"{n_failed} of {len(table)} images have Dice < {fail_dice:g} (evaluate.fail_dice).", ""]
    if "risk" not in table:
        return lines + ["The model bundle holds no risk model (the review queue is sorted by GED): no risk "
                        "score to assess."]
    if n_failed < MIN_GROUP or n_ok < MIN_GROUP:
        return lines + [f"AUROC of the risk score for ranking the failures first: not computed, it needs at least "
                        f"{MIN_GROUP} failures and {MIN_GROUP} successes (here {n_failed} and {n_ok})."]
    return lines + [f"AUROC of the risk score for ranking the failures first (0.5 = chance, 1 = perfect): "
                    f"{format_score(auroc(table['risk'], failed))}."]
