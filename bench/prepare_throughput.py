"""Throughput of dataset preparation: images/s and wall time of prepare_dataset on real data.

    .venv/bin/python bench/prepare_throughput.py --threads 2 --resolution 128
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from diffseg.data import discover_pairs, prepare_dataset
from diffseg.inpaint import METHODS
from diffseg.settings import PrepareSettings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "isic2018_task1_256"


def limited_copy(data: Path, limit: int, root: Path) -> Path:
    """Generic-layout folder of symlinks to the first ``limit`` pairs (all splits pooled)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    pairs = [p for split in discover_pairs(data).values() for p in split][:limit]
    for image_id, image, mask in pairs:
        os.symlink(image.resolve(), root / "images" / image.name)
        os.symlink(mask.resolve(), root / "masks" / f"{image_id}_segmentation{mask.suffix}")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ISIC 2018 or images/ + masks/ folder")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N pairs")
    parser.add_argument("--inpaint", choices=METHODS, default="texture")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="diffseg-bench-") as tmp:
        data = limited_copy(args.data, args.limit, Path(tmp) / "data") if args.limit else args.data
        started = time.perf_counter()
        summary = prepare_dataset(
            data, Path(tmp) / "dataset.h5", Path(tmp) / "split.csv", Path(tmp) / "preview.png",
            PrepareSettings(resolution=args.resolution, inpaint=args.inpaint), threads=args.threads,
        )
        wall = time.perf_counter() - started
        size_mb = (Path(tmp) / "dataset.h5").stat().st_size / 1e6
    n = sum(summary["counts"].values())
    print(f"data: {args.data}  resolution: {args.resolution}  threads: {args.threads}  inpaint: {args.inpaint}")
    print(f"images: {n} {summary['counts']}  skipped: {len(summary['skipped'])}  no twin: {len(summary['no_healthy'])}")
    print(f"wall: {wall:.1f} s  throughput: {n / wall:.1f} images/s  dataset.h5: {size_mb:.1f} MB")


if __name__ == "__main__":
    main()
