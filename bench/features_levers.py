"""Levers of inference.method features, chosen on the VAL split only (the test split is never read).

For a results folder of the quick benchmark (its data/dataset.h5 and trained models/ddpm.pt), caches
the head inputs of every decoder block (h(c1), |h(c0) - h(c1)|, eq. 2 noise difference) at each
candidate timestep for the train and val splits once, under the same per-image noise as the workflow,
then fits one head per lever set with diffseg.features.fit_head (train masks, val early stopping) and
prints, per lever set, the val Dice of the vote at 0.5 and after the calibration the workflow fits on
val (diffseg.calibration.fit_calibration), with the head's wall time. One JSON line per lever set is
appended to <out>/levers.jsonl.

    PYTHONPATH=src .venv/bin/python bench/features_levers.py /work/runs/h19_seed0_features /tmp/levers \\
        --candidates 10 25 50 100 200
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from diffseg.calibration import fit_calibration
from diffseg.data import load_split
from diffseg.ddpm import load_model
from diffseg.features import FeatureHead, fit_head, head_probabilities, split_inputs
from diffseg.schedule import Schedule
from diffseg.settings import HeadSettings
from diffseg.train import load_checkpoint

# (name, timesteps, head settings and input switches); blocks None = all decoder blocks
LEVER_SETS = [
    ("all inputs, t 10 25 50", [10, 25, 50], {}),
    ("h(c1) only, t 10 25 50", [10, 25, 50], {"use_difference": False, "use_noise": False}),
    ("all inputs, t 25 50 100", [25, 50, 100], {}),
    ("all inputs, t 50 100 200", [50, 100, 200], {}),
    ("all inputs, t 10 25 50 100", [10, 25, 50, 100], {}),
    ("all inputs, last two decoder blocks, t 10 25 50", [10, 25, 50], {"blocks": "fine"}),
    ("all inputs, 3x3 head, t 10 25 50", [10, 25, 50], {"head": "conv3x3"}),
    ("all inputs, hidden 128, t 10 25 50", [10, 25, 50], {"hidden": 128}),
    ("all inputs, 1200 steps, t 10 25 50", [10, 25, 50], {"steps": 1200}),
    ("h(c1) only, 1200 steps, t 10 25 50", [10, 25, 50], {"use_difference": False, "use_noise": False,
                                                          "steps": 1200}),
    ("all inputs, 3x3 head, 1200 steps, t 10 25 50", [10, 25, 50], {"head": "conv3x3", "steps": 1200}),
    ("all inputs, t 10 25", [10, 25], {}),
]


def cached_inputs(model, schedule, split: dict, name: str, t: int, out: Path, seed: int) -> torch.Tensor:
    """(N, C, R, R) float16 inputs of one split at one timestep, all blocks, all inputs (cached on disk)."""
    path = out / f"{name}_t{t}.pt"
    if not path.exists():
        start = time.perf_counter()
        x = split_inputs(model, schedule, split["ids"], split["images"], [t], range(len(model.up)), seed=seed,
                         batch_images=32, device=torch.device("cpu"))[:, 0]
        torch.save(x, path)
        logging.info("cached %s t=%d %s in %.0f s", name, t, tuple(x.shape), time.perf_counter() - start)
    return torch.load(path, mmap=True)


def channel_index(widths: list[int], blocks: list[int], use_features=True, use_difference=True, use_noise=True):
    """Indices into the all-block layout (h(c1) of every block, then differences, then noise) of a lever set."""
    offsets, total = np.cumsum([0, *widths]), sum(widths)
    index = []
    if use_features:
        index += [c for b in blocks for c in range(offsets[b], offsets[b + 1])]
    if use_difference:
        index += [total + c for b in blocks for c in range(offsets[b], offsets[b + 1])]
    if use_noise:
        index.append(2 * total)
    return torch.tensor(index)


def trial(name, timesteps, levers, cache, widths, train, val, out: Path, steps: int, eval_every: int) -> dict:
    levers = dict(levers)
    blocks = levers.pop("blocks", None)
    blocks = list(range(len(widths)))[-2:] if blocks == "fine" else list(range(len(widths)))
    switches = {k: levers.pop(k) for k in ("use_features", "use_difference", "use_noise") if k in levers}
    steps = levers.pop("steps", steps)
    index = channel_index(widths, blocks, **switches)
    stack = {s: torch.stack([cache[s, t].index_select(1, index) for t in timesteps], dim=1) for s in ("train", "val")}
    tag = f"{len(list(out.glob('head_*.pt'))):02d}"
    start = time.perf_counter()
    summary = fit_head(stack["train"], train["masks"], stack["val"], val["masks"], out / f"head_{tag}.pt",
                       out / f"log_{tag}.csv", {}, HeadSettings(steps=steps, eval_every=eval_every, **levers),
                       device="cpu")
    seconds = time.perf_counter() - start
    ckpt = load_checkpoint(out / f"head_{tag}.pt")
    head = FeatureHead(**ckpt["config"]["model"])
    head.load_state_dict(ckpt["ema"])
    probs = head_probabilities(head.eval(), stack["val"]).numpy()
    _, report = fit_calibration(probs, val["masks"], timesteps, method="calibrated", bias=False, blur_sigma=1.0)
    return {"levers": name, "timesteps": timesteps, "blocks": blocks, "channels": len(index),
            "val_vote_at_0.5": round(summary["best_metric"], 4),
            "val_calibrated_vote": round(report["val_dice_vote"], 4),
            "head_steps": summary["steps"], "head_seconds": round(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="results folder with data/dataset.h5 and models/ddpm.pt")
    parser.add_argument("out", type=Path, help="folder for the cached inputs, heads and levers.jsonl")
    parser.add_argument("--candidates", type=int, nargs="+", default=[10, 25, 50, 100, 200])
    parser.add_argument("--steps", type=int, default=400, help="head steps (features.steps)")
    parser.add_argument("--eval-every", type=int, default=50, help="features.eval_every")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (inference.seed)")
    parser.add_argument("--only", type=int, nargs="*", help="indices of LEVER_SETS to run (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    model, cfg = load_model(args.run / "models/ddpm.pt")
    schedule = Schedule.from_config(cfg["diffusion"])
    train, val = (load_split(args.run / "data/dataset.h5", s) for s in ("train", "val"))
    cache = {(name, t): cached_inputs(model, schedule, split, name, t, args.out, args.seed)
             for t in args.candidates for name, split in (("train", train), ("val", val))}
    widths = model.decoder_channels()
    for i, (name, timesteps, levers) in enumerate(LEVER_SETS):
        if args.only and i not in args.only or not set(timesteps) <= set(args.candidates):
            continue
        row = trial(name, timesteps, levers, cache, widths, train, val, args.out, args.steps, args.eval_every)
        print(json.dumps(row), flush=True)
        with open(args.out / "levers.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
