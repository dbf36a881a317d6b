"""bench/gpu_run.py: its helpers, and its --dry mode run for real (the same steps as on the GPU, tiny config)."""

import csv
import importlib.util
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_run", REPO / "bench" / "gpu_run.py")
gpu_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_run)

OUT_FILES = {"gpu_run.json", "gpu_run.log", "table.md", "test.csv", "summary.png", "ddpm_train_log.csv",
             "table_paper.md", "logs.tar.gz"}


def write_training(R, rows, done_line):
    (R / "models").mkdir(parents=True)
    (R / "logs").mkdir()
    with open(R / "models/ddpm_train_log.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "loss", "lr", "images_per_s"])
        writer.writerows(rows)
    (R / "logs/train_ddpm.log").write_text(done_line)


def test_training_throughput_leaves_out_the_compile_and_budget_windows(tmp_path):
    # window 1 holds the compilation; step 130 is the time-budget stop (a 30-step window)
    rows = [(50, 0.9, 1e-4, 300.0), (100, 0.5, 2e-4, 1200.0), (130, 0.4, 2e-4, 800.0)]
    done = ("INFO training done: {'kind': 'ddpm', 'steps': 130, 'steps_planned': 100000, 'final_loss': 0.4, "
            "'stopped_by': 'max_minutes', 'resumed_from': None, 'images_per_s': 950.5, 'device': 'cuda'}")
    write_training(tmp_path, rows, done)
    found = gpu_run.training_throughput(tmp_path)
    assert found == {"steps_reached": 130, "stopped_by": "max_minutes", "steady_images_per_s": 1200.0,
                     "windows": 1, "window_steps": 50, "mean_images_per_s_whole_run": 950.5, "final_loss": 0.4}


def test_training_summary_of_a_run_that_did_all_its_steps(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("training done: {'kind': 'ddpm', 'steps': 600, 'steps_planned': 600, 'stopped_by': None, "
                   "'images_per_s': 12.0}")
    assert gpu_run.training_summary(log) == {"steps": 600.0, "stopped_by": None, "images_per_s": 12.0}
    assert gpu_run.training_summary(tmp_path / "absent.log") == {}


def test_rule_seconds_read_from_benchmark_files(tmp_path):
    (tmp_path / "infer").mkdir()
    header = "s\th:m:s\tmax_rss\n"
    (tmp_path / "train_ddpm.tsv").write_text(header + "245.1234\t0:04:05\t900\n")
    (tmp_path / "infer/test_shard-0.tsv").write_text(header + "12.5\t0:00:12\t800\n")
    assert gpu_run.rule_seconds(tmp_path) == {"infer/test_shard-0": 12.5, "train_ddpm": 245.12}


def test_a_command_past_the_budget_is_stopped(tmp_path):
    run = gpu_run.Run(tmp_path, budget_s=60)
    start = time.monotonic()
    rc = run.command([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                     cwd=tmp_path, env=None, limit_s=2)
    assert rc == 124 and time.monotonic() - start < 30
    log = (tmp_path / "gpu_run.log").read_text()
    assert "started" in log and "stopped after 2 s (the budget)" in log


def test_no_output_folder_and_no_data_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_run.py")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "no output folder: pass --out or set OUT" in proc.stderr
    with pytest.raises(SystemExit, match=r"no ISIC data folder; looked for .*nowhere"):
        gpu_run.find_data(str(tmp_path / "nowhere"), dry=False)


@pytest.mark.slow
def test_dry_mode_runs_every_step_and_writes_the_eight_files(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_run.py"), "--dry", "--out", str(out), "--work",
                           str(work), "--cores", "2", "--budget-s", "1500"],
                          capture_output=True, text=True, timeout=1600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == OUT_FILES  # at most 8 files come back from the GPU machine
    record = json.loads((out / "gpu_run.json").read_text())
    assert record["mode"].startswith("dry") and record["skipped"] == {}
    assert [s["rc"] for s in record["steps"].values()] == [0, 0, 0, 0]
    assert list(record["steps"]) == ["train_ddpm", "default", "paper", "infer_bench"]
    rules = record["steps"]["default"]["rules_s"]
    assert {"train_ddpm", "train_baseline/unet", "infer/test_shard-0", "evaluate"} <= set(rules)
    training = record["training"]
    assert training["stopped_by"] == "max_minutes" and training["steps_reached"] >= 1  # the budget, not the steps
    bench = record["inference_bench"]
    assert bench["passes_per_image"] == 20 and bench["n_images"] == 8 and bench["images_per_s"] > 0
    assert set(record["inference_jobs_default"]) == {"val_shard-0", "test_shard-0"}
    assert record["versions"]["torch"] and record["versions"]["snakemake"]
    assert record["targets"]["unet_dice"] is not None and record["targets"]["diffseg_dice"] is not None
    table, paper = (out / "table.md").read_text(), (out / "table_paper.md").read_text()
    assert "DiffSeg, paper post-processing" in table and "U-Net (supervised)" in table and "Otsu" in table
    assert "paper post-processing" not in paper and "DiffSeg + CRF fusion" in paper  # the overlay's own rows
    header = (out / "test.csv").read_text().splitlines()[0]
    assert header.startswith("id,method,dice")
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    steps = [int(r["step"]) for r in csv.DictReader(open(out / "ddpm_train_log.csv"))]
    assert steps[-1] == training["steps_reached"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "default_run/logs/train_ddpm.log" in names and "last_run/benchmarks/evaluate.tsv" in names


def test_the_final_diffseg_row_is_compared_with_the_unet_row_whatever_scores_best(tmp_path):
    from diffseg.evaluate import FINAL_METHOD

    assert gpu_run.FINAL_ROW == FINAL_METHOD
    table = tmp_path / "table.md"
    table.write_text("# Results\n\n| method | Dice | Jaccard |\n|---|---|---|\n"
                     "| DiffSeg, mean of outputs thresholded | 0.912 | 0.80 |\n| DiffSeg + CRF fusion | 0.845 | 0.74 |\n"
                     "| Otsu | 0.757 | 0.67 |\n| U-Net (supervised) | 0.890 | 0.80 |\n\n| score | AUROC |\n|---|---|\n")
    dice = gpu_run.table_dice(table)
    assert dice == {"DiffSeg, mean of outputs thresholded": 0.912, "DiffSeg + CRF fusion": 0.845, "Otsu": 0.757,
                    "U-Net (supervised)": 0.890}
    # the mean-of-outputs row scores best on this (test) table: it is not picked, the final mask is
    assert gpu_run.compare_with_unet(dice) == {"diffseg_row": "DiffSeg + CRF fusion", "diffseg_dice": 0.845,
                                               "unet_dice": 0.890, "diffseg_reached_unet": False}
    absent = gpu_run.compare_with_unet(gpu_run.table_dice(tmp_path / "absent.md"))
    assert absent["diffseg_dice"] is None and absent["diffseg_reached_unet"] is None
