"""Uncertainty of the T binary outputs: consistency, ambiguity and GED (paper eqs. 3-7).

All arithmetic is done in floating point: the authors' code subtracts uint8 masks, which wraps
around (0 - 1 = 255) and inflates every distance.
"""

from __future__ import annotations

import logging
import os

import h5py
import numpy as np
import pandas as pd

from diffseg.atomic import atomic_path
from diffseg.calibration import load_calibration
from diffseg.h5io import decode_ids, open_h5, require, write_ids
from diffseg.imageio import InputError
from diffseg.postprocess import binary_outputs, needs_maps
from diffseg.shards import image_chunks

logger = logging.getLogger(__name__)


def _as_stack(masks: np.ndarray, name: str) -> np.ndarray:
    """Check a (N, H, W) stack of masks and return it as float64."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, H, W) stack, got shape {masks.shape}")
    return masks.astype(np.float64)


def consistency(binary: np.ndarray) -> np.ndarray:
    """Per-pixel mean of the N binary outputs (eq. 3), float32 (H, W)."""
    return _as_stack(binary, "binary").mean(axis=0).astype(np.float32)


def ambiguity(binary: np.ndarray) -> np.ndarray:
    """Per-pixel population variance of the N binary outputs (eq. 4), float32 (H, W)."""
    return _as_stack(binary, "binary").var(axis=0).astype(np.float32)


def _pairwise_rms(x: np.ndarray) -> np.ndarray:
    """(N, N) root-mean-square differences between the rows of x (N, P), from a Gram matrix."""
    gram = x @ x.T
    sq_norms = np.diag(gram)
    sq_dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram
    return np.sqrt(np.clip(sq_dist, 0.0, None) / x.shape[1])


def ged_paper(binary: np.ndarray) -> float:
    """GED as the paper writes it (eqs. 5-7): (2/N^2) * sum_{i<j} RMS(y_i - y_j).

    For binary masks it is at most sqrt((N-1)/(2N)).
    """
    stack = _as_stack(binary, "binary")
    n = stack.shape[0]
    dist = _pairwise_rms(stack.reshape(n, -1))
    return float(2.0 / n**2 * np.triu(dist, k=1).sum())


def _iou_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) matrix of 1 - IoU between flattened binary rows; two empty masks -> 0."""
    inter = a @ b.T
    union = a.sum(axis=1)[:, None] + b.sum(axis=1)[None, :] - inter
    iou = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
    return 1.0 - iou


def ged_kohl(samples: np.ndarray, truth: np.ndarray) -> float:
    """Generalised energy distance of Kohl et al.: 2E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')], d = 1 - IoU.

    ``truth`` is one mask (H, W) or several annotations (K, H, W). Expectations run over all
    ordered pairs, the diagonal (i = j, distance 0) included, as in Kohl et al.'s code.
    """
    s = _as_stack(samples, "samples")
    y = np.asarray(truth)
    y = _as_stack(y[None] if y.ndim == 2 else y, "truth")
    if s.shape[1:] != y.shape[1:]:
        raise ValueError(f"ged_kohl: samples are {s.shape[1:]} but truth is {y.shape[1:]}")
    s, y = s.reshape(len(s), -1) > 0, y.reshape(len(y), -1) > 0
    s, y = s.astype(np.float64), y.astype(np.float64)
    cross = _iou_distance(s, y).mean()
    within_s = _iou_distance(s, s).mean()
    within_y = _iou_distance(y, y).mean()
    return float(2.0 * cross - within_s - within_y)


def ambiguity_area(consistency: np.ndarray) -> np.ndarray:
    """Fraction of pixels where the outputs disagree (0 < consistency < 1); consistency (..., H, W)."""
    c = np.asarray(consistency)
    return ((c > 0) & (c < 1)).mean(axis=(-2, -1))


def crf_disagreement(rounds: np.ndarray) -> np.ndarray:
    """Fraction of pixels where the K CRF rounds (..., K, H, W) differ."""
    r = np.asarray(rounds)
    return (r.min(axis=-3) != r.max(axis=-3)).mean(axis=(-2, -1))


def mask_free_scores(consistency: np.ndarray, rounds: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image scores that need no ground truth, from consistency (N, R, R) and CRF rounds (N, K, R, R)."""
    return {"ambiguity_area": ambiguity_area(consistency), "crf_disagreement": crf_disagreement(rounds)}


def _read_binary(inference_h5: str | os.PathLike) -> tuple[list[str], h5py.Dataset, h5py.File]:
    """Open inference.h5 and return (ids, binary dataset, open file); the caller closes the file."""
    f = open_h5(inference_h5)
    try:
        require(f, ("ids", "binary"), inference_h5)
    except InputError:
        f.close()
        raise
    ids = decode_ids(f["ids"])
    binary = f["binary"]
    if binary.ndim != 4 or binary.shape[0] != len(ids):  # N = 0 is an empty shard
        f.close()
        raise InputError(inference_h5, f"'binary' has shape {binary.shape}; expected (N={len(ids)}, T, R, R)")
    return ids, binary, f


def run_uncertainty(inference_h5: str | os.PathLike, out_h5: str | os.PathLike,
                    out_csv: str | os.PathLike, calibration_h5: str | os.PathLike | None = None) -> dict:
    """Consistency, ambiguity and paper GED for every image of inference.h5; writes HDF5 and CSV.

    The binary outputs are those of the calibration in ``calibration_h5`` (diffseg.calibration);
    None or a 'paper' calibration = the binary outputs stored by inference.
    """
    cal = load_calibration(calibration_h5) if calibration_h5 is not None else None
    ids, binary, f = _read_binary(inference_h5)
    with f:
        if needs_maps(cal) and "maps" not in f:
            raise InputError(inference_h5, "missing dataset 'maps' (needed by the calibration)")
        n, _, r, _ = binary.shape
        cons = np.empty((n, r, r), np.float32)
        amb = np.empty((n, r, r), np.float32)
        ged = np.empty(n, np.float64)
        for i in range(n):  # one image at a time: the whole (N, T, R, R) stack may not fit in memory
            outputs = binary_outputs(cal, binary[i], f["maps"][i] if needs_maps(cal) else None)
            if outputs.max(initial=0) > 1:
                raise InputError(inference_h5, f"'binary' of image {ids[i]} holds values above 1")
            cons[i], amb[i], ged[i] = consistency(outputs), ambiguity(outputs), ged_paper(outputs)
    area = (amb > 0).mean(axis=(1, 2))
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as out:
        write_ids(out, ids)
        out.create_dataset("consistency", data=cons, compression="gzip", chunks=image_chunks(cons.shape))
        out.create_dataset("ambiguity", data=amb, compression="gzip", chunks=image_chunks(amb.shape))
        out.create_dataset("ged", data=ged)
        out.attrs["inference"] = str(inference_h5)
        out.attrs["calibration"] = "none" if cal is None else cal.method
    with atomic_path(out_csv) as tmp:
        pd.DataFrame({"id": ids, "ged": ged, "ambiguity_area": area}).to_csv(tmp, index=False)
    summary = {"n_images": int(n), "mean_ged": float(ged.mean()) if n else float("nan"),
               "mean_ambiguity_area": float(area.mean()) if n else float("nan")}

    logger.info("uncertainty: %s", summary)
    return summary
