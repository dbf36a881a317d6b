"""Few masks (prepare.labelled, train.twins_from): nested labelled sets, masks never opened, the DDPM's pools."""

import csv
import re

import h5py
import numpy as np
import pytest
import torch

import diffseg.data as data_module
from diffseg.data import choose_labelled, labelled_counts, load_split, masks_read_line, split_pool
from diffseg.ddpm import PairSampler, PoolSampler, load_pairs
from diffseg.h5io import read_labelled
from test_data import prepare, write_generic
from workflow_helpers import TINY_CONFIG, snakemake, workflow_copy


def read_csv(path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_val_count_is_a_fifth_at_least_two_and_both_counts_grow_by_at_most_one():
    assert [labelled_counts(n) for n in (3, 6, 10, 14, 15, 25, 50)] == [
        (1, 2), (4, 2), (8, 2), (12, 2), (12, 3), (20, 5), (40, 10)]
    for n in range(3, 300):
        (train_a, val_a), (train_b, val_b) = labelled_counts(n), labelled_counts(n + 1)
        assert (train_b - train_a, val_b - val_a) in ((1, 0), (0, 1))
    for bad in (2, 0, True, 4.0):
        with pytest.raises(ValueError, match="prepare.labelled must be an integer >= 3"):
            labelled_counts(bad)


def test_labelled_sets_are_nested_and_split_by_the_val_rule():
    ids = [f"ISIC_{i:07d}" for i in range(200)]
    split_of = split_pool(ids, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=1)
    sets = {n: choose_labelled(split_of, n, seed=5) for n in (10, 25, 50)}
    assert set(sets[10]) < set(sets[25]) < set(sets[50])
    for n, chosen in sets.items():
        assert len(chosen) == n and not any(split_of[i] == "test" for i in chosen)
        assert sum(split_of[i] == "val" for i in chosen) == max(2, n // 5)
    assert set(choose_labelled(split_of, 25, seed=6)) != set(sets[25])  # labelled_seed picks the images
    with pytest.raises(ValueError, match=r"labelled = 160 needs 128 train and 32 val .* the val split holds 30"):
        choose_labelled(split_of, 160, seed=5)


def test_split_images_and_labelled_masks_are_those_of_every_mask(tmp_path):
    data = write_generic(tmp_path / "d", 20)
    full, summary_full = prepare(tmp_path / "full", data, split_seed=3)
    few, summary_few = prepare(tmp_path / "few", data, split_seed=3, labelled=6, labelled_seed=2)
    assert read_csv(full / "split.csv") == read_csv(few / "split.csv")  # the split does not move
    assert summary_few["masks_read"] == {"train": 4, "val": 2, "test": 3}
    assert summary_full["masks_read"] == summary_full["counts"] == {"train": 14, "val": 3, "test": 3}
    with h5py.File(full / "dataset.h5", "r") as a, h5py.File(few / "dataset.h5", "r") as b:
        assert "labelled" not in a.attrs and b.attrs["labelled"] == 6 and b.attrs["labelled_seed"] == 2
        for split in ("train", "val", "test"):
            assert "has_mask" not in a[split]  # every mask: today's layout
            np.testing.assert_array_equal(a[split]["images"][()], b[split]["images"][()])
            if split == "test":
                assert "has_mask" not in b[split]
                np.testing.assert_array_equal(a[split]["masks"][()], b[split]["masks"][()])
                continue
            has = b[split]["has_mask"][()]
            rank = b[split]["label_rank"][()]
            assert has.sum() == {"train": 4, "val": 2}[split] and ((rank >= 0) == has).all()
            assert sorted(rank[has].tolist()) == list(range(has.sum()))
            np.testing.assert_array_equal(a[split]["masks"][()][has], b[split]["masks"][()][has])
            assert not b[split]["masks"][()][~has].any()
        train_has = b["train/has_mask"][()]
        assert (b["train/has_healthy"][()] == train_has).all()  # a twin only where the mask was read
        np.testing.assert_array_equal(b["train/healthy"][()][train_has], a["train/healthy"][()][train_has])
        np.testing.assert_array_equal(b["train/healthy"][()][~train_has], b["train/images"][()][~train_has])


def test_no_other_mask_is_opened(tmp_path, monkeypatch):
    data = write_generic(tmp_path / "d", 20)
    first, _ = prepare(tmp_path / "first", data, split_seed=3, labelled=6)
    unlabelled = []
    with h5py.File(first / "dataset.h5", "r") as h5:
        for split in ("train", "val"):
            ids = [i.decode() for i in h5[split]["ids"][()]]
            unlabelled += [i for i, has in zip(ids, h5[split]["has_mask"][()]) if not has]
    assert len(unlabelled) == 14 + 3 - 6
    for image_id in unlabelled:  # unreadable: opening one would fail the preparation (on_bad_file: error)
        (data / "masks" / f"{image_id}_segmentation.png").write_bytes(b"not a png")
    opened = []
    real_read_mask = data_module.read_mask
    monkeypatch.setattr(data_module, "read_mask", lambda path: opened.append(path.stem) or real_read_mask(path))
    again, summary = prepare(tmp_path / "again", data, split_seed=3, labelled=6)
    assert summary["skipped"] == [] and len(opened) == 6 + 3  # the labelled and the test masks, once each
    assert not {f"{i}_segmentation" for i in unlabelled} & set(opened)
    with h5py.File(first / "dataset.h5", "r") as a, h5py.File(again / "dataset.h5", "r") as b:
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(a[split]["masks"][()], b[split]["masks"][()])


def test_readers_of_masks_get_only_the_labelled_rows(tmp_path):
    out, _ = prepare(tmp_path, write_generic(tmp_path / "d", 20), split_seed=3, labelled=6)
    h5 = out / "dataset.h5"
    every = load_split(h5, "train")
    labelled = load_split(h5, "train", labelled_only=True)
    assert len(every["ids"]) == 14 and len(labelled["ids"]) == 4 and labelled["has_mask"].all()
    keep = every["has_mask"]
    assert labelled["ids"] == [i for i, k in zip(every["ids"], keep) if k]
    np.testing.assert_array_equal(labelled["images"], every["images"][keep])
    val = read_labelled(h5, "val", ["orig_size"])
    assert len(val["ids"]) == len(val["masks"]) == len(val["orig_size"]) == 2 and val["n_unlabelled"] == 1
    assert read_labelled(h5, "test")["n_unlabelled"] == 0 and len(read_labelled(h5, "test")["ids"]) == 3
    assert masks_read_line(h5) == ("Masks read for training and selection: 6 (4 train + 2 val; prepare.labelled = 6, "
                                   "labelled_seed 0); the 3 test masks are only the scoring truth.")


def test_read_labelled_and_load_split_keep_every_row_without_the_setting(tmp_path):
    out, _ = prepare(tmp_path, write_generic(tmp_path / "d", 10))
    h5 = out / "dataset.h5"
    assert load_split(h5, "train", labelled_only=True)["ids"] == load_split(h5, "train")["ids"]
    assert read_labelled(h5, "val")["n_unlabelled"] == 0
    assert masks_read_line(h5) is None  # table.md unchanged


def test_pool_sampler_keeps_images_without_a_twin():
    lesion = np.arange(6, dtype=np.uint8)[:, None, None, None] * np.ones((6, 4, 4, 3), np.uint8)
    healthy = 100 + np.arange(2, dtype=np.uint8)[:, None, None, None] * np.ones((2, 4, 4, 3), np.uint8)
    sampler = PoolSampler(lesion, healthy, 8, None)
    generator = torch.Generator().manual_seed(0)
    seen_lesion, seen_healthy = set(), set()
    for step in range(40):
        a, b = sampler.draw(generator)
        seen_lesion |= set(a[:, 0, 0, 0].tolist())
        seen_healthy |= set(b[:, 0, 0, 0].tolist())
    assert seen_lesion == set(range(6)) and seen_healthy == {100, 101}
    x0, y = sampler(0, generator, torch.device("cpu"))
    assert x0.shape == (8, 3, 4, 4) and y.tolist() == [1] * 4 + [0] * 4
    paired = PairSampler(lesion, lesion + 50, 8, None)  # every mask: an image and its own twin
    a, b = paired.draw(torch.Generator().manual_seed(0))
    assert torch.equal(b, a + 50)


def test_ddpm_pools_lesion_class_every_train_image_healthy_class_the_twins_of_twins_from(tmp_path):
    out, _ = prepare(tmp_path, write_generic(tmp_path / "d", 60), split_seed=3, labelled=25)
    h5 = out / "dataset.h5"
    train = load_split(h5, "train")
    lesion, healthy, paired = load_pairs(h5)
    assert not paired and len(lesion) == len(train["ids"]) == 42
    assert len(healthy) == train["has_healthy"].sum() == 20  # the 20 labelled train images' twins
    _, healthy_10, _ = load_pairs(h5, twins_from=10)
    first_8 = np.flatnonzero((train["label_rank"] >= 0) & (train["label_rank"] < 8))
    np.testing.assert_array_equal(healthy_10, train["healthy"][first_8])
    ten, _ = prepare(tmp_path / "ten", tmp_path / "d", split_seed=3, labelled=10)
    lesion_ten, healthy_ten, _ = load_pairs(ten / "dataset.h5")  # one DDPM serves every N >= twins_from
    np.testing.assert_array_equal(lesion_ten, lesion)
    np.testing.assert_array_equal(healthy_ten, healthy_10)
    with pytest.raises(ValueError, match=r"train.twins_from = 26 must be at most prepare.labelled = 25"):
        load_pairs(h5, twins_from=26)
    every, _ = prepare(tmp_path / "every", write_generic(tmp_path / "e", 10))
    lesion, healthy, paired = load_pairs(every / "dataset.h5")
    assert paired and len(lesion) == len(healthy) == 7
    with pytest.raises(ValueError, match=r"train.twins_from = 3 needs a labelled subset \(prepare.labelled\)"):
        load_pairs(every / "dataset.h5", twins_from=3)


def tiny_labelled(tmp_path, **sections):
    config = {"prepare": {**TINY_CONFIG["prepare"], "labelled": 6},
              **{name: {**TINY_CONFIG.get(name, {}), **values} for name, values in sections.items()}}
    return workflow_copy(tmp_path / "wf", config)


@pytest.mark.slow
def test_dry_run_with_six_labelled_images_and_the_twins_from_check(tmp_path):
    run = snakemake(tiny_labelled(tmp_path), "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "prepare_dataset" in run.stdout and "train_ddpm" in run.stdout
    run = snakemake(tiny_labelled(tmp_path / "bad", train={"twins_from": 7}), "-n")
    assert run.returncode != 0
    assert "Invalid config value train.twins_from = 7" in run.stdout + run.stderr


@pytest.mark.slow
def test_tiny_run_with_six_labelled_images_reads_six_masks_and_trains_the_ddpm_on_every_train_image(tmp_path):
    wf = tiny_labelled(tmp_path, train={"twins_from": 5})
    run = snakemake(wf)
    assert run.returncode == 0, run.stderr[-5000:]
    results = wf / "results"
    with h5py.File(results / "data/dataset.h5", "r") as h5:
        assert h5["train/has_mask"][()].sum() == 4 and h5["val/has_mask"][()].sum() == 2
        assert len(h5["train/ids"]) == 8 and "has_mask" not in h5["test"]
    table = (results / "metrics/table.md").read_text()
    assert ("Masks read for training and selection: 6 (4 train + 2 val; prepare.labelled = 6, labelled_seed 0); "
            "the 4 test masks are only the scoring truth.") in table
    log = (results / "logs/train_ddpm.log").read_text()
    twins = re.search(r"8 train images under the lesion label, (\d+) twins \(of labelled ranks < 3\)", log)
    assert twins is not None and 1 <= int(twins.group(1)) <= 3, log[-2000:]


def test_calibration_fits_on_the_labelled_val_rows_only(tmp_path):
    from diffseg.calibration import run_calibrate
    from test_calibration import val_set, write_files

    maps, truth = val_set(n=6)
    write_files(tmp_path, maps, truth)
    with h5py.File(tmp_path / "dataset.h5", "r+") as f:  # rows 1 and 4 unlabelled: their masks were never read
        val = f["val"]
        has_mask = np.array([True, False, True, True, False, True])
        masks = val["masks"][()]
        masks[~has_mask] = 0
        val["masks"][...] = masks
        val.create_dataset("has_mask", data=has_mask)
    kwargs = dict(method="paper", blur_sigma=0.0, closing_px=0)
    report = run_calibrate(tmp_path / "dataset.h5", tmp_path / "inf.h5", tmp_path / "cal.h5", **kwargs)
    assert report["val_dice_vote"] == pytest.approx(1.0)
    with h5py.File(tmp_path / "dataset.h5", "r+") as f:
        del f["val/has_mask"]  # the same zero masks read as truth: the fit scores them and falls below 1
    report = run_calibrate(tmp_path / "dataset.h5", tmp_path / "inf.h5", tmp_path / "cal2.h5", **kwargs)
    assert report["val_dice_vote"] < 0.9


def test_best_timestep_is_chosen_on_the_labelled_val_rows_only(tmp_path):
    from diffseg.evaluate import choose_timestep_on_val
    from diffseg.h5io import write_ids

    ids = [f"ISIC_{i:07d}" for i in range(4)]
    disc = np.zeros((8, 8), bool)
    disc[2:6, 2:6] = True
    has_mask = np.array([True, False, False, False])
    with h5py.File(tmp_path / "dataset.h5", "w") as f:
        val = f.create_group("val")
        write_ids(val, ids)
        val["masks"] = np.stack([disc if has else np.zeros_like(disc) for has in has_mask]).astype(np.uint8)
        val["has_mask"] = has_mask
    with h5py.File(tmp_path / "val.h5", "w") as f:  # t=60 finds the lesion everywhere, t=70 finds nothing
        write_ids(f, ids)
        f["timesteps"] = np.array([60, 70], np.int32)
        f["binary"] = np.stack([np.stack([disc, np.zeros_like(disc)])] * 4).astype(np.uint8)
        f.attrs["split"] = "val"
    best, _, dice = choose_timestep_on_val(tmp_path / "dataset.h5", tmp_path / "val.h5")
    assert best == 60 and dice.tolist() == [1.0, 0.0]  # the unlabelled rows' zero masks would favour t=70


def test_features_head_learns_from_and_early_stops_on_the_labelled_rows_only(tmp_path, monkeypatch):
    import diffseg.features as features
    from test_features import INPUTS, head_settings, write_dataset, write_ddpm

    dataset_h5, ddpm = write_dataset(tmp_path / "dataset.h5"), write_ddpm(tmp_path / "ddpm.pt")
    labelled = {"train": np.array([1, 0, 1, 0, 0, 1, 0, 0], bool), "val": np.array([1, 1, 0, 0], bool)}
    with h5py.File(dataset_h5, "r+") as f:
        for split, has_mask in labelled.items():
            f[split]["has_mask"] = has_mask
    captured = {}
    real_fit = features.fit_head
    monkeypatch.setattr(features, "fit_head", lambda *a, **k: captured.update(args=a) or real_fit(*a, **k))
    features.train_feature_head(dataset_h5, ddpm, tmp_path / "head.pt", tmp_path / "log.csv", head_settings(blocks=[1]),
                                INPUTS)
    train_inputs, train_targets, val_inputs, val_masks = captured["args"][:4]
    every = {split: load_split(dataset_h5, split)["masks"] for split in labelled}
    assert len(train_inputs) == 3 and len(val_inputs) == 2
    np.testing.assert_array_equal(train_targets, every["train"][labelled["train"]])
    np.testing.assert_array_equal(val_masks, every["val"][labelled["val"]])
