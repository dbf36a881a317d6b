"""The full-size result on one GPU in one prepared run (config/isic2018_gpu.yaml), within about 9 minutes.

On the GPU machine (repository root; wheels from ../shared/tools/gpu-wheelhouse carried as .whl,
the ISIC images as .data/isic2018_task1_256 unless ../shared/data is there):
    python3 bench/gpu_run.py                  # results into $OUT
On a CPU, the same steps on a tiny config (synthetic demo data, a few minutes), to catch typos and
missing files before the GPU lease is spent:
    python bench/gpu_run.py --dry             # results into a temporary folder unless --out/$OUT

Steps: install the offline wheels (skipped in --dry when snakemake is importable); print GPU, torch
and Snakemake versions; copy the workflow into a scratch folder and run (1) prepare + DDPM training
(budget train.max_minutes), (2) the rest of the default workflow, the U-Net baseline training beside
the inference jobs (gpu=2), (3) the paper overlay (config/ablation/paper.yaml) on the same model,
(4) bench/infer_throughput.py on the trained model with torch.compile at the paper's 10 timesteps
(steady state: compilation and a warm-up batch untimed). Steps 3 and 4 are skipped when they would
not end before --budget-s; each step is stopped at the budget. Writes into the output folder at most 8 files, refreshed after each step:
gpu_run.json (versions, wall times, per-rule seconds, throughputs), table.md, test.csv (per-image
metrics), summary.png, ddpm_train_log.csv, table_paper.md, logs.tar.gz (rule logs and benchmarks of
both runs), gpu_run.log (this script's output).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_PARTS = ["Snakefile", "rules", "workflow", "config", "envs", "profiles", "report"]
CONFIGS = ["config/isic2018.yaml", "config/isic2018_gpu.yaml"]
PAPER = "config/ablation/paper.yaml"
DATA_CANDIDATES = [REPO / "../shared/data/isic2018_task1_256", REPO / ".data/isic2018_task1_256"]
SITE = Path("/tmp/site")
PAPER_TIMESTEPS = [60, 70, 80, 90, 100, 110, 120, 130, 140, 150]  # the paper's 10 outputs: 20 passes per image
TARGETS = {"train_images_per_s": 1100, "infer_images_per_s": 200}
# table.md rows compared: the workflow's final mask (diffseg.evaluate.FINAL_METHOD; this script runs before the
# package is importable) and the supervised U-Net
FINAL_ROW, UNET_ROW = "DiffSeg + CRF fusion", "U-Net (supervised)"
# seconds that steps 3 and 4 need on an H100 (eager inference + CPU stages; compilation ~1 min + 1,024 images)
NEEDS_S = {"paper": 90, "infer_bench": 90}

# Tiny settings for --dry: every rule and every step of this script, on 2 CPU cores in minutes.
# The budgets are set so that both trainings stop on time, not on steps.
DRY_CONFIG = {
    "data_dir": None,
    "demo": {"n_images": 24, "image_size": 64, "seed": 0},
    "prepare": {"resolution": 32, "dilate_px": 1, "split_fractions": {"train": 0.5, "val": 0.25, "test": 0.25}},
    "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
              "dropout": 0.0, "num_heads": 1},
    "train": {"steps": 100000, "max_minutes": 0.25, "batch_size": 8, "warmup_steps": 5, "checkpoint_every": 10,
              "log_every": 2, "precision": "fp32", "compile": False, "device": "cpu"},
    "inference": {"batch_images": 4, "precision": "fp32", "device": "cpu"},
    "features": {"hidden": 8, "steps": 20, "batch_size": 8, "eval_every": 10},
    "crf": {"rounds": 2, "subset_size": 2, "bilateral_sxy": 10},
    "baselines": {"base_channels": 4, "depth": 2, "steps": 100000, "max_minutes": 0.1, "batch_size": 8,
                  "eval_every": 10, "patience": 100, "precision": "fp32", "device": "cpu"},
}
DRY_BENCH = ["--device", "cpu", "--precision", "fp32", "--n-images", "8", "--batch-images", "4", "--threads", "1"]
GPU_BENCH = ["--device", "cuda", "--precision", "bf16", "--n-images", "1024", "--batch-images", "32", "--compile"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="tiny CPU config (synthetic data); no wheel install if "
                                                      "snakemake is importable")
    p.add_argument("--out", help="output folder (default $OUT; with --dry a temporary folder)")
    p.add_argument("--work", help="scratch folder for the workflow copy and its results (default: a temporary one)")
    p.add_argument("--data-dir", help="ISIC folder (default: the first of " +
                                      ", ".join(str(c.relative_to(REPO)) for c in DATA_CANDIDATES) + " that exists)")
    p.add_argument("--budget-s", type=float, default=540, help="wall-time budget of the whole script (default 540)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    return p.parse_args()


class Run:
    """The output folder, the console log and the JSON record, written after every step."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.start, self.budget_s = out, time.monotonic(), budget_s
        self.log_fh = open(out / "gpu_run.log", "a")
        self.record: dict = {"started_utc": utc_now(), "steps": {}, "skipped": {}}

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def say(self, text: str) -> None:
        line = f"[gpu_run {time.monotonic() - self.start:6.1f} s] {text}"
        print(line, flush=True)
        self.log_fh.write(line + "\n")
        self.log_fh.flush()

    def command(self, cmd: list[str], *, cwd: Path, env: dict, limit_s: float) -> int:
        """Run cmd, its output into the log and the console; stopped (whole process group) after limit_s."""
        self.say("$ " + " ".join(cmd))
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + max(limit_s, 1)
        timer = _Killer(proc, deadline)
        for line in proc.stdout:
            sys.stdout.write(line)
            self.log_fh.write(line)
        rc = proc.wait()
        timer.cancel()
        self.log_fh.flush()
        if timer.fired:
            self.say(f"stopped after {limit_s:.0f} s (the budget): {' '.join(cmd[:4])} ...")
            return 124
        return rc

    def save(self) -> None:
        self.record["wall_s"] = round(time.monotonic() - self.start, 1)
        (self.out / "gpu_run.json").write_text(json.dumps(self.record, indent=2, default=str))


