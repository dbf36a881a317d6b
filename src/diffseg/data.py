"""Dataset preparation: discover image/mask pairs, validate, resize, split, healthy twins, dataset.h5.

Over 350 lines: one stage (rule prepare_dataset) whose steps share the pair/split bookkeeping; split
further, each part would re-pass the same tuples.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

import diffseg
from diffseg.atomic import atomic_path
from diffseg.h5io import decode_ids, labelled_rows, open_h5, write_ids
from diffseg.imageio import IMAGE_SUFFIXES, InputError, read_mask, read_rgb
from diffseg.inpaint import METHODS, dilate_mask, remove_lesion
from diffseg.seeding import content_key, image_seed
from diffseg.settings import PrepareSettings

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PREDICT = "predict"  # the group of images without masks (prepare_images), a split for the per-image stages
OFFICIAL = {"train": "Training", "val": "Validation", "test": "Test"}

Pair = tuple[str, Path, Path]  # (id, image path, mask path)


# ----------------------------------------------------------------------------- discovery


def discover_pairs(data_dir: str | os.PathLike) -> dict[str, list[Pair]]:
    """Image/mask pairs per split: ``{split: [(id, image_path, mask_path), ...]}``, sorted by id.

    Official ISIC 2018 layout gives its splits (train/val/test, whichever are present); the
    generic layout (``images/`` + ``masks/``) gives one pool under ``"train"``, to be split.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(data_dir, "data folder not found")
    official = {s: data_dir / f"ISIC2018_Task1-2_{name}_Input" for s, name in OFFICIAL.items()}
    if any(folder.is_dir() for folder in official.values()):
        pairs = {}
        for split, image_dir in official.items():
            if image_dir.is_dir():
                mask_dir = data_dir / f"ISIC2018_Task1_{OFFICIAL[split]}_GroundTruth"
                pairs[split] = _match_pairs(image_dir, mask_dir)
        return pairs
    image_dir, mask_dir = data_dir / "images", data_dir / "masks"
    if not image_dir.is_dir():
        raise InputError(
            image_dir, "image folder not found (expected ISIC2018_Task1-2_Training_Input/ or images/ + masks/)"
        )
    return {"train": _match_pairs(image_dir, mask_dir)}


def truth_mask_files(data_dir: str | os.PathLike, ids: list[str]) -> dict[str, Path]:
    """The original ground-truth mask file of every id (any split folder of ``data_dir``), by id.

    These are the files the official scorer compares with, at the image's original size.
    """
    masks = {image_id: mask for pairs in discover_pairs(data_dir).values() for image_id, _, mask in pairs}
    missing = [image_id for image_id in ids if image_id not in masks]
    if missing:
        raise InputError(data_dir, f"no ground-truth mask for image id {missing[0]} "
                         f"({len(missing)} of {len(ids)} ids absent)")
    return {image_id: masks[image_id] for image_id in ids}


def mask_files(image_dir: str | os.PathLike, mask_dir: str | os.PathLike) -> dict[str, Path]:
    """The mask file of every image in ``image_dir``, by id, paired as the dataset's are (``_match_pairs``)."""
    return {image_id: mask for image_id, _, mask in _match_pairs(Path(image_dir), Path(mask_dir))}


