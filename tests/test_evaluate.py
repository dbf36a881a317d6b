"""run_evaluate and export_masks on tiny hand-made HDF5 files (16 px) with known per-row Dice."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ISIC_FULLRES
from diffseg.evaluate import (BEST_T_METHOD, FINAL_METHOD, MEAN_METHOD, EvalRow, EvaluateInputs, EvaluateOutputs,
                              auroc, row_slug, run_evaluate)
from diffseg.export import export_masks
from diffseg.imageio import InputError, write_mask_png
from diffseg.uncertainty import ged_kohl, ged_paper

R = 16
TEST_IDS = ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]
VAL_IDS = ["ISIC_0000010", "ISIC_0000011"]


def square(top: int, left: int, size: int) -> np.ndarray:
    mask = np.zeros((R, R), np.uint8)
    mask[top:top + size, left:left + size] = 1
    return mask


def left_half(mask: np.ndarray) -> np.ndarray:
    """The mask with its right half of columns (within its bounding box) removed."""
    cols = np.flatnonzero(mask.any(axis=0))
    out = mask.copy()
    out[:, cols[len(cols) // 2]:] = 0
    return out


TRUTH = {"ISIC_0000001": square(2, 2, 8), "ISIC_0000002": square(6, 4, 6), "ISIC_0000003": square(4, 8, 4),
         "ISIC_0000010": square(3, 3, 6), "ISIC_0000011": square(8, 6, 4)}
EXTRA = square(12, 0, 3)  # outside every test truth: a false positive seen by one output of three


def write_ids(f: h5py.File, ids) -> None:
    f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())


def write_dataset(path, sizes=None) -> None:
    sizes = sizes or {}
    with h5py.File(path, "w") as f:
        for split, ids in (("val", VAL_IDS), ("test", TEST_IDS)):
            g = f.create_group(split)
            write_ids(g, ids)
            g["images"] = np.full((len(ids), R, R, 3), 128, np.uint8)
            g["masks"] = np.stack([TRUTH[i] for i in ids])
            g["orig_size"] = np.array([sizes.get(i, (R, R)) for i in ids], np.int32)


def write_inference(path, ids, binary_by_id, split) -> None:
    with h5py.File(path, "w") as f:
        write_ids(f, ids)
        f["timesteps"] = np.array([60, 70, 80], np.int32)
        f["binary"] = np.stack([binary_by_id[i] for i in ids]).astype(np.uint8)
        f["maps"] = f["binary"][()].astype(np.float16)
        f.attrs["split"] = split


def val_binary() -> dict:
    """On val only t=70 is right (Dice 1); t=60 and t=80 are empty (Dice 0)."""
    return {i: np.stack([np.zeros((R, R)), TRUTH[i], np.zeros((R, R))]) for i in VAL_IDS}


def eval_binary() -> dict:
    """On test t=60 is right plus a false positive, t=70 is the left half, t=80 is right."""
    return {i: np.stack([TRUTH[i] | EXTRA, left_half(TRUTH[i]), TRUTH[i]]) for i in TEST_IDS}


CONSISTENCY_AMBIGUOUS_PX = {"ISIC_0000001": 0, "ISIC_0000002": 16, "ISIC_0000003": 8}
GED_PAPER = {"ISIC_0000001": 0.10, "ISIC_0000002": 0.50, "ISIC_0000003": 0.20}


def write_uncertainty(path, ids) -> None:
    cons = []
    for i in ids:
        c = TRUTH[i].astype(np.float32)
        c.reshape(-1)[R * R - CONSISTENCY_AMBIGUOUS_PX[i]:] = 0.5  # ambiguous pixels at the end
        cons.append(c)
    with h5py.File(path, "w") as f:
        write_ids(f, ids)
        f["consistency"] = np.stack(cons)
        f["ambiguity"] = np.stack(cons) * (1 - np.stack(cons))
        f["ged"] = np.array([GED_PAPER[i] for i in ids])


FUSED = {"ISIC_0000001": TRUTH["ISIC_0000001"], "ISIC_0000002": np.zeros((R, R), np.uint8),
         "ISIC_0000003": TRUTH["ISIC_0000003"]}  # Dice 1, 0, 1
DISAGREE_PX = {"ISIC_0000001": 4, "ISIC_0000002": 32, "ISIC_0000003": 0}


def write_crf(path, ids) -> None:
    rounds = []
    for i in ids:
        r = np.repeat(FUSED[i][None], 3, axis=0).copy()
        r[1].reshape(-1)[:DISAGREE_PX[i]] ^= 1  # round 2 differs on the first pixels
        rounds.append(r)
    with h5py.File(path, "w") as f:
        write_ids(f, ids)
        f["fused"] = np.stack([FUSED[i] for i in ids])
        f["rounds"] = np.stack(rounds)


def write_truth_folder(folder, masks_by_id) -> None:
    """The data folder (images/ + masks/) with each ground-truth mask at its original size."""
    for image_id, mask in masks_by_id.items():
        (folder / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((*mask.shape, 3), np.uint8)).save(folder / "images" / f"{image_id}.png")
        write_mask_png(folder / "masks" / f"{image_id}_segmentation.png", mask)


def upscale(mask: np.ndarray, factor: int) -> np.ndarray:
    return np.kron(mask, np.ones((factor, factor), mask.dtype))


def write_baseline(path, ids, masks_by_id) -> None:
    with h5py.File(path, "w") as f:
        write_ids(f, ids)
        f["masks"] = np.stack([masks_by_id[i] for i in ids]).astype(np.uint8)


@pytest.fixture
def files(tmp_path):
    shuffled = TEST_IDS[::-1]  # every file in another order than the dataset: matching is by id
    paths = {k: tmp_path / f"{k}.h5" for k in ("dataset", "val", "test", "unc", "crf", "otsu", "unet")}
    write_dataset(paths["dataset"])
    write_inference(paths["val"], VAL_IDS, val_binary(), "val")
    write_inference(paths["test"], shuffled, eval_binary(), "test")
    write_uncertainty(paths["unc"], shuffled)
    write_crf(paths["crf"], [TEST_IDS[1], TEST_IDS[0], TEST_IDS[2]])
    write_baseline(paths["otsu"], shuffled, TRUTH)
    write_baseline(paths["unet"], TEST_IDS, {i: np.zeros((R, R)) for i in TEST_IDS})
    paths["data"] = tmp_path / "data"
    write_truth_folder(paths["data"], TRUTH)
    return paths


def evaluate(paths, tmp_path, *, baselines=None, calibration_h5=None, risk_json=None, review_queue_csv=None,
             reliability_csv=None, **kwargs):
    csv, md = tmp_path / "metrics" / "test.csv", tmp_path / "metrics" / "table.md"
    baselines = {"otsu": paths["otsu"], "unet": paths["unet"]} if baselines is None else baselines
    inputs = EvaluateInputs(paths["dataset"], [paths["val"], paths["test"]], paths["unc"], paths["crf"],
                            truth_dir=paths["data"], baselines=baselines, calibration_h5=calibration_h5,
                            risk_json=risk_json)
    outputs = EvaluateOutputs(csv, md, tmp_path / "metrics" / "test_png", review_queue_csv=review_queue_csv,
                              reliability_csv=reliability_csv)
    means = run_evaluate(inputs, outputs, **kwargs)
    return means, pd.read_csv(csv), md.read_text()


def test_rows_have_the_known_dice(files, tmp_path):
    means, _, _ = evaluate(files, tmp_path)
    # t=70 is chosen on val although t=60/t=80 are better on test; left half of a square: Dice 2/3
    assert means[BEST_T_METHOD]["timestep"] == 70
    assert means[BEST_T_METHOD]["dice"] == pytest.approx(2 / 3)
    assert means[BEST_T_METHOD]["jaccard"] == pytest.approx(0.5)
    assert means[BEST_T_METHOD]["precision"] == pytest.approx(1.0)
    assert means[BEST_T_METHOD]["recall"] == pytest.approx(0.5)
    assert means[BEST_T_METHOD]["threshold_jaccard"] == pytest.approx(0.0)
    # majority vote drops the false positive seen by 1 of 3 outputs and keeps the half seen by 2 of 3
    assert means[MEAN_METHOD]["dice"] == pytest.approx(1.0)
    assert means[FINAL_METHOD]["dice"] == pytest.approx(2 / 3)
    assert means["Otsu"]["dice"] == pytest.approx(1.0)
    assert means["U-Net (supervised)"]["dice"] == pytest.approx(0.0)
    assert means["U-Net (supervised)"]["precision"] == pytest.approx(1.0)  # empty prediction: ISIC freebie


def test_per_image_csv_has_every_image_and_method(files, tmp_path):
    _, table, _ = evaluate(files, tmp_path)
    assert len(table) == 5 * len(TEST_IDS)
    assert set(table["method"]) == {BEST_T_METHOD, MEAN_METHOD, FINAL_METHOD, "Otsu", "U-Net (supervised)"}
    final = table[table["method"] == FINAL_METHOD].set_index("id")
    assert final.loc[TEST_IDS, "dice"].tolist() == pytest.approx([1.0, 0.0, 1.0])
    assert final.loc[TEST_IDS, "ged_paper"].tolist() == pytest.approx([GED_PAPER[i] for i in TEST_IDS])
    assert final.loc[TEST_IDS, "ambiguity_area"].tolist() == pytest.approx(
        [CONSISTENCY_AMBIGUOUS_PX[i] / R**2 for i in TEST_IDS])
    assert final.loc[TEST_IDS, "crf_disagreement"].tolist() == pytest.approx([DISAGREE_PX[i] / R**2 for i in TEST_IDS])
    binary = eval_binary()
    assert final.loc[TEST_IDS, "ged_kohl"].tolist() == pytest.approx([ged_kohl(binary[i], TRUTH[i]) for i in TEST_IDS])
    others = table[table["method"] != FINAL_METHOD]
    assert others["ged_paper"].isna().all()


def test_table_lists_rows_auroc_and_published_reference(files, tmp_path):
    means, _, md = evaluate(files, tmp_path)
    for label in ("DiffSeg, best single timestep (t = 70, chosen on val)", MEAN_METHOD, FINAL_METHOD,
                  "Otsu", "U-Net (supervised)"):
        assert f"| {label} |" in md
    assert "n = 3 images" in md
    assert "| Otsu | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in md  # official table
    assert "| Otsu | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | n/a | n/a |" in md  # working-resolution table
    assert "Does uncertainty warn where the mask is wrong?" in md
    # the only failure (Dice 0) has the highest GED, ambiguity area and CRF disagreement: AUROC 1
    for score in ("GED of the outputs (paper eqs. 5-7)", "ambiguity area", "CRF disagreement"):
        line = next(row for row in md.splitlines() if row.startswith(f"| {score}"))
        assert line.endswith("| 1.000 |"), line
    assert "1 of 3 images have a final Dice < 0.7" in md
    assert "published, other splits, not comparable" in md.lower()
    assert "| DiffSeg | 0.864 | 0.897 | 0.882 | 0.735 |" in md
    assert f"{np.mean(list(GED_PAPER.values())):.3f}" in md


def test_rows_name_their_mask_folders_and_table_labels(files, tmp_path):
    evaluate(files, tmp_path)
    assert sorted(p.name for p in (tmp_path / "metrics" / "test_png").iterdir()) == [
        "diffseg_best_single_timestep", "diffseg_crf_fusion", "diffseg_mean_of_outputs_thresholded", "otsu",
        "u_net_supervised"]
    best = EvalRow(BEST_T_METHOD, np.zeros((1, R, R), bool), best_t=70)
    assert best.slug == "diffseg_best_single_timestep"
    assert best.label == "DiffSeg, best single timestep (t = 70, chosen on val)"
    assert EvalRow("U-Net (supervised)", np.zeros((1, R, R), bool)).label == "U-Net (supervised)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        best.best_t = 60


def test_two_rows_with_one_folder_name_are_refused(files, tmp_path):
    with pytest.raises(ValueError, match="rows 'Otsu' and 'OTSU' share the folder name 'otsu'"):
        evaluate(files, tmp_path, baselines={"otsu": files["otsu"], "OTSU": files["otsu"]})
    assert not (tmp_path / "metrics" / "table.md").exists()


def test_auroc_is_na_without_failures(files, tmp_path):
    _, _, md = evaluate(files, tmp_path, fail_dice=0.0)
    assert "| GED of the outputs (paper eqs. 5-7) | n/a |" in md


def test_auroc_rank_formula_with_ties():
    # pairs (positive, negative): 0.4>0.1, 0.4=0.4 (half), 0.8>0.1, 0.8>0.4 -> 3.5 of 4
    assert auroc([0.1, 0.4, 0.4, 0.8], [False, True, False, True]) == pytest.approx(0.875)
    assert auroc([0.3, 0.2, 0.1], [True, False, False]) == pytest.approx(1.0)
    assert auroc([0.3, 0.2, 0.1], [False, False, True]) == pytest.approx(0.0)
    assert auroc([0.3, 0.2], [True, True]) is None


def test_missing_id_names_file_and_id(files, tmp_path):
    write_crf(files["crf"], TEST_IDS[:2])
    with pytest.raises(InputError, match=rf"{files['crf'].name}.*ISIC_0000003"):
        evaluate(files, tmp_path)
    assert not (tmp_path / "metrics" / "table.md").exists()


def test_missing_id_in_baseline_names_file_and_id(files, tmp_path):
    write_baseline(files["unet"], TEST_IDS[1:], TRUTH)
    with pytest.raises(InputError, match=rf"unet.h5.*ISIC_0000001"):
        evaluate(files, tmp_path)


def test_refuses_to_choose_the_timestep_on_another_split(files, tmp_path):
    with h5py.File(files["val"], "a") as f:
        f.attrs["split"] = "test"
    with pytest.raises(InputError, match="val.h5.*split 'test', expected 'val'"):
        evaluate(files, tmp_path)


# ----------------------------------------------------------------------------- export_masks


def test_export_masks_writes_original_size_0_255_pngs(tmp_path):
    sizes = {"ISIC_0000001": (20, 30), "ISIC_0000002": (16, 16), "ISIC_0000003": (48, 32)}
    write_dataset(tmp_path / "dataset.h5", sizes)
    write_crf(tmp_path / "crf.h5", TEST_IDS[::-1])
    png_dir = tmp_path / "test_png"
    assert export_masks(tmp_path / "dataset.h5", tmp_path / "crf.h5", png_dir, split="test") == 3
    assert sorted(p.name for p in png_dir.iterdir()) == [f"{i}_segmentation.png" for i in TEST_IDS]
    for image_id, (height, width) in sizes.items():
        png = np.asarray(Image.open(png_dir / f"{image_id}_segmentation.png"))
        assert png.shape == (height, width)
        assert set(np.unique(png).tolist()) <= {0, 255}
        # upscaled mask covers the same fraction of the image as the 16 px one (up to the outline)
        assert (png > 0).mean() == pytest.approx(FUSED[image_id].mean(), abs=0.06)
    centre = np.asarray(Image.open(png_dir / "ISIC_0000001_segmentation.png"))
    assert centre[int(6 / R * 20), int(6 / R * 30)] == 255  # inside the square at (2..9, 2..9)


def test_export_masks_unknown_id_names_split(tmp_path):
    write_dataset(tmp_path / "dataset.h5")
    with h5py.File(tmp_path / "crf.h5", "w") as f:
        write_ids(f, ["ISIC_9999999"])
        f["fused"] = np.zeros((1, R, R), np.uint8)
    with pytest.raises(InputError, match="ISIC_9999999 missing from split 'test'"):
        export_masks(tmp_path / "dataset.h5", tmp_path / "crf.h5", tmp_path / "png", split="test")


def test_calibrated_rows_beside_the_paper_rows(files, tmp_path):
    """A calibration (largest component) removes the false positive of t=60; the paper rows stay as stored."""
    from diffseg.calibration import save_calibration
    from diffseg.postprocess import Calibration
    from diffseg.evaluate import PAPER_BEST_T_METHOD, PAPER_FINAL_METHOD, PAPER_MEAN_METHOD

    cal = Calibration(method="calibrated", threshold=0.5, blur_sigma=0.0, largest_component=True, closing_px=0,
                      fill_holes=False, sigmoid_scale=0.05, best_timestep=60, timesteps=[60, 70, 80])
    save_calibration(tmp_path / "cal.h5", cal, (3, R, R), {})
    with h5py.File(files["crf"], "a") as f:
        n = len(f["ids"])
        f["paper_fused"] = np.zeros((n, R, R), np.uint8)
        f["paper_rounds"] = np.zeros((n, 3, R, R), np.uint8)
    means, table, md = evaluate(files, tmp_path, calibration_h5=tmp_path / "cal.h5")
    assert means[BEST_T_METHOD]["timestep"] == 60 and means[BEST_T_METHOD]["dice"] == pytest.approx(1.0)
    assert means[MEAN_METHOD]["dice"] == pytest.approx(1.0)
    assert means[PAPER_BEST_T_METHOD]["timestep"] == 70  # chosen on val from the stored outputs
    assert means[PAPER_BEST_T_METHOD]["dice"] == pytest.approx(2 / 3)
    assert means[PAPER_MEAN_METHOD]["dice"] == pytest.approx(1.0)
    assert means[PAPER_FINAL_METHOD]["dice"] == pytest.approx(0.0)
    assert f"{PAPER_BEST_T_METHOD} (t = 70, chosen on val)" in md
    assert f"{BEST_T_METHOD} (t = 60, chosen on val)" in md


def test_paper_calibration_file_gives_todays_rows(files, tmp_path):
    from diffseg.calibration import save_calibration
    from diffseg.postprocess import Calibration

    save_calibration(tmp_path / "cal.h5", Calibration(timesteps=[60, 70, 80], best_timestep=70), (3, R, R), {})
    with_cal, table_cal, _ = evaluate(files, tmp_path, calibration_h5=tmp_path / "cal.h5")
    without, table, _ = evaluate(files, tmp_path)
    assert set(table_cal["method"]) == set(table["method"])
    assert with_cal == without


# ----------------------------------------------------------------------------- the official score, GED labels


def test_official_score_at_twice_the_working_size_equals_the_known_dice(files, tmp_path):
    """Originals at 32 px: every row's 16 px mask is written at 32 px and scored by the official scorer."""
    write_dataset(files["dataset"], {i: (2 * R, 2 * R) for i in TEST_IDS})
    write_truth_folder(files["data"], {i: upscale(TRUTH[i], 2) for i in TEST_IDS})
    means, table, md = evaluate(files, tmp_path)
    for method in (BEST_T_METHOD, MEAN_METHOD, FINAL_METHOD, "Otsu", "U-Net (supervised)"):
        folder = tmp_path / "metrics" / "test_png" / row_slug(method)
        assert sorted(p.name for p in folder.iterdir()) == [f"{i}_segmentation.png" for i in TEST_IDS]
        assert np.asarray(Image.open(folder / f"{TEST_IDS[0]}_segmentation.png")).shape == (2 * R, 2 * R)
        # a 2x bilinear upscale cut at 0.5 of these squares is exact: the official numbers equal the working ones
        for metric in ("dice", "jaccard", "precision", "recall", "threshold_jaccard"):
            assert means[method]["official"][metric] == pytest.approx(means[method][metric]), (method, metric)
    assert means[BEST_T_METHOD]["official"]["dice"] == pytest.approx(2 / 3)
    final = table[table["method"] == FINAL_METHOD].set_index("id")
    assert final.loc[TEST_IDS, "official_dice"].tolist() == pytest.approx([1.0, 0.0, 1.0])


