"""Per-image segmentation metrics (paper eq. 13) with the ISIC 2018 scorer's conventions.

Degenerate cases follow isic-challenge-scoring: Dice and Jaccard are 1 when both masks are empty;
precision is 1 when the prediction is empty and recall is 1 when the truth is empty (the scorer
calls these "freebies"). Aggregation is the macro mean over images. ``mask_metrics`` scores in-memory masks (the working
resolution); ``score_png_pairs`` / ``score_png_folder`` score PNG files at the original size with the
official scorer's own code (the numbers of ISIC 2018 Task 1); tests check both agree. The original-size
score adds HD95 (``hd95``, pixels of the original image), which is undefined (NaN) where a mask is empty.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.stats import rankdata

from diffseg.imageio import InputError

logger = logging.getLogger(__name__)

METRICS = ("dice", "jaccard", "precision", "recall", "threshold_jaccard")
OFFICIAL_METRICS = (*METRICS, "hd95")  # the original-size score: the overlap metrics and the surface distance
HD95_PERCENTILE = 95
ISIC_JACCARD_THRESHOLD = 0.65
PNG_SUFFIX = "_segmentation.png"


def _ratio(num: int, den: int) -> float:
    """num / den, and 1 when den is 0 (the scorer's convention for an undefined metric)."""
    return 1.0 if den == 0 else num / den


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks; both empty -> 1 (ISIC convention). The fast path for fitting loops."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    overlap = int(np.count_nonzero(pred & truth))
    return _ratio(2 * overlap, int(np.count_nonzero(pred)) + int(np.count_nonzero(truth)))


def mask_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice, Jaccard, precision, recall and ISIC threshold Jaccard of one predicted mask."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask_metrics: prediction is {pred.shape} but truth is {truth.shape}")
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    jaccard = _ratio(tp, tp + fp + fn)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "jaccard": jaccard,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "threshold_jaccard": jaccard if jaccard >= ISIC_JACCARD_THRESHOLD else 0.0,
    }


