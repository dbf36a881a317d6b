"""Scatter/gather of the per-image stages: shard k of n is the k-th contiguous block of a split's ids.

Gathering concatenates the shards' per-image arrays in shard order, so the gathered file equals the
file one shard would have written (tested for 1 and 4 shards).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import pandas as pd

from diffseg.atomic import atomic_path

logger = logging.getLogger(__name__)


def shard_indices(n_items: int, shard: int, n_shards: int, block: int = 1) -> np.ndarray:
    """Indices of shard ``shard`` of ``n_shards`` contiguous blocks (as np.array_split).

    Shard boundaries fall on multiples of ``block``: with block = the inference batch size, every
    image meets the same batch mates whatever the shard count, so results are bit-identical (CPU
    convolutions round differently with the batch's composition).
    """
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is outside 0..{n_shards - 1}")
    n_blocks = -(-n_items // block)
    blocks = np.array_split(np.arange(n_blocks), n_shards)[shard]
    if len(blocks) == 0:
        return np.arange(0)
    return np.arange(blocks[0] * block, min((blocks[-1] + 1) * block, n_items))


def image_chunks(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """HDF5 chunks of one image for a per-image dataset; None where there is no image (empty shard)."""
    return (1, *shape[1:]) if len(shape) > 1 and shape[0] > 0 else None


# Datasets that describe the run, not an image: equal in every shard, copied once.
SHARED_DATASETS = frozenset({"timesteps"})


def gather_h5(parts: Sequence[str | os.PathLike], out_path: str | os.PathLike) -> None:
    """Concatenate per-image datasets (first axis = ids) of the shard files; copy shared ones."""
    files = [h5py.File(p, "r") for p in parts]
    try:
        counts = [len(f["ids"]) for f in files]
        first = files[0]
        with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as out:
            for key, value in first.attrs.items():
                out.attrs[key] = value
            for name, dataset in first.items():
                if name not in SHARED_DATASETS:
                    for f, n in zip(files, counts):
                        if f[name].shape[:1] != (n,):
                            raise ValueError(f"{f.filename}: dataset {name!r} has {f[name].shape[0]} rows "
                                             f"for {n} ids")
                    data = np.concatenate([f[name][...] for f in files], axis=0)
                    chunks = image_chunks(data.shape)
                    out.create_dataset(name, data=data, dtype=dataset.dtype, chunks=chunks,
                                       compression="gzip" if chunks else None)
                else:
                    for f in files[1:]:
                        if not np.array_equal(f[name][...], dataset[...]):
                            raise ValueError(f"{f.filename}: dataset {name!r} differs between shards")
                    out.create_dataset(name, data=dataset[...], dtype=dataset.dtype)
        logger.info("gathered %d shards (%d images) into %s", len(files), sum(counts), out_path)
    finally:
        for f in files:
            f.close()


def gather_csv(parts: Sequence[str | os.PathLike], out_path: str | os.PathLike) -> None:
    table = pd.concat([pd.read_csv(p) for p in parts], ignore_index=True)
    with atomic_path(out_path) as tmp:
        table.to_csv(tmp, index=False)
    logger.info("gathered %d shards (%d rows) into %s", len(parts), len(table), out_path)


GATHERERS = {".h5": gather_h5, ".csv": gather_csv}


def gather(inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Gather each output from the inputs that share its file extension."""
    for out in outputs:
        suffix = Path(out).suffix
        parts = [p for p in inputs if Path(p).suffix == suffix]
        if not parts:
            raise ValueError(f"{out}: no shard files with extension {suffix} among the inputs")
        GATHERERS[suffix](parts, out)