class _Killer:
    """Kills a process group at a deadline (a thread, so reading its output is never blocked)."""

    def __init__(self, proc: subprocess.Popen, deadline: float):
        import threading

        self.fired = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._wait, args=(proc, deadline), daemon=True)
        self._thread.start()

    def _wait(self, proc, deadline):
        if self._done.wait(max(0.0, deadline - time.monotonic())):
            return
        self.fired = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            if not self._done.wait(10):
                os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cancel(self):
        self._done.set()


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# ----------------------------------------------------------------------------- environment


def python_env(run: Run, dry: bool) -> dict:
    """Environment for every child: the wheels (installed here unless --dry finds snakemake) and src/."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(REPO / "src")]
    if dry and importlib.util.find_spec("snakemake") is not None:
        run.say("dry run: snakemake is importable, the wheel install is skipped")
    else:
        wheels = sorted((REPO / ".whl").glob("*.whl"))
        if not wheels:
            raise SystemExit(f"gpu_run: no wheels in {REPO / '.whl'}: run ../shared/tools/gpu-wheelhouse here first "
                             "and carry .whl")
        # exactly as ../shared/tools/gpu-wheelhouse says
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--target", str(SITE), *map(str, wheels)]
        if run.command(cmd, cwd=REPO, env=env, limit_s=min(180, run.left_s())) != 0:
            raise SystemExit("gpu_run: the wheel install failed (see above)")
        paths.insert(0, str(SITE))
        env["PATH"] = f"{SITE / 'bin'}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = ":".join(paths + [p for p in env.get("PYTHONPATH", "").split(":") if p])
    return env


VERSIONS_PY = """
import json, platform, torch, snakemake, h5py, numpy, pydensecrf.densecrf
try:
    import isic_challenge_scoring; scoring = getattr(isic_challenge_scoring, '__version__', 'importable')
except ImportError:
    scoring = None
cuda = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
    "snakemake": snakemake.__version__, "numpy": numpy.__version__, "h5py": h5py.__version__,
    "isic_challenge_scoring": scoring}))
