import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffseg.imageio import InputError, write_mask_png
from diffseg.metrics import aggregate, mask_metrics, score_png_folder


def _mask(rows, cols, shape=(8, 8)):
    m = np.zeros(shape, bool)
    m[rows, cols] = True
    return m


def test_mask_metrics_by_hand():
    truth = _mask(slice(0, 4), slice(0, 4))  # 16 px
    pred = _mask(slice(2, 6), slice(0, 4))  # 16 px, 8 overlap -> TP 8, FP 8, FN 8
    m = mask_metrics(pred, truth)
    assert m["dice"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5
    assert m["jaccard"] == pytest.approx(1 / 3) and m["threshold_jaccard"] == 0.0
    pred = _mask(slice(0, 4), slice(0, 3))  # 12 px inside truth -> J = 0.75 >= 0.65
    m = mask_metrics(pred, truth)
    assert m == pytest.approx({"dice": 24 / 28, "jaccard": 0.75, "precision": 1.0,
                               "recall": 0.75, "threshold_jaccard": 0.75})


def test_degenerate_conventions():
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert mask_metrics(empty, empty) == dict.fromkeys(mask_metrics(empty, empty), 1.0)
    # empty prediction: precision is the scorer's freebie, the rest are 0
    assert mask_metrics(empty, full) == {"dice": 0.0, "jaccard": 0.0, "precision": 1.0,
                                         "recall": 0.0, "threshold_jaccard": 0.0}
    # empty truth: recall is the freebie
    assert mask_metrics(full, empty) == {"dice": 0.0, "jaccard": 0.0, "precision": 0.0,
                                         "recall": 1.0, "threshold_jaccard": 0.0}
    with pytest.raises(ValueError, match="truth"):
        mask_metrics(empty, np.zeros((4, 5), bool))


def _cases():
    rng = np.random.default_rng(0)
    truth = np.zeros((32, 32), bool)
    truth[8:24, 6:26] = True
    cases = [(truth, truth), (np.zeros_like(truth), truth), (truth, np.zeros_like(truth)),
             (np.zeros_like(truth), np.zeros_like(truth)), (np.ones_like(truth), truth)]
    for p in (0.05, 0.2, 0.5):  # noisy predictions across the 0.65 Jaccard threshold
        cases.append((truth ^ (rng.random(truth.shape) < p), truth))
    return cases


def test_equal_to_isic_scorer_per_image():
    from isic_challenge_scoring import confusion
    from isic_challenge_scoring import metrics as isic_metrics

    for pred, truth in _cases():
        cm = confusion.create_binary_confusion_matrix(truth_binary_values=truth,
                                                      prediction_binary_values=pred)
        ours = mask_metrics(pred, truth)
        assert ours["jaccard"] == pytest.approx(isic_metrics.binary_jaccard(cm), abs=1e-6)
        assert ours["dice"] == pytest.approx(isic_metrics.binary_dice(cm), abs=1e-6)
        assert ours["threshold_jaccard"] == pytest.approx(
            isic_metrics.binary_threshold_jaccard(cm, threshold=0.65), abs=1e-6)
        assert ours["recall"] == pytest.approx(isic_metrics.binary_sensitivity(cm), abs=1e-6)
        assert ours["precision"] == pytest.approx(isic_metrics.binary_ppv(cm), abs=1e-6)


def _write_folders(tmp_path):
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth"
    for k, (pred, truth) in enumerate(_cases()):
        write_mask_png(pred_dir / f"ISIC_{k:07d}_segmentation.png", pred)
        write_mask_png(truth_dir / f"ISIC_{k:07d}_segmentation.png", truth)
    return pred_dir, truth_dir


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # inside the scorer, not ours
def test_score_png_folder_matches_isic_scorer_macro_average(tmp_path):
    from isic_challenge_scoring import segmentation

    pred_dir, truth_dir = _write_folders(tmp_path)
    table = score_png_folder(pred_dir, truth_dir)
    assert list(table["id"]) == [f"ISIC_{k:07d}" for k in range(len(_cases()))]
    ours = aggregate(table)
    theirs = segmentation.SegmentationScore.from_dir(truth_dir, pred_dir).macro_average
    for name in ("jaccard", "dice", "threshold_jaccard"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6)
    assert ours["recall"] == pytest.approx(theirs["sensitivity"], abs=1e-6)


def test_score_png_folder_errors_name_the_file(tmp_path):
    pred_dir, truth_dir = _write_folders(tmp_path)
    (pred_dir / "ISIC_0000003_segmentation.png").unlink()
    with pytest.raises(InputError, match="ISIC_0000003_segmentation.png: prediction missing"):
        score_png_folder(pred_dir, truth_dir)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(pred_dir / "ISIC_0000003_segmentation.png")
    with pytest.raises(InputError, match="ISIC_0000003_segmentation.png: mask is 16x16 px"):
        score_png_folder(pred_dir, truth_dir)


def test_aggregate_is_macro_mean():
    table = pd.DataFrame({"id": ["a", "b"], "dice": [1.0, 0.5], "jaccard": [1.0, 1 / 3]})
    means = aggregate(table)
    assert list(means.index) == ["dice", "jaccard"]
    assert means["dice"] == 0.75 and means["jaccard"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="non-empty"):
        aggregate(table.iloc[:0])


def test_fast_dice_equals_mask_metrics_dice():
    from diffseg.metrics import dice

    rng = np.random.default_rng(0)
    for _ in range(20):
        pred, truth = rng.random((9, 9)) > 0.6, rng.random((9, 9)) > 0.5
        assert dice(pred, truth) == mask_metrics(pred, truth)["dice"]
    assert dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
