import math

import h5py
import numpy as np
import pandas as pd
import pytest

from diffseg.imageio import InputError
from diffseg.uncertainty import ambiguity, consistency, ged_kohl, ged_paper, run_uncertainty


def test_consistency_and_ambiguity_by_hand():
    # pixel 0: outputs 1,1,0,0 -> mean 0.5, var 0.25; pixel 1: 1,1,1,0 -> 0.75, 0.1875; pixel 2: all 0
    y = np.array([[[1, 1, 0]], [[1, 1, 0]], [[0, 1, 0]], [[0, 0, 0]]], dtype=np.uint8)
    c, a = consistency(y), ambiguity(y)
    assert c.dtype == np.float32 and a.dtype == np.float32 and c.shape == (1, 3)
    np.testing.assert_array_equal(c, [[0.5, 0.75, 0.0]])
    np.testing.assert_array_equal(a, [[0.25, 0.1875, 0.0]])


def test_no_uint8_wraparound():
    # uint8 arithmetic would give (0 - 1) = 255; floats give a variance of 0.25
    y = np.array([[[0]], [[1]]], dtype=np.uint8)
    assert ambiguity(y)[0, 0] == 0.25
    assert ged_paper(y) == 0.5


def test_ged_paper_identical_outputs_is_zero():
    y = np.repeat((np.arange(64).reshape(8, 8) % 3 == 0)[None], 10, axis=0).astype(np.uint8)
    assert ged_paper(y) == 0.0


@pytest.mark.parametrize("n", [2, 4, 10])
def test_ged_paper_half_ones_half_zeros(n):
    y = np.zeros((n, 5, 5), np.uint8)
    y[: n // 2] = 1
    # (N/2)^2 pairs at RMS distance 1: (2/N^2) * (N/2)^2 = 0.5
    assert ged_paper(y) == pytest.approx(0.5, abs=1e-12)


def test_ged_paper_small_case_by_hand():
    # 4-pixel masks: d12 = sqrt(1/4), d13 = sqrt(2/4), d23 = sqrt(1/4)
    y = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.uint8).reshape(3, 2, 2)
    expected = 2 / 9 * (0.5 + math.sqrt(0.5) + 0.5)
    assert ged_paper(y) == pytest.approx(expected, abs=1e-12)


def test_ged_paper_below_bound_on_random_masks():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10):
        bound = math.sqrt((n - 1) / (2 * n))
        for _ in range(20):
            y = rng.random((n, 16, 16)) < rng.random()
            assert 0.0 <= ged_paper(y) <= bound + 1e-12


def test_ged_paper_matches_explicit_pair_loop():
    rng = np.random.default_rng(1)
    y = (rng.random((10, 12, 12)) < 0.4).astype(np.float64)
    loop = sum(np.sqrt(np.mean((y[i] - y[j]) ** 2)) for i in range(10) for j in range(i + 1, 10))
    assert ged_paper(y) == pytest.approx(2 / 100 * loop, abs=1e-12)


def test_ged_kohl_by_hand():
    a = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b = np.zeros((4, 4), bool)
    b[1:3] = True  # overlaps a on 4 pixels; union 12 -> d(a, b) = 1 - 4/12 = 2/3
    empty = np.zeros((4, 4), bool)
    assert ged_kohl(np.stack([a, a]), a) == 0.0
    # S = {a, empty}, Y = a: E[d(S,Y)] = (0 + 1)/2; E[d(S,S')] over 4 ordered pairs = 2/4
    assert ged_kohl(np.stack([a, empty]), a) == pytest.approx(2 * 0.5 - 0.5, abs=1e-12)
    # S = {a}, Y = {a, b}: cross = (0 + 2/3)/2; within Y = (0 + 2/3 + 2/3 + 0)/4
    assert ged_kohl(a[None], np.stack([a, b])) == pytest.approx(2 / 3 - 1 / 3, abs=1e-12)
    # two empty masks agree perfectly
    assert ged_kohl(empty[None], empty) == 0.0


