"""Final masks at each image's original size, as <id>_segmentation.png (0/255) for the ISIC scorer."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from diffseg.h5io import match_rows, read_h5
from diffseg.imageio import InputError, resize_float, write_mask_png

logger = logging.getLogger(__name__)


def write_original_size_pngs(ids, masks: np.ndarray, orig_sizes: np.ndarray, png_dir: str | os.PathLike,
                             *, threshold: float = 0.5) -> None:
    """Write <id>_segmentation.png (0/255) at each image's original (height, width).

    ``masks`` (N, R, R) are bool masks or fractions in [0, 1] (e.g. a vote); they are resized
    bilinearly and binarized at ``threshold``, which gives smoother outlines than nearest.
    """
    if not len(ids) == len(masks) == len(orig_sizes):
        raise ValueError(f"write_original_size_pngs: {len(ids)} ids, {len(masks)} masks and "
                         f"{len(orig_sizes)} sizes must match")
    for image_id, mask, (height, width) in zip(ids, masks, orig_sizes):
        frac = resize_float(mask, height, width)
        write_mask_png(Path(png_dir) / f"{image_id}_segmentation.png", frac >= threshold)


def export_masks(dataset_h5: str | os.PathLike, crf_h5: str | os.PathLike, png_dir: str | os.PathLike, *,
                 split: str = "test") -> int:
    """Write every fused mask of crf_h5 at its original (height, width) into png_dir; returns the count."""
    crf = read_h5(crf_h5, ["fused"])
    if crf["fused"].ndim != 3:
        raise InputError(crf_h5, f"'fused' has shape {crf['fused'].shape}; expected (N, R, R)")
    data = read_h5(dataset_h5, ["orig_size"], group=split)
    # every crf id must be an image of the split: that is where its original size comes from
    rows = match_rows(crf["ids"], data["ids"], dataset_h5, f" from split '{split}'")
    Path(png_dir).mkdir(parents=True, exist_ok=True)  # a Snakemake directory() output: we create it
    write_original_size_pngs(crf["ids"], crf["fused"] > 0, data["orig_size"][rows], png_dir)
    logger.info("wrote %d masks at original size to %s", len(crf["ids"]), png_dir)
    return len(crf["ids"])