def test_official_score_sees_detail_lost_at_the_working_resolution(files, tmp_path):
    """The original truth of one image has a lesion part the 16 px mask cannot hold: only the official row drops."""
    write_dataset(files["dataset"], {i: (2 * R, 2 * R) for i in TEST_IDS})
    originals = {i: upscale(TRUTH[i], 2) for i in TEST_IDS}
    originals["ISIC_0000001"][28:30, 28:30] = 1  # 4 px more lesion, far from the square (rows/cols 4..19)
    write_truth_folder(files["data"], originals)
    means, _, md = evaluate(files, tmp_path)
    square_px = (2 * 8) ** 2  # the 8 px square at 2x
    expected = (2 * square_px / (2 * square_px + 4) + 1 + 1) / 3
    assert means["Otsu"]["dice"] == pytest.approx(1.0)
    assert means["Otsu"]["official"]["dice"] == pytest.approx(expected)
    official, working = md.split("## At the model's working resolution")
    assert "## Official ISIC 2018 Task 1 score" in official and "isic-challenge-scoring" in official
    assert f"| Otsu | {expected:.3f} |" in official
    assert "| Otsu | 1.000 |" in working
    assert "the model worked at 16 x 16 px" in md and "n = 3 images" in md
    assert "32 x 32 px" in official  # the original size, stated


