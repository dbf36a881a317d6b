"""Baselines on real ISIC 2018 images: Otsu (and, with --train, the supervised U-Nets) on a seeded test split.

Prepares a dataset.h5 from /work/shared/data/isic2018_task1_256 (seeded 70/15/15 split) at
--resolution into --workdir (a temporary folder by default), runs the baselines through the same
functions the workflow calls, and prints a markdown table of macro Dice / Jaccard / Precision /
Recall on the test split with each method's wall time. Skips with a message if the data is absent.

    .venv/bin/python bench/baselines_isic.py --resolution 64
    .venv/bin/python bench/baselines_isic.py --resolution 128 --train --steps 4000 --device cuda
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import h5py
import pandas as pd
import torch

from diffseg.baselines import predict_baseline, train_baseline
from diffseg.data import load_split, prepare_dataset
from diffseg.metrics import aggregate, mask_metrics
from diffseg.settings import BaselineSettings, PrepareSettings

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "isic2018_task1_256"
logger = logging.getLogger("bench.baselines_isic")


def prepare(data_dir: Path, folder: Path, resolution: int, seed: int, limit: int | None) -> Path:
    dataset_h5 = folder / f"dataset_{resolution}.h5"
    if dataset_h5.exists():
        logger.info("reusing %s", dataset_h5)
        return dataset_h5
    source = data_dir
    if limit:  # a smaller pool: link the first `limit` pairs into a folder with the same layout
        source = folder / f"subset_{limit}"
        link_subset(data_dir, source, limit)
    # twins are not used by the baselines: the fast inpainting keeps preparation short
    summary = prepare_dataset(source, dataset_h5, folder / f"split_{resolution}.csv",
                              settings=PrepareSettings(resolution=resolution, inpaint="pushpull", split_seed=seed),
                              threads=2)
    logger.info("prepared %s in %.1f s: %s", dataset_h5, summary["seconds"], summary["counts"])
    return dataset_h5


def link_subset(data_dir: Path, target: Path, limit: int) -> None:
    images = sorted((data_dir / "ISIC2018_Task1-2_Training_Input").glob("ISIC_*.jpg"))[:limit]
    (target / "ISIC2018_Task1-2_Training_Input").mkdir(parents=True, exist_ok=True)
    (target / "ISIC2018_Task1_Training_GroundTruth").mkdir(parents=True, exist_ok=True)
    for image in images:
        mask = data_dir / "ISIC2018_Task1_Training_GroundTruth" / f"{image.stem}_segmentation.png"
        for src in (image, mask):
            dst = target / src.parent.name / src.name
            if not dst.exists():
                dst.symlink_to(src)


def scores(dataset_h5: Path, pred_h5: Path) -> dict:
    truth = load_split(dataset_h5, "test")
    with h5py.File(pred_h5, "r") as f:
        ids, masks = list(f["ids"].asstr()[:]), f["masks"][()].astype(bool)
        channel = f.attrs.get("channel")
    if ids != truth["ids"]:
        raise ValueError(f"{pred_h5}: ids differ from the test split of {dataset_h5}")
    table = pd.DataFrame([mask_metrics(p, t) for p, t in zip(masks, truth["masks"])])
    return {**aggregate(table).to_dict(), "n": len(ids), "channel": channel}


def run_method(name: str, dataset_h5: Path, folder: Path, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    checkpoint, extra = None, {}
    if name != "otsu":
        checkpoint = folder / f"{name}_{args.resolution}.pt"
        settings = BaselineSettings(steps=args.steps, batch_size=args.batch_size, depth=args.depth,
                                    eval_every=args.eval_every, device=args.device)
        summary = train_baseline(name, dataset_h5, checkpoint, folder / f"{name}_{args.resolution}.csv", settings,
                                 augment={})
        extra = {"steps": summary["steps"], "val_dice": summary["best_metric"]}
    out = folder / f"{name}_{args.resolution}_test.h5"
    predict_baseline(name, dataset_h5, checkpoint, out, BaselineSettings(device=args.device), split="test")
    return {"method": name, **scores(dataset_h5, out), **extra, "seconds": time.perf_counter() - started}


def markdown(rows: list[dict]) -> str:
    lines = ["| method | n | Dice | Jaccard | Precision | Recall | notes | wall s |", "|---" * 8 + "|"]
    for r in rows:
        notes = f"channel {r['channel']}" if r.get("channel") else f"{r['steps']} steps, val Dice {r['val_dice']:.3f}"
        lines.append(f"| {r['method']} | {r['n']} | {r['dice']:.3f} | {r['jaccard']:.3f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {notes} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--workdir", type=Path, help="keep dataset and outputs here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--limit", type=int, help="use only the first N image/mask pairs")
    parser.add_argument("--train", action="store_true", help="also train and score unet and attention_unet")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not (args.data / "ISIC2018_Task1-2_Training_Input").is_dir():
        logger.warning("skipped: ISIC data folder %s is absent", args.data)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        dataset_h5 = prepare(args.data.resolve(), folder, args.resolution, args.seed, args.limit)
        prep_s = time.perf_counter() - started
        methods = ["otsu", "unet", "attention_unet"] if args.train else ["otsu"]
        rows = [run_method(name, dataset_h5, folder, args) for name in methods]
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    device = torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu"
    print(f"ISIC 2018 Task 1 test split, {args.resolution} px, split seed {args.seed}, {date.today()}, {device}; "
          f"dataset preparation {prep_s:.1f} s\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