def hd95(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """95th-percentile symmetric Hausdorff distance between the two masks' surfaces, in pixels; None when
    either mask is empty (no surface to measure from).

    A mask's surface is its pixels with a 4-neighbour outside it (the image border counts as outside).
    For each direction, every surface pixel of one mask gets its Euclidean distance to the nearest surface
    pixel of the other (a distance transform); the larger of the two directions' 95th percentiles is the
    result (as the Hausdorff distance is the larger of its two directed distances). Computed inside the
    masks' joint bounding box plus one pixel, which gives the same surfaces and distances at a fraction of
    the cost of a large image.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"hd95: prediction is {pred.shape} but truth is {truth.shape}")
    if not pred.any() or not truth.any():
        return None
    box = ndimage.find_objects((pred | truth).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    surfaces = [_surface(mask[box]) for mask in (pred, truth)]
    directed = [np.percentile(ndimage.distance_transform_edt(~to)[start], HD95_PERCENTILE)
                for start, to in (surfaces, surfaces[::-1])]
    return float(max(directed))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask; outside the array counts as outside the mask."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def aggregate(per_image: pd.DataFrame) -> pd.Series:
    """Macro means (one value per metric, every image weighted equally) of a per-image table.

    HD95 is averaged over the images that have one (NaN where a mask is empty) and left out where no
    image has one.
    """
    columns = [c for c in OFFICIAL_METRICS if c in per_image.columns and (c != "hd95" or per_image[c].notna().any())]
    if per_image.empty or not columns:
        raise ValueError(f"aggregate: need a non-empty table with columns among {OFFICIAL_METRICS}, "
                         f"got {len(per_image)} rows and columns {list(per_image.columns)}")
    return per_image[columns].mean(axis="index").rename("macro_average")


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """AUROC of ``scores`` ranking positives above negatives (rank formula, ties averaged); None if a class is empty."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)  # average ranks for ties: a tie counts as half a correct ordering
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Average precision of ``scores`` for the positives (area under the step precision-recall curve, ties
    grouped as by scikit-learn); None if there is no positive."""
    from sklearn.metrics import average_precision_score

    positive = np.asarray(positive, bool)
    if not positive.any():
        return None
    return float(average_precision_score(positive, np.asarray(scores, float)))


def _ids_in(folder: Path) -> dict[str, Path]:
    """Map image id -> file for every <id>_segmentation.png in a folder."""
    if not folder.is_dir():
        raise InputError(folder, "folder not found")
    return {p.name[: -len(PNG_SUFFIX)]: p for p in sorted(folder.iterdir())
            if p.name.endswith(PNG_SUFFIX) and not p.name.startswith(".")}


def official_metrics(pred_png: str | os.PathLike, truth_png: str | os.PathLike) -> dict[str, float]:
    """One image scored by the official ISIC 2018 scorer (isic-challenge-scoring): its image loading,
    its binarisation (> 128), its confusion matrix and its metric functions (precision = its PPV); and
    ``hd95`` of the same binary masks (pixels at this size; None where a mask is empty).

    A size mismatch or an unreadable / non-greyscale file is an InputError naming the file.
    """
    from isic_challenge_scoring import metrics as isic
    from isic_challenge_scoring.confusion import create_binary_confusion_matrix
    from isic_challenge_scoring.load_image import load_segmentation_image
    from isic_challenge_scoring.types import ScoreError

    images = []
    for path in (pred_png, truth_png):
        try:
            images.append(load_segmentation_image(Path(path)))
        except ScoreError as err:
            raise InputError(path, str(err)) from err
    pred, truth = images
    if pred.shape != truth.shape:
        raise InputError(pred_png, f"mask is {pred.shape[1]}x{pred.shape[0]} px; "
                         f"ground truth {Path(truth_png).name} is {truth.shape[1]}x{truth.shape[0]}")
    pred, truth = pred > 128, truth > 128
    cm = create_binary_confusion_matrix(truth_binary_values=truth, prediction_binary_values=pred)
    return {"dice": isic.binary_dice(cm), "jaccard": isic.binary_jaccard(cm), "precision": isic.binary_ppv(cm),
            "recall": isic.binary_sensitivity(cm),
            "threshold_jaccard": isic.binary_threshold_jaccard(cm, threshold=ISIC_JACCARD_THRESHOLD),
            "hd95": hd95(pred, truth)}


def score_png_pairs(pairs: Sequence[tuple[str, str | os.PathLike, str | os.PathLike]]) -> pd.DataFrame:
    """Official per-image scores of (id, prediction PNG, ground-truth PNG) triples: one row per image
    (columns id and OFFICIAL_METRICS; hd95 NaN where a mask is empty).

    A missing prediction is an error naming the file, as in the official scorer.
    """
    rows = []
    for image_id, pred_png, truth_png in pairs:
        if not Path(pred_png).is_file():
            raise InputError(pred_png, "prediction missing")
        rows.append({"id": image_id, **official_metrics(pred_png, truth_png)})
    return pd.DataFrame(rows, columns=["id", *OFFICIAL_METRICS]).astype({"hd95": float})


def score_png_folder(pred_dir: str | os.PathLike, truth_dir: str | os.PathLike) -> pd.DataFrame:
    """Score every <id>_segmentation.png of truth_dir against the same name in pred_dir (score_png_pairs).

    Returns one row per image (id plus the metrics). A missing prediction or a size mismatch is an
    error naming the file, as in the official scorer.
    """
    truths, preds = _ids_in(Path(truth_dir)), _ids_in(Path(pred_dir))
    if not truths:
        raise InputError(truth_dir, f"no *{PNG_SUFFIX} ground-truth masks found")
    extra = sorted(set(preds) - set(truths))
    if extra:
        logger.warning("%d predictions in %s have no ground truth and are ignored (e.g. %s)",
                       len(extra), pred_dir, extra[0])
    return score_png_pairs([(image_id, Path(pred_dir) / f"{image_id}{PNG_SUFFIX}", truth_file)
                            for image_id, truth_file in truths.items()])
