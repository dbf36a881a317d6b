"""CRF-stage throughput: images/s (and per worker core) of diffseg.crf.run_crf on synthetic inputs.

Builds a dataset.h5 and an inference.h5 of synthetic dermoscopy-like images (dark disc on skin,
soft maps = blurred disc plus speckle) in a temporary folder and times the whole stage: reading,
K rounds x subset_size CRFs per image (one round when subset_size = T), and the crf.h5 write (the original-size PNGs are rule
export_masks's, not timed here).

    .venv/bin/python bench/crf_throughput.py --threads 1 --n-images 32
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from diffseg.crf import rounds_to_run, run_crf
from diffseg.settings import CRFSettings


def synthetic_inputs(folder: Path, n_images: int, size: int, n_maps: int, orig_size: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    images, maps = [], []
    for _ in range(n_images):
        (cy, cx), r = rng.uniform(0.35, 0.65, 2) * size, rng.uniform(0.15, 0.3) * size
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        image = np.where(disc[..., None], [90, 50, 40], [215, 175, 155]) + rng.normal(0, 8, (size, size, 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
        soft = ndimage.gaussian_filter(disc.astype(np.float32), size / 40)
        maps.append(np.clip(soft + (rng.random((n_maps, size, size)) < 0.01), 0, 1))
    ids = np.array([f"ISIC_{k:07d}" for k in range(n_images)], dtype=object)
    with h5py.File(folder / "dataset.h5", "w") as f:
        g = f.create_group("test")
        g.create_dataset("ids", data=ids, dtype=h5py.string_dtype())
        g.create_dataset("images", data=np.stack(images), chunks=(1, size, size, 3), compression="gzip")
        g.create_dataset("orig_size", data=np.full((n_images, 2), orig_size, np.int32))
    with h5py.File(folder / "inference.h5", "w") as f:
        f.create_dataset("ids", data=ids, dtype=h5py.string_dtype())
        f.create_dataset("maps", data=np.stack(maps).astype(np.float16),
                         chunks=(1, n_maps, size, size), compression="gzip")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="worker processes (crf.threads)")
    parser.add_argument("--n-images", type=int, default=32)
    parser.add_argument("--size", type=int, default=128, help="working resolution R")
    parser.add_argument("--maps", type=int, default=10, help="T, soft maps per image")
    parser.add_argument("--rounds", type=int, default=3, help="K")
    parser.add_argument("--subset-size", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        synthetic_inputs(folder, args.n_images, args.size, args.maps, args.size)
        began = time.perf_counter()
        settings = CRFSettings(rounds=args.rounds, subset_size=args.subset_size)
        run_crf(folder / "dataset.h5", folder / "inference.h5", folder / "crf.h5", settings, threads=args.threads)
        seconds = time.perf_counter() - began
    crfs = args.n_images * rounds_to_run(settings, args.maps) * args.subset_size  # one round when subset = T
    print(f"machine: {platform.node()} ({os.cpu_count()} CPUs), threads={args.threads}, "
          f"{args.n_images} images at {args.size} px, T={args.maps}, K={args.rounds}, "
          f"subset={args.subset_size} -> {crfs} CRFs")
    print(f"wall {seconds:.2f} s: {args.n_images / seconds:.2f} images/s, "
          f"{args.n_images / seconds / args.threads:.2f} images/s per core, "
          f"{1000 * seconds * args.threads / crfs:.1f} ms per CRF per core")


if __name__ == "__main__":
    main()
