"""DenseCRF fusion of the T soft difference maps (paper eqs. 8-12).

Each of K rounds samples ``subset_size`` of the T maps without replacement, refines each with a
two-label DenseCRF on the RGB image, averages the refined maps and binarizes them (y_k); the final
mask is the vote of the y_k. The maps are used as lesion probabilities as given: whether they are
raw normalised maps or calibrated ones is the caller's choice.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pydensecrf.densecrf as dcrf
from PIL import Image
from pydensecrf.utils import unary_from_softmax
from tqdm import tqdm

from diffseg.atomic import atomic_path
from diffseg.calibration import PAPER, Calibration, apply_calibration, load_calibration
from diffseg.imageio import InputError, write_mask_png
from diffseg.seeding import image_rng
from diffseg.shards import image_chunks

logger = logging.getLogger(__name__)

PROB_CLIP = 1e-5  # keeps -log(p) finite for maps that are exactly 0 or 1
MAX_CHUNK = 16  # images per worker task: large enough to amortise IPC, small enough for progress


def dense_crf(image: np.ndarray, prob: np.ndarray, *, iterations: int = 5, gaussian_sxy: float = 3,
              gaussian_compat: float = 3, bilateral_sxy: float = 80, bilateral_srgb: float = 13,
              bilateral_compat: float = 10) -> np.ndarray:
    """Two-label DenseCRF posterior P(lesion), float32 (H, W), from a lesion probability map."""
    prob = np.asarray(prob, np.float32)
    if prob.ndim != 2 or np.shape(image) != (*prob.shape, 3):
        raise ValueError(f"dense_crf: image {np.shape(image)} must be (H, W, 3) for a map {prob.shape}")
    if not np.isfinite(prob).all():
        raise ValueError("dense_crf: probability map holds NaN or infinite values")
    h, w = prob.shape
    p = np.clip(prob, PROB_CLIP, 1.0 - PROB_CLIP)
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1.0 - p, p]))))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb,
                             rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=bilateral_compat)
    posterior = np.asarray(crf.inference(iterations), np.float32).reshape(2, h, w)
    return posterior[1].copy()


def _check_subset(subset_size: int, n_maps: int) -> None:
    if not 1 <= subset_size <= n_maps:
        raise ValueError(f"crf.subset_size = {subset_size} must be between 1 and the number of "
                         f"maps per image T = {n_maps}")


def crf_fusion(image: np.ndarray, soft_maps: np.ndarray, rng: np.random.Generator, *, rounds: int = 3,
               subset_size: int = 4, threshold: float = 0.5, iterations: int = 5,
               gaussian_sxy: float = 3, gaussian_compat: float = 3, bilateral_sxy: float = 80,
               bilateral_srgb: float = 13, bilateral_compat: float = 10) -> tuple[np.ndarray, np.ndarray]:
    """Fuse T soft maps (T, H, W) into (fused bool (H, W), per-round masks uint8 (K, H, W))."""
    soft_maps = np.asarray(soft_maps, np.float32)
    if soft_maps.ndim != 3:
        raise ValueError(f"crf_fusion: soft_maps must be (T, H, W), got {soft_maps.shape}")
    if rounds < 1:
        raise ValueError(f"crf.rounds = {rounds} must be at least 1")
    _check_subset(subset_size, soft_maps.shape[0])
    crf_kwargs = dict(iterations=iterations, gaussian_sxy=gaussian_sxy, gaussian_compat=gaussian_compat,
                      bilateral_sxy=bilateral_sxy, bilateral_srgb=bilateral_srgb,
                      bilateral_compat=bilateral_compat)
    per_round = np.empty((rounds, *soft_maps.shape[1:]), np.uint8)
    for k in range(rounds):
        picks = rng.choice(soft_maps.shape[0], size=subset_size, replace=False)
        refined = np.mean([dense_crf(image, soft_maps[i], **crf_kwargs) for i in picks], axis=0)
        per_round[k] = refined >= threshold
    fused = per_round.mean(axis=0) >= threshold
    return fused, per_round


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
        frac = np.asarray(mask, np.float32)
        if frac.shape != (height, width):
            frac = np.asarray(Image.fromarray(frac).resize((int(width), int(height)),
                                                                      Image.Resampling.BILINEAR))
        write_mask_png(Path(png_dir) / f"{image_id}_segmentation.png", frac >= threshold)


def _read_inference(inference_h5: str | os.PathLike) -> tuple[np.ndarray, tuple[int, ...]]:
    """ids and the (N, T, R, R) shape of the maps in inference.h5."""
    with h5py.File(inference_h5, "r") as f:
        for key in ("ids", "maps"):
            if key not in f:
                raise InputError(inference_h5, f"missing dataset '{key}' (expected inference.h5 layout)")
        ids, shape = f["ids"].asstr()[:], f["maps"].shape
    if len(shape) != 4 or shape[0] != len(ids) or shape[2] != shape[3]:  # N = 0: an empty shard
        raise InputError(inference_h5, f"'maps' has shape {shape}; expected (N={len(ids)}, T, R, R)")
    return ids, shape


def _match_split(dataset_h5, split: str, ids: np.ndarray, resolution: int, inference_h5) -> tuple:
    """Row of each inference id in the dataset split, and the original sizes in inference order."""
    with h5py.File(dataset_h5, "r") as f:
        if split not in f:
            raise InputError(dataset_h5, f"no split '{split}' (groups: {sorted(f)})")
        group = f[split]
        for key in ("ids", "images", "orig_size"):
            if key not in group:
                raise InputError(dataset_h5, f"missing dataset '{split}/{key}'")
        row_of = {image_id: row for row, image_id in enumerate(group["ids"].asstr()[:])}
        image_res = group["images"].shape[1:3]
        orig_size = group["orig_size"][:]
    if image_res != (resolution, resolution):
        raise InputError(inference_h5, f"maps are {resolution}x{resolution} but the images of "
                         f"'{split}' in {dataset_h5} are {image_res[1]}x{image_res[0]}")
    missing = [i for i in ids if i not in row_of]
    if missing:
        raise InputError(inference_h5, f"image id {missing[0]} (and {len(missing) - 1} more) not "
                         f"found in split '{split}' of {dataset_h5}")
    rows = np.array([row_of[i] for i in ids], dtype=np.int64)
    return rows, orig_size[rows]


def _fuse_chunk(job: tuple, *, dataset_h5, inference_h5, split, png_dir, seed, fusion_kwargs,
                calibrations: tuple[Calibration, ...] = (PAPER,)) -> list[tuple]:
    """Fuse images start..stop of inference.h5 once per calibration (one worker task); PNGs of the first.

    Each calibration turns the stored maps into the CRF's lesion probabilities (diffseg.calibration);
    every calibration of an image uses the same subset draws (a fresh rng from the same seed).
    """
    start, stop, rows, orig_sizes = job
    results = [([], []) for _ in calibrations]
    with h5py.File(dataset_h5, "r") as data, h5py.File(inference_h5, "r") as inf:
        ids = inf["ids"].asstr()[start:stop]
        for k, image_id in enumerate(ids):
            image = data[split]["images"][rows[k]]
            maps = inf["maps"][start + k]
            for (fused, rounds), cal in zip(results, calibrations):
                prob, _ = apply_calibration(maps, cal)
                mask, per_round = crf_fusion(image, prob, image_rng(seed, image_id), **fusion_kwargs)
                fused.append(mask)
                rounds.append(per_round)
    out = [(np.stack(fused).astype(np.uint8), np.stack(rounds)) for fused, rounds in results]
    if png_dir is not None:
        write_original_size_pngs(ids, out[0][1].mean(axis=1), orig_sizes, png_dir,
                                 threshold=fusion_kwargs["threshold"])
    return out


def _jobs(n: int, threads: int, rows: np.ndarray, orig_sizes: np.ndarray) -> list[tuple]:
    """Split 0..n into chunks: about four per worker, for load balance, at most MAX_CHUNK images."""
    size = max(1, min(MAX_CHUNK, math.ceil(n / (4 * threads))))
    return [(s, min(s + size, n), rows[s:s + size], orig_sizes[s:s + size]) for s in range(0, n, size)]


def _run_jobs(task, jobs: list[tuple], threads: int):
    """Yield task(job) in job order, inline or on a process pool of `threads` workers."""
    if threads == 1:
        yield from map(task, jobs)
        return
    # fork, not spawn: spawn re-imports the caller's __main__, and Snakemake scripts have no
    # __main__ guard. Forking is safe here: the workers only run numpy, h5py and pydensecrf (no
    # torch/OpenMP), and the parent holds no open HDF5 file.
    with ProcessPoolExecutor(threads, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(task, jobs)


def run_crf(dataset_h5: str | os.PathLike, inference_h5: str | os.PathLike, out_h5: str | os.PathLike,
            png_dir: str | os.PathLike | None, *, split: str = "test", threads: int = 1, rounds: int = 3,
            subset_size: int = 4, iterations: int = 5, gaussian_sxy: float = 3,
            gaussian_compat: float = 3, bilateral_sxy: float = 80, bilateral_srgb: float = 13,
            bilateral_compat: float = 10, seed: int = 0, threshold: float = 0.5,
            calibration_h5: str | os.PathLike | None = None) -> dict:
    """CRF fusion of every image in inference.h5; writes crf/{split}.h5 and original-size PNG masks.

    The CRF's lesion probabilities come from the calibration in ``calibration_h5`` (None = the paper's
    identity: the normalised maps). With a non-paper calibration the paper-faithful fusion is written
    too, as ``paper_fused``/``paper_rounds``. With ``png_dir=None`` no PNG is written (the workflow
    exports them after gathering shards).
    """
    if threads < 1:
        raise ValueError(f"crf.threads = {threads} must be at least 1")
    ids, (n, n_maps, res, _) = _read_inference(inference_h5)
    _check_subset(subset_size, n_maps)
    rows, orig_sizes = _match_split(dataset_h5, split, ids, res, inference_h5)
    cal = load_calibration(calibration_h5) if calibration_h5 is not None else PAPER
    calibrations = (cal,) if cal.method == "paper" else (cal, PAPER)
    fusion_kwargs = dict(rounds=rounds, subset_size=subset_size, threshold=threshold,
                         iterations=iterations, gaussian_sxy=gaussian_sxy, gaussian_compat=gaussian_compat,
                         bilateral_sxy=bilateral_sxy, bilateral_srgb=bilateral_srgb,
                         bilateral_compat=bilateral_compat)
    task = partial(_fuse_chunk, dataset_h5=str(dataset_h5), inference_h5=str(inference_h5), split=split,
                   png_dir=None if png_dir is None else str(png_dir), seed=seed, fusion_kwargs=fusion_kwargs,
                   calibrations=calibrations)
    fused = np.empty((len(calibrations), n, res, res), np.uint8)
    per_round = np.empty((len(calibrations), n, rounds, res, res), np.uint8)
    jobs = _jobs(n, threads, rows, orig_sizes)
    began = time.perf_counter()
    with tqdm(total=n, desc=f"crf {split}", mininterval=5, unit="img") as bar:
        for (start, stop, *_), chunk in zip(jobs, _run_jobs(task, jobs, threads)):
            for c, (chunk_fused, chunk_rounds) in enumerate(chunk):
                fused[c, start:stop], per_round[c, start:stop] = chunk_fused, chunk_rounds
            bar.update(stop - start)
    seconds = time.perf_counter() - began
    extra = {"paper_fused": fused[1], "paper_rounds": per_round[1]} if len(calibrations) > 1 else {}
    _write_crf_h5(out_h5, ids, fused[0], per_round[0], {**fusion_kwargs, "seed": seed, "split": split,
                                                         "inference": str(inference_h5),
                                                         "calibration": cal.method}, extra)
    summary = {"n_images": int(n), "seconds": seconds, "images_per_s": n / max(seconds, 1e-9),
               "mean_lesion_fraction": float(fused[0].mean()) if n else 0.0}
    logger.info("crf fusion: %s", summary)
    return summary


def _write_crf_h5(out_h5, ids, fused: np.ndarray, per_round: np.ndarray, attrs: dict, extra: dict | None = None) -> None:
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
        for name, data in {"fused": fused, "rounds": per_round, **(extra or {})}.items():
            f.create_dataset(name, data=data, compression="gzip", chunks=image_chunks(data.shape))
        f.attrs.update(attrs)
