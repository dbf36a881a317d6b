"""For the reviewer of predictions on new images: the contact sheet of the review queue (rule
predict_outputs), most doubtful first, each thumbnail with its predicted mask outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from diffseg.figures_common import FINAL_COLOUR, add_note, new_figure, outline, save_png
from diffseg.imageio import read_mask, read_rgb

SHEET_TILE_IN = 2.0  # contact sheet: inches per thumbnail
SHEET_THUMB_PX = 256  # longest side of a contact-sheet thumbnail


def _thumbnail(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) reduced so the longest side is at most SHEET_THUMB_PX (mask by nearest neighbour)."""
    from PIL import Image

    height, width = image.shape[:2]
    scale = min(1.0, SHEET_THUMB_PX / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
    small_mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)) > 0
    return small, small_mask


def draw_contact_sheet(queue: pd.DataFrame, image_dir, masks_dir, out_png, *, n_total: int, columns: int = 6,
                       dpi: int = 120, note: str = "") -> None:
    """Thumbnails of the queue's images (in queue order) with their predicted mask outlined, rank and score."""
    from diffseg.data import image_files  # the data stage (and its imports) only where a sheet is drawn

    files = image_files(Path(image_dir))
    n = len(queue)
    n_cols = max(1, min(columns, n))
    n_rows = max(1, -(-n // n_cols))
    height_in = SHEET_TILE_IN * n_rows + 1.0  # 0.6 in for the title, 0.4 in for the note
    fig = new_figure((max(SHEET_TILE_IN * n_cols, 6.0), height_in))  # 6 in at least: the title fits
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, row in zip(axes, queue.itertuples(index=False)):
        image, mask = _thumbnail(read_rgb(files[row.id]), read_mask(Path(masks_dir) / f"{row.id}_segmentation.png"))
        ax.imshow(image)
        outline(ax, mask, FINAL_COLOUR)
        score = f"risk {row.risk:.2f}" if row.sorted_by == "risk" else f"GED {row.ged:.3f}"
        ax.set_title(f"#{row.rank} {row.id}\n{score}", fontsize=7)
    shown = f"the {n} most doubtful of {n_total} images" if n < n_total else f"all {n_total} images"
    fig.suptitle(f"Review queue: {shown}\nmost doubtful first, predicted mask in green", fontsize=10)
    add_note(fig, note, top=False)
    fig.tight_layout(rect=(0, 0.4 / height_in, 1, 1 - 0.6 / height_in))
    save_png(fig, out_png, dpi)