def image_files(folder: Path) -> dict[str, Path]:
    """Image files of a folder by stem; other files (LICENSE.txt, ATTRIBUTION.txt) are ignored."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in files:
                raise InputError(path, f"two image files share the id {path.stem!r} ({files[path.stem].name})")
            files[path.stem] = path
    return files


def _match_pairs(image_dir: Path, mask_dir: Path) -> list[Pair]:
    """Pair every image with ``<id>_segmentation.<ext>`` or ``<id>.<ext>`` in ``mask_dir``."""
    if not mask_dir.is_dir():
        raise InputError(mask_dir, f"mask folder not found (needed for the images in {image_dir})")
    images = image_files(image_dir)
    if not images:
        raise InputError(image_dir, f"no images found (expected {', '.join(IMAGE_SUFFIXES)} files)")
    masks = {}
    for stem, path in image_files(mask_dir).items():
        image_id = stem[: -len("_segmentation")] if stem.endswith("_segmentation") else stem
        if image_id in masks:
            raise InputError(path, f"second mask for image id {image_id!r} ({masks[image_id].name})")
        masks[image_id] = path
    for image_id, path in images.items():
        if image_id not in masks:
            raise InputError(path, f"image has no mask (expected {image_id}_segmentation.png in {mask_dir})")
    for image_id, path in masks.items():
        if image_id not in images:
            raise InputError(path, f"mask has no image (expected {image_id}.jpg or .png in {image_dir})")
    return [(image_id, images[image_id], masks[image_id]) for image_id in sorted(images)]


# ----------------------------------------------------------------------------- split


def check_fractions(split_fractions: dict[str, float]) -> dict[str, float]:
    """Fractions for train/val/test, each in [0, 1], summing to 1 within 1e-6 (else ValueError)."""
    unknown = set(split_fractions) - set(SPLITS)
    if unknown:
        raise ValueError(f"prepare.split_fractions: unknown split(s) {sorted(unknown)}; use {list(SPLITS)}")
    fractions = {s: float(split_fractions.get(s, 0.0)) for s in SPLITS}
    bad = {s: f for s, f in fractions.items() if not 0.0 <= f <= 1.0}
    if bad:
        raise ValueError(f"prepare.split_fractions: each fraction must be in [0, 1], got {bad}")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"prepare.split_fractions must sum to 1, got {sum(fractions.values())} ({fractions})")
    return fractions


def split_pool(ids: list[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Seeded split of ``ids``: ``{id: split}``; counts are the rounded fractions (test takes the rest)."""
    order = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(order))
    n_train = round(fractions["train"] * len(order))
    n_val = min(round(fractions["val"] * len(order)), len(order) - n_train)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(order))}
    return {order[i]: split for split, (lo, hi) in bounds.items() for i in perm[lo:hi]}


def _write_split_csv(path: str | os.PathLike, assignment: dict[str, list[str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "split"])
        for split in SPLITS:
            writer.writerows([image_id, split] for image_id in assignment.get(split, []))


# ----------------------------------------------------------------------------- per-file work


def load_pair(image_path: Path, mask_path: Path | None, resolution: int) -> tuple[np.ndarray, np.ndarray | None,
                                                                                  tuple[int, int]]:
    """Read and validate one pair, resize to ``resolution``; (image uint8, mask bool, orig (H, W)).

    ``mask_path`` None: an image to predict on, without a mask (the mask returned is None).
    """
    image = read_rgb(image_path)
    if mask_path is None:
        return resize_image(image, resolution), None, image.shape[:2]
    mask = read_mask(mask_path)
    if mask.shape != image.shape[:2]:
        raise InputError(
            mask_path,
            f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
            f"{image.shape[1]}x{image.shape[0]} ({image_path.name}) (width x height)",
        )
    return resize_image(image, resolution), resize_mask(mask, resolution), image.shape[:2]


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """Anti-aliased bicubic resize to a square (PIL filters scale their support with the reduction)."""
    return np.asarray(Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BICUBIC))


def resize_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
    """Area-aware bilinear resize of the 0/1 mask, thresholded at 0.5 so it stays binary."""
    small = Image.fromarray(mask.astype(np.float32))  # float32 -> mode "F"
    return np.asarray(small.resize((resolution, resolution), Image.Resampling.BILINEAR)) >= 0.5


def _load_chunk(pairs: list[Pair], resolution: int) -> list[tuple]:
    """Worker: ``("ok", id, image, mask, orig)`` or ``("bad", file, problem)`` per pair, in order.

    Errors are returned, not raised: InputError does not survive pickling between processes.
    """
    results = []
    for image_id, image_path, mask_path in pairs:
        try:
            results.append(("ok", image_id, *load_pair(image_path, mask_path, resolution)))
        except InputError as err:
            results.append(("bad", err.path, err.problem))
    return results


