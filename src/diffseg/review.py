"""The review queue: images in the order a clinician should look at them, most doubtful first.

One function serves every caller (prediction on new images, the evaluated split).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from diffseg.atomic import atomic_path


def review_order_column(scores: pd.DataFrame) -> str:
    """'risk' when every image has a risk score, else 'ged' (the paper's per-image uncertainty)."""
    if "risk" in scores and scores["risk"].notna().all():
        return "risk"
    if "ged" not in scores:
        raise ValueError(f"review queue: need a 'risk' or 'ged' column, got {list(scores.columns)}")
    return "ged"


def review_queue(scores: pd.DataFrame) -> pd.DataFrame:
    """``scores`` (one row per image: id, ged, optionally risk, ...) sorted most doubtful first.

    Adds ``rank`` (1 = review first) and ``sorted_by``; ties are broken by id so the order is
    reproducible.
    """
    if scores["id"].duplicated().any():
        raise ValueError(f"review queue: duplicate image id {scores['id'][scores['id'].duplicated()].iloc[0]!r}")
    key = review_order_column(scores)
    queue = scores.sort_values([key, "id"], ascending=[False, True], kind="stable").reset_index(drop=True)
    queue.insert(0, "rank", np.arange(1, len(queue) + 1))
    queue.insert(1, "sorted_by", key)
    return queue


def write_review_queue(scores: pd.DataFrame, path: str | os.PathLike) -> pd.DataFrame:
    """Write ``review_queue(scores)`` as CSV (atomically); returns the queue."""
    queue = review_queue(scores)
    with atomic_path(path) as tmp:
        queue.to_csv(tmp, index=False, float_format="%.6g")
    return queue
