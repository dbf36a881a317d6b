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
def test_prediction_equals_evaluation_under_other_names_order_and_shards(tiny_run, tmp_path):
    """Issue 25: the evaluated test images, copied under other names whose order is reversed into another
    folder and predicted from the exported bundle with 3 shards (evaluation ran 1), get bit-identical maps
    and exactly the evaluated final masks (rule export_masks: results/crf/test_png, at the original size)."""
    from diffseg.demo import IMAGE_DIR
    from diffseg.h5io import read_h5

    split = pd.read_csv(tiny_run / "results/data/split.csv")
    test_ids = sorted(split.loc[split["split"] == "test", "id"])
    new_name = {image_id: f"PATIENT_{len(test_ids) - k:02d}" for k, image_id in enumerate(test_ids)}
    images = tmp_path / "clinic_images"
    images.mkdir()
    for image_id, name in new_name.items():
        shutil.copy(tiny_run / "results/demo_data" / IMAGE_DIR / f"{image_id}.jpg", images / f"{name}.jpg")
    wf = workflow_copy(tmp_path / "clinic")
    bundle = tiny_run / "results/models/diffseg_bundle.zip"
    (wf / "predict.yaml").write_text(yaml.safe_dump({"shards": 3, "predict": {"images": str(images),
                                                                              "bundle": str(bundle)}}))
    run = snakemake(wf, configfiles=("test.yaml", "predict.yaml"))
    assert run.returncode == 0, run.stderr[-5000:]

    evaluated = read_h5(tiny_run / "results/inference/test.h5", ["maps"])
    predicted = read_h5(wf / "results/inference/predict.h5", ["maps"])
    assert predicted["ids"] == sorted(new_name.values()) == [new_name[i] for i in reversed(test_ids)]
    for image_id in test_ids:
        np.testing.assert_array_equal(predicted["maps"][predicted["ids"].index(new_name[image_id])],
                                      evaluated["maps"][evaluated["ids"].index(image_id)], err_msg=image_id)
    final = [(read_mask(tiny_run / f"results/crf/test_png/{image_id}_segmentation.png"),
              read_mask(wf / f"results/predict/masks/{new_name[image_id]}_segmentation.png")) for image_id in test_ids]
    for image_id, (mask, prediction) in zip(test_ids, final):
        np.testing.assert_array_equal(prediction, mask, err_msg=image_id)
    assert len({mask.tobytes() for mask, _ in final}) > 1  # the images' masks differ: not a constant answer


@pytest.mark.slow
def test_a_bundle_that_does_not_match_the_config_is_refused_before_any_rule(tiny_run, tmp_path):
    wf = workflow_copy(tmp_path / "wf")
    images = unlabelled_images(tmp_path / "new_images")
    overlay = {"predict": {"images": str(images), "bundle": str(tiny_run / "results/models/diffseg_bundle.zip")},
               "prepare": {"resolution": 24}, "model": {"base_channels": 16},
               "crf": {"rounds": 3}, "inference": {"seed": 5}}  # the tiny run's bundle has rounds 2, seed 0
    (wf / "predict.yaml").write_text(yaml.safe_dump(overlay))
    run = snakemake(wf, "-n", configfiles=("test.yaml", "predict.yaml"))
    message = run.stdout + run.stderr
    assert run.returncode != 0
    assert "the model bundle does not match the config" in message, message[-3000:]
    assert "prepare.resolution: bundle 16, config 24" in message
    assert "model.base_channels: bundle 8, config 16" in message
    assert "crf.rounds: bundle 2, config 3" in message and "inference.seed: bundle 0, config 5" in message


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


# ----------------------------------------------------------------------------- scoring against given masks


def _test_split(tiny_run):
    split = pd.read_csv(tiny_run / "results/data/split.csv")
    return sorted(split.loc[split["split"] == "test", "id"])


@pytest.fixture(scope="module")
def scored_prediction(tiny_run, tmp_path_factory):
    """The tiny run's test images and their masks, predicted with its bundle in a folder that never trained."""
    from diffseg.demo import IMAGE_DIR, MASK_DIR

    root = tmp_path_factory.mktemp("scored")
    images, masks = root / "test_images", root / "test_masks"
    images.mkdir()
    masks.mkdir()
    demo = tiny_run / "results/demo_data"
    for image_id in _test_split(tiny_run):
        shutil.copy(demo / IMAGE_DIR / f"{image_id}.jpg", images)
        shutil.copy(demo / MASK_DIR / f"{image_id}_segmentation.png", masks)
    wf = workflow_copy(root / "clinic")
    bundle = str(tiny_run / "results/models/diffseg_bundle.zip")
    (wf / "predict.yaml").write_text(yaml.safe_dump({"predict": {"images": str(images), "bundle": bundle,
                                                                 "masks": str(masks)}}))
    run = snakemake(wf, configfiles=("test.yaml", "predict.yaml"))
    assert run.returncode == 0, run.stderr[-5000:]
    return wf, masks