def _twin_chunk(items: list[tuple[np.ndarray, np.ndarray, int]], dilate_px: int, method: str) -> list:
    """Worker: healthy twin (or None) for each (image, mask, seed)."""
    return [remove_lesion(img, mask, dilate_px=dilate_px, method=method, seed=seed) for img, mask, seed in items]


def _parallel(worker, items: list, threads: int, desc: str, **kwargs) -> list:
    """Run ``worker(chunk, **kwargs)`` over chunks of ``items``; results flattened in input order."""
    if not items:
        return []
    n_chunks = 1 if threads <= 1 else min(len(items), threads * 8)
    size = math.ceil(len(items) / n_chunks)
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    bar = tqdm(total=len(items), desc=desc, mininterval=5, unit="img")
    out: list = []
    try:
        if threads <= 1:
            for chunk in chunks:
                out.extend(worker(chunk, **kwargs))
                bar.update(len(chunk))
            return out
        with ProcessPoolExecutor(max_workers=threads) as pool:
            futures = [pool.submit(worker, chunk, **kwargs) for chunk in chunks]
            for chunk, future in zip(chunks, futures):
                out.extend(future.result())
                bar.update(len(chunk))
        return out
    finally:
        bar.close()


# ----------------------------------------------------------------------------- prepare


def prepare_dataset(
    data_dir: str | os.PathLike,
    out_h5: str | os.PathLike,
    split_csv: str | os.PathLike,
    preview_png: str | os.PathLike | None = None,
    settings: PrepareSettings | None = None,
    *,
    threads: int = 1,
) -> dict:
    """Build ``dataset.h5`` (layout in docs/ARCHITECTURE.md), the split table and a preview figure.

    ``settings``: the ``prepare`` section (None: its defaults). Every pair is read, validated and
    resized before anything heavy or anything is written. Non-square originals are squashed to
    ``resolution x resolution`` (``orig_size`` keeps (H, W)). Official ISIC split folders are used when
    Validation or Test is present; otherwise the (training) pool is split with ``split_fractions`` and
    ``split_seed``, which also seeds the healthy twins' texture. Healthy twins are made for the train
    split only. ``on_bad_file="skip"`` skips files that fail validation, logs them and lists them in the
    ``skipped`` attribute; ``"error"`` raises the first failure. ``limit`` keeps only the first N pairs
    (sorted by id) of each split folder, for quick runs.
    Returns a summary dict (counts per split, skipped files, images without a twin, seconds).
    """
    s = settings if settings is not None else PrepareSettings()
    started = time.perf_counter()
    _check_options(s.resolution, s.dilate_px, s.inpaint, s.on_bad_file, threads, s.limit)
    discovered = {split: pairs[:s.limit] for split, pairs in discover_pairs(data_dir).items()}
    split_of = _assign_splits(discovered, s.split_fractions, s.split_seed)
    ranks = None if s.labelled is None else choose_labelled(split_of, s.labelled, s.labelled_seed)
    pairs = [pair for split in SPLITS for pair in discovered.get(split, [])]
    logger.info("found %d image/mask pairs in %s", len(pairs), data_dir)
    if ranks is not None:  # the masks of unlabelled train/val images are never opened
        pairs = [(i, image, mask if split_of[i] == "test" or i in ranks else None) for i, image, mask in pairs]
        logger.info("prepare.labelled = %d: %d train and %d val masks are read (labelled_seed %d)", s.labelled,
                    *labelled_counts(s.labelled), s.labelled_seed)

    loaded, skipped = _load_all(pairs, s.resolution, s.on_bad_file, threads)
    if not loaded:
        raise InputError(data_dir, f"no valid image/mask pair left ({len(skipped)} skipped)")
    groups = _group_by_split(loaded, split_of, ranks)
    _add_healthy_twins(groups.get("train"), s.dilate_px, s.inpaint, s.split_seed, threads)

    attrs = {
        "source": str(Path(data_dir).resolve()),
        "resolution": s.resolution,
        "dilate_px": s.dilate_px,
        "inpaint": s.inpaint,
        "split_seed": s.split_seed,
        "split_fractions": json.dumps(dict(s.split_fractions)),
        "diffseg_version": diffseg.__version__,
        "skipped": json.dumps(skipped),
        # only with a labelled subset, so that a dataset of every mask keeps today's attributes
        **({} if ranks is None else {"labelled": s.labelled, "labelled_seed": s.labelled_seed}),
    }
    _write_h5(out_h5, groups, attrs)
    _write_split_csv(split_csv, {split: g["ids"] for split, g in groups.items()})
    if preview_png is not None:
        write_preview(preview_png, labelled_group(groups.get("train", next(iter(groups.values())))), s.preview_n)
    summary = {
        "counts": {split: len(g["ids"]) for split, g in groups.items()},
        "masks_read": {split: int(g["has_mask"].sum()) if "has_mask" in g else len(g["ids"])
                       for split, g in groups.items()},
        "skipped": skipped,
        "no_healthy": [i for i, ok in zip(groups["train"]["ids"], groups["train"]["has_healthy"]) if not ok]
        if "train" in groups
        else [],
        "seconds": time.perf_counter() - started,
    }
    logger.info("dataset written to %s: %s, %d skipped", out_h5, summary["counts"], len(skipped))
    return summary


