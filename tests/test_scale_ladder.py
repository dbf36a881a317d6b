"""bench/scale_ladder.py: the FLOPs proxy, the rungs' overlays, reading a finished row, the table and the figure
(on synthetic rung records), and one rung for real on demo data (slow)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("scale_ladder", REPO / "bench" / "scale_ladder.py")
ladder = importlib.util.module_from_spec(spec)
sys.modules["scale_ladder"] = ladder  # its dataclass looks its module up there
spec.loader.exec_module(ladder)


def record(rung, resolution, parameters, steps, dice, weak=None, batch=32):
    """A synthetic rung record: every DiffSeg row's final Dice offset from ``dice``."""
    out = {"rung": rung, "resolution": resolution, "parameters": parameters, "train_steps": steps,
           "batch_size": batch, "train_seconds": 10.0 * steps, "final_train_loss": 0.05, "val_eps_loss": 0.1,
           "default final": dice, "paper final": dice - 0.3, "paper mean": dice - 0.28, "noise_difference final": dice - 0.15,
           "unet": 0.91, "otsu": 0.748, "paper_ged": 0.2}
    if weak is not None:
        out["features_weak final"] = weak
    return out


RECORDS = [  # listed out of order: the table sorts by the FLOPs proxy
    record("r64", 64, 3_540_000, 1000, 0.91),
    record("r32", 32, 1_140_000, 1500, 0.90, weak=0.80),
    record("r32_init", 32, 1_140_000, 1, 0.60, weak=0.50),
    record("r64_half", 64, 3_540_000, 500, 0.89),
    record("r32_wide", 32, 4_500_000, 1500, 0.905, weak=0.81),
]


def test_flops_proxy_is_images_seen_times_parameters_times_pixels():
    assert ladder.flops_proxy(48_000, 1_140_000, 32) == 48_000 * 1_140_000 * 1024
    assert ladder.flops_proxy(1, 1, 1) == 1.0
    with pytest.raises(ValueError, match="images_seen=0"):
        ladder.flops_proxy(0, 1_140_000, 32)


def test_table_counts_images_and_orders_the_rungs_by_the_proxy():
    table = ladder.ladder_table(RECORDS)
    assert table["rung"].tolist() == ["r32_init", "r32", "r32_wide", "r64_half", "r64"]  # 2.2e14 < 2.3e14
    row = table.set_index("rung").loc["r64_half"]
    assert row["images_seen"] == 16_000
    assert row["flops_proxy"] == 16_000 * 3_540_000 * 64 * 64
    assert table.set_index("rung").loc["r32_init", "images_seen"] == 32


def test_markdown_has_one_line_per_rung_and_na_where_a_row_did_not_run():
    text = ladder.ladder_markdown(ladder.ladder_table(RECORDS))
    lines = text.strip().splitlines()
    assert len(lines) == 2 + len(RECORDS)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["rung", "px", "parameters"] and "GED, paper path" in header
    weak = header.index("features, head on DiffSeg's own masks (Dice)")
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert cells["r64"][weak] == "n/a" and cells["r32"][weak] == "0.800"
    assert cells["r32_init"][header.index("FLOPs proxy")] == f"{32 * 1_140_000 * 1024:.3g}"


def test_figure_draws_each_row_against_the_proxy_with_the_control_at_the_left(tmp_path):
    table = ladder.ladder_table(RECORDS)
    lines = ladder.draw_ladder(table, tmp_path / "ladder.png")
    assert (tmp_path / "ladder.png").stat().st_size > 10_000
    x, y = lines["features (the default)"]
    assert x == sorted(x) and x[0] == table.loc[0, "flops_proxy"] and y[0] == 0.60
    weak_x, weak_y = lines["features, head on DiffSeg's own masks"]
    assert weak_y == [0.50, 0.80, 0.81] and len(weak_x) == 3  # the 32-px rungs only
    assert lines["paper reference"] == ([], [0.864])
    assert set(lines) == {*ladder.LINES.values(), "paper reference"}


def test_write_ladder_writes_csv_markdown_and_figure(tmp_path):
    ladder.write_ladder(tmp_path, RECORDS)
    csv = pd.read_csv(tmp_path / "ladder.csv")
    assert csv["rung"].tolist()[0] == "r32_init" and "flops_proxy" in csv
    text = (tmp_path / "ladder.md").read_text()
    assert text.startswith("| rung |") and "EXTRAPOLATED to config/isic2018.yaml" in text
    trend = pd.read_csv(tmp_path / "ladder_trend.csv")
    assert "the paper as written" in trend["line"].tolist() and (trend["rungs"] == 4).sum() == 6
    assert " +- " in text.split("EXTRAPOLATED")[1] and "head on DiffSeg's own masks | 2 | +0.0" in text
    assert (tmp_path / "ladder.png").is_file()