"""


def versions(run: Run, env: dict) -> dict:
    if shutil.which("nvidia-smi"):
        run.command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"], cwd=REPO,
                    env=env, limit_s=30)
    proc = subprocess.run([sys.executable, "-c", VERSIONS_PY], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        run.say(proc.stderr)
        raise SystemExit("gpu_run: torch, snakemake, h5py or pydensecrf cannot be imported (see above)")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    run.say("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    return found


# ----------------------------------------------------------------------------- the workflow


def workflow_copy(work: Path, dry: bool) -> Path:
    """The workflow in work/, plus the dry overlay; the package itself comes from PYTHONPATH (src/)."""
    work.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        src, dest = REPO / part, work / part
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest)
    if dry:
        (work / "gpu_dry.yaml").write_text(yaml.safe_dump(DRY_CONFIG))
    return work


def find_data(given: str | None, dry: bool) -> Path | None:
    if dry:
        return None
    candidates = [Path(given)] if given else DATA_CANDIDATES
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise SystemExit("gpu_run: no ISIC data folder; looked for " + ", ".join(map(str, candidates)) +
                     " (copy ../shared/data/isic2018_task1_256 to .data/ and carry it)")


def results_dir(work: Path) -> Path:
    cfg = yaml.safe_load((REPO / CONFIGS[-1]).read_text())
    return work / cfg["results_dir"]


def snakemake_cmd(args, targets: list[str], *, gpus: int, paper: bool, dry: bool, data: Path | None) -> list[str]:
    configs = CONFIGS + ([PAPER] if paper else []) + (["gpu_dry.yaml"] if dry else [])
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(args.cores), "--resources", f"gpu={gpus}",
           "--show-failed-logs", *targets, "--configfile", *configs]
    if data is not None:
        cmd += ["--config", f"data_dir={data}"]
    return cmd


def workflow_step(run: Run, name: str, cmd: list[str], work: Path, env: dict, R: Path) -> bool:
    run.say(f"step {name}")
    t0 = time.monotonic()
    rc = run.command(cmd, cwd=work, env=env, limit_s=run.left_s() - 15)
    run.record["steps"][name] = {"wall_s": round(time.monotonic() - t0, 1), "rc": rc,
                                 "rules_s": rule_seconds(R / "benchmarks")}
    run.save()
    return rc == 0


def rule_seconds(bench_dir: Path) -> dict:
    """Wall seconds of each job from its Snakemake benchmark file (column s)."""
    seconds = {}
    for tsv in sorted(bench_dir.rglob("*.tsv")):
        with open(tsv) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            seconds[str(tsv.relative_to(bench_dir).with_suffix(""))] = round(float(rows[0]["s"]), 2)
    return seconds


# ----------------------------------------------------------------------------- throughputs from the run's files


def training_throughput(R: Path) -> dict:
    """Steady-state DDPM images/s: median of the CSV's windows without the first (compilation) and a budget-stop window."""
    rows = list(csv.DictReader(open(R / "models/ddpm_train_log.csv")))
    steps = [int(r["step"]) for r in rows]
    log_every = steps[1] - steps[0] if len(steps) > 1 else None
    full = [r for i, r in enumerate(rows) if i > 0 and (log_every is None or int(r["step"]) % log_every == 0)]
    rates = [float(r["images_per_s"]) for r in full]
    done = training_summary(R / "logs/train_ddpm.log")
    return {"steps_reached": steps[-1] if steps else 0, "stopped_by": done.get("stopped_by"),
            "steady_images_per_s": round(statistics.median(rates), 1) if rates else None,
            "windows": len(rates), "window_steps": log_every, "mean_images_per_s_whole_run": done.get("images_per_s"),
            "final_loss": float(rows[-1]["loss"]) if rows else None}


def training_summary(log: Path) -> dict:
    """steps, stopped_by and images_per_s from the trainer's 'training done: {...}' line."""
    text = log.read_text() if log.is_file() else ""
    found = {}
    for key in ("steps", "stopped_by", "images_per_s"):
        match = re.findall(rf"'{key}': ('?[\w.]+'?)", text)
        if match:
            value = match[-1].strip("'")
            found[key] = None if value == "None" else (value if key == "stopped_by" else float(value))
    return found


def inference_logs(R: Path) -> dict:
    """images/s that each infer job logged (its whole split, first batch included)."""
    found = {}
    for log in sorted((R / "logs/infer").glob("*.log")):
        match = re.search(r"(\d+) images in ([\d.]+) s \(([\d.]+) images/s\)", log.read_text())
        if match:
            found[log.stem] = {"images": int(match[1]), "seconds": float(match[2]), "images_per_s": float(match[3])}
    return found


def table_dice(table_md: Path) -> dict[str, float]:
    """{method: Dice} from the first table of a metrics table.md whose header names 'method' and 'Dice'."""
    lines = table_md.read_text().splitlines() if table_md.is_file() else []
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:1] == ["method"] and "Dice" in cells:
            col, found = cells.index("Dice"), {}
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                values = [c.strip() for c in row.strip().strip("|").split("|")]
                if re.fullmatch(r"[\d.]+", values[col]):
                    found[values[0]] = float(values[col])
            return found
    return {}


def compare_with_unet(dice: dict[str, float]) -> dict:
    """The final DiffSeg row (FINAL_ROW, fixed before the run: the best row of the test table would be chosen on
    the test split) against the supervised U-Net row of the same table."""
    final, unet = dice.get(FINAL_ROW), dice.get(UNET_ROW)
    return {"diffseg_row": FINAL_ROW, "diffseg_dice": final, "unet_dice": unet,
            "diffseg_reached_unet": None if final is None or unet is None else final >= unet}