def prepare_images(image_dir: str | os.PathLike, out_h5: str | os.PathLike, *, resolution: int = 128,
                   on_bad_file: str = "error", threads: int = 1, split: str = PREDICT) -> dict:
    """Images WITHOUT masks (a folder of JPEG/PNG/BMP, any size) -> one ``split`` group of the dataset layout.

    Each file is read and validated as a training image is (diffseg.imageio), resized to
    ``resolution`` with the same filter, and stored with its original size; there is no ``masks``
    dataset. ``on_bad_file`` as in prepare_dataset. Returns a summary (count, skipped files).
    """
    _check_options(resolution, 0, METHODS[0], on_bad_file, threads, None)
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise InputError(image_dir, "image folder not found")
    files = image_files(image_dir)
    if not files:
        raise InputError(image_dir, f"no images found (expected {', '.join(IMAGE_SUFFIXES)} files)")
    loaded, skipped = _load_all([(i, p, None) for i, p in files.items()], resolution, on_bad_file, threads)
    if not loaded:
        raise InputError(image_dir, f"no valid image left ({len(skipped)} skipped)")
    group = {"ids": [r[0] for r in loaded], "images": np.stack([r[1] for r in loaded]),
             "orig_size": np.array([r[3] for r in loaded], dtype=np.int32)}
    attrs = {"source": str(image_dir.resolve()), "resolution": resolution, "diffseg_version": diffseg.__version__,
             "skipped": json.dumps(skipped)}
    _write_h5(out_h5, {split: group}, attrs)
    logger.info("%d images of %s ready for prediction in %s, %d skipped", len(loaded), image_dir, out_h5,
                len(skipped))
    return {"n_images": len(loaded), "skipped": skipped}


