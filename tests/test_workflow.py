"""The workflow as users drive it: lint, dry runs, config errors, a tiny real run and its reruns."""

import re

import pandas as pd
import pytest
import yaml

from conftest import ISIC_256
from workflow_helpers import REPO, snakemake, workflow_copy

CHAIN = ["prepare_dataset", "train_ddpm", "infer", "gather_inference", "calibrate", "uncertainty",
         "gather_uncertainty", "crf_fusion", "gather_crf", "export_masks", "train_baseline",
         "predict_baseline", "fit_risk", "evaluate", "figures", "risk_figures", "export_bundle"]


def planned_jobs(output: str) -> dict[str, int]:
    """Job counts from the 'Job stats' table of a dry run."""
    table = output.split("Job stats:")[1].split("Reasons:")[0] if "Reasons:" in output else output.split("Job stats:")[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def test_lint_passes():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Congratulations" in run.stdout + run.stderr


def test_dry_run_plans_the_full_chain_on_demo_data(tmp_path):
    wf = workflow_copy(tmp_path)
    run = snakemake(wf, "-n", configfiles=("config/config.yaml",))
    assert run.returncode == 0, run.stderr
    jobs = planned_jobs(run.stdout)
    for rule in ["make_demo_data", *CHAIN]:
        assert jobs.get(rule, 0) >= 1, f"{rule} missing from the plan: {jobs}"
    assert jobs["infer"] == 2  # val (calibration) and test
    assert jobs["calibrate"] == 1
    assert jobs["train_baseline"] == 2 and jobs["predict_baseline"] == 3
    assert "train_feature_head" not in jobs and "teacher_masks" not in jobs  # the paper method needs no head


@pytest.mark.parametrize("targets", ["truth", "diffseg"])
def test_dry_run_of_the_features_method_trains_its_head_before_inference(tmp_path, targets):
    """inference.method features: rule infer reads the head (diffseg.methods), trained once, from the teacher's
    masks only with features.targets diffseg; the bundle waits for the head too."""
    wf = workflow_copy(tmp_path, {"inference": {"timesteps": [60, 100, 150], "method": "features"},
                                  "features": {"targets": targets}})
    run = snakemake(wf, "-n", "--printshellcmds")
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = planned_jobs(run.stdout)
    assert jobs["train_feature_head"] == 1 and jobs["infer"] == 2 and jobs["export_bundle"] == 1
    assert jobs.get("teacher_masks", 0) == (targets == "diffseg")
    infer_inputs = re.findall(r"^rule infer:\n    input: (.*)$", run.stdout, re.M)
    assert len(infer_inputs) == 2 and all("results/models/feature_head.pt" in i for i in infer_inputs)


@pytest.mark.skipif(not ISIC_256.is_dir(), reason="shared ISIC data absent")
def test_dry_run_plans_the_full_chain_on_isic(tmp_path):
    wf = workflow_copy(tmp_path)
    (wf / "isic.yaml").write_text(yaml.safe_dump({"data_dir": str(ISIC_256)}))
    run = snakemake(wf, "-n", configfiles=("config/config.yaml", "config/isic2018.yaml", "isic.yaml"))
    assert run.returncode == 0, run.stderr
    jobs = planned_jobs(run.stdout)
    assert "make_demo_data" not in jobs
    for rule in CHAIN:
        assert jobs.get(rule, 0) >= 1, f"{rule} missing from the plan: {jobs}"


GPU_RULES = {"train_ddpm", "train_baseline", "infer"}


def planned_resources(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job in a dry run's output."""
    jobs = re.findall(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", output, re.M)
    return [(rule, dict(item.split("=", 1) for item in res.split(", "))) for rule, res in jobs]


def test_slurm_profile_plans_the_chain_with_gpu_resources_on_gpu_rules(tmp_path):
    wf = workflow_copy(tmp_path)
    run = snakemake(wf, "-n", "--profile", "profiles/slurm", configfiles=("config/config.yaml",))
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = planned_resources(run.stdout)
    assert {rule for rule, _ in jobs} >= set(CHAIN) | GPU_RULES
    for rule, resources in jobs:
        assert int(resources["mem_mb"]) > 0 and int(resources["runtime"]) > 0, (rule, resources)
        if rule in GPU_RULES:
            assert resources.get("gpu") == "1" and resources["slurm_partition"] == "gpu", (rule, resources)
        else:
            assert "gpu" not in resources and resources["slurm_partition"] == "cpu", (rule, resources)


@pytest.mark.parametrize(
    "bad, key, allowed",
    [
        ({"train": {"steps": -1}}, "['train']['steps']", "minimum of 1"),
        ({"inference": {"timesteps": [60, 1000]}}, "inference.timesteps = 1000", "[0, 1000)"),
        ({"data_dir": "/no/such/folder"}, "data_dir = '/no/such/folder'", "an existing folder"),
        ({"crf": {"subset_size": 11}}, "crf.subset_size = 11", "1 to len(inference.timesteps) = 3"),
        ({"prepare": {"inpaint": "magic"}}, "['prepare']['inpaint']", "is not one of"),
        ({"prepare": {"split_fractions": {"train": 0.5, "val": 0.1, "test": 0.1}}}, "prepare.split_fractions",
         "sum to 1"),
        ({"shards": 0}, "['shards']", "minimum of 1"),
        ({"no_such_key": 1}, "no_such_key", "Additional properties are not allowed"),
    ],
)
def test_invalid_config_fails_before_any_rule_runs(tmp_path, bad, key, allowed):
    wf = workflow_copy(tmp_path)
    (wf / "bad.yaml").write_text(yaml.safe_dump(bad))
    run = snakemake(wf, configfiles=("test.yaml", "bad.yaml"))
    assert run.returncode != 0
    message = run.stdout + run.stderr
    assert key in message and allowed in message, message
    assert not (wf / "results").exists(), "a rule ran before the config was rejected"


@pytest.mark.slow
def test_tiny_run_end_to_end_then_nothing_to_do_then_crf_change_reruns_only_crf_and_after(tiny_run, tmp_path):
    table = (tiny_run / "results/metrics/table.md").read_text()
    assert "CRF fusion" in table and "Otsu" in table and "U-Net (supervised)" in table
    assert "paper post-processing" in table  # the faithful rows beside the calibrated ones
    per_image = pd.read_csv(tiny_run / "results/metrics/test.csv")
    assert len(per_image) > 0 and per_image["dice"].between(0, 1).all()
    # the official score first: every row's masks at the demo images' original size (64 px; model at 16 px)
    assert table.index("## Official ISIC 2018 Task 1 score") < table.index("## At the model's working resolution")
    assert "the model worked at 16 x 16 px" in table and "(64 x 64 px;" in table
    assert per_image["official_dice"].between(0, 1).all()
    rows = sorted(p.name for p in (tiny_run / "results/metrics/test_png").iterdir() if p.is_dir())
    assert len(rows) == per_image["method"].nunique() and "otsu" in rows
    crf_pngs = sorted((tiny_run / "results/crf/test_png").glob("*_segmentation.png"))
    scored = tiny_run / "results/metrics/test_png/diffseg_crf_fusion"
    assert crf_pngs and [p.read_bytes() for p in crf_pngs] == [(scored / p.name).read_bytes() for p in crf_pngs]
    # the risk model is fitted (on val) beside the calibration and ranks every test image
    assert "features" in (tiny_run / "results/calibration/risk.json").read_text()
    queue = pd.read_csv(tiny_run / "results/metrics/review_queue.csv")
    assert sorted(queue["id"]) == sorted(set(per_image["id"])) and queue["risk"].is_monotonic_decreasing
    assert "Risk-coverage" in table and "Expected calibration error" in table

    again = snakemake(tiny_run, "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr

    config = yaml.safe_load((tiny_run / "test.yaml").read_text())
    config["crf"]["iterations"] = 3
    (tiny_run / "changed.yaml").write_text(yaml.safe_dump(config))
    plan = snakemake(tiny_run, "-n", configfiles=("changed.yaml",))
    assert plan.returncode == 0, plan.stderr
    # the risk model (fitted on val's CRF masks) changes, and with it the model bundle that packs it
    assert set(planned_jobs(plan.stdout)) == {"crf_fusion", "gather_crf", "export_masks", "fit_risk", "evaluate",
                                              "figures", "risk_figures", "export_bundle", "all"}


@pytest.mark.slow
def test_html_report_holds_the_table_and_figures(tiny_run):
    run = snakemake(tiny_run, "--report", "report.html")
    assert run.returncode == 0, run.stderr[-3000:]
    report = (tiny_run / "report.html").read_text(errors="replace")
    assert len(report) > 10_000
    for name in ["table.md", "summary.png", "ddpm_loss.png", "preview.png", "cases", "method", "risk_coverage.png",
                 "reliability.png"]:
        assert name in report, name


def _requirement_names(requirements) -> set[str]:
    import re

    return {re.split(r"[\s\[<>=!;~]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_plain_install_brings_what_snakemake_report_needs():
    """`pip install -e .` (no extras) must pull in pygments, which `snakemake --report` imports."""
    import importlib.metadata
    import re
    import tomllib

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    resolved = _requirement_names(dependencies)
    for requirement in dependencies:  # one level of extras, e.g. snakemake[reports]
        match = re.match(r"([\w.-]+)\[([\w,\s-]+)\]", requirement)
        if match:
            extras = {e.strip() for e in match[2].split(",")}
            for sub in importlib.metadata.requires(match[1]) or []:
                marker = re.search(r'extra == "([\w-]+)"', sub)
                if marker is None or marker[1] in extras:
                    resolved |= _requirement_names([sub])
    assert "pygments" in resolved, sorted(resolved)


ABLATION_OVERLAYS = sorted(p.name for p in (REPO / "config" / "ablation").glob("*.yaml"))


@pytest.mark.skipif(not ISIC_256.is_dir(), reason="shared ISIC data absent")
@pytest.mark.parametrize("overlay", ["(none)", *ABLATION_OVERLAYS])
def test_quick_benchmark_and_each_ablation_row_plan_the_full_chain(tmp_path, overlay):
    """Every command of docs/RESULTS.md's quick benchmark and ablation passes validation and plans."""
    wf = workflow_copy(tmp_path)
    (wf / "data.yaml").write_text(yaml.safe_dump({"data_dir": str(ISIC_256)}))
    files = ["config/config.yaml", "config/isic2018_quick.yaml", "data.yaml"]
    if overlay != "(none)":
        files.append(f"config/ablation/{overlay}")
    run = snakemake(wf, "-n", configfiles=tuple(files))
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = planned_jobs(run.stdout)
    for rule in ["prepare_dataset", "train_ddpm", "infer", "calibrate", "crf_fusion", "evaluate"]:
        assert jobs.get(rule, 0) >= 1, f"{rule} missing from the plan: {jobs}"


MEDIUM_PARAMETERS = 3_543_651  # base 48, channel_mult 1,2,2,2, one residual block per level, no attention, 64 px


@pytest.mark.skipif(not ISIC_256.is_dir(), reason="shared ISIC data absent")
def test_medium_config_plans_the_full_chain_at_64_px_with_a_3_5m_ddpm(tmp_path):
    """config/isic2018_medium.yaml (issue 26's scale ladder) validates and plans every rule of the chain."""
    from snakemake.utils import update_config

    from diffseg.ddpm import build_model
    from diffseg.unet import count_parameters

    wf = workflow_copy(tmp_path)
    (wf / "data.yaml").write_text(yaml.safe_dump({"data_dir": str(ISIC_256)}))
    files = ("config/config.yaml", "config/isic2018_medium.yaml", "data.yaml")
    run = snakemake(wf, "-n", configfiles=files)
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = planned_jobs(run.stdout)
    assert all(jobs.get(rule, 0) >= 1 for rule in [*CHAIN, "train_feature_head"]), jobs
    assert jobs["infer"] == 2 and jobs["train_baseline"] == 1 and "make_demo_data" not in jobs
    config = {}
    for name in files:
        update_config(config, yaml.safe_load((wf / name).read_text()))
    assert config["prepare"]["resolution"] == 64 and config["prepare"]["limit"] == 600
    assert count_parameters(build_model(config["model"], 64)) == MEDIUM_PARAMETERS


@pytest.mark.skipif(not ISIC_256.is_dir(), reason="shared ISIC data absent")
@pytest.mark.parametrize("paper", [False, True])
def test_gpu_config_and_its_paper_overlay_plan_the_chain(tmp_path, paper):
    """config/isic2018_gpu.yaml (bench/gpu_run.py's run) validates; one U-Net, the 4-minute DDPM budget."""
    wf = workflow_copy(tmp_path)
    (wf / "data.yaml").write_text(yaml.safe_dump({"data_dir": str(ISIC_256)}))
    files = ["config/config.yaml", "config/isic2018.yaml", "config/isic2018_gpu.yaml", "data.yaml"]
    files += ["config/ablation/paper.yaml"] if paper else []
    run = snakemake(wf, "-n", "--printshellcmds", configfiles=tuple(files))
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = planned_jobs(run.stdout)
    assert jobs["train_baseline"] == 1 and jobs["predict_baseline"] == 2 and jobs["infer"] == 2
    assert all(jobs.get(rule, 0) >= 1 for rule in CHAIN)


@pytest.mark.slow
def test_time_budget_stop_then_a_larger_budget_reruns_and_resumes(tmp_path):
    """train.max_minutes through Snakemake: the budget ends training; raising it reruns the rule, which resumes."""
    import torch

    train = {"steps": 6, "batch_size": 4, "warmup_steps": 2, "checkpoint_every": 3, "log_every": 2}
    wf = workflow_copy(tmp_path, {"train": {**train, "max_minutes": 1e-9}})  # spent by the first step
    target = "results/models/ddpm.pt"
    first = snakemake(wf, target)
    assert first.returncode == 0, first.stderr[-3000:]
    log = (wf / "results/logs/train_ddpm.log").read_text()
    assert "training stopped at step 1 of 6" in log
    assert torch.load(wf / target, weights_only=True)["step"] == 1
    (wf / "larger.yaml").write_text(yaml.safe_dump({"train": {**train, "max_minutes": 30}}))
    second = snakemake(wf, target, configfiles=("test.yaml", "larger.yaml"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in (wf / "results/logs/train_ddpm.log").read_text()
    final = torch.load(wf / target, weights_only=True)
    assert final["step"] == 6 and final["stopped_by"] is None
    assert not (wf / "results/models/ddpm.pt.resume.pt").exists()


@pytest.mark.slow
def test_tiny_run_with_the_features_method_on_diffseg_masks_then_its_bundle_predicts_elsewhere(tmp_path):
    """inference.method features trains its head (on the teacher's masks), the rest of the chain runs unchanged,
    and the model bundle (DDPM + head) predicts on images without masks in a folder that never trained."""
    settings = {
        "inference": {"timesteps": [20, 60, 100], "batch_images": 2, "method": "features", "noise_draws": 2},
        "features": {"blocks": [1, 2], "hidden": 8, "steps": 4, "batch_size": 4, "eval_every": 2,
                     "targets": "diffseg", "teacher": {"timesteps": [60, 100], "noise_draws": 1}},
        "calibration": {"method": "calibrated"},
        "baselines": {"methods": ["otsu"]},
    }
    wf = workflow_copy(tmp_path / "wf", settings)
    run = snakemake(wf)
    assert run.returncode == 0, run.stderr[-5000:]
    results = wf / "results"
    assert (results / "models/feature_head.pt").is_file() and (results / "features/teacher_masks.h5").is_file()
    import h5py

    with h5py.File(results / "inference/test.h5") as fh:
        assert fh.attrs["method"] == "features" and list(fh["timesteps"][()]) == [20, 60, 100]
    per_image = pd.read_csv(results / "metrics/test.csv")
    assert len(per_image) > 0 and per_image["dice"].between(0, 1).all()
    plan = snakemake(wf, "-n")
    assert "Nothing to be done" in plan.stdout + plan.stderr

    from test_predict import SIZES, unlabelled_images

    clinic = workflow_copy(tmp_path / "clinic", settings)
    images = unlabelled_images(tmp_path / "new_images")
    bundle = results / "models/diffseg_bundle.zip"
    (clinic / "predict.yaml").write_text(yaml.safe_dump({"predict": {"images": str(images), "bundle": str(bundle)}}))
    run = snakemake(clinic, configfiles=("test.yaml", "predict.yaml"))
    assert run.returncode == 0, run.stderr[-5000:]
    model = clinic / "results/predict/model"
    assert (model / "feature_head.pt").read_bytes() == (results / "models/feature_head.pt").read_bytes()
    assert not (clinic / "results/models").exists()  # nothing was trained there
    with h5py.File(clinic / "results/inference/predict.h5") as fh:
        assert fh.attrs["method"] == "features"
    masks = sorted(p.name for p in (clinic / "results/predict/masks").glob("*.png"))
    assert masks == sorted(f"{name.split('.')[0]}_segmentation.png" for name in SIZES)
    assert len(pd.read_csv(clinic / "results/predict/review_queue.csv")) == len(SIZES)
