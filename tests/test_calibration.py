"""Calibration (diffseg.calibration): the paper identity, bias maps, threshold on val, clean-up, the file."""

import h5py
import numpy as np
import pytest

from diffseg.calibration import (bias_map, choose_threshold, fit_calibration, load_calibration, run_calibrate,
                                 save_calibration, threshold_grid)
from diffseg.imageio import InputError
from diffseg.postprocess import PAPER, Calibration, apply_calibration, cleanup, postprocess_image, vote

R = 16


def disc(cy: int, cx: int, r: float, size: int = R) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_paper_path_is_the_identity_and_matches_inference():
    rng = np.random.default_rng(0)
    raw = rng.gamma(2.0, 1.0, (3, R, R)).astype(np.float32)
    stored = postprocess_image(raw, normalise="p99", threshold=0.5)
    prob, binary = apply_calibration(stored.maps, PAPER)
    np.testing.assert_array_equal(prob, stored.maps)
    np.testing.assert_array_equal(binary, stored.binary)
    _, otsu = apply_calibration(stored.maps, Calibration(method="paper", threshold="otsu"))
    np.testing.assert_array_equal(otsu, postprocess_image(raw, threshold="otsu").binary)


def test_bias_map_is_subtracted_before_the_threshold():
    frame = np.zeros((2, R, R), np.float32)
    frame[:, 0, :] = frame[:, -1, :] = frame[:, :, 0] = frame[:, :, -1] = 0.9  # the border artefact
    lesion = disc(8, 8, 3)
    maps = frame + 0.6 * lesion
    cal = Calibration(method="calibrated", threshold=0.3, bias_map=frame, blur_sigma=0.0, sigmoid_scale=0.05,
                      closing_px=0, fill_holes=False, largest_component=False)
    prob, binary = apply_calibration(maps, cal)
    assert (binary == lesion).all()
    _, without = apply_calibration(maps, Calibration(method="calibrated", threshold=0.3, blur_sigma=0.0,
                                                         sigmoid_scale=0.05, closing_px=0, fill_holes=False, largest_component=False))
    assert without[:, 0, :].all()  # without the bias map the frame is "lesion"
    assert prob[0, 8, 8] == pytest.approx(1 / (1 + np.exp(-(0.6 - 0.3) / 0.05)))
    with pytest.raises(ValueError, match="bias_map"):
        apply_calibration(maps[:1], cal)


def test_bias_map_is_the_per_pixel_median_of_val_background():
    val = np.stack([np.full((2, 4, 4), v, np.float32) for v in (0.1, 0.2, 0.9)])
    np.testing.assert_allclose(bias_map(val), np.full((2, 4, 4), 0.2))
    truth = np.zeros((3, 4, 4), bool)
    truth[2] = True  # the 0.9 image is all lesion: only 0.1 and 0.2 are background
    np.testing.assert_allclose(bias_map(val, truth), np.full((2, 4, 4), 0.15))
    truth[:, 0, 0] = True  # lesion in every image: the background median of its timestep
    np.testing.assert_allclose(bias_map(val, truth)[:, 0, 0], [0.15, 0.15])


def test_sigmoid_is_one_half_at_the_threshold():
    maps = np.full((1, 4, 4), 0.4, np.float32)
    prob, binary = apply_calibration(maps, Calibration(method="calibrated", threshold=0.4, blur_sigma=0.0,
                                                       sigmoid_scale=0.1))
    np.testing.assert_allclose(prob, 0.5)
    assert not binary.any()  # strictly above the threshold is lesion


def test_cleanup_closing_holes_largest_component():
    ring = disc(8, 8, 5) & ~disc(8, 8, 2)
    np.testing.assert_array_equal(cleanup(ring, closing_px=0, fill_holes=True, largest_component=False), disc(8, 8, 5))
    gap = disc(8, 8, 5).copy()
    gap[:, 8] = False  # a one-pixel cut
    assert cleanup(gap, closing_px=1, fill_holes=False, largest_component=False)[8, 8]
    assert not cleanup(gap, closing_px=0, fill_holes=False, largest_component=False)[8, 8]
    two = disc(5, 5, 3) | disc(13, 13, 1)
    np.testing.assert_array_equal(cleanup(two, closing_px=0, fill_holes=False, largest_component=True), disc(5, 5, 3))
    edge = np.zeros((R, R), bool)
    edge[:, :4] = True  # touching the border: closing must not erode it
    np.testing.assert_array_equal(cleanup(edge, closing_px=2, fill_holes=False, largest_component=False), edge)
    assert not cleanup(np.zeros((R, R), bool), closing_px=1, fill_holes=True, largest_component=True).any()


def test_vote_is_the_majority():
    binary = np.array([[[1, 1]], [[1, 0]], [[0, 0]]], np.uint8)
    np.testing.assert_array_equal(vote(binary), [[True, False]])


def val_set(n: int = 6, lesion: float = 0.6, background: float = 0.3):
    truth = np.stack([disc(4 + i, 8, 3) for i in range(n)])
    maps = np.where(truth[:, None], lesion, background).astype(np.float32).repeat(2, axis=1)
    return maps, truth


def test_threshold_is_chosen_on_the_given_val_maps():
    maps, truth = val_set()
    base = Calibration(method="calibrated", blur_sigma=0.0)
    thr, dice = choose_threshold(maps, truth, base, grid=[0.1, 0.3, 0.45, 0.6, 0.7])
    assert thr == pytest.approx(0.30) and dice == pytest.approx(1.0)  # lowest threshold that separates
    maps2, truth2 = val_set(lesion=0.9, background=0.5)
    assert choose_threshold(maps2, truth2, base, grid=[0.3, 0.5, 0.7, 0.95])[0] == pytest.approx(0.5)
    thr3, dice3 = choose_threshold(maps2, truth2, base)  # default grid: quantiles of the val maps
    assert 0.5 <= thr3 < 0.9 and dice3 == pytest.approx(1.0)