def labelled_counts(n_labelled: int) -> tuple[int, int]:
    """(train, val) counts of ``prepare.labelled`` = n: a fifth in val (``n // 5``, at least 2), the rest in train.

    Each count grows by at most one when n grows by one, so taking the first counts of fixed per-split
    orders gives nested sets (the 10 are among the 25). n < 3 leaves no labelled train image: ValueError.
    """
    if isinstance(n_labelled, bool) or not isinstance(n_labelled, int) or n_labelled < 3:
        raise ValueError(f"prepare.labelled must be an integer >= 3 (2 val + 1 train masks) or null, "
                         f"got {n_labelled!r}")
    n_val = max(2, n_labelled // 5)
    return n_labelled - n_val, n_val


def labelled_order(split_of: dict[str, str], seed: int) -> dict[str, int]:
    """Rank of every train and val id in its split's seeded order (``prepare.labelled_seed``).

    One permutation per split (train first, then val, from one generator), of the ids sorted: it does not
    depend on ``prepare.labelled``, so the labelled set of any n is the first ``labelled_counts(n)`` of
    each order and the sets are nested. The split itself (``split_seed``) is computed before and unchanged.
    """
    rng = np.random.default_rng(seed)
    ranks = {}
    for split in ("train", "val"):
        ids = sorted(image_id for image_id, s in split_of.items() if s == split)
        ranks.update({ids[row]: rank for rank, row in enumerate(rng.permutation(len(ids)))})
    return ranks


def choose_labelled(split_of: dict[str, str], n_labelled: int, seed: int) -> dict[str, int]:
    """``{id: rank}`` of the labelled train and val images (their masks are read; ranks as labelled_order)."""
    counts = dict(zip(("train", "val"), labelled_counts(n_labelled)))
    for split, count in counts.items():
        pool = sum(1 for s in split_of.values() if s == split)
        if count > pool:
            raise ValueError(f"prepare.labelled = {n_labelled} needs {counts['train']} train and {counts['val']} "
                             f"val images with masks, but the {split} split holds {pool}")
    ranks = labelled_order(split_of, seed)
    return {i: rank for i, rank in ranks.items() if rank < counts[split_of[i]]}


def labelled_group(group: dict) -> dict:
    """The rows of an in-memory split group that have a mask (all of it without ``has_mask``)."""
    if "has_mask" not in group:
        return group
    rows = np.flatnonzero(group["has_mask"])
    return {key: [value[r] for r in rows] if isinstance(value, list) else value[rows] for key, value in group.items()}


def _check_options(
    resolution: int, dilate_px: int, inpaint: str, on_bad_file: str, threads: int, limit: int | None
) -> None:
    if not (isinstance(resolution, int) and resolution >= 8):
        raise ValueError(f"prepare.resolution must be an integer >= 8, got {resolution!r}")
    if dilate_px < 0:
        raise ValueError(f"prepare.dilate_px must be >= 0, got {dilate_px!r}")
    if inpaint not in METHODS:
        raise ValueError(f"prepare.inpaint: unknown method {inpaint!r}; choose one of {', '.join(METHODS)}")
    if on_bad_file not in ("error", "skip"):
        raise ValueError(f"prepare.on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
    if threads < 1:
        raise ValueError(f"prepare.threads must be >= 1, got {threads!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"prepare.limit must be >= 1 or null, got {limit!r}")


def _assign_splits(discovered: dict[str, list[Pair]], split_fractions: dict, seed: int) -> dict[str, str]:
    """``{id: split}``: official folders when val or test exist, else a seeded split of the pool."""
    if set(discovered) != {"train"}:
        logger.info("using the official split folders: %s", ", ".join(discovered))
        split_of: dict[str, str] = {}
        for split, pairs in discovered.items():
            for image_id, image_path, _ in pairs:
                if image_id in split_of:
                    raise InputError(image_path, f"image id {image_id!r} is also in the {split_of[image_id]} split")
                split_of[image_id] = split
        return split_of
    fractions = check_fractions(split_fractions)
    split_of = split_pool([image_id for image_id, _, _ in discovered["train"]], fractions, seed)
    for split in SPLITS:
        if fractions[split] > 0 and split not in split_of.values():
            logger.warning("split %r is empty: %d images are too few for fraction %g", split, len(split_of), fractions[split])
    return split_of


def _load_all(pairs: list[Pair], resolution: int, on_bad_file: str, threads: int) -> tuple[list, list]:
    """Loaded pairs ``(id, image, mask, orig)`` and skipped files ``[file, reason]``."""
    results = _parallel(_load_chunk, pairs, threads, "read+resize", resolution=resolution)
    loaded = [r[1:] for r in results if r[0] == "ok"]
    skipped = [[str(r[1]), r[2]] for r in results if r[0] == "bad"]
    if skipped and on_bad_file == "error":
        raise InputError(*skipped[0])
    for file, reason in skipped:
        logger.warning("skipping %s: %s", file, reason)
    return loaded, skipped


def _group_by_split(loaded: list, split_of: dict[str, str], ranks: dict[str, int] | None = None) -> dict[str, dict]:
    """Stack the loaded arrays per split (only splits that have images).

    ``ranks`` (a labelled subset, :func:`choose_labelled`): train and val get ``has_mask`` and ``label_rank``
    (-1 where unlabelled), and an all-zero mask where none was read.
    """
    groups = {}
    for split in SPLITS:
        rows = [row for row in loaded if split_of[row[0]] == split]
        if rows:
            groups[split] = {
                "ids": [r[0] for r in rows],
                "images": np.stack([r[1] for r in rows]),
                "masks": np.stack([np.zeros(r[1].shape[:2], bool) if r[2] is None else r[2] for r in rows]),
                "orig_size": np.array([r[3] for r in rows], dtype=np.int32),
            }
            if ranks is not None and split != "test":
                rank = np.array([ranks.get(r[0], -1) for r in rows], dtype=np.int32)
                groups[split].update(has_mask=rank >= 0, label_rank=rank)
    return groups


def _add_healthy_twins(group: dict | None, dilate_px: int, method: str, seed: int, threads: int) -> None:
    """Add ``healthy`` and ``has_healthy`` to the train group (twin = the image where no skin is left).

    Only images with a mask get a twin (``has_mask``; every image without it): has_healthy is false elsewhere.
    """
    if group is None:
        return
    labelled = group.get("has_mask", np.ones(len(group["ids"]), bool))
    items = [(img, mask, image_seed(seed, content_key(img)))
             for img, mask, ok in zip(group["images"], group["masks"], labelled) if ok]
    made = iter(_parallel(_twin_chunk, items, threads, f"healthy twins ({method})", dilate_px=dilate_px,
                          method=method))
    twins = [next(made) if ok else None for ok in labelled]
    for image_id, mask, twin, ok in zip(group["ids"], group["masks"], twins, labelled):
        if twin is None and ok:
            covered = dilate_mask(mask, dilate_px).mean()
            logger.warning("%s: no healthy twin, the dilated lesion covers %.1f%% of the image", image_id, 100 * covered)
    group["has_healthy"] = np.array([t is not None for t in twins], dtype=bool)
    group["healthy"] = np.stack([img if t is None else t for img, t in zip(group["images"], twins)])


def _write_h5(out_h5: str | os.PathLike, groups: dict[str, dict], attrs: dict) -> None:
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update(attrs)
        for split, group in groups.items():
            g = h5.create_group(split)
            write_ids(g, group["ids"])
            g.create_dataset("orig_size", data=group["orig_size"].astype(np.int32))
            _image_dataset(g, "images", group["images"])
            if "masks" in group:  # images to predict on have none
                _image_dataset(g, "masks", group["masks"].astype(np.uint8))
            if "healthy" in group:
                _image_dataset(g, "healthy", group["healthy"])
                g.create_dataset("has_healthy", data=group["has_healthy"].astype(bool))
            if "has_mask" in group:  # a labelled subset (prepare.labelled)
                g.create_dataset("has_mask", data=group["has_mask"].astype(bool))
                g.create_dataset("label_rank", data=group["label_rank"].astype(np.int32))


def _image_dataset(group: h5py.Group, name: str, data: np.ndarray) -> None:
    """One image per chunk, gzip level 4."""
    group.create_dataset(name, data=data, chunks=(1, *data.shape[1:]), compression="gzip", compression_opts=4)


def write_preview(preview_png: str | os.PathLike, group: dict, preview_n: int = 4) -> None:
    """Figure with rows image | mask | healthy twin for the first ``preview_n`` ids, written atomically.

    Meant for the train group; for a group without twins (or an image without one) the third
    column repeats the image, titled as such.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(preview_n, len(group["ids"]))
    if n == 0:  # the rule still expects a figure
        fig = plt.figure(figsize=(3, 1))
        fig.text(0.5, 0.5, "preview disabled (prepare.preview_n = 0)", ha="center", va="center", fontsize=7)
        _save_figure(fig, preview_png)
        return
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for row in range(n):
        has_twin = "healthy" in group and group["has_healthy"][row]
        twin = group["healthy"][row] if has_twin else group["images"][row]
        titles = ("image", "mask", "healthy twin" if has_twin else "no twin (image)")
        for ax, panel, title in zip(axes[row], (group["images"][row], group["masks"][row], twin), titles):
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None)
            ax.set_title(f"{group['ids'][row]} {title}" if title == "image" else title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    _save_figure(fig, preview_png)


def _save_figure(fig, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- reading back


def load_split(h5_path: str | os.PathLike, split: str, require_masks: bool = True, labelled_only: bool = False) -> dict:
    """One split of ``dataset.h5``: ids, images (N,R,R,3) uint8, masks (N,R,R) bool, orig_size (N,2),
    and healthy / has_healthy and has_mask / label_rank when present. ``require_masks=False`` also reads a
    split without masks (images to predict on; no ``masks`` key then). ``labelled_only``: only the rows
    whose mask was read (diffseg.h5io.labelled_rows; every row without ``prepare.labelled``), as every
    stage that learns from or is scored against masks reads them."""
    path = Path(h5_path)
    if not path.is_file():
        raise InputError(path, "dataset file not found")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise InputError(path, f"not a readable HDF5 file ({err})") from err
    with h5:
        if split not in h5:
            raise InputError(path, f"no group {split!r} in the dataset file (groups: {sorted(h5.keys())})")
        group = h5[split]
        required = ("ids", "images", "orig_size", *(("masks",) if require_masks else ()))
        missing = [k for k in required if k not in group]
        if missing:
            raise InputError(path, f"group {split!r} lacks dataset(s) {missing}: not a diffseg dataset file")
        out = {
            "ids": decode_ids(group["ids"]),
            "images": group["images"][()],
            "orig_size": group["orig_size"][()],
        }
        if "masks" in group:
            out["masks"] = group["masks"][()].astype(bool)
        if "healthy" in group:
            out["healthy"] = group["healthy"][()]
            out["has_healthy"] = group["has_healthy"][()].astype(bool)
        for key in ("has_mask", "label_rank"):  # a labelled subset (prepare.labelled)
            if key in group:
                out[key] = group[key][()]
        rows = labelled_rows(group) if labelled_only else None
    if rows is None or len(rows) == len(out["ids"]):
        return out
    return {key: [value[r] for r in rows] if key == "ids" else value[rows] for key, value in out.items()}


def masks_read_line(h5_path: str | os.PathLike) -> str | None:
    """table.md's line on how many masks the run read (None when every mask was read: no ``prepare.labelled``)."""
    with open_h5(h5_path) as h5:
        if "labelled" not in h5.attrs:
            return None
        counts = {split: len(labelled_rows(h5[split])) for split in ("train", "val") if split in h5}
        n_test = len(h5["test"]["ids"]) if "test" in h5 else 0
        setting, seed = int(h5.attrs["labelled"]), int(h5.attrs["labelled_seed"])
    return (f"Masks read for training and selection: {sum(counts.values())} ({counts.get('train', 0)} train + "
            f"{counts.get('val', 0)} val; prepare.labelled = {setting}, labelled_seed {seed}); the {n_test} test "
            f"masks are only the scoring truth.")


def labelled_setting(h5_path: str | os.PathLike) -> int | None:
    """The dataset's ``prepare.labelled`` (its ``labelled`` attribute), None when every mask was read."""
    with open_h5(h5_path) as h5:
        value = h5.attrs.get("labelled")
    return None if value is None else int(value)
