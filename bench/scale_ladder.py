"""Issue 26's scale ladder: how the paper's method grows with its diffusion model, on the CPU.

One DDPM trained per rung for a fixed number of steps; each rung is a folder ``<out>/<rung>/`` with one
Snakemake results folder per row. Rungs (the overlay is written to ``<out>/<rung>/rung.yaml``):

    rung      base config                  overlay
    r32_init  config/isic2018_quick.yaml   train.steps 1, train.ema_decay 1.0: the DDPM at initialisation (control)
    r32       config/isic2018_quick.yaml   none (1,500 steps); --reuse-quick DIR copies a finished quick run's
                                           data/, models/ and training benchmark instead of training
    r64_half  config/isic2018_medium.yaml  train.steps: half the medium config's
    r64       config/isic2018_medium.yaml  none
    r32_wide  config/isic2018_quick.yaml   model.base_channels 64 (4.5M parameters, twice the channels), 1,500 steps

Rows of a rung, each a results folder ``<out>/<rung>/<row>/``:

    default            the base config's chain: the features method, the U-Net and Otsu (rule all)
    paper              + config/ablation/paper.yaml (the method as written; its GED is the paper path's)
    noise_difference   + config/ablation/noise_difference.yaml
    features_weak      + config/ablation/features_weak.yaml (32-px rungs only)

The rows after ``default`` start from a copy of its data/ and models/ (the trained DDPM and U-Net, file
times kept; not the features head, which each row trains for itself) and run with ``--rerun-triggers mtime input`` (as bench/ablation_rows.py), so the DDPM trains
once per rung. Every run is one ``snakemake --cores 2`` at a time (never two trainings on 2 cores), with
``--rerun-incomplete``: run the same command again after an interruption and finished rows are skipped by
Snakemake, an interrupted training resumes from its resume file.

Precision (decided 2026-12-05, before any rung ran): every rung trains and infers with the defaults users run,
``precision: auto`` = bf16 on this CPU. A bf16-trained DDPM gives DiffSeg's own rows lower scores than an
fp32-trained one at 32 px (docs/RESULTS.md, seeds 1 and 2: the paper row 0.520 / 0.460 against 0.561 / 0.480,
the noise difference 0.715 / 0.681 against 0.735 / 0.730), an offset of about 0.03 that the ladder takes to be
the same on every rung (not measured at 64 px); fp32 training takes 2.4x as long here, which would make the
ladder about 12 hours. The ladder measures the trend across rungs, and the 32-px rungs reuse the bf16 quick
benchmark.

Per rung (``<out>/<rung>/record.json``), then for every rung with a record: ``<out>/ladder.csv``,
``<out>/ladder.md``, ``<out>/ladder_trend.csv`` and ``<out>/ladder.png`` (official Dice of each row's final mask
against the training FLOPs proxy, images seen x parameters x pixels, log x; the paper's 0.864 dashed). The trend:
per row a least-squares line of Dice against log2 of the proxy through the trained rungs, its slope (Dice per
doubling) and its value at config/isic2018.yaml's proxy, labelled as the extrapolation it is. Recorded: parameters, steps
and images seen, the proxy, the wall time of train_ddpm (its benchmark TSV), the last logged training loss,
the DDPM's epsilon loss on the val images under the lesion label at t = 100
(diffseg.ddpm.val_epsilon_loss), every row's official Dice (best single t, mean of outputs, final) and the
paper path's mean GED.

Measured wall time on the quiet 2-core CPU (2026-12-05, docs/RESULTS.md "Scale ladder"): r32_init 9 min, r32
18 min, r64 55 min (training 35), r64_half 38 min (training 17), r32_wide 34 min (training 19): about 2.5 hours.
``--smoke``: every rung on 16 synthetic demo images with a few steps
(a check of the script, a few minutes per rung; its numbers mean nothing).

    PYTHONPATH=src nice -n 10 .venv/bin/python bench/scale_ladder.py --out /work/runs/ladder \\
        --reuse-quick results/isic2018_quick      # a finished run of config/isic2018_quick.yaml, or leave out
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import yaml

from diffseg.evaluate import (BASELINE_NAMES, BEST_T_METHOD, FINAL_METHOD, MEAN_METHOD, OFFICIAL_PREFIX,
                              PAPER_FINAL_METHOD, PUBLISHED)

REPO = Path(__file__).resolve().parents[1]
QUICK = "config/isic2018_quick.yaml"
MEDIUM = "config/isic2018_medium.yaml"
TARGET = "config/isic2018.yaml"  # the 128-px GPU config the trend is extrapolated to (never run: no GPU so far)
PAPER_DICE = PUBLISHED["DiffSeg"][0]  # the paper's Table 1 Dice of DiffSeg on ISIC 2018: 0.864
VAL_LOSS_T = 100
STAGES = {"best_t": BEST_T_METHOD, "mean": MEAN_METHOD, "final": FINAL_METHOD}
BASELINES = {name: BASELINE_NAMES[name] for name in ("unet", "otsu")}
OFFICIAL_DICE = f"{OFFICIAL_PREFIX}dice"
HEAD_FILES = "feature_head"  # models/feature_head.pt and its train log: never copied between rows (copy_trained)
ROWS = {"default": None, "paper": "config/ablation/paper.yaml",
        "noise_difference": "config/ablation/noise_difference.yaml",
        "features_weak": "config/ablation/features_weak.yaml"}
# the figure's lines: (record key of the official Dice, label); the DiffSeg rows at their final mask
LINES = {"default final": "features (the default)", "paper final": "the paper as written",
         "noise_difference final": "noise difference (eq. 2, calibrated)",
         "features_weak final": "features, head on DiffSeg's own masks", "unet": "U-Net (supervised)",
         "otsu": "Otsu"}
# the trend's lines: the figure's, and the paper row's mean of outputs (before the CRF, which adds spread)
TREND_LINES = {**LINES, "paper mean": "the paper as written, mean of its 10 outputs (no CRF)"}
# Each rung is one training seed, so each point carries a training's spread: the quick benchmark's 3-seed sd of
# each row's official Dice (docs/RESULTS.md, "Default changes re-measured", commit b5979b3, 2026-12-05; Otsu
# needs no training; the weak head's 3-seed spread was not measured at bf16)
SEED_SD = {"default final": 0.003, "paper final": 0.051, "paper mean": 0.031, "noise_difference final": 0.022,
           "unet": 0.003, "otsu": 0.0}
# --smoke: 16 synthetic images and a few steps of everything (every rung keeps its resolution and model)
SMOKE = {
    "data_dir": None,
    "demo": {"n_images": 16, "image_size": 64, "seed": 0},
    "prepare": {"split_fractions": {"train": 0.5, "val": 0.25, "test": 0.25}},
    "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1},
    "inference": {"batch_images": 4},
    "features": {"hidden": 8, "steps": 2, "batch_size": 4, "eval_every": 1, "patience": 1},
    "baselines": {"base_channels": 4, "depth": 2, "steps": 2, "batch_size": 4, "eval_every": 1, "patience": 1},
}


@dataclass(frozen=True)
class Rung:
    """A rung: its base config, its overlay (a function of the resolved base, e.g. half its steps) and
    whether the weak-head row runs on it (32-px rungs)."""

    name: str
    base: str
    overlay: Callable[[dict], dict] = field(default=lambda base: {})
    weak_row: bool = False

    def rows(self) -> list[str]:
        return [row for row in ROWS if row != "features_weak" or self.weak_row]


RUNGS = {rung.name: rung for rung in (
    Rung("r32_init", QUICK, lambda base: {"train": {"steps": 1, "ema_decay": 1.0}}, weak_row=True),
    Rung("r32", QUICK, weak_row=True),
    Rung("r64_half", MEDIUM, lambda base: {"train": {"steps": max(1, base["train"]["steps"] // 2)}}),
    Rung("r64", MEDIUM),
    Rung("r32_wide", QUICK, lambda base: {"model": {"base_channels": 64}}, weak_row=True),
)}


# ----------------------------------------------------------------------------- the table and the figure


def flops_proxy(images_seen: int, parameters: int, resolution: int) -> float:
    """Training compute proxy: images seen x parameters x pixels per image (a conv net's FLOPs grow with both)."""
    if min(images_seen, parameters, resolution) < 1:
        raise ValueError(f"flops_proxy needs positive counts, got images_seen={images_seen}, "
                         f"parameters={parameters}, resolution={resolution}")
    return float(images_seen) * float(parameters) * float(resolution) ** 2


def ladder_table(records: list[dict]) -> pd.DataFrame:
    """One row per rung record, ordered by the FLOPs proxy (images_seen and flops_proxy computed here)."""
    table = pd.DataFrame(records)
    table["images_seen"] = table["train_steps"] * table["batch_size"]
    table["flops_proxy"] = [flops_proxy(n, p, r) for n, p, r in
                            zip(table["images_seen"], table["parameters"], table["resolution"])]
    return table.sort_values("flops_proxy", kind="stable").reset_index(drop=True)


MARKDOWN_COLUMNS = {"rung": "rung", "resolution": "px", "parameters": "parameters", "train_steps": "steps",
                    "images_seen": "images seen", "flops_proxy": "FLOPs proxy", "train_seconds": "train s",
                    "final_train_loss": "last train loss", "val_eps_loss": f"val eps loss (t={VAL_LOSS_T})",
                    **{key: f"{label} (Dice)" for key, label in LINES.items()},
                    "paper_ged": "GED, paper path"}


FORMATS = {"flops_proxy": "{:.3g}", "train_seconds": "{:.0f}", "final_train_loss": "{:.4f}", "val_eps_loss": "{:.4f}"}


def ladder_markdown(table: pd.DataFrame) -> str:
    """The table's headline columns (official Dice of each row's final mask) as markdown; n/a where missing."""
    lines = ["| " + " | ".join(MARKDOWN_COLUMNS.values()) + " |", "|" + "---|" * len(MARKDOWN_COLUMNS)]
    for _, row in table.reindex(columns=list(MARKDOWN_COLUMNS)).iterrows():
        lines.append("| " + " | ".join(_cell(row[key], FORMATS.get(key, "{:.3f}")) for key in MARKDOWN_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "n/a"
    return fmt.format(value) if isinstance(value, float) else str(value)


MARKERS = {32: "o", 64: "s"}  # by resolution; others "D"


def draw_ladder(table: pd.DataFrame, png: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Official Dice against the FLOPs proxy (log x), one line per row (circles 32 px, squares 64 px), the
    paper's Dice dashed, the rungs named at the bottom; returns {label: (x, y)} of every line drawn (rungs
    without the row left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    drawn = {}
    try:
        for key, label in LINES.items():
            if key not in table:
                continue
            points = table[["flops_proxy", key, "resolution"]].dropna()
            if points.empty:
                continue
            x, y = points["flops_proxy"].tolist(), points[key].astype(float).tolist()
            line, = ax.plot(x, y, ":" if key in BASELINES else "-", label=label)
            for xi, yi, res in zip(x, y, points["resolution"]):
                ax.plot(xi, yi, MARKERS.get(int(res), "D"), color=line.get_color())
            drawn[label] = (x, y)
        for _, row in table.iterrows():
            ax.annotate(row["rung"], (row["flops_proxy"], 0.0), xytext=(0, 4), textcoords="offset points",
                        rotation=90, fontsize=7, ha="center", va="bottom")
        ax.axhline(PAPER_DICE, ls="--", color="k", lw=1, label=f"the paper's Dice ({PAPER_DICE})")
        drawn["paper reference"] = ([], [PAPER_DICE])
        ax.set(xscale="log", ylim=(0, 1), xlabel="training FLOPs proxy: images seen x parameters x pixels",
               ylabel="official Dice, test split (final mask)",
               title="DiffSeg scale ladder (2-core CPU; circles 32 px, squares 64 px)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=120)
    finally:
        plt.close(fig)
    return drawn


def config_proxy(config: dict) -> tuple[int, float]:
    """(DDPM parameters, training FLOPs proxy) of a resolved config: steps x batch x parameters x pixels."""
    from diffseg.ddpm import build_model
    from diffseg.unet import count_parameters

    resolution = int(config["prepare"]["resolution"])
    parameters = count_parameters(build_model(config["model"], resolution))
    images_seen = int(config["train"]["steps"]) * int(config["train"]["batch_size"])
    return parameters, flops_proxy(images_seen, parameters, resolution)


def ladder_trend(table: pd.DataFrame, target_proxy: float) -> pd.DataFrame:
    """Per trend line with at least 2 trained rungs: the least-squares line Dice = a + b log2(proxy) through
    the trained rungs (the control at initialisation left out: it learned nothing), ``per_doubling`` = b (Dice
    per doubling of training compute) and ``at_target`` = the line at ``target_proxy``, clipped to [0, 1]: an
    EXTRAPOLATION ``doublings_beyond`` doublings past the largest rung. With the row's seed sd (SEED_SD), the
    standard errors that one-seed points give: ``per_doubling_se`` = sd / sqrt(Sxx) and ``at_target_se`` =
    sd sqrt(1/n + (x_target - mean x)^2 / Sxx); NaN where the sd is not known."""
    trained = table[table["train_steps"] > 1]
    target = float(np.log2(target_proxy))
    rows = []
    for key, label in TREND_LINES.items():
        if key not in trained:
            continue
        points = trained[["flops_proxy", key]].dropna()
        if len(points) < 2:
            continue
        x = np.log2(points["flops_proxy"].to_numpy(float))
        slope, intercept = np.polyfit(x, points[key].to_numpy(float), 1)
        sxx = float(((x - x.mean()) ** 2).sum())
        sd = SEED_SD.get(key, float("nan"))
        rows.append({"line": label, "rungs": len(points), "per_doubling": float(slope),
                     "per_doubling_se": sd / np.sqrt(sxx),
                     "at_target": float(np.clip(intercept + slope * target, 0.0, 1.0)),
                     "at_target_se": sd * float(np.sqrt(1 / len(x) + (target - x.mean()) ** 2 / sxx)),
                     "doublings_beyond": target - float(x.max())})
    return pd.DataFrame(rows, columns=["line", "rungs", "per_doubling", "per_doubling_se", "at_target",
                                       "at_target_se", "doublings_beyond"])


def trend_markdown(trend: pd.DataFrame, target: str, target_proxy: float) -> str:
    """The trend as a markdown table, its extrapolation column named for what it is (+- one standard error)."""
    lines = [f"| row | trained rungs | Dice per doubling of the FLOPs proxy | EXTRAPOLATED to {target} "
             f"(proxy {target_proxy:.3g}) | doublings beyond the largest rung |", "|---|---|---|---|---|"]
    lines += [f"| {r.line} | {r.rungs} | {r.per_doubling:+.4f}{_se(r.per_doubling_se, '.4f')} | "
              f"{r.at_target:.3f}{_se(r.at_target_se, '.2f')} | {r.doublings_beyond:.1f} |" for r in trend.itertuples()]
    return "\n".join(lines) + "\n"


def _se(value: float, fmt: str) -> str:
    return "" if pd.isna(value) else f" +- {value:{fmt}}"


def write_ladder(out: Path, records: list[dict]) -> pd.DataFrame:
    """ladder.csv, ladder.md (the table, then the trend extrapolated to TARGET), ladder_trend.csv and
    ladder.png in ``out`` from the rung records."""
    table = ladder_table(records)
    table.to_csv(out / "ladder.csv", index=False)
    _, target_proxy = config_proxy(merged_config(TARGET))
    trend = ladder_trend(table, target_proxy)
    trend.to_csv(out / "ladder_trend.csv", index=False)
    (out / "ladder.md").write_text(ladder_markdown(table) + "\n" + trend_markdown(trend, TARGET, target_proxy))
    draw_ladder(table, out / "ladder.png")
    return table


# ----------------------------------------------------------------------------- reading a finished row


def row_scores(metrics_csv: Path, row: str) -> dict:
    """Official Dice of a row's DiffSeg stages ("<row> best_t", "<row> mean", "<row> final"), for the
    default row also of the baselines ("unet", "otsu"), for the paper row its path's mean GED ("paper_ged")."""
    table = pd.read_csv(metrics_csv)
    means = table.groupby("method").mean(numeric_only=True)
    missing = [name for name in STAGES.values() if name not in means.index]
    if missing:
        raise ValueError(f"{metrics_csv}: no rows {missing} (methods present: {sorted(means.index)})")
    scores = {f"{row} {stage}": float(means.loc[name, OFFICIAL_DICE]) for stage, name in STAGES.items()}
    if row == "default":
        scores.update({key: float(means.loc[name, OFFICIAL_DICE]) for key, name in BASELINES.items()
                       if name in means.index})
    if row == "paper":
        # calibration.method paper shows the faithful rows only: the final row is the paper path
        path = PAPER_FINAL_METHOD if PAPER_FINAL_METHOD in means.index else FINAL_METHOD
        scores["paper_ged"] = float(means.loc[path, "ged_paper"])
    return scores


def training_record(results: Path) -> dict:
    """Steps, batch, resolution, model size, last logged loss and train_ddpm's wall time of a trained row."""
    from diffseg.ddpm import load_model
    from diffseg.train import load_checkpoint
    from diffseg.unet import count_parameters

    checkpoint = results / "models" / "ddpm.pt"
    ckpt = load_checkpoint(checkpoint, kind="ddpm")
    model, config = load_model(checkpoint)
    log = pd.read_csv(results / "models" / "ddpm_train_log.csv")
    bench = results / "benchmarks" / "train_ddpm.tsv"
    return {"resolution": int(config["image_size"]), "base_channels": int(config["model"]["base_channels"]),
            "channel_mult": list(config["model"]["channel_mult"]), "parameters": count_parameters(model),
            "train_steps": int(ckpt["step"]), "batch_size": int(config["train"]["batch_size"]),
            "final_train_loss": float(log["loss"].iloc[-1]) if len(log) else None,
            "train_seconds": float(pd.read_csv(bench, sep="\t")["s"].iloc[0]) if bench.is_file() else None}


def val_loss(results: Path, seed: int = 0) -> float:
    """The trained DDPM's epsilon loss on the val split under the lesion label at t = VAL_LOSS_T (EMA weights)."""
    from diffseg.data import load_split
    from diffseg.ddpm import LESION, load_model, val_epsilon_loss
    from diffseg.schedule import Schedule

    model, config = load_model(results / "models" / "ddpm.pt")
    schedule = Schedule.from_config(config["diffusion"])
    images = load_split(results / "data" / "dataset.h5", "val")["images"]
    return val_epsilon_loss(model, schedule, images, VAL_LOSS_T, LESION, seed)


# ----------------------------------------------------------------------------- running a rung


def snakemake(configfiles: list[Path | str], log: Path) -> tuple[int, float]:
    """One Snakemake run of the workflow in REPO (appended to ``log``): (return code, seconds). A lock left
    by an interrupted run of the same outputs is removed (--unlock) and the run retried once."""
    command = [sys.executable, "-m", "snakemake", "--cores", "2", "--rerun-triggers", "mtime", "input",
               "--rerun-incomplete", "--configfile", *map(str, configfiles)]
    start = time.monotonic()
    for attempt in range(2):
        print("$", " ".join(command), file=sys.stderr, flush=True)
        with open(log, "a") as fh:
            code = subprocess.run(command, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode
        if code == 0 or attempt or "cannot be locked" not in log.read_text()[-5000:]:
            break
        subprocess.run([*command, "--unlock"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return code, time.monotonic() - start


def copy_trained(source: Path, dest: Path, benchmark: bool = False) -> None:
    """data/ (and demo_data/) and models/ of a trained results folder into dest, file times kept (no retraining),
    except the features head: with --rerun-triggers mtime input, Snakemake 9 keeps a copied feature_head.pt
    even where the row's head learns other targets (features_weak: its teacher masks do not exist yet and do
    not trigger a rerun), so every row trains its own. With ``benchmark`` also train_ddpm's benchmark TSV.
    Nothing is copied when dest already has this DDPM."""
    theirs, ours = source / "models" / "ddpm.pt", dest / "models" / "ddpm.pt"
    if not theirs.is_file():
        raise FileNotFoundError(f"{theirs}: no trained DDPM to copy")
    if ours.is_file() and ours.stat().st_mtime == theirs.stat().st_mtime and ours.stat().st_size == theirs.stat().st_size:
        return
    if dest.exists():
        shutil.rmtree(dest)  # a copy of an older DDPM: everything in it is stale
    dest.mkdir(parents=True)
    for part in ("demo_data", "data", "models"):
        if (source / part).is_dir():
            shutil.copytree(source / part, dest / part, copy_function=shutil.copy2,
                            ignore=shutil.ignore_patterns(f"{HEAD_FILES}*"))
    if benchmark:
        (dest / "benchmarks").mkdir()
        shutil.copy2(source / "benchmarks" / "train_ddpm.tsv", dest / "benchmarks" / "train_ddpm.tsv")


def check_reusable(quick: Path, base: dict) -> None:
    """A run given to --reuse-quick must hold a DDPM trained with the quick config's model and steps."""
    from diffseg.train import load_checkpoint

    ckpt = load_checkpoint(quick / "models" / "ddpm.pt", kind="ddpm")
    ours = {"model": base["model"], "steps": base["train"]["steps"], "image_size": base["prepare"]["resolution"]}
    theirs = {"model": {k: ckpt["config"]["model"].get(k) for k in base["model"]}, "steps": ckpt["step"],
              "image_size": ckpt["config"]["image_size"]}
    if ours != theirs:
        raise SystemExit(f"--reuse-quick {quick}: its DDPM was not trained with {QUICK}: {theirs} != {ours}")
    if not (quick / "benchmarks" / "train_ddpm.tsv").is_file():
        raise SystemExit(f"--reuse-quick {quick}: no benchmarks/train_ddpm.tsv (its training time)")


def resolved_base(rung: Rung, smoke: bool) -> dict:
    """config/config.yaml, the rung's base config and, with --smoke, the smoke settings, merged as Snakemake does."""
    return merged_config(rung.base, SMOKE if smoke else None)


def merged_config(base: str, extra: dict | None = None) -> dict:
    """config/config.yaml, then ``base`` (a config file of the repository), then ``extra``, merged as Snakemake
    merges its config files (bench/few_masks.py uses it too)."""
    from snakemake.utils import update_config

    config: dict = {}
    for part in (yaml.safe_load((REPO / name).read_text()) for name in ("config/config.yaml", base)):
        update_config(config, part or {})
    if extra:
        update_config(config, json.loads(json.dumps(extra)))  # a deep copy: update_config keeps references
    return config


def run_rung(rung: Rung, out: Path, smoke: bool, reuse_quick: Path | None) -> dict:
    """Every row of one rung, one after another; the rung's record (written to <out>/<rung>/record.json)."""
    folder = out / rung.name
    folder.mkdir(parents=True, exist_ok=True)
    base = resolved_base(rung, smoke)
    configfiles: list[Path | str] = [rung.base]
    if smoke:
        (folder / "smoke.yaml").write_text(yaml.safe_dump(SMOKE))
        configfiles.append(folder / "smoke.yaml")
    overlay = rung.overlay(base)
    if overlay:
        (folder / "rung.yaml").write_text(yaml.safe_dump(overlay))
        configfiles.append(folder / "rung.yaml")
    if reuse_quick is not None:
        check_reusable(reuse_quick, base)
        copy_trained(reuse_quick, folder / "default", benchmark=True)
    record = {"rung": rung.name, "base": rung.base, "overlay": json.dumps(overlay), "failed_rows": []}
    for row in rung.rows():
        results = folder / row
        if row != "default":
            copy_trained(folder / "default", results)
        results.mkdir(parents=True, exist_ok=True)
        (results / "run.yaml").write_text(yaml.safe_dump({"results_dir": str(results)}))
        files = [*configfiles, results / "run.yaml", *([ROWS[row]] if ROWS[row] else [])]
        code, seconds = snakemake(files, results / "snakemake.log")
        record[f"{row} seconds"] = round(seconds, 1)
        if code != 0:
            print(f"{rung.name}/{row} failed (exit {code}): see {results / 'snakemake.log'}", file=sys.stderr)
            record["failed_rows"].append(row)
            if row == "default":
                break  # no trained DDPM: the other rows cannot run
            continue
        record.update(row_scores(results / "metrics" / "test.csv", row))
    if "default" not in record["failed_rows"]:
        record.update(training_record(folder / "default"))
        record["val_eps_loss"] = val_loss(folder / "default")
    (folder / "record.json").write_text(json.dumps(record, indent=1))
    return record


def finished_records(out: Path) -> list[dict]:
    """The records of every rung under ``out`` whose default row trained (a rung run earlier counts too)."""
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/record.json"))]
    return [r for r in records if "parameters" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="one folder per rung, and the ladder's table and figure")
    parser.add_argument("--rungs", nargs="+", choices=list(RUNGS), default=list(RUNGS), help="in this order")
    parser.add_argument("--reuse-quick", type=Path, help="a finished run of config/isic2018_quick.yaml: rung r32's "
                                                         "DDPM, data and U-Net (not trained again)")
    parser.add_argument("--smoke", action="store_true", help="16 demo images and a few steps per rung (a check)")
    args = parser.parse_args()
    if args.reuse_quick is not None and args.smoke:
        parser.error("--reuse-quick and --smoke exclude each other (a smoke run trains on demo data)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.rungs:
        reuse = args.reuse_quick.resolve() if name == "r32" and args.reuse_quick is not None else None
        record = run_rung(RUNGS[name], out, args.smoke, reuse)
        failed += [f"{name}/{row}" for row in record["failed_rows"]]
        records = finished_records(out)
        if records:
            write_ladder(out, records)  # after every rung: a partial ladder is readable while the next one runs
    print((out / "ladder.md").read_text() if (out / "ladder.md").is_file() else "no rung finished")
    if failed:
        raise SystemExit(f"failed rows: {', '.join(failed)} (their snakemake.log says why)")


if __name__ == "__main__":
    main()