def test_missing_original_truth_names_the_data_folder_and_id(files, tmp_path):
    (files["data"] / "masks" / "ISIC_0000002_segmentation.png").unlink()
    (files["data"] / "images" / "ISIC_0000002.png").unlink()
    with pytest.raises(InputError, match=r"data.*ground-truth mask for image id ISIC_0000002"):
        evaluate(files, tmp_path)
    assert not (tmp_path / "metrics" / "table.md").exists()


def test_ged_of_the_n_outputs_for_the_paper_path_and_the_calibrated_path(files, tmp_path):
    from diffseg.calibration import Calibration, save_calibration
    from diffseg.evaluate import PAPER_FINAL_METHOD

    save_calibration(tmp_path / "cal.h5", Calibration(method="calibrated", threshold=0.5, blur_sigma=0.0,
                                                      largest_component=True, closing_px=0, fill_holes=False,
                                                      sigmoid_scale=0.05, best_timestep=60,
                                                      timesteps=[60, 70, 80]), (3, R, R), {})
    with h5py.File(files["crf"], "a") as f:
        n = len(f["ids"])
        f["paper_fused"] = np.zeros((n, R, R), np.uint8)
        f["paper_rounds"] = np.zeros((n, 3, R, R), np.uint8)
    means, table, md = evaluate(files, tmp_path, calibration_h5=tmp_path / "cal.h5")
    paper_ged = np.mean([ged_paper(eval_binary()[i]) for i in TEST_IDS])  # the stored outputs of each image
    assert paper_ged > 0
    assert means[PAPER_FINAL_METHOD]["ged_paper"] == pytest.approx(paper_ged)
    assert means[FINAL_METHOD]["ged_paper"] == pytest.approx(np.mean(list(GED_PAPER.values())))  # rule uncertainty's
    assert "| GED (Kohl, vs truth) | GED of the 3 outputs (paper eqs. 5-7) |" in md
    assert (f"Mean GED of the 3 outputs (paper eqs. 5-7) over 3 images, the paper's path: {paper_ged:.3f} "
            f"(the paper reports 0.13); the calibrated path: {np.mean(list(GED_PAPER.values())):.3f}") in md
    paper_rows = table[table["method"] == PAPER_FINAL_METHOD].set_index("id")
    assert paper_rows.loc[TEST_IDS, "ged_paper"].tolist() == pytest.approx([ged_paper(eval_binary()[i]) for i in TEST_IDS])