def test_threshold_grid_is_quantiles_of_the_maps():
    values = np.arange(100, dtype=np.float32) / 100
    grid = threshold_grid(values, n=3)
    assert grid == [pytest.approx(0.198), pytest.approx(0.5915, abs=1e-4), pytest.approx(0.9851, abs=1e-4)]
    assert threshold_grid(np.zeros(10, np.float32)) == [0.0]  # constant maps: one candidate


def test_fit_calibration_paper_keeps_the_configured_threshold():
    maps, truth = val_set()
    cal, report = fit_calibration(maps, truth, [60, 70], method="paper", threshold=0.5)
    assert cal.method == "paper" and cal.threshold == 0.5 and cal.bias_map is None
    assert cal.best_timestep == 60  # both timesteps tie: the earliest
    assert report["val_dice_vote"] == pytest.approx(1.0)


def test_fit_calibration_calibrated_fits_threshold_scale_bias():
    maps, truth = val_set(n=8)
    cal, report = fit_calibration(maps, truth, [60, 70], method="calibrated", bias=True, blur_sigma=0.0,
                                  closing_px=0)
    assert cal.method == "calibrated" and cal.bias_map.shape == (2, R, R)
    assert report["val_dice_vote"] == pytest.approx(1.0)
    assert 0.0 < cal.sigmoid_scale <= 0.2
    with pytest.raises(ValueError, match="do not match"):
        fit_calibration(maps, truth[:, :8], [60, 70])


def write_files(tmp_path, maps, truth, split="val"):
    n = len(truth)
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    with h5py.File(tmp_path / "dataset.h5", "w") as f:
        for name, masks in (("val", truth), ("test", ~truth)):  # test masks inverted: must not matter
            g = f.create_group(name)
            g.create_dataset("ids", data=np.asarray(ids, object), dtype=h5py.string_dtype())
            g.create_dataset("masks", data=masks.astype(np.uint8))
    with h5py.File(tmp_path / "inf.h5", "w") as f:
        f.create_dataset("ids", data=np.asarray(ids[::-1], object), dtype=h5py.string_dtype())  # other order
        f.create_dataset("maps", data=maps[::-1].astype(np.float16))
        f.create_dataset("timesteps", data=np.array([60, 70], np.int32))
        f.attrs["split"] = split


def test_run_calibrate_uses_val_only_and_round_trips(tmp_path):
    maps, truth = val_set(n=6)
    write_files(tmp_path, maps, truth)
    report = run_calibrate(tmp_path / "dataset.h5", tmp_path / "inf.h5", tmp_path / "cal.h5", method="calibrated",
                           bias=True, blur_sigma=0.0, closing_px=0)
    assert report["threshold"] == pytest.approx(0.02) or report["val_dice_vote"] == pytest.approx(1.0)
    cal = load_calibration(tmp_path / "cal.h5")
    assert cal.method == "calibrated" and cal.timesteps == [60, 70] and cal.bias_map.shape == (2, R, R)
    _, binary = apply_calibration(maps[0], cal)
    np.testing.assert_array_equal(vote(binary), truth[0])


def test_run_calibrate_refuses_a_test_file(tmp_path):
    maps, truth = val_set()
    write_files(tmp_path, maps, truth, split="test")
    with pytest.raises(InputError, match="val split"):
        run_calibrate(tmp_path / "dataset.h5", tmp_path / "inf.h5", tmp_path / "cal.h5")


def test_save_load_paper_and_errors(tmp_path):
    save_calibration(tmp_path / "p.h5", Calibration(timesteps=[5]), (1, 4, 4), {})
    cal = load_calibration(tmp_path / "p.h5")
    assert cal.method == "paper" and cal.bias_map is None and cal.threshold == 0.5 and cal.best_timestep is None
    assert cal.sigmoid_scale is None  # not fitted: stored as NaN, read back as None
    with pytest.raises(ValueError, match="sigmoid_scale is not fitted"):
        apply_calibration(np.zeros((1, 4, 4), np.float32), Calibration(method="calibrated"))
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.attrs["method"] = "paper"
    with pytest.raises(InputError, match="threshold"):
        load_calibration(tmp_path / "bad.h5")
    with pytest.raises(ValueError, match="calibration.method"):
        Calibration(method="magic")


def test_binary_outputs_stored_for_the_paper_identity_computed_otherwise():
    from diffseg.postprocess import binary_outputs, needs_maps

    maps, truth = val_set(n=2)
    stored = np.zeros(maps.shape, np.uint8)  # deliberately unlike maps > 0.5: must come back untouched
    assert binary_outputs(None, stored) is stored and binary_outputs(PAPER, stored, maps) is stored
    assert not needs_maps(None) and not needs_maps(PAPER)
    cal = Calibration(method="calibrated", threshold=0.02, blur_sigma=0.0, sigmoid_scale=0.05)
    assert needs_maps(cal)
    np.testing.assert_array_equal(binary_outputs(cal, stored, maps), np.stack([apply_calibration(m, cal)[1] for m in maps]))
    np.testing.assert_array_equal(binary_outputs(cal, stored[0], maps[0]), apply_calibration(maps[0], cal)[1])
    with pytest.raises(ValueError, match="needs the maps"):
        binary_outputs(cal, stored)