@pytest.mark.slow
def test_predicting_labelled_images_scores_them_at_original_size(scored_prediction, tiny_run):
    """metrics.csv equals Dice and HD95 computed here from the PNG files; table.md counts what it should."""
    from test_metrics import _brute_force_hd95

    wf, masks = scored_prediction
    out = wf / "results/predict"
    per_image = pd.read_csv(out / "metrics.csv", dtype={"id": str}).set_index("id")
    ids = _test_split(tiny_run)
    assert sorted(per_image.index) == ids and per_image["risk"].between(0, 1).all()
    dice, empty = {}, 0
    for image_id in ids:
        pred = np.asarray(Image.open(out / "masks" / f"{image_id}_segmentation.png")) > 128
        truth = np.asarray(Image.open(masks / f"{image_id}_segmentation.png")) > 128
        assert pred.shape == truth.shape == (64, 64)  # the demo images' original size; the model saw 16 px
        total = pred.sum() + truth.sum()
        dice[image_id] = 1.0 if total == 0 else 2 * (pred & truth).sum() / total
        assert per_image.loc[image_id, "dice"] == pytest.approx(dice[image_id], abs=1e-12)
        if pred.any() and truth.any():
            assert per_image.loc[image_id, "hd95"] == pytest.approx(_brute_force_hd95(pred, truth), abs=1e-9)
        else:
            empty += 1
            assert np.isnan(per_image.loc[image_id, "hd95"])
    table = (out / "table.md").read_text()
    failed = sum(d < 0.7 for d in dice.values())
    assert f"(n = {len(ids)} images)" in table
    assert f"Images without an HD95 (empty ground truth or empty prediction): {empty}." in table
    assert f"{failed} of {len(ids)} images have Dice < 0.7" in table
    assert f"not computed, it needs at least 5 failures and 5 successes (here {failed} and {len(ids) - failed})" in table
    assert f"| {np.mean(list(dice.values())):.3f} |" in table


TRUTH_BOX = (slice(4, 12), slice(4, 14))  # 8 x 10 px lesion in a 16 x 20 px image


def labelled_predictions(root, n_ok=6, n_shifted=5, risk=True):
    """Images (16 x 20 px) with masks, their prepared images.h5, final masks and a review queue.

    Good predictions equal the truth (Dice 1, HD95 0); shifted ones move it 5 px right (Dice 0.5, HD95 5);
    the last image's prediction is empty (Dice 0, no HD95). Risk: 0.6-0.9 for the failures, 0.1 for the
    good ones except the first (0.95), so the AUROC is 30/36 with 6 and 6.
    """
    from diffseg.data import prepare_images
    from diffseg.imageio import write_mask_png

    ids = [f"IMG_{k:02d}" for k in range(n_ok + n_shifted + 1)]
    images, truth_dir, pred_dir = root / "images", root / "truth", root / "predict" / "masks"
    images.mkdir(parents=True)
    truth = np.zeros((16, 20), bool)
    truth[TRUTH_BOX] = True
    for k, image_id in enumerate(ids):
        Image.fromarray(np.full((16, 20, 3), 40 * (k % 6), np.uint8)).save(images / f"{image_id}.png")
        write_mask_png(truth_dir / f"{image_id}_segmentation.png", truth)
        pred = truth if k < n_ok else np.roll(truth, 5, axis=1) if k < len(ids) - 1 else np.zeros_like(truth)
        write_mask_png(pred_dir / f"{image_id}_segmentation.png", pred)
    prepare_images(images, root / "predict" / "images.h5", resolution=8)
    queue = pd.DataFrame({"id": ids[::-1]})  # another order than the images: matched by id
    if risk:
        n_fail = n_shifted + 1
        by_id = {i: (0.95 if k == 0 else 0.1) if k < n_ok else 0.6 + 0.3 * (k - n_ok) / max(n_fail - 1, 1)
                 for k, i in enumerate(ids)}
        queue["risk"] = [by_id[i] for i in queue["id"]]
    queue.to_csv(root / "predict" / "review_queue.csv", index=False)
    return ids, images, truth_dir, pred_dir