def test_paper_calibration_ged_line_names_the_paper_path_only(files, tmp_path):
    _, _, md = evaluate(files, tmp_path)
    line = next(row for row in md.splitlines() if row.startswith("Mean GED of the 3 outputs"))
    assert f"the paper's path: {np.mean(list(GED_PAPER.values())):.3f} (the paper reports 0.13)." in line
    assert "calibrated" not in line


@pytest.mark.realdata
@pytest.mark.skipif(not ISIC_FULLRES.is_dir(), reason="shared full-resolution ISIC pairs absent")
def test_official_score_of_full_size_originals_through_the_working_resolution(tmp_path):
    """The 5 full-size ISIC pairs (up to 2592 x 1936 px): the truth squashed to 32 px and written back at the
    original size by the evaluate stage's export scores high but not perfect (outline detail is lost at 32 px)."""
    from diffseg.data import discover_pairs, load_pair, truth_mask_files
    from diffseg.evaluate import export_row, official_score

    pairs = discover_pairs(ISIC_FULLRES)["train"]
    ids = [image_id for image_id, _, _ in pairs]
    loaded = [load_pair(image, mask, 32) for _, image, mask in pairs]
    sizes = np.array([orig for _, _, orig in loaded])
    assert sizes.max() > 1900  # really full size
    folder = export_row(EvalRow("truth at 32 px", np.stack([mask for _, mask, _ in loaded])), ids, sizes, tmp_path)
    assert folder == tmp_path / "truth_at_32_px"
    scores = official_score(folder, truth_mask_files(ISIC_FULLRES, ids))
    assert list(scores["id"]) == ids
    assert scores["dice"].between(0.9, 0.9999).all(), scores
    for image_id, (height, width) in zip(ids, sizes):
        png = Image.open(folder / f"{image_id}_segmentation.png")
        assert png.size == (width, height)
