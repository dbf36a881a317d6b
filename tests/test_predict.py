"""Prediction on new images without masks through Snakemake, with a bundle trained in another results folder."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from diffseg.imageio import read_mask
from workflow_helpers import snakemake, workflow_copy

SIZES = {"NEW_0.jpg": (64, 80), "NEW_1.png": (50, 50), "NEW_2.bmp": (33, 71), "NEW_3.jpg": (48, 40)}


def unlabelled_images(folder):
    """Synthetic dermoscopy-like images of several sizes and formats, no masks."""
    from diffseg.demo import render_sample
    from diffseg.seeding import image_rng

    folder.mkdir(parents=True)
    for k, (name, (height, width)) in enumerate(SIZES.items()):
        rgb, _ = render_sample(image_rng(7, name), 64)
        Image.fromarray(rgb).resize((width, height)).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def prediction(tiny_run, tmp_path_factory):
    """The tiny run's bundle, copied to a fresh workflow folder that never trained, predicts there."""
    root = tmp_path_factory.mktemp("predict")
    bundle = root / "diffseg_bundle.zip"
    shutil.copy(tiny_run / "results/models/diffseg_bundle.zip", bundle)
    wf = workflow_copy(root / "clinic")
    images = unlabelled_images(root / "new_images")
    (wf / "predict.yaml").write_text(yaml.safe_dump({"predict": {"images": str(images), "bundle": str(bundle)}}))
    run = snakemake(wf, configfiles=("test.yaml", "predict.yaml"))
    assert run.returncode == 0, run.stderr[-5000:]
    return wf, run


@pytest.mark.slow
def test_predict_writes_one_original_size_mask_per_image_the_queue_and_the_sheet(prediction):
    wf, run = prediction
    out = wf / "results/predict"
    for name, (height, width) in SIZES.items():
        image_id = name.split(".")[0]
        mask = read_mask(out / "masks" / f"{image_id}_segmentation.png")
        assert mask.shape == (height, width)
        for kind in ("consistency", "ambiguity"):
            with Image.open(out / "maps" / f"{image_id}_{kind}.png") as img:
                assert img.size == (width, height) and img.mode == "L"
    assert sorted(p.name for p in (out / "masks").glob("*.png")) == sorted(
        f"{n.split('.')[0]}_segmentation.png" for n in SIZES)
    queue = pd.read_csv(out / "review_queue.csv")
    assert sorted(queue["id"]) == ["NEW_0", "NEW_1", "NEW_2", "NEW_3"]
    assert queue["rank"].tolist() == [1, 2, 3, 4] and set(queue["sorted_by"]) == {"risk"}
    # the tiny run's bundle holds its risk model (fitted on val): the queue is sorted by that risk
    assert queue["risk"].is_monotonic_decreasing and queue["risk"].between(0, 1).all()
    assert queue["ged"].between(0, 1).all()
    assert (queue[["height", "width"]].to_numpy() == [SIZES_BY_ID[i] for i in queue["id"]]).all()
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size[0] > 400 and sheet.size[1] > 200
    # nothing of the training chain ran in this folder: the bundle's model was used
    assert not (wf / "results/models/ddpm.pt").exists() and not (wf / "results/data").exists()
    assert (wf / "results/predict/model/ddpm.pt").is_file()


SIZES_BY_ID = {name.split(".")[0]: list(size) for name, size in SIZES.items()}


@pytest.mark.slow
def test_predict_uses_the_same_model_output_as_the_training_folder(prediction, tiny_run):
    """The bundle's checkpoint is bit-identical to the training run's."""
    wf, _ = prediction
    assert (wf / "results/predict/model/ddpm.pt").read_bytes() == (tiny_run / "results/models/ddpm.pt").read_bytes()


@pytest.mark.slow
def test_a_bundle_that_does_not_match_the_config_is_refused_before_any_rule(tiny_run, tmp_path):
    wf = workflow_copy(tmp_path / "wf")
    images = unlabelled_images(tmp_path / "new_images")
    overlay = {"predict": {"images": str(images), "bundle": str(tiny_run / "results/models/diffseg_bundle.zip")},
               "prepare": {"resolution": 24}, "model": {"base_channels": 16}}
    (wf / "predict.yaml").write_text(yaml.safe_dump(overlay))
    run = snakemake(wf, "-n", configfiles=("test.yaml", "predict.yaml"))
    message = run.stdout + run.stderr
    assert run.returncode != 0
    assert "the model bundle does not match the config" in message, message[-3000:]
    assert "prepare.resolution: bundle 16, config 24" in message
    assert "model.base_channels: bundle 8, config 16" in message


@pytest.mark.slow
def test_a_bad_image_is_named(tiny_run, tmp_path):
    wf = workflow_copy(tmp_path / "wf")
    images = unlabelled_images(tmp_path / "new_images")
    (images / "NEW_9.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    overlay = {"predict": {"images": str(images), "bundle": str(tiny_run / "results/models/diffseg_bundle.zip")}}
    (wf / "predict.yaml").write_text(yaml.safe_dump(overlay))
    run = snakemake(wf, "--until", "prepare_images", configfiles=("test.yaml", "predict.yaml"))
    assert run.returncode != 0
    log = (wf / "results/logs/prepare_images.log").read_text()
    assert "NEW_9.png: unreadable or truncated image" in log
    assert not (wf / "results/predict/images.h5").exists()


def test_prediction_is_sharded_and_trains_its_own_bundle_when_none_is_given(tmp_path):
    """Dry run: predict.bundle null = this results_dir's bundle, trained first; the per-image stages run per shard."""
    from test_workflow import planned_jobs

    wf = workflow_copy(tmp_path / "wf")
    images = unlabelled_images(tmp_path / "new_images")
    (wf / "predict.yaml").write_text(yaml.safe_dump({"shards": 3, "predict": {"images": str(images)}}))
    run = snakemake(wf, "-n", configfiles=("test.yaml", "predict.yaml"))
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = planned_jobs(run.stdout)
    assert jobs["infer"] == 6  # 3 shards of val (for the calibration) + 3 of the new images
    # CRF on val too: the bundle's risk model (fit_risk) is fitted on val's fused masks; no table, no figures
    assert jobs["crf_fusion"] == 6 and jobs["uncertainty"] == 3
    for rule in ("train_ddpm", "calibrate", "fit_risk", "export_bundle", "unpack_bundle", "prepare_images", "predict_outputs"):
        assert jobs[rule] == 1, (rule, jobs)
    assert "evaluate" not in jobs and "figures" not in jobs and "train_baseline" not in jobs
