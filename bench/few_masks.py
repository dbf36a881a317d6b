"""Issue 27's learning curve: segmentation from few masks, the features head against a U-Net on the same masks.

For each seed S (the labelled choice ``prepare.labelled_seed``, the DDPM's ``train.seed``, the head's
``features.seed`` and the U-Net's ``baselines.seed`` are all S) on the quick benchmark's images and split
(config/isic2018_quick.yaml; inference.seed stays 0, as in the quick benchmark):

1. Snakemake (one ``--cores 2`` run at a time) prepares ``prepare.labelled: 200`` and trains the quick DDPM
   with ``train.twins_from: 10``: every train image under the lesion label, the healthy twins of only the
   10 first labelled images, so one DDPM serves every N >= 10; the same with ``train.steps: 1``,
   ``ema_decay: 1.0`` (the DDPM at initialisation: the control); a ``prepare.labelled: 10`` dataset (the
   weak head's calibration reads its 2 val masks); and once the quick dataset with every mask (N = all).
2. Per DDPM, the head inputs of every train, val and test image are computed once (as the workflow does:
   the head trains on noise draw 0 of each image and early-stops on val's draw 0; val and test
   probabilities average ``inference.noise_draws`` draws).
3. Per N in 10, 25, 50, 100, 200 and all (``N // 5``, at least 2, of them val images, the rest train
   images, nested, diffseg.data.labelled_counts): the features head (fit on the N masks, early-stopped
   and calibrated on the N's val images), the U-Net (fit on the same masks, early-stopped on the same val
   images), Otsu (channel chosen on the same val images); the head on the untrained DDPM at N = 10, 25, all;
   the weakly supervised head (``features.targets: diffseg``: DiffSeg's own calibrated masks of every train
   image, calibration on the 2 val masks of N = 10) at N = 10. No CRF, figures or bundles.

Every row is scored on the 120 test images with the official score at original size (the 'mean of the
outputs' mask for the heads: the calibrated outputs of the 3 timesteps voted; the quick table's row of
that name). One JSON line per (seed, N, row) in <out>/rows.jsonl (a rerun skips finished rows and finished
Snakemake jobs); then <out>/curve.csv, <out>/curve.md (mean +- sd over seeds) and <out>/curve.png (Dice
against N, log x, the seed spread as bars).

    PYTHONPATH=src .venv/bin/python bench/few_masks.py --out /work/runs/few_masks [--seeds 0 1 2]
    PYTHONPATH=src .venv/bin/python bench/few_masks.py --out /tmp/few --smoke     # demo data, minutes; a check
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from scale_ladder import merged_config  # bench/ is on sys.path when this script runs

from diffseg.baselines import fit_unet, load_baseline, otsu_channel, otsu_masks, predict_masks
from diffseg.calibration import fit_calibration
from diffseg.data import labelled_counts, load_split, truth_mask_files
from diffseg.ddpm import load_model
from diffseg.evaluate import EvalRow, score_row
from diffseg.features import FeatureHead, feature_inputs, fit_head, head_probabilities, resolve_blocks, \
    run_teacher_masks, split_inputs
from diffseg.h5io import read_h5
from diffseg.seeding import image_noise
from diffseg.metrics import mask_metrics
from diffseg.postprocess import calibrated_binary
from diffseg.runtime import resolve_autocast, resolve_device, resolve_dtype, to_model_range
from diffseg.schedule import Schedule
from diffseg.settings import BaselineSettings, HeadSettings, InferenceSettings
from diffseg.train import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
QUICK = "config/isic2018_quick.yaml"
SIZES = (10, 25, 50, 100, 200)
ALL = "all"
CONTROL_SIZES = (10, 25, ALL)
FAIL_DICE = 0.7
ROW_NAMES = {"head": "features head", "unet": "U-Net (supervised)", "otsu": "Otsu",
             "control": "features head, untrained DDPM", "weak": "weakly supervised head (targets: diffseg)"}
# --smoke: 48 synthetic images at 16 px, a few steps: checks the script, its numbers mean nothing
SMOKE_SIZES = (3, 5, 8)
SMOKE = {
    "data_dir": None,
    "demo": {"n_images": 48, "image_size": 48, "seed": 0},
    "prepare": {"resolution": 16, "dilate_px": 1, "limit": None},
    "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": []},
    "train": {"steps": 6, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 6, "log_every": 2},
    "features": {"steps": 6, "eval_every": 3, "batch_size": 8, "teacher": {"timesteps": [50, 100], "noise_draws": 1}},
    "baselines": {"base_channels": 4, "depth": 2, "steps": 6, "eval_every": 3},
}


# ----------------------------------------------------------------------------- the Snakemake part


def quick_config(smoke: bool) -> dict:
    """The quick config (and the smoke settings) merged as Snakemake does and completed with the schema's
    defaults as rules/common.smk does."""
    from snakemake.utils import validate

    config = merged_config(QUICK, SMOKE if smoke else None)
    validate(config, str(REPO / "config/schema.yaml"), set_default=True)
    return config


def snakemake(out: Path, name: str, overlay: dict, target: str, smoke: bool) -> Path:
    """Run the workflow for one target of results folder <out>/<name> (overlay on the quick config); its path."""
    results = out / name
    results.mkdir(parents=True, exist_ok=True)
    files = [QUICK]
    if smoke:
        (out / "smoke.yaml").write_text(yaml.safe_dump(SMOKE))
        files.append(str(out / "smoke.yaml"))
    (results / "run.yaml").write_text(yaml.safe_dump({"results_dir": str(results), **overlay}))
    files.append(str(results / "run.yaml"))
    command = [sys.executable, "-m", "snakemake", "--cores", "2", "--rerun-incomplete", "--configfile", *files,
               "--", str(results / target)]
    start = time.monotonic()
    with open(results / "snakemake.log", "a") as log:
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"{name}: snakemake failed (exit {code}); see {results / 'snakemake.log'}")
    logging.info("%s: %s ready (%.0f s)", name, target, time.monotonic() - start)
    return results


def seed_runs(out: Path, seed: int, sizes: tuple, smoke: bool) -> dict[str, Path]:
    """The results folders of one seed: trained and untrained DDPM (labelled max N, twins of min N), weak data."""
    labelled = {"prepare": {"labelled": max(sizes), "labelled_seed": seed},
                "train": {"seed": seed, "twins_from": min(sizes)}}
    untrained = {"prepare": labelled["prepare"], "train": {**labelled["train"], "steps": 1, "ema_decay": 1.0}}
    weak = {"prepare": {"labelled": min(sizes), "labelled_seed": seed}}
    return {"trained": snakemake(out, f"seed{seed}/trained", labelled, "models/ddpm.pt", smoke),
            "untrained": snakemake(out, f"seed{seed}/untrained", untrained, "models/ddpm.pt", smoke),
            "weak": snakemake(out, f"seed{seed}/weak", weak, "data/dataset.h5", smoke)}


# ----------------------------------------------------------------------------- the head inputs, once per DDPM


class DDPMInputs:
    """Every split's head inputs under one DDPM: ``train`` (noise draw 0, as the head trains), ``val0`` (val's
    draw 0, early stopping) and ``val``/``test``: a list of one (N, T, C, R, R) float16 tensor per draw."""

    def __init__(self, checkpoint: Path, splits: dict[str, dict], inference: InferenceSettings,
                 head: HeadSettings):
        device = resolve_device(inference.device)
        model, cfg = load_model(checkpoint, device=str(device))
        schedule = Schedule.from_config(cfg["diffusion"], device)
        self.timesteps = list(inference.timesteps)
        blocks = resolve_blocks(model, head.blocks)
        autocast = resolve_autocast(device, inference.precision)
        common = dict(seed=inference.seed, batch_images=inference.batch_images, device=device, autocast_dtype=autocast,
                      switches=head.switches)
        start = time.monotonic()
        self.train = split_inputs(model, schedule, splits["train"]["ids"], splits["train"]["images"], self.timesteps,
                                  blocks, **common)
        self.val0 = split_inputs(model, schedule, splits["val"]["ids"], splits["val"]["images"], self.timesteps,
                                 blocks, **common)
        self.val, self.test = (self.draws(model, schedule, splits[s]["images"], blocks, inference, head, autocast)
                               for s in ("val", "test"))
        logging.info("inputs of %s: %s in %.0f s", checkpoint, tuple(self.train.shape), time.monotonic() - start)

    def draws(self, model, schedule, images: np.ndarray, blocks, inference: InferenceSettings, head: HeadSettings,
              autocast) -> list[torch.Tensor]:
        """One (N, T, C, R, R) float16 tensor per noise draw, as inference draws them (image_noise, all draws)."""
        per_draw: list[list[torch.Tensor]] = [[] for _ in range(inference.noise_draws)]
        device = next(model.parameters()).device
        for start in range(0, len(images), inference.batch_images):
            part = images[start:start + inference.batch_images]
            x = to_model_range(part, device)
            noise = image_noise(part, inference.seed, inference.noise_draws)
            for d in range(inference.noise_draws):
                per_draw[d].append(feature_inputs(model, schedule, x, self.timesteps, noise[:, d].to(device), blocks,
                                                  autocast_dtype=autocast, **head.switches).to("cpu", torch.float16))
        return [torch.cat(parts) for parts in per_draw]


def probabilities(head: FeatureHead, draws: list[torch.Tensor]) -> np.ndarray:
    """(N, T, R, R) lesion probabilities averaged over the noise draws (as diffseg.features.feature_maps)."""
    return (sum(head_probabilities(head, d) for d in draws) / len(draws)).numpy()


# ----------------------------------------------------------------------------- one N


def labelled_rows(split: dict, n: int) -> np.ndarray:
    """Rows of the first n labelled images of this split (label_rank < n); every row without label_rank."""
    if "label_rank" not in split:
        return np.arange(len(split["ids"]))
    rank = np.asarray(split["label_rank"])
    return np.flatnonzero((rank >= 0) & (rank < n))


def subset(split: dict, rows: np.ndarray) -> dict:
    return {"ids": [split["ids"][r] for r in rows], "images": split["images"][rows], "masks": split["masks"][rows]}


def head_masks(inputs: DDPMInputs, train_rows, targets, val_rows, val_masks, work: Path, settings: HeadSettings,
               calibration: dict) -> tuple[np.ndarray, dict]:
    """Fit a head, calibrate it on the val rows; the test masks ('mean of the outputs') and a summary."""
    start = time.monotonic()
    train_rows, val_rows = torch.as_tensor(train_rows), torch.as_tensor(val_rows)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        summary = fit_head(inputs.train[train_rows], targets, inputs.val0[val_rows], val_masks, f"{tmp}/head.pt",
                           f"{tmp}/log.csv", {}, settings, device="cpu")
        ckpt = load_checkpoint(f"{tmp}/head.pt")
    head = FeatureHead(**ckpt["config"]["model"])
    head.load_state_dict(ckpt["ema"])
    head.eval()
    val_maps = probabilities(head, [d[val_rows] for d in inputs.val])
    cal, report = fit_calibration(val_maps, val_masks, inputs.timesteps, **calibration)
    val_binary = calibrated_binary(val_maps, cal).mean(axis=1) >= 0.5
    val_dice = [mask_metrics(p, t)["dice"] for p, t in zip(val_binary, val_masks)]
    test_binary = calibrated_binary(probabilities(head, inputs.test), cal)
    return test_binary.mean(axis=1) >= 0.5, {
        "head_steps": summary["steps"], "val_dice": float(np.mean(val_dice)),
        "val_failures": int(np.sum(np.asarray(val_dice) < FAIL_DICE)), "seconds": time.monotonic() - start}


def unet_masks(train: dict, val: dict, test_images: np.ndarray, work: Path, settings: BaselineSettings,
               augment: dict) -> tuple[np.ndarray, dict]:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        summary = fit_unet("unet", train, val, f"{tmp}/unet.pt", f"{tmp}/log.csv", settings, augment=augment)
        net, _ = load_baseline(f"{tmp}/unet.pt", "unet", "cpu")
    device = resolve_device("cpu")
    masks = predict_masks(net, test_images, device, resolve_dtype(settings.precision, device))
    return masks, {"unet_steps": summary["steps"], "seconds": time.monotonic() - start}


# ----------------------------------------------------------------------------- scoring and the record


class Scorer:
    """The official score (original size) of test masks, and rows.jsonl (append; finished rows skipped)."""

    def __init__(self, out: Path, test: dict, data_dir: Path):
        self.out, self.test = out, test
        self.truth = test["masks"].astype(bool)
        self.truth_files = truth_mask_files(data_dir, test["ids"])
        self.path = out / "rows.jsonl"
        self.done = {(r["seed"], str(r["n"]), r["row"]) for r in read_rows(self.path)}

    def has(self, seed: int, n, row: str) -> bool:
        return (seed, str(n), row) in self.done

    def record(self, seed: int, n, row: str, masks: np.ndarray, extra: dict) -> None:
        with tempfile.TemporaryDirectory(dir=self.out) as png_root:
            scores = score_row(EvalRow(ROW_NAMES[row], masks), self.test["ids"], self.truth, self.test["orig_size"],
                               png_root, self.truth_files)
        line = {"seed": seed, "n": n, "row": row, "dice": scores.official_means["dice"],
                "jaccard": scores.official_means["jaccard"], "working_dice": scores.means["dice"],
                **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in extra.items()}}
        logging.info("seed %d N %s %s: official Dice %.4f", seed, n, row, line["dice"])
        with open(self.path, "a") as fh:
            fh.write(json.dumps(line) + "\n")
        self.done.add((seed, str(n), row))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ----------------------------------------------------------------------------- one seed


def run_seed(seed: int, runs: dict[str, Path], everything: Path, config: dict, scorer: Scorer, sizes: tuple) -> None:
    """Every row of one seed: per N the head, U-Net and Otsu; the control and the weak head."""
    dataset = runs["trained"] / "data" / "dataset.h5"
    splits = {s: load_split(dataset, s) for s in ("train", "val")}
    full = {s: load_split(everything / "data" / "dataset.h5", s) for s in ("train", "val")}
    for s in ("train", "val"):  # the same images in the same order: only the masks differ
        if splits[s]["ids"] != full[s]["ids"] or not np.array_equal(splits[s]["images"], full[s]["images"]):
            raise SystemExit(f"{dataset} and {everything} differ in their {s} images")
    splits["test"] = scorer.test
    inference = InferenceSettings.from_config({**config["inference"], "device": "cpu"})
    head = HeadSettings.from_config({**config["features"], "seed": seed})
    unet = BaselineSettings.from_config({**config["baselines"], "seed": seed, "device": "cpu"})
    augment = config["augment"]
    calibration = {**config["calibration"], "threshold": inference.threshold}
    work = scorer.out / "work"
    work.mkdir(exist_ok=True)

    def rows_of(n) -> tuple[np.ndarray, np.ndarray]:
        """The train and val rows whose masks N = n reads (every row of the every-mask dataset for all)."""
        if n == ALL:
            return np.arange(len(full["train"]["ids"])), np.arange(len(full["val"]["ids"]))
        n_train, n_val = labelled_counts(n)
        return labelled_rows(splits["train"], n_train), labelled_rows(splits["val"], n_val)

    def per_n(n) -> tuple[dict, dict]:
        """The train and val images and masks of N = n."""
        source = full if n == ALL else splits
        return tuple(subset(source[s], rows) for s, rows in zip(("train", "val"), rows_of(n)))

    for n in (*sizes, ALL):
        train, val = per_n(n)
        counts = {"train_masks": len(train["ids"]), "val_masks": len(val["ids"])}
        if not scorer.has(seed, n, "otsu"):
            channel, _ = otsu_channel(val["images"], val["masks"])
            scorer.record(seed, n, "otsu", otsu_masks(scorer.test["images"], channel), {**counts, "channel": channel})
        if not scorer.has(seed, n, "unet"):
            masks, extra = unet_masks(train, val, scorer.test["images"], work, unet, augment)
            scorer.record(seed, n, "unet", masks, {**counts, **extra})
    controls = [("head", runs["trained"], (*sizes, ALL)), ("control", runs["untrained"], CONTROL_SIZES)]
    for row, results, ns in controls:
        ns = [n for n in ns if n == ALL or n in sizes]
        if all(scorer.has(seed, n, row) for n in ns) and (row != "head" or scorer.has(seed, min(sizes), "weak")):
            continue
        inputs = DDPMInputs(results / "models" / "ddpm.pt", splits, inference, head)
        for n in ns:
            if scorer.has(seed, n, row):
                continue
            train, val = per_n(n)
            train_rows, val_rows = rows_of(n)
            masks, extra = head_masks(inputs, train_rows, train["masks"], val_rows, val["masks"], work, head,
                                      calibration)
            scorer.record(seed, n, row, masks, {"train_masks": len(train_rows), "val_masks": len(val_rows), **extra})
        if row == "head" and not scorer.has(seed, min(sizes), "weak"):
            weak_head(seed, runs, inputs, splits, config, inference, head, calibration, scorer, min(sizes))
        del inputs


def weak_head(seed: int, runs: dict[str, Path], inputs: DDPMInputs, splits: dict, config: dict,
              inference: InferenceSettings, head: HeadSettings, calibration: dict, scorer: Scorer, n: int) -> None:
    """The head on DiffSeg's own masks of every train image, calibrated on the val masks of the smallest N."""
    teacher = config["features"]["teacher"]
    targets_h5 = scorer.out / "work" / f"teacher_seed{seed}.h5"
    start = time.monotonic()
    if not targets_h5.is_file():
        run_teacher_masks(runs["weak"] / "data" / "dataset.h5", runs["trained"] / "models" / "ddpm.pt", targets_h5,
                          timesteps=teacher["timesteps"], noise_draws=teacher["noise_draws"], calibration=calibration,
                          seed=inference.seed, batch_images=inference.batch_images, device="cpu",
                          precision=inference.precision)
    teacher_seconds = time.monotonic() - start
    targets = read_h5(targets_h5, ["masks"])
    if targets["ids"] != splits["train"]["ids"]:
        raise SystemExit(f"{targets_h5}: its ids are not the train split's")
    _, n_val = labelled_counts(n)
    val_rows = labelled_rows(splits["val"], n_val)
    masks, extra = head_masks(inputs, np.arange(len(targets["ids"])), targets["masks"].astype(bool), val_rows,
                              splits["val"]["masks"][val_rows], scorer.out / "work", head, calibration)
    scorer.record(seed, n, "weak", masks, {"train_masks": 0, "val_masks": len(val_rows), **extra,
                                           "teacher_seconds": teacher_seconds})


