"""bench/few_masks.py: the labelled rows of an N, the curve's table, markdown and figure (synthetic rows);
diffseg.baselines.fit_unet on arrays and otsu_channel (the pieces the bench shares with the workflow)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # few_masks imports scale_ladder, as when it runs
spec = importlib.util.spec_from_file_location("few_masks", REPO / "bench" / "few_masks.py")
few = importlib.util.module_from_spec(spec)
sys.modules["few_masks"] = few
spec.loader.exec_module(few)


def test_labelled_rows_are_the_first_n_of_the_split_order_and_every_row_without_ranks():
    split = {"ids": list("abcdef"), "label_rank": np.array([3, -1, 0, 1, -1, 2])}
    assert few.labelled_rows(split, 2).tolist() == [2, 3]
    assert few.labelled_rows(split, 4).tolist() == [0, 2, 3, 5]
    assert few.labelled_rows({"ids": list("abc")}, 1).tolist() == [0, 1, 2]


def rows(row, dice_by_n, **extra):
    return [{"seed": s, "n": n, "row": row, "dice": d + 0.01 * s, "train_masks": 8, "val_masks": 2, **extra}
            for n, d in dice_by_n.items() for s in range(3)]


SYNTHETIC = rows("head", {10: 0.80, 25: 0.85, "all": 0.90}) + rows("unet", {10: 0.70, "all": 0.91})[:4]


def test_curve_table_gives_mean_sd_and_seed_count_with_all_last():
    table = few.curve_table(SYNTHETIC)
    head = table[table["row"] == "head"]
    assert head["n"].tolist() == ["10", "25", "all"]
    assert head["dice_mean"].round(6).tolist() == [0.81, 0.86, 0.91]
    assert head["dice_sd"].round(6).tolist() == [0.01, 0.01, 0.01]
    unet = table[table["row"] == "unet"].set_index("n")
    assert unet.loc["10", "seeds"] == 3 and unet.loc["all", "seeds"] == 1 and np.isnan(unet.loc["all", "dice_sd"])


def test_curve_markdown_marks_missing_cells_and_incomplete_seeds():
    text = few.curve_markdown(few.curve_table(SYNTHETIC))
    lines = text.splitlines()
    assert lines[0] == "| row | N = 10 | N = 25 | N = all |"
    assert lines[2] == "| features head | 0.810 +- 0.010 | 0.860 +- 0.010 | 0.910 +- 0.010 |"
    assert lines[3] == "| U-Net (supervised) | 0.710 +- 0.010 |  | 0.910 (1 seeds) |"


def test_curve_figure_is_written(tmp_path):
    few.draw_curve(few.curve_table(SYNTHETIC), tmp_path / "curve.png", n_all=480)
    assert (tmp_path / "curve.png").stat().st_size > 10_000


def test_otsu_channel_picks_the_channel_that_separates_the_lesion():
    from diffseg.baselines import otsu_channel, otsu_masks

    rng = np.random.default_rng(0)
    images = rng.integers(100, 140, (4, 16, 16, 3)).astype(np.uint8)
    masks = np.zeros((4, 16, 16), bool)
    masks[:, 4:12, 4:12] = True
    images[..., 2][masks] = 20  # only the blue channel shows the lesion
    channel, scores = otsu_channel(images, masks)
    assert channel == "blue" and scores["blue"] == pytest.approx(1.0)
    assert np.array_equal(otsu_masks(images, "blue"), masks)
