"""Prediction speed on a CPU: the prediction target's fixed cost and its cost per image.

    .venv/bin/python bench/predict_speed.py [--quick-bundle results/isic2018_quick/models/diffseg_bundle.zip]
        [--images 16] [--few 1] [--repeats 3] [--cores 2] [--cases quick isic128] [--masks] [--workdir DIR]
    .venv/bin/python bench/predict_speed.py --smoke      # checks the script: 2 images, a 16 px model, demo data

Models (cases):
  quick    config/isic2018_quick.yaml: 32 px, the 1.1M-parameter DDPM and its features head. The bundle given
           by --quick-bundle (e.g. the quick benchmark's), else one trained here for a few steps.
  isic128  config/isic2018.yaml: 128 px, the 13.6M-parameter DDPM and its features head, trained here for a
           few steps on a few images (an untrained model costs what a trained one costs per image).
For each case, in a scratch copy of the workflow, the bundle is made once (rule export_bundle, untimed);
then prediction (predict.images and predict.bundle; with --masks also predict.masks, the scoring rule)
runs in a fresh results folder on --few images and on --images images, --repeats times each (the sizes
alternating). Every Snakemake call is timed end to end (Snakefile parsing, job start-up, every rule) and
each rule's benchmark file is read; medians over the repeats are reported. The cost is modelled as
fixed + n x per image:
    per image = (t(N) - t(few)) / (N - few),   fixed = t(few) - few x per image.
Images are the last ones (by id) of the ISIC folder (--data-dir); torch.compile is off (it is for GPUs).
Timings mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PARTS = ["Snakefile", "rules", "workflow", "config", "envs", "profiles", "report"]
IMAGES, MASKS = "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"
CASES = {"quick": ["config/isic2018_quick.yaml"], "isic128": ["config/isic2018.yaml"]}
CPU = {"train": {"compile": False, "device": "cpu"}, "inference": {"compile": False, "device": "cpu"}}
# A bundle in minutes: the case's model, diffusion and inference settings (the bundle's), trained for 2 steps.
FEW_STEPS = {
    "prepare": {"limit": 24, "split_fractions": {"train": 0.5, "val": 0.25, "test": 0.25}},
    "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1},
    "features": {"steps": 2, "batch_size": 8, "eval_every": 1, "patience": 1},
}
# --smoke: the same steps on synthetic demo data with a 16 px model, to check the script in minutes.
SMOKE = {
    "data_dir": None,
    "demo": {"n_images": 16, "image_size": 48, "seed": 0},
    "prepare": {"resolution": 16, "dilate_px": 1, "split_fractions": {"train": 0.5, "val": 0.25, "test": 0.25}},
    "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
              "dropout": 0.0, "num_heads": 1},
    "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1},
    "inference": {"timesteps": [10, 25, 50], "batch_images": 2},
    "features": {"hidden": 8, "steps": 4, "batch_size": 8, "eval_every": 2},
    "crf": {"rounds": 2, "subset_size": 2, "bilateral_sxy": 10},
}


def merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` written over it, nested sections key by key (as Snakemake merges config files)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def snakemake(work: Path, cores: int, configfiles: list[str], overlay: dict, name: str, *targets: str) -> float:
    """Run Snakemake in ``work`` with the config files and ``overlay`` (written as name.yaml); wall seconds."""
    (work / f"{name}.yaml").write_text(yaml.safe_dump(overlay))
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), *targets,
           "--configfile", *configfiles, f"{name}.yaml"]
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"snakemake failed ({name}) in {work}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return time.perf_counter() - start


def rule_seconds(benchmarks: Path) -> dict[str, float]:
    """Seconds per rule from a results folder's benchmark files (a sharded rule's files summed)."""
    totals: dict[str, float] = {}
    for tsv in sorted(benchmarks.rglob("*.tsv")):
        rule = tsv.relative_to(benchmarks).parts[0].removesuffix(".tsv")
        with open(tsv) as fh:
            totals[rule] = totals.get(rule, 0.0) + sum(float(row["s"]) for row in csv.DictReader(fh, delimiter="\t"))
    return totals


def pick_images(source: Path, n: int, dest: Path, with_masks: bool) -> tuple[Path, Path | None]:
    """The last n images (by id) of an ISIC-layout folder copied to dest/images (and their masks to dest/masks)."""
    chosen = sorted((source / IMAGES).glob("*.jpg"))[-n:]
    if len(chosen) < n:
        sys.exit(f"{source / IMAGES}: {len(chosen)} images, {n} wanted")
    images, masks = dest / "images", dest / "masks"
    images.mkdir(parents=True)
    for path in chosen:
        shutil.copy(path, images)
        if with_masks:
            masks.mkdir(exist_ok=True)
            shutil.copy(source / MASKS / f"{path.stem}_segmentation.png", masks)
    return images, masks if with_masks else None


def make_bundle(work: Path, case: str, args, base: dict) -> tuple[Path, Path]:
    """(bundle, folder of ISIC-layout images to predict) for a case: given, or trained here for a few steps."""
    if case == "quick" and args.quick_bundle and not args.smoke:
        return args.quick_bundle.resolve(), args.data_dir
    results = f"results/{case}_bundle"
    overlay = merge(base, {"results_dir": results, **({} if args.smoke else FEW_STEPS)})
    bundle = f"{results}/models/diffseg_bundle.zip"
    seconds = snakemake(work, args.cores, CASES[case], overlay, f"{case}_bundle", bundle)
    print(f"{case}: bundle trained for a few steps in {seconds:.0f} s (not part of the timing)", flush=True)
    return work / bundle, args.data_dir or work / results / "demo_data"


def time_case(work: Path, case: str, args) -> list[dict]:
    """One row per image count of a case: images, median wall seconds over the repeats, median seconds per rule."""
    base = merge(CPU, {"data_dir": str(args.data_dir)} if args.data_dir else {})
    base = merge(base, SMOKE) if args.smoke else base
    bundle, source = make_bundle(work, case, args, base)
    runs: dict[int, list[tuple[float, dict]]] = {args.few: [], args.images: []}
    for repeat in range(args.repeats):  # the two sizes alternate: a slow spell of the machine hits both
        for n in runs:
            images, masks = pick_images(source, n, work / f"{case}_images_{n}_{repeat}", args.masks)
            results = f"results/{case}_predict_{n}_{repeat}"
            predict = {"images": str(images), "bundle": str(bundle), "masks": str(masks) if masks else None}
            wall = snakemake(work, args.cores, CASES[case], merge(base, {"results_dir": results, "predict": predict}),
                             f"{case}_predict_{n}_{repeat}")
            runs[n].append((wall, rule_seconds(work / results / "benchmarks")))
            print(f"{case}: {n} images predicted in {wall:.1f} s", flush=True)
    return [{"case": case, "images": n, "wall_s": statistics.median(w for w, _ in done),
             "rules": {rule: statistics.median(r.get(rule, 0.0) for _, r in done) for rule in done[0][1]}}
            for n, done in runs.items()]


def report(rows: list[dict]) -> None:
    """Markdown: wall time and per-rule seconds of every run, then the fixed cost and the cost per image."""
    rules = sorted({rule for row in rows for rule in row["rules"]})
    print("\n| case | images | wall (s) | " + " | ".join(rules) + " |")
    print("|---" * (len(rules) + 3) + "|")
    for row in rows:
        cells = [f"{row['rules'][r]:.1f}" if r in row["rules"] else "" for r in rules]
        print(f"| {row['case']} | {row['images']} | {row['wall_s']:.1f} | " + " | ".join(cells) + " |")
    print("\n| case | fixed cost (s) | per image (s) |\n|---|---|---|")
    for case in dict.fromkeys(row["case"] for row in rows):
        few, many = (row for row in rows if row["case"] == case)
        per_image = (many["wall_s"] - few["wall_s"]) / (many["images"] - few["images"])
        print(f"| {case} | {few['wall_s'] - few['images'] * per_image:.1f} | {per_image:.2f} |")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick-bundle", type=Path, help="bundle of config/isic2018_quick.yaml (default: train one)")
    p.add_argument("--images", type=int, default=16, help="images of the larger run (default 16)")
    p.add_argument("--few", type=int, default=1, help="images of the smaller run (default 1)")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs of each size; medians are reported (default 3)")
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--masks", action="store_true", help="predict with the images' masks: the scoring rule too")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data/isic2018_task1_256",
                   help="ISIC 2018 folder (official layout) the bundles train on and the images come from")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--smoke", action="store_true", help="check the script: 16 px model, demo data, 1 and 2 images")
    args = p.parse_args()
    if args.smoke:
        args.data_dir, args.images, args.few, args.repeats = None, 2, 1, 1
    elif not args.data_dir.is_dir():
        p.error(f"--data-dir {args.data_dir}: folder not found")
    if not 0 < args.few < args.images:
        p.error("need 0 < --few < --images")
    return args


def main() -> None:
    args = parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="predict-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        if not (work / part).exists():
            (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(REPO / part, work / part)
    rows = [row for case in args.cases for row in time_case(work, case, args)]
    report(rows)
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