def metrics_csv(path, methods):
    rows = [{"id": f"ISIC_{i}", "method": m, "official_dice": d + 0.01 * i, "ged_paper": 0.1 * i}
            for m, d in methods.items() for i in range(2)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


STAGE_DICE = {"DiffSeg, best single timestep": 0.80, "DiffSeg, mean of outputs thresholded": 0.82,
              "DiffSeg + CRF fusion": 0.84}


def test_row_scores_read_official_dice_of_each_stage_the_baselines_and_the_paper_ged(tmp_path):
    default = metrics_csv(tmp_path / "d.csv", {**STAGE_DICE, "U-Net (supervised)": 0.9, "Otsu": 0.7})
    assert ladder.row_scores(default, "default") == pytest.approx(
        {"default best_t": 0.805, "default mean": 0.825, "default final": 0.845, "unet": 0.905, "otsu": 0.705})
    paper = ladder.row_scores(metrics_csv(tmp_path / "p.csv", STAGE_DICE), "paper")
    assert paper["paper final"] == pytest.approx(0.845) and paper["paper_ged"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match=r"p2.csv: no rows \['DiffSeg \+ CRF fusion'\]"):
        ladder.row_scores(metrics_csv(tmp_path / "p2.csv", {"DiffSeg, best single timestep": 0.8,
                                                            "DiffSeg, mean of outputs thresholded": 0.8}), "paper")


def test_rungs_overlays_and_rows():
    quick, medium = (ladder.resolved_base(ladder.RUNGS[name], smoke=False) for name in ("r32", "r64"))
    assert ladder.RUNGS["r32_init"].overlay(quick) == {"train": {"steps": 1, "ema_decay": 1.0}}
    assert ladder.RUNGS["r64_half"].overlay(medium) == {"train": {"steps": medium["train"]["steps"] // 2}}
    assert ladder.RUNGS["r32_wide"].overlay(quick) == {"model": {"base_channels": 64}}
    assert ladder.RUNGS["r64"].overlay(medium) == {} and ladder.RUNGS["r32"].overlay(quick) == {}
    assert (quick["prepare"]["resolution"], medium["prepare"]["resolution"]) == (32, 64)
    assert ladder.RUNGS["r64"].rows() == ["default", "paper", "noise_difference"]
    assert ladder.RUNGS["r32_init"].rows() == ["default", "paper", "noise_difference", "features_weak"]
    smoke = ladder.resolved_base(ladder.RUNGS["r64_half"], smoke=True)
    assert smoke["data_dir"] is None and ladder.RUNGS["r64_half"].overlay(smoke) == {"train": {"steps": 2}}


def test_copy_trained_keeps_file_times_and_replaces_a_stale_copy(tmp_path):
    source = tmp_path / "default"
    for name in ("models/ddpm.pt", "models/feature_head.pt", "models/feature_head_train_log.csv",
                 "data/dataset.h5", "benchmarks/train_ddpm.tsv"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(name)
    os.utime(source / "models/ddpm.pt", (1_000_000, 1_000_000))
    dest = tmp_path / "paper"
    ladder.copy_trained(source, dest)
    assert (dest / "models/ddpm.pt").stat().st_mtime == 1_000_000 and (dest / "data/dataset.h5").is_file()
    assert not (dest / "benchmarks").exists()
    assert sorted(p.name for p in (dest / "models").iterdir()) == ["ddpm.pt"]  # each row trains its own head
    (dest / "metrics").mkdir()  # the row's own outputs survive while the DDPM is the same
    ladder.copy_trained(source, dest)
    assert (dest / "metrics").is_dir()
    os.utime(source / "models/ddpm.pt", (2_000_000, 2_000_000))  # retrained: the copy is stale
    ladder.copy_trained(source, dest, benchmark=True)
    assert not (dest / "metrics").exists() and (dest / "benchmarks/train_ddpm.tsv").is_file()
    with pytest.raises(FileNotFoundError, match="no trained DDPM"):
        ladder.copy_trained(tmp_path / "nothing", dest)


def quick_run(folder, step, model):
    """A finished-run folder with a DDPM checkpoint (no weights: only what check_reusable reads)."""
    from diffseg.ddpm import MODEL_DEFAULTS
    from diffseg.train import save_checkpoint

    (folder / "models").mkdir(parents=True)
    (folder / "benchmarks").mkdir()
    (folder / "benchmarks" / "train_ddpm.tsv").write_text("s\n534.3\n")
    save_checkpoint(folder / "models" / "ddpm.pt", {
        "model": {}, "ema": {}, "optimizer": {}, "scaler": None, "step": step, "version": "test", "kind": "ddpm",
        "best_metric": None, "config": {"model": {**MODEL_DEFAULTS, **model}, "image_size": 32}})
    return folder


def test_reuse_quick_accepts_a_run_of_the_quick_config_only(tmp_path):
    quick = ladder.resolved_base(ladder.RUNGS["r32"], smoke=False)
    ladder.check_reusable(quick_run(tmp_path / "ok", 1500, quick["model"]), quick)
    with pytest.raises(SystemExit, match="'steps': 1000"):
        ladder.check_reusable(quick_run(tmp_path / "short", 1000, quick["model"]), quick)
    with pytest.raises(SystemExit, match="'base_channels': 64"):
        ladder.check_reusable(quick_run(tmp_path / "wide", 1500, {**quick["model"], "base_channels": 64}), quick)


@pytest.mark.slow
def test_smoke_rung_runs_every_row_and_writes_the_ladder(tmp_path):
    """--smoke --rungs r32_init for real: 4 Snakemake runs on 16 demo images, then the record and the ladder."""
    run = subprocess.run([sys.executable, str(REPO / "bench/scale_ladder.py"), "--smoke", "--rungs", "r32_init",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert run.returncode == 0, run.stderr[-3000:]
    table = pd.read_csv(tmp_path / "ladder.csv")
    row = table.iloc[0]
    assert row["rung"] == "r32_init" and row["train_steps"] == 1 and row["images_seen"] == 4
    assert row["flops_proxy"] == 4 * row["parameters"] * 32 * 32
    for key in ("default final", "paper final", "noise_difference final", "features_weak final", "unet", "otsu"):
        assert 0 <= row[key] <= 1, key
    assert abs(row["val_eps_loss"] - 1) < 0.1  # the DDPM at initialisation predicts zeros: mean(eps^2)
    assert (tmp_path / "ladder.png").is_file() and (tmp_path / "r32_init" / "rung.yaml").is_file()


def test_trend_fits_dice_per_doubling_through_the_trained_rungs_and_extrapolates_clipped():
    table = ladder.ladder_table(RECORDS)
    log2 = np.log2(table.set_index("rung")["flops_proxy"])
    trend = ladder.ladder_trend(table, target_proxy=2.0 ** 60).set_index("line")
    # the features line through (log2 proxy, Dice) of r32, r32_wide, r64_half, r64 (r32_init left out)
    x = log2[["r32", "r32_wide", "r64_half", "r64"]].to_numpy()
    y = [0.90, 0.905, 0.89, 0.91]
    slope = ((x - x.mean()) * (np.array(y) - np.mean(y))).sum() / ((x - x.mean()) ** 2).sum()
    row = trend.loc["features (the default)"]
    assert row["rungs"] == 4 and row["per_doubling"] == pytest.approx(slope)
    assert row["doublings_beyond"] == pytest.approx(60 - log2.max())
    sxx = ((x - x.mean()) ** 2).sum()
    assert row["per_doubling_se"] == pytest.approx(0.003 / np.sqrt(sxx))  # the default's seed sd, one seed per rung
    assert row["at_target_se"] == pytest.approx(0.003 * np.sqrt(1 / 4 + (60 - x.mean()) ** 2 / sxx))
    assert trend.loc["the paper as written, mean of its 10 outputs (no CRF)", "rungs"] == 4  # "paper mean" keys
    weak = trend.loc["features, head on DiffSeg's own masks"]
    assert weak["rungs"] == 2 and np.isnan(weak["at_target_se"])  # r32 and r32_wide; no seed sd known
    assert trend.loc["U-Net (supervised)", "per_doubling"] == pytest.approx(0.0, abs=1e-12)
    # a line rising by 0.1 per doubling runs past 1 within 20 doublings: clipped, never above a Dice of 1
    steep = [record("a", 32, 1_000_000, 1000, 0.5), record("b", 32, 1_000_000, 2000, 0.6)]
    at = ladder.ladder_trend(ladder.ladder_table(steep), 2.0 ** 80).set_index("line")
    assert at.loc["features (the default)", "per_doubling"] == pytest.approx(0.1)
    assert at.loc["features (the default)", "at_target"] == 1.0
    assert ladder.ladder_trend(ladder.ladder_table(steep[:1]), 2.0 ** 80).empty  # one rung: no line


def test_config_proxy_counts_the_128px_config():
    parameters, proxy = ladder.config_proxy(ladder.merged_config(ladder.TARGET))
    base = ladder.merged_config(ladder.TARGET)
    assert base["prepare"]["resolution"] == 128 and parameters > 5_000_000
    assert proxy == base["train"]["steps"] * base["train"]["batch_size"] * parameters * 128 ** 2
