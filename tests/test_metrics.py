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


# ----------------------------------------------------------------------------- HD95


def _square(top, left, side=10, shape=(40, 40)):
    return _mask(slice(top, top + side), slice(left, left + side), shape)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_hd95_of_two_squares_offset_by_k_pixels_is_k(k):
    from diffseg.metrics import hd95

    assert hd95(_square(10, 10 + k), _square(10, 10)) == k  # sideways
    assert hd95(_square(10 + k, 10), _square(10, 10)) == k  # downwards
    assert hd95(_square(10, 10), _square(10 + k, 10)) == k  # symmetric


def test_hd95_by_hand_identical_empty_and_diagonal():
    from diffseg.metrics import hd95

    square = _square(5, 5)
    assert hd95(square, square) == 0.0
    empty = np.zeros_like(square)
    assert hd95(empty, square) is None and hd95(square, empty) is None and hd95(empty, empty) is None
    one, other = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    one[2, 2], other[5, 6] = True, True  # a 3-4-5 triangle: Euclidean, in pixels
    assert hd95(one, other) == 5.0
    with pytest.raises(ValueError, match="truth is"):
        hd95(square, np.zeros((4, 5), bool))


def _brute_force_hd95(pred, truth):
    """The definition written out without distance transforms or cropping: all pairwise surface distances."""
    def surface(mask):
        padded = np.pad(mask, 1)  # outside the image counts as outside the mask
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        return np.argwhere(mask & ~inner)

    a, b = surface(pred), surface(truth)
    distances = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


def test_hd95_equals_the_definition_on_random_blobs_touching_the_border():
    from scipy import ndimage

    from diffseg.metrics import hd95

    rng = np.random.default_rng(3)
    for _ in range(12):
        blobs = [ndimage.gaussian_filter(rng.random((30, 37)), 3) for _ in range(2)]
        pred, truth = (b > np.quantile(b, q) for b, q in zip(blobs, rng.uniform(0.4, 0.9, 2)))
        assert hd95(pred, truth) == pytest.approx(_brute_force_hd95(pred, truth), abs=1e-9)


def test_the_official_score_carries_hd95_and_its_mean_skips_empty_masks(tmp_path):
    from diffseg.metrics import score_png_pairs

    truth = _square(10, 10)
    write_mask_png(tmp_path / "t.png", truth)
    write_mask_png(tmp_path / "shifted.png", _square(10, 14))
    write_mask_png(tmp_path / "empty.png", np.zeros_like(truth))
    table = score_png_pairs([("a", tmp_path / "shifted.png", tmp_path / "t.png"),
                             ("b", tmp_path / "empty.png", tmp_path / "t.png")])
    assert table["hd95"].iloc[0] == 4.0 and np.isnan(table["hd95"].iloc[1])
    assert table["dice"].tolist() == [pytest.approx(2 * 60 / 200), 0.0]
    means = aggregate(table)
    assert means["hd95"] == 4.0 and means["dice"] == pytest.approx(0.3)
    assert "hd95" not in aggregate(table.iloc[[1]])  # no image with an HD95: no mean (not NaN)
