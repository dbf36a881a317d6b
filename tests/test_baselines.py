"""Baselines on synthetic 24 px 'skin + dark blob' datasets: Otsu, channel choice, U-Net training, prediction files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from diffseg.baselines import (
    otsu_channel_scores,
    otsu_segment,
    predict_baseline,
    train_baseline,
)
from diffseg.data import load_split
from diffseg.metrics import mask_metrics
from diffseg.settings import BaselineSettings
from diffseg.train import CheckpointError, load_checkpoint

SIZE = 24
SKIN, LESION = (200, 150, 130), (90, 50, 40)
SPLIT_SIZES = {"train": 48, "val": 16, "test": 16}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def blob_image(rng: np.random.Generator, skin=SKIN, lesion=LESION, noise=10.0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy skin with one dark elliptical blob somewhere near the centre; (image uint8, mask bool)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.uniform(0.35, 0.65, 2) * SIZE
    ry, rx = rng.uniform(0.15, 0.3, 2) * SIZE
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    image = np.where(mask[..., None], lesion, skin) + rng.normal(0, noise, (SIZE, SIZE, 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_dataset(path, colours: dict[str, tuple] | None = None, seed: int = 0) -> str:
    """dataset.h5 per docs/ARCHITECTURE.md; colours[split] = (skin, lesion) overrides the default colours."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.attrs["resolution"] = SIZE
        for split, n in SPLIT_SIZES.items():
            skin, lesion = (colours or {}).get(split, (SKIN, LESION))
            pairs = [blob_image(rng, skin, lesion) for _ in range(n)]
            g = f.create_group(split)
            ids = np.array([f"ISIC_{split}_{k:03d}" for k in range(n)], dtype=object)
            g.create_dataset("ids", data=ids, dtype=h5py.string_dtype())
            g.create_dataset("images", data=np.stack([p[0] for p in pairs]))
            g.create_dataset("masks", data=np.stack([p[1] for p in pairs]).astype(np.uint8))
            g.create_dataset("orig_size", data=np.full((n, 2), SIZE, np.int32))
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "dataset.h5")


def read_predictions(path) -> tuple[list[str], np.ndarray, dict]:
    with h5py.File(path, "r") as f:
        return list(f["ids"].asstr()[:]), f["masks"][()], dict(f.attrs)


def mean_test_dice(dataset_h5, masks) -> float:
    truth = load_split(dataset_h5, "test")["masks"]
    return float(np.mean([mask_metrics(p, t)["dice"] for p, t in zip(masks, truth)]))


# ----------------------------------------------------------------------------- Otsu


def test_otsu_finds_dark_blob():
    rng = np.random.default_rng(1)
    dices = []
    for _ in range(10):
        image, mask = blob_image(rng)
        pred = otsu_segment(image, "gray")
        assert pred.dtype == bool and pred.shape == (SIZE, SIZE)
        dices.append(mask_metrics(pred, mask)["dice"])
    assert min(dices) > 0.9


def test_otsu_keeps_largest_component_and_fills_holes():
    image = np.full((SIZE, SIZE, 3), 200, np.uint8)
    image[2:14, 2:14] = 40  # big dark square ...
    image[6:10, 6:10] = 200  # ... with a bright hole
    image[18:21, 18:21] = 40  # small dark square, not connected
    expected = np.zeros((SIZE, SIZE), bool)
    expected[2:14, 2:14] = True
    np.testing.assert_array_equal(otsu_segment(image, "gray"), expected)


def test_otsu_constant_image_gives_empty_mask():
    assert not otsu_segment(np.full((SIZE, SIZE, 3), 128, np.uint8), "red").any()


def test_otsu_rejects_bad_channel_and_shape():
    with pytest.raises(ValueError, match="Otsu channel must be one of gray, red"):
        otsu_segment(np.zeros((SIZE, SIZE, 3), np.uint8), "hue")
    with pytest.raises(ValueError, match=r"must be \(H, W, 3\)"):
        otsu_segment(np.zeros((SIZE, SIZE), np.uint8), "gray")


# Lesions darker in one channel only, on grey skin: only that channel separates them well.
RED_ONLY = ((160, 160, 160), (60, 160, 160))
BLUE_ONLY = ((160, 160, 160), (160, 160, 60))


def test_otsu_channel_scores_favour_the_separating_channel():
    """The scores otsu_predict chooses from (the choice itself: the next test, through predict_baseline)."""
    rng = np.random.default_rng(2)
    pairs = [blob_image(rng, *BLUE_ONLY, noise=12.0) for _ in range(8)]
    images, masks = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    scores = otsu_channel_scores(images, masks)
    assert scores["blue"] > 0.9 and scores["red"] < 0.7 and scores["gray"] < 0.8
    assert max(scores.values()) == scores["blue"]


def test_otsu_channel_is_chosen_on_val_not_on_predicted_split(tmp_path):
    h5 = write_dataset(tmp_path / "dataset.h5", {"train": BLUE_ONLY, "val": RED_ONLY, "test": BLUE_ONLY})
    out = tmp_path / "otsu" / "test.h5"
    summary = predict_baseline("otsu", h5, None, out, BaselineSettings(steps=10, lr=1e-3), split="test")
    ids, masks, attrs = read_predictions(out)
    assert attrs["method"] == "otsu" and attrs["channel"] == "red" and attrs["channel_chosen_on"] == "val"
    assert summary["channel"] == "red"
    assert mean_test_dice(h5, masks) < 0.7  # red does not separate the test lesions: proof it was not chosen on test
    # predicting val itself: the channel comes from train instead
    predict_baseline("otsu", h5, None, tmp_path / "otsu" / "val.h5", split="val")
    assert read_predictions(tmp_path / "otsu" / "val.h5")[2]["channel"] == "blue"