def test_risk_ranks_the_review_queue_and_the_table_shows_rankings_coverage_and_ece(files, tmp_path):
    """A model that only weighs CRF disagreement (32, 4, 0 px) ranks ISIC_0000002 (Dice 0) first."""
    from diffseg.calibration import Calibration, save_calibration
    from diffseg.risk import FEATURES, RiskModel, save_risk_model

    save_calibration(tmp_path / "cal.h5", Calibration(timesteps=[60, 70, 80], best_timestep=70), (3, R, R), {})
    n = len(FEATURES)
    coef = [1.0 if f == "crf_disagreement" else 0.0 for f in FEATURES]
    save_risk_model(tmp_path / "risk.json", RiskModel(features=list(FEATURES), mean=[0.0] * n, scale=[1.0] * n,
                                                      coef=coef, intercept=0.0), {})
    queue_csv, bins_csv = tmp_path / "metrics" / "review_queue.csv", tmp_path / "metrics" / "reliability.csv"
    _, _, md = evaluate(files, tmp_path, calibration_h5=tmp_path / "cal.h5", risk_json=tmp_path / "risk.json",
                        review_queue_csv=queue_csv, reliability_csv=bins_csv)
    queue = pd.read_csv(queue_csv)
    assert queue["id"].tolist() == ["ISIC_0000002", "ISIC_0000001", "ISIC_0000003"]
    assert queue["dice"].tolist() == [0.0, 1.0, 1.0]
    assert queue["crf_disagreement"].tolist() == pytest.approx([32 / 256, 4 / 256, 0.0])
    assert "| **risk score** | 1.000 | 1.000 |" in md  # the one failure ranked first
    assert "| 30% (1) | 2 | 1.000 | 1.000 |" in md
    # consistency: 0 or 1 where right, 0.5 on 24 background pixels -> ECE = 0.5 * 24 / 768
    bins = pd.read_csv(bins_csv)
    assert bins["n_pixels"].sum() == 3 * R * R
    assert "Expected calibration error over 768 pixels, 10 equal bins: 0.016" in md


