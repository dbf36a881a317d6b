"""Rule figures: the summary plot and the clinician's page of each chosen image
(diffseg.figures_clinician) and, with a method folder, the method page of each
(diffseg.figures_method, which runs the model for its noise panels).

The other figures live by audience: the prediction contact sheet in diffseg.figures_review, the
risk-coverage curve and reliability diagram (rule risk_figures) in diffseg.figures_risk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from diffseg.figures_clinician import draw_case_pages, draw_summary, load_case_data, pick_cases, read_final_rows
from diffseg.figures_method import draw_method_pages
from diffseg.settings import InferenceSettings


@dataclass(frozen=True)
class FigureInputs:
    """The files rule figures reads: the dataset, the DDPM checkpoint (method pages), the evaluated
    split's inference, uncertainty and CRF files, evaluate's per-image CSV, and the calibration (None =
    the paper's identity: inference's stored binary outputs)."""

    dataset_h5: str | os.PathLike
    checkpoint: str | os.PathLike
    inference_h5: str | os.PathLike
    uncertainty_h5: str | os.PathLike
    crf_h5: str | os.PathLike
    per_image_csv: str | os.PathLike
    calibration_h5: str | os.PathLike | None = None


@dataclass(frozen=True)
class FigureOutputs:
    """The summary PNG, the folder of clinician pages and (optional) the folder of method pages."""

    summary_png: str | os.PathLike
    cases_dir: str | os.PathLike
    method_dir: str | os.PathLike | None = None


def run_figures(inputs: FigureInputs, outputs: FigureOutputs, *, split: str = "test", inference: dict | None = None,
                ids: Sequence[str] = (), dpi: int = 120, fail_dice: float = 0.7, note: str = "") -> dict:
    """Write the summary PNG, the clinician's <id>.png per chosen image (``ids``, or the best, median and
    worst final Dice) into ``outputs.cases_dir`` and, with ``outputs.method_dir``, the method page
    <id>.png there. ``note`` (e.g. 'synthetic demo data') is printed on every page. Returns the paths
    written."""
    settings = InferenceSettings.from_config(inference)
    final = read_final_rows(inputs.per_image_csv)
    draw_summary(final, outputs.summary_png, fail_dice=fail_dice, dpi=dpi, note=note)
    chosen = [str(i) for i in ids] or pick_cases(final)
    data = load_case_data(inputs.dataset_h5, inputs.inference_h5, inputs.uncertainty_h5, inputs.crf_h5, split,
                          chosen, inputs.calibration_h5)
    written = {"summary": str(outputs.summary_png),
               "cases": draw_case_pages(data, chosen, final, outputs.cases_dir, split=split, dpi=dpi, note=note),
               "method": []}
    if outputs.method_dir is not None:
        written["method"] = draw_method_pages(data, chosen, inputs.checkpoint, settings, inputs.inference_h5,
                                              outputs.method_dir, dpi=dpi, note=note)
    return written