def test_otsu_prediction_file(dataset, tmp_path):
    out = tmp_path / "otsu.h5"
    predict_baseline("otsu", dataset, None, out)
    ids, masks, attrs = read_predictions(out)
    assert ids == [f"ISIC_test_{k:03d}" for k in range(SPLIT_SIZES["test"])]
    assert masks.dtype == np.uint8 and masks.shape == (SPLIT_SIZES["test"], SIZE, SIZE)
    assert set(np.unique(masks)) <= {0, 1}
    assert attrs["split"] == "test" and "diffseg_version" in attrs
    assert mean_test_dice(dataset, masks) > 0.9
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, no temporary left behind


# ----------------------------------------------------------------------------- U-Nets

TINY = dict(base_channels=4, depth=3, batch_size=8, eval_every=2, patience=5, device="cpu")
CPU = BaselineSettings(device="cpu")


def tiny(**changes) -> BaselineSettings:
    return BaselineSettings(**{**TINY, **changes})


@pytest.mark.parametrize("name", ["unet", "attention_unet"])
def test_unet_trains_checkpoints_and_predicts(name, dataset, tmp_path):
    ckpt, log_csv, out = tmp_path / f"{name}.pt", tmp_path / f"{name}.csv", tmp_path / f"{name}_test.h5"
    summary = train_baseline(name, dataset, ckpt, log_csv, tiny(steps=4), augment={})
    assert summary["steps"] == 4 and summary["best_metric"] is not None
    saved = load_checkpoint(ckpt, kind="baseline")
    model_cfg = saved["config"]["model"]
    assert (model_cfg["name"], model_cfg["base_channels"], model_cfg["depth"]) == (name, 4, 3)
    assert model_cfg["attention"] == (name == "attention_unet") and saved["config"]["image_size"] == SIZE
    assert log_csv.read_text().startswith("step,loss,lr,images_per_s")
    assert not (tmp_path / f"{name}.pt.resume.pt").exists()

    predict_baseline(name, dataset, ckpt, out, tiny(steps=4), split="test")
    ids, masks, attrs = read_predictions(out)
    assert ids == load_split(dataset, "test")["ids"]
    assert masks.dtype == np.uint8 and masks.shape == (SPLIT_SIZES["test"], SIZE, SIZE)
    assert set(np.unique(masks)) <= {0, 1}
    assert attrs["method"] == name and attrs["checkpoint"] == str(ckpt)


def test_unet_learns_dark_blobs(dataset, tmp_path):
    ckpt, out = tmp_path / "unet.pt", tmp_path / "test.h5"
    settings = tiny(base_channels=8, batch_size=16, eval_every=25, lr=3e-3, steps=150)
    summary = train_baseline("unet", dataset, ckpt, tmp_path / "log.csv", settings, augment={})
    assert summary["best_metric"] > 0.8  # val Dice of the kept weights
    predict_baseline("unet", dataset, ckpt, out, CPU)
    assert mean_test_dice(dataset, read_predictions(out)[1]) > 0.8


def test_unknown_name_and_missing_checkpoint(dataset, tmp_path):
    with pytest.raises(ValueError, match=r"baselines\.methods.*'segformer'.*otsu, unet, attention_unet"):
        predict_baseline("segformer", dataset, None, tmp_path / "x.h5")
    with pytest.raises(ValueError, match=r"baselines\.methods.*'segformer'"):
        train_baseline("segformer", dataset, tmp_path / "x.pt", tmp_path / "x.csv", augment={})
    with pytest.raises(ValueError, match="'unet' needs a checkpoint"):
        predict_baseline("unet", dataset, None, tmp_path / "x.h5")
    with pytest.raises(ValueError, match="unknown key.*config section 'baselines': stepz"):
        BaselineSettings.from_config({"methods": ["otsu"], "stepz": 3})
    assert not (tmp_path / "x.h5").exists()


def test_resolution_not_divisible_by_depth(dataset, tmp_path):
    with pytest.raises(ValueError, match=r"resolution 24 is not divisible by 2\*\*baselines.depth = 16"):
        train_baseline("unet", dataset, tmp_path / "x.pt", tmp_path / "x.csv", tiny(depth=4, steps=1), augment={})


def test_checkpoint_of_the_other_baseline_is_refused(dataset, tmp_path):
    ckpt = tmp_path / "unet.pt"
    train_baseline("unet", dataset, ckpt, tmp_path / "log.csv", tiny(steps=1), augment={})
    with pytest.raises(CheckpointError, match="checkpoint is for baseline 'unet', expected 'attention_unet'"):
        predict_baseline("attention_unet", dataset, ckpt, tmp_path / "x.h5", CPU)


def test_unet_time_budget_stops_keeps_best_and_predicts(dataset, tmp_path):
    # a budget far below one step's time: the first step spends it, before any evaluation
    ckpt = tmp_path / "unet.pt"
    summary = train_baseline("unet", dataset, ckpt, tmp_path / "log.csv", tiny(steps=40, max_minutes=1e-9),
                             augment={})
    assert summary["steps"] == 1 and summary["stopped_by"] == "max_minutes" and summary["best_metric"] is None
    saved = load_checkpoint(ckpt, kind="baseline")
    assert saved["step"] == 1 and saved["config"]["train"]["max_minutes"] == 1e-9
    assert (tmp_path / "unet.pt.resume.pt").exists()
    # the rule passes the whole baselines section, max_minutes included, to the prediction too
    out = tmp_path / "test.h5"
    predict_baseline("unet", dataset, ckpt, out, tiny(max_minutes=1e-9))
    assert read_predictions(out)[1].shape == (SPLIT_SIZES["test"], SIZE, SIZE)
