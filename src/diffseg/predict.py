"""Prediction on new images (no masks): per image the mask at original size, the uncertainty maps, GED,
a review queue and a contact sheet.

The per-image stages are the workflow's own (inference, calibration, uncertainty, CRF fusion, run on
the ``predict`` group made by diffseg.data.prepare_images with a model bundle's checkpoint and
calibration); this module only writes what a reader of the results needs from their outputs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from diffseg.data import PREDICT
from diffseg.h5io import match_rows, read_h5
from diffseg.export import export_masks
from diffseg.imageio import resize_float, write_grey_png
from diffseg.bundle import optional_member
from diffseg.review import write_review_queue
from diffseg.risk import apply_risk, load_risk_model, split_features
from diffseg.uncertainty import mask_free_scores

logger = logging.getLogger(__name__)

AMBIGUITY_MAX = 0.25  # variance of 0/1 outputs peaks at 0.25 (half of them disagree): white in the PNG


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


def write_predictions(images_h5: str | os.PathLike, uncertainty_h5: str | os.PathLike, crf_h5: str | os.PathLike,
                      image_dir: str | os.PathLike, masks_dir: str | os.PathLike, maps_dir: str | os.PathLike,
                      queue_csv: str | os.PathLike, sheet_png: str | os.PathLike, *, split: str = PREDICT,
                      manifest_json: str | os.PathLike | None = None, risk_inputs: tuple | None = None,
                      sheet_images: int = 48, dpi: int = 120) -> dict:
    """Masks at original size, uncertainty maps, review_queue.csv and the contact sheet (rule predict_outputs).

    ``image_dir`` is the folder the images came from (the contact sheet shows them at their own
    resolution); ``manifest_json`` is the unpacked bundle's manifest: a model trained on the synthetic
    demo data says so on the sheet. ``risk_inputs`` = (bundle, inference_h5, calibration_h5): when the
    bundle holds a risk model, each image's risk joins the queue, which is then sorted by it.
    """
    from diffseg.figures_review import draw_contact_sheet  # matplotlib: only for the sheet

    n = export_masks(images_h5, crf_h5, masks_dir, split=split)
    scores, arrays = prediction_scores(images_h5, uncertainty_h5, crf_h5, split)
    write_uncertainty_maps(scores["id"], arrays, maps_dir)
    risk = None if risk_inputs is None else bundle_risk(risk_inputs[0], images_h5, risk_inputs[1], crf_h5,
                                                        risk_inputs[2], scores["id"], split)
    if risk is not None:
        scores.insert(1, "risk", risk)
    scores["mask"] = [f"{Path(masks_dir).name}/{i}_segmentation.png" for i in scores["id"]]
    queue = write_review_queue(scores, queue_csv)
    draw_contact_sheet(queue.head(sheet_images), image_dir, masks_dir, sheet_png, n_total=len(queue),
                       dpi=dpi, note=_training_note(manifest_json))
    logger.info("predictions for %d images: queue %s (sorted by %s), sheet %s", n, queue_csv,
                queue["sorted_by"].iloc[0], sheet_png)
    return {"n_images": n, "sorted_by": str(queue["sorted_by"].iloc[0]), "first": str(queue["id"].iloc[0])}
