"""Final masks at each image's original size, as <id>_segmentation.png (0/255) for the ISIC scorer."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from diffseg.crf import write_original_size_pngs
from diffseg.evaluate import match_rows, read_h5
from diffseg.imageio import InputError

logger = logging.getLogger(__name__)


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