def test_the_official_score_carries_hd95_per_image_and_in_the_table(files, tmp_path):
    """HD95 at the original size: the best-t row keeps the left half of each square (the right edge moves by 4,
    3 and 2 px), the final row is exact where it is not empty, the U-Net row is empty everywhere (no HD95)."""
    means, table, md = evaluate(files, tmp_path)
    best_t = table[table["method"] == BEST_T_METHOD].set_index("id")
    assert best_t.loc[TEST_IDS, "official_hd95"].tolist() == [4.0, 3.0, 2.0]
    final = table[table["method"] == FINAL_METHOD].set_index("id").loc[TEST_IDS, "official_hd95"]
    assert final.iloc[[0, 2]].tolist() == [0.0, 0.0] and np.isnan(final.iloc[1])  # image 2: empty final mask
    assert means[BEST_T_METHOD]["official"]["hd95"] == pytest.approx(3.0)
    assert means[FINAL_METHOD]["official"]["hd95"] == 0.0
    official = md.split("## At the model's working resolution")[0]
    assert "| threshold Jaccard | HD95 (px) |" in official
    assert "| 3.000 |" in official.split(BEST_T_METHOD)[1].splitlines()[0]
    assert official.split("| U-Net (supervised) |")[1].splitlines()[0].endswith("| n/a |")