# ----------------------------------------------------------------------------- the curve


def curve_table(rows: list[dict]) -> pd.DataFrame:
    """Mean, sd and count over seeds of the official Dice per (row, N); N 'all' last."""
    frame = pd.DataFrame(rows)
    frame["n"] = frame["n"].astype(str)
    table = frame.groupby(["row", "n"]).agg(dice_mean=("dice", "mean"), dice_sd=("dice", "std"),
                                            seeds=("seed", "nunique"), train_masks=("train_masks", "max"),
                                            val_masks=("val_masks", "max")).reset_index()
    table["order"] = [float("inf") if n == ALL else float(n) for n in table["n"]]
    return table.sort_values(["row", "order"]).drop(columns="order").reset_index(drop=True)


def curve_markdown(table: pd.DataFrame) -> str:
    ns = sorted(set(table["n"]), key=lambda n: float("inf") if n == ALL else float(n))
    lines = ["| row | " + " | ".join(f"N = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for row in [r for r in ROW_NAMES if r in set(table["row"])]:
        cells = []
        for n in ns:
            hit = table[(table["row"] == row) & (table["n"] == n)]
            if hit.empty:
                cells.append("")
                continue
            r = hit.iloc[0]
            sd = "" if pd.isna(r["dice_sd"]) else f" +- {r['dice_sd']:.3f}"
            cells.append(f"{r['dice_mean']:.3f}{sd}" + ("" if r["seeds"] == 3 else f" ({r['seeds']} seeds)"))
        lines.append(f"| {ROW_NAMES[row]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_curve(table: pd.DataFrame, png: Path, n_all: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row, name in ROW_NAMES.items():
        part = table[table["row"] == row]
        if part.empty:
            continue
        x = [n_all if n == ALL else int(n) for n in part["n"]]
        ax.errorbar(x, part["dice_mean"], yerr=part["dice_sd"].fillna(0), marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel(f"masks read N (train + val; all = {n_all})")
    ax.set_ylabel("official Dice, test split (mean +- sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def write_curve(out: Path, n_all: int) -> pd.DataFrame:
    rows = read_rows(out / "rows.jsonl")
    table = curve_table(rows)
    table.to_csv(out / "curve.csv", index=False)
    (out / "curve.md").write_text(curve_markdown(table))
    draw_curve(table, out / "curve.png", n_all)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="48 demo images at 16 px, a few steps (a check)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("diffseg").setLevel(logging.WARNING)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = SMOKE_SIZES if args.smoke else SIZES
    config = quick_config(args.smoke)
    everything = snakemake(out, "all_masks", {}, "data/dataset.h5", args.smoke)
    data_dir = everything / "demo_data" if args.smoke else (REPO / config["data_dir"]).resolve()
    test = load_split(everything / "data" / "dataset.h5", "test")
    scorer = Scorer(out, test, data_dir)
    n_all = sum(len(load_split(everything / "data" / "dataset.h5", s)["ids"]) for s in ("train", "val"))
    for seed in args.seeds:
        runs = seed_runs(out, seed, sizes, args.smoke)
        run_seed(seed, runs, everything, config, scorer, sizes)
        write_curve(out, n_all)
    print((out / "curve.md").read_text())


if __name__ == "__main__":
    main()