def test_ged_kohl_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="truth"):
        ged_kohl(np.zeros((2, 4, 4)), np.zeros((5, 5)))


def _write_inference(path, binary, ids):
    with h5py.File(path, "w") as f:
        f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("timesteps", data=np.arange(60, 60 + 10 * binary.shape[1], 10, dtype=np.int32))
        f.create_dataset("maps", data=binary.astype(np.float16))
        f.create_dataset("binary", data=binary.astype(np.uint8))


def test_run_uncertainty_layout_and_values(tmp_path):
    binary = np.zeros((2, 4, 8, 8), np.uint8)
    binary[0] = 1  # image A: all outputs agree -> GED 0, no ambiguity
    binary[1, :2, :4] = 1  # image B: half the outputs mark the top half -> GED 0.5 * sqrt(0.5)
    _write_inference(tmp_path / "inf.h5", binary, ["ISIC_0000001", "ISIC_0000002"])
    summary = run_uncertainty(tmp_path / "inf.h5", tmp_path / "u" / "test.h5", tmp_path / "u" / "test.csv")
    with h5py.File(tmp_path / "u" / "test.h5") as f:
        assert list(f["ids"].asstr()[:]) == ["ISIC_0000001", "ISIC_0000002"]
        assert f["consistency"].dtype == np.float32 and f["consistency"].shape == (2, 8, 8)
        assert f["ambiguity"].dtype == np.float32 and f["ambiguity"].shape == (2, 8, 8)
        assert f["ged"].dtype == np.float64 and f["ged"].shape == (2,)
        np.testing.assert_array_equal(f["consistency"][1, :4], 0.5)
        np.testing.assert_array_equal(f["ambiguity"][1, 4:], 0.0)
        np.testing.assert_allclose(f["ged"][:], [0.0, 0.5 * math.sqrt(0.5)], atol=1e-12)
    table = pd.read_csv(tmp_path / "u" / "test.csv")
    assert list(table.columns) == ["id", "ged", "ambiguity_area"]
    np.testing.assert_allclose(table["ambiguity_area"], [0.0, 0.5])
    assert summary["mean_ged"] == pytest.approx(0.25 * math.sqrt(0.5))
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == ["test.csv", "test.h5"]


def test_run_uncertainty_missing_key_names_file_and_key(tmp_path):
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("ids", data=np.array(["a"], dtype=object), dtype=h5py.string_dtype())
    with pytest.raises(InputError, match=r"bad\.h5.*'binary'"):
        run_uncertainty(tmp_path / "bad.h5", tmp_path / "o.h5", tmp_path / "o.csv")
    assert not (tmp_path / "o.h5").exists()


def test_run_uncertainty_uses_the_calibrated_outputs(tmp_path):
    """With a calibration whose bias map removes image B's marks, B has no ambiguity and GED 0."""
    from diffseg.calibration import save_calibration
    from diffseg.postprocess import Calibration

    binary = np.zeros((2, 4, 8, 8), np.uint8)
    binary[1, :2, :4] = 1
    _write_inference(tmp_path / "inf.h5", binary, ["ISIC_0000001", "ISIC_0000002"])
    bias = np.zeros((4, 8, 8), np.float32)
    bias[:2, :4] = 1.0
    cal = Calibration(method="calibrated", threshold=0.5, bias_map=bias, blur_sigma=0.0, timesteps=[60, 70, 80, 90],
                      sigmoid_scale=0.05, closing_px=0, fill_holes=False, largest_component=False)
    save_calibration(tmp_path / "cal.h5", cal, (4, 8, 8), {})
    run_uncertainty(tmp_path / "inf.h5", tmp_path / "u.h5", tmp_path / "u.csv", calibration_h5=tmp_path / "cal.h5")
    with h5py.File(tmp_path / "u.h5") as f:
        np.testing.assert_array_equal(f["consistency"][:], 0.0)
        np.testing.assert_array_equal(f["ged"][:], [0.0, 0.0])
        assert f.attrs["calibration"] == "calibrated"
