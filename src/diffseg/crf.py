"""DenseCRF fusion of the T soft difference maps (paper eqs. 8-12).

Each of K rounds samples ``subset_size`` of the T maps without replacement, refines each with a
two-label DenseCRF on the RGB image, averages the refined maps and binarizes them (y_k); the final
mask is the vote of the y_k. The maps are used as lesion probabilities as given: whether they are
raw normalised maps or calibrated ones is the caller's choice. When ``subset_size`` is T, every round
would fuse all T maps and give the same y_k, so one round runs (:func:`rounds_to_run`).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from functools import partial

import h5py
import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax
from tqdm import tqdm

from diffseg.atomic import atomic_path
from diffseg.calibration import load_calibration
from diffseg.h5io import decode_ids, match_rows, open_h5, require, write_ids
from diffseg.imageio import InputError
from diffseg.postprocess import PAPER, Calibration, apply_calibration
from diffseg.seeding import content_key, image_rng
from diffseg.settings import CRFSettings
from diffseg.shards import image_chunks

logger = logging.getLogger(__name__)

PROB_CLIP = 1e-5  # keeps -log(p) finite for maps that are exactly 0 or 1
MAX_CHUNK = 16  # images per worker task: large enough to amortise IPC, small enough for progress


DEFAULT = CRFSettings()


def dense_crf(image: np.ndarray, prob: np.ndarray, settings: CRFSettings = DEFAULT) -> np.ndarray:
    """Two-label DenseCRF posterior P(lesion), float32 (H, W), from a lesion probability map.

    Uses the kernel settings (iterations, gaussian_*, bilateral_*) of ``settings``.
    """
    prob = np.asarray(prob, np.float32)
    if prob.ndim != 2 or np.shape(image) != (*prob.shape, 3):
        raise ValueError(f"dense_crf: image {np.shape(image)} must be (H, W, 3) for a map {prob.shape}")
    if not np.isfinite(prob).all():
        raise ValueError("dense_crf: probability map holds NaN or infinite values")
    h, w = prob.shape
    p = np.clip(prob, PROB_CLIP, 1.0 - PROB_CLIP)
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1.0 - p, p]))))
    crf.addPairwiseGaussian(sxy=settings.gaussian_sxy, compat=settings.gaussian_compat)
    crf.addPairwiseBilateral(sxy=settings.bilateral_sxy, srgb=settings.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=settings.bilateral_compat)
    posterior = np.asarray(crf.inference(settings.iterations), np.float32).reshape(2, h, w)
    return posterior[1].copy()


def _check_subset(subset_size: int, n_maps: int) -> None:
    if not 1 <= subset_size <= n_maps:
        raise ValueError(f"crf.subset_size = {subset_size} must be between 1 and the number of "
                         f"maps per image T = {n_maps}")


def rounds_to_run(settings: CRFSettings, n_maps: int) -> int:
    """K, or 1 when each round would sample all ``n_maps`` maps: those rounds refine the same maps and
    average them, only in another order, so K of them vote for the first one's mask (a pixel could differ
    only where its average lies within float rounding of the threshold)."""
    return 1 if settings.subset_size == n_maps else settings.rounds


def crf_fusion(image: np.ndarray, soft_maps: np.ndarray, rng: np.random.Generator,
               settings: CRFSettings = DEFAULT) -> tuple[np.ndarray, np.ndarray]:
    """Fuse T soft maps (T, H, W) into (fused bool (H, W), per-round masks uint8 (K', H, W)).

    K' = :func:`rounds_to_run`: K, or 1 when the subset is all T maps.
    """
    soft_maps = np.asarray(soft_maps, np.float32)
    if soft_maps.ndim != 3:
        raise ValueError(f"crf_fusion: soft_maps must be (T, H, W), got {soft_maps.shape}")
    _check_subset(settings.subset_size, soft_maps.shape[0])
    n_rounds = rounds_to_run(settings, soft_maps.shape[0])
    per_round = np.empty((n_rounds, *soft_maps.shape[1:]), np.uint8)
    for k in range(n_rounds):
        # with all T maps the draw only orders the sum: the one round is exactly the first of K
        picks = rng.choice(soft_maps.shape[0], size=settings.subset_size, replace=False)
        refined = np.mean([dense_crf(image, soft_maps[i], settings) for i in picks], axis=0)
        per_round[k] = refined >= settings.threshold
    fused = per_round.mean(axis=0) >= settings.threshold
    return fused, per_round


def _read_inference(inference_h5: str | os.PathLike) -> tuple[list[str], tuple[int, ...]]:
    """ids and the (N, T, R, R) shape of the maps in inference.h5."""
    with open_h5(inference_h5) as f:
        require(f, ("ids", "maps"), inference_h5)
        ids, shape = decode_ids(f["ids"]), f["maps"].shape
    if len(shape) != 4 or shape[0] != len(ids) or shape[2] != shape[3]:  # N = 0: an empty shard
        raise InputError(inference_h5, f"'maps' has shape {shape}; expected (N={len(ids)}, T, R, R)")
    return ids, shape


def _dataset_rows(dataset_h5, split: str, ids: list[str], resolution: int, inference_h5) -> np.ndarray:
    """Row of each inference id in the dataset split, after checking that the images have the maps' size."""
    with open_h5(dataset_h5) as f:
        if split not in f:
            raise InputError(dataset_h5, f"no split '{split}' (groups: {sorted(f)})")
        require(f[split], ("ids", "images"), dataset_h5, f"{split}/")
        split_ids, image_res = decode_ids(f[split]["ids"]), f[split]["images"].shape[1:3]
    if image_res != (resolution, resolution):
        raise InputError(inference_h5, f"maps are {resolution}x{resolution} but the images of "
                         f"'{split}' in {dataset_h5} are {image_res[1]}x{image_res[0]}")
    return match_rows(ids, split_ids, inference_h5, f" from split '{split}' of {dataset_h5}")


def _fuse_chunk(job: tuple, *, dataset_h5, inference_h5, split, settings: CRFSettings,
                calibrations: tuple[Calibration, ...] = (PAPER,)) -> list[tuple]:
    """Fuse images start..stop of inference.h5 once per calibration (one worker task).

    Each calibration turns the stored maps into the CRF's lesion probabilities (diffseg.postprocess);
    every calibration of an image uses the same subset draws (a fresh rng from the same seed).
    """
    start, stop, rows = job
    results = [([], []) for _ in calibrations]
    with h5py.File(dataset_h5, "r") as data, h5py.File(inference_h5, "r") as inf:
        for k in range(stop - start):
            image = data[split]["images"][rows[k]]
            maps = inf["maps"][start + k]
            for (fused, rounds), cal in zip(results, calibrations):
                prob, _ = apply_calibration(maps, cal)
                mask, per_round = crf_fusion(image, prob, image_rng(settings.seed, content_key(image)), settings)
                fused.append(mask)
                rounds.append(per_round)
    return [(np.stack(fused).astype(np.uint8), np.stack(rounds)) for fused, rounds in results]


def _jobs(n: int, threads: int, rows: np.ndarray) -> list[tuple]:
    """Split 0..n into chunks: about four per worker, for load balance, at most MAX_CHUNK images."""
    size = max(1, min(MAX_CHUNK, math.ceil(n / (4 * threads))))
    return [(s, min(s + size, n), rows[s:s + size]) for s in range(0, n, size)]


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
            settings: CRFSettings = DEFAULT, *, split: str = "test", threads: int = 1,
            calibration_h5: str | os.PathLike | None = None, paper_rows: bool = True) -> dict:
    """CRF fusion of every image in inference.h5; writes crf/{split}.h5 (PNG masks: diffseg.export).

    ``rounds`` holds the rounds that ran (:func:`rounds_to_run`: one when the subset is every output).

    The CRF's lesion probabilities come from the calibration in ``calibration_h5`` (None = the paper's
    identity: the normalised maps). With a non-paper calibration the paper-faithful fusion is written
    too, as ``paper_fused``/``paper_rounds``, unless ``paper_rows`` is False (prediction: no table).
    """
    if threads < 1:
        raise ValueError(f"crf.threads = {threads} must be at least 1")
    ids, (n, n_maps, res, _) = _read_inference(inference_h5)
    _check_subset(settings.subset_size, n_maps)
    n_rounds = rounds_to_run(settings, n_maps)
    if n_rounds < settings.rounds:
        logger.info("crf: subset_size = %d is every output: the %d rounds would all fuse the same maps, so one "
                    "round runs (the same final mask)", settings.subset_size, settings.rounds)
    rows = _dataset_rows(dataset_h5, split, ids, res, inference_h5)
    cal = load_calibration(calibration_h5) if calibration_h5 is not None else PAPER
    calibrations = (cal,) if cal.is_paper or not paper_rows else (cal, PAPER)
    task = partial(_fuse_chunk, dataset_h5=str(dataset_h5), inference_h5=str(inference_h5), split=split,
                   settings=settings, calibrations=calibrations)
    fused = np.empty((len(calibrations), n, res, res), np.uint8)
    per_round = np.empty((len(calibrations), n, n_rounds, res, res), np.uint8)
    jobs = _jobs(n, threads, rows)
    began = time.perf_counter()
    with tqdm(total=n, desc=f"crf {split}", mininterval=5, unit="img") as bar:
        for (start, stop, _), chunk in zip(jobs, _run_jobs(task, jobs, threads)):
            for c, (chunk_fused, chunk_rounds) in enumerate(chunk):
                fused[c, start:stop], per_round[c, start:stop] = chunk_fused, chunk_rounds
            bar.update(stop - start)
    seconds = time.perf_counter() - began
    extra = {"paper_fused": fused[1], "paper_rounds": per_round[1]} if len(calibrations) > 1 else {}
    _write_crf_h5(out_h5, ids, fused[0], per_round[0], {**asdict(settings), "split": split,
                                                         "inference": str(inference_h5),
                                                         "calibration": cal.method}, extra)
    summary = {"n_images": int(n), "seconds": seconds, "images_per_s": n / max(seconds, 1e-9),
               "mean_lesion_fraction": float(fused[0].mean()) if n else 0.0}
    logger.info("crf fusion: %s", summary)
    return summary


def _write_crf_h5(out_h5, ids, fused: np.ndarray, per_round: np.ndarray, attrs: dict, extra: dict | None = None) -> None:
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as f:
        write_ids(f, ids)
        for name, data in {"fused": fused, "rounds": per_round, **(extra or {})}.items():
            f.create_dataset(name, data=data, compression="gzip", chunks=image_chunks(data.shape))
        f.attrs.update(attrs)