def score(root, images, truth_dir, pred_dir):
    from diffseg.predict import score_predictions

    out = root / "predict"
    table = score_predictions(out / "images.h5", images, truth_dir, pred_dir, out / "review_queue.csv",
                              out / "metrics.csv", out / "table.md", fail_dice=0.7)
    return table, pd.read_csv(out / "metrics.csv"), (out / "table.md").read_text()


def test_scoring_labelled_predictions_by_hand(tmp_path):
    ids, images, truth_dir, pred_dir = labelled_predictions(tmp_path)
    table, csv, md = score(tmp_path, images, truth_dir, pred_dir)
    assert csv["id"].tolist() == ids
    assert csv["dice"].tolist() == pytest.approx([1.0] * 6 + [0.5] * 5 + [0.0])
    assert csv["jaccard"].tolist() == pytest.approx([1.0] * 6 + [1 / 3] * 5 + [0.0])
    assert csv["hd95"].iloc[:11].tolist() == [0.0] * 6 + [5.0] * 5 and np.isnan(csv["hd95"].iloc[11])
    assert csv.loc[0, "risk"] == 0.95 and csv.loc[11, "risk"] == pytest.approx(0.9)
    dice, jaccard, hd = (6 + 2.5) / 12, (6 + 5 / 3) / 12, 25 / 11
    assert f"| {dice:.3f} | {jaccard:.3f} | {6 / 12:.3f} | {hd:.3f} |" in md  # threshold Jaccard: 1/3 counts 0
    assert "averaged over the 11 images where neither mask is empty" in md
    assert "Images without an HD95 (empty ground truth or empty prediction): 1." in md
    assert "6 of 12 images have Dice < 0.7" in md
    assert f"AUROC of the risk score for ranking the failures first (0.5 = chance, 1 = perfect): {30 / 36:.3f}." in md


def test_the_risk_auroc_needs_five_failures_and_five_successes(tmp_path):
    ids, images, truth_dir, pred_dir = labelled_predictions(tmp_path / "few", n_ok=6, n_shifted=3)
    _, _, md = score(tmp_path / "few", images, truth_dir, pred_dir)
    assert "not computed, it needs at least 5 failures and 5 successes (here 4 and 6)" in md
    ids, images, truth_dir, pred_dir = labelled_predictions(tmp_path / "norisk", risk=False)
    _, csv, md = score(tmp_path / "norisk", images, truth_dir, pred_dir)
    assert "risk" not in csv and "The model bundle holds no risk model" in md


def test_an_image_without_its_mask_is_named(tmp_path):
    from diffseg.imageio import InputError

    ids, images, truth_dir, pred_dir = labelled_predictions(tmp_path)
    (truth_dir / f"{ids[3]}_segmentation.png").unlink()
    with pytest.raises(InputError, match=f"{ids[3]}.png: image has no mask .expected {ids[3]}_segmentation.png"):
        score(tmp_path, images, truth_dir, pred_dir)
    assert not (tmp_path / "predict" / "metrics.csv").exists() and not (tmp_path / "predict" / "table.md").exists()


def test_given_masks_add_the_scoring_rule_and_a_missing_masks_folder_is_refused(tmp_path):
    """Dry runs: predict.masks plans rule score_predictions after predict_outputs; a folder that is not there
    (or masks without images) stops Snakemake before any rule, naming the key."""
    from test_workflow import planned_jobs

    wf = workflow_copy(tmp_path / "wf")
    images = unlabelled_images(tmp_path / "new_images")
    (tmp_path / "masks").mkdir()
    for predict, planned in (({"images": str(images), "masks": str(tmp_path / "masks")}, True),
                             ({"images": str(images), "masks": str(tmp_path / "absent")}, False),
                             ({"masks": str(tmp_path / "masks")}, False)):
        (wf / "predict.yaml").write_text(yaml.safe_dump({"predict": predict}))
        run = snakemake(wf, "-n", configfiles=("test.yaml", "predict.yaml"))
        if planned:
            assert run.returncode == 0, run.stderr[-3000:]
            assert planned_jobs(run.stdout)["score_predictions"] == 1
        else:
            assert run.returncode != 0 and "Invalid config value predict.masks" in run.stdout + run.stderr