def copy_out(run: Run, files: dict[str, Path]) -> None:
    for name, src in files.items():
        if src.is_file():
            shutil.copy(src, run.out / name)
        else:
            run.say(f"missing, not copied: {src}")


def archive_logs(run: Run, R: Path, saved: Path) -> None:
    with tarfile.open(run.out / "logs.tar.gz", "w:gz") as tar:
        for folder, name in ((saved, "default_run"), (R / "logs", "last_run/logs"), (R / "benchmarks", "last_run/benchmarks")):
            if folder.is_dir():
                tar.add(folder, arcname=name)


# ----------------------------------------------------------------------------- main


def main() -> int:
    args = parse_args()
    out_dir = args.out or os.environ.get("OUT") or (tempfile.mkdtemp(prefix="gpu_run_out_") if args.dry else None)
    if not out_dir:
        raise SystemExit("gpu_run: no output folder: pass --out or set OUT (or use --dry)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.budget_s)
    run.record["mode"] = "dry (tiny CPU config)" if args.dry else "gpu"
    run.say(f"output folder {out}")
    data = find_data(args.data_dir, args.dry)
    env = python_env(run, args.dry)
    run.record["versions"] = versions(run, env)
    work = workflow_copy(Path(args.work or tempfile.mkdtemp(prefix="gpu_run_work_")), args.dry)
    R = results_dir(work)
    run.record.update(work=str(work), results=str(R), data_dir=str(data) if data else "synthetic demo data",
                      configs=CONFIGS + (["(dry overlay) " + json.dumps(DRY_CONFIG)] if args.dry else []))
    run.save()

    ok = workflow_step(run, "train_ddpm", snakemake_cmd(args, [str((R / "models/ddpm.pt").relative_to(work))],
                                                        gpus=1, paper=False, dry=args.dry, data=data), work, env, R)
    if ok:
        run.record["training"] = training_throughput(R)
        ok = workflow_step(run, "default", snakemake_cmd(args, [], gpus=2, paper=False, dry=args.dry, data=data),
                           work, env, R)
    run.record["inference_jobs_default"] = inference_logs(R)
    copy_out(run, {"table.md": R / "metrics/table.md", "test.csv": R / "metrics/test.csv",
                   "summary.png": R / "figures/summary.png", "ddpm_train_log.csv": R / "models/ddpm_train_log.csv"})
    saved = work / "default_run"
    for folder in ("logs", "benchmarks"):
        if (R / folder).is_dir():
            shutil.copytree(R / folder, saved / folder, dirs_exist_ok=True)
    archive_logs(run, R, saved)
    run.save()
    if not ok:
        run.say("the default run did not finish: steps 3 and 4 are skipped")
        return 1

    if run.left_s() > NEEDS_S["paper"]:
        if workflow_step(run, "paper", snakemake_cmd(args, [], gpus=1, paper=True, dry=args.dry, data=data),
                         work, env, R):
            run.record["inference_jobs_paper"] = inference_logs(R)
            copy_out(run, {"table_paper.md": R / "metrics/table.md"})
    else:
        run.record["skipped"]["paper"] = f"{run.left_s():.0f} s left, needs {NEEDS_S['paper']} s"
    if run.left_s() > NEEDS_S["infer_bench"]:
        bench_json = work / "infer_throughput.json"
        cmd = [sys.executable, str(REPO / "bench/infer_throughput.py"), "--checkpoint", str(R / "models/ddpm.pt"),
               "--timesteps", *map(str, PAPER_TIMESTEPS), "--json", str(bench_json),
               *(DRY_BENCH if args.dry else GPU_BENCH)]
        t0 = time.monotonic()
        rc = run.command(cmd, cwd=work, env=env, limit_s=run.left_s() - 15)
        run.record["steps"]["infer_bench"] = {"wall_s": round(time.monotonic() - t0, 1), "rc": rc}
        if rc == 0:
            run.record["inference_bench"] = json.loads(bench_json.read_text())
    else:
        run.record["skipped"]["infer_bench"] = f"{run.left_s():.0f} s left, needs {NEEDS_S['infer_bench']} s"
    run.save()

    archive_logs(run, R, saved)

    training, bench = run.record.get("training", {}), run.record.get("inference_bench", {})
    run.record["targets"] = {
        **TARGETS,
        "train_reached": (training.get("steady_images_per_s") or 0) >= TARGETS["train_images_per_s"],
        "infer_reached": (bench.get("images_per_s") or 0) >= TARGETS["infer_images_per_s"],
        **compare_with_unet(table_dice(out / "table.md")),
    }
    run.record["finished_utc"] = utc_now()
    run.save()
    run.say(f"done in {run.record['wall_s']} s; files in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
