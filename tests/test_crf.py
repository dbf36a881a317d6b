import h5py
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from diffseg.crf import crf_fusion, dense_crf, rounds_to_run, run_crf
from diffseg.settings import CRFSettings
from diffseg.export import export_masks, write_original_size_pngs
from diffseg.imageio import InputError, read_mask
from diffseg.seeding import content_key, image_rng


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _scene(size=48, seed=0):
    """A dark disc on light skin, its blurred mask as soft map, and isolated noise pixels far from it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size * 0.45) ** 2 < (size / 4) ** 2
    image = np.where(disc[..., None], [90, 50, 40], [220, 180, 160]) + rng.normal(0, 4, (size, size, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    soft = ndimage.gaussian_filter(disc.astype(np.float64), 2)
    far = ~ndimage.binary_dilation(disc, iterations=5)
    noise = np.zeros_like(disc)
    noise[rng.integers(0, size, 30), rng.integers(0, size, 30)] = True
    return image, disc, soft, noise & far


def test_dense_crf_keeps_lesion_and_removes_isolated_noise():
    image, disc, soft, noise = _scene()
    noisy = soft.copy()
    noisy[noise] = 1.0
    assert noise.sum() >= 10
    posterior = dense_crf(image, noisy)
    assert posterior.dtype == np.float32 and posterior.shape == disc.shape
    assert 0.0 <= posterior.min() and posterior.max() <= 1.0
    assert _dice(posterior >= 0.5, disc) > 0.95
    # p = 1 - 1e-5 costs 11.5 nats to overturn: the normalised pairwise terms (compat 3 + 10) do it
    # inside the image but not always on its edge row, where a pixel has half the neighbours
    interior = np.zeros_like(noise)
    interior[3:-3, 3:-3] = True
    assert (noise & interior).sum() >= 10
    assert not (posterior >= 0.5)[noise & interior].any()
    assert posterior[noise].mean() < 0.5


def test_dense_crf_rejects_mismatched_image():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        dense_crf(np.zeros((8, 9, 3), np.uint8), np.zeros((8, 8)))


def _noisy_maps(soft, noise, n_maps, seed):
    """n_maps copies of the soft map, each with its own third of the noise pixels set to 1."""
    rng = np.random.default_rng(seed)
    maps = np.repeat(soft[None], n_maps, axis=0)
    coords = np.argwhere(noise)
    for m in maps:
        pick = coords[rng.random(len(coords)) < 0.33]
        m[pick[:, 0], pick[:, 1]] = 1.0
    return maps


def test_crf_fusion_recovers_disc_and_is_deterministic():
    image, disc, soft, noise = _scene()
    maps = _noisy_maps(soft, noise, 10, seed=1)
    fused, per_round = crf_fusion(image, maps, np.random.default_rng(7))
    again, again_rounds = crf_fusion(image, maps, np.random.default_rng(7))
    assert fused.dtype == bool and per_round.dtype == np.uint8 and per_round.shape == (3, 48, 48)
    assert set(np.unique(per_round)) <= {0, 1}
    assert _dice(fused, disc) > 0.95 and not fused[noise].any()
    np.testing.assert_array_equal(fused, again)
    np.testing.assert_array_equal(per_round, again_rounds)
    np.testing.assert_array_equal(fused, per_round.mean(axis=0) >= 0.5)


def test_crf_fusion_rounds_use_sampled_subsets():
    # only map 0 marks the lesion; with subsets of 2 and threshold 0.25, a round is positive on the
    # disc exactly when its sample (drawn without replacement) contains map 0
    image, disc, soft, _ = _scene(32)
    maps = np.zeros((4, 32, 32))
    maps[0] = disc
    fused, per_round = crf_fusion(image, maps, np.random.default_rng(3),
                                  CRFSettings(rounds=6, subset_size=2, threshold=0.25))
    rng = np.random.default_rng(3)
    expected = [0 in rng.choice(4, size=2, replace=False) for _ in range(6)]
    assert 0 < sum(expected) < 6  # the seed gives both kinds of round
    assert [bool(r[disc].all()) for r in per_round] == expected
    assert not per_round[:, ~ndimage.binary_dilation(disc, iterations=3)].any()


def test_a_subset_of_every_output_runs_one_round_with_the_mask_of_k_rounds():
    """3 rounds of all 3 outputs refine the same maps: one round gives the K-round vote, bit for bit."""
    image, disc, soft, noise = _scene(16, seed=2)
    maps = _noisy_maps(soft, noise, 3, seed=4).astype(np.float32)
    settings = CRFSettings(rounds=3, subset_size=3)
    assert rounds_to_run(settings, 3) == 1 and rounds_to_run(CRFSettings(rounds=3, subset_size=2), 3) == 3
    fused, per_round = crf_fusion(image, maps, np.random.default_rng(11), settings)
    # the K rounds as they ran before: each its own draw (an order of all 3 maps), averaged, binarized
    rng = np.random.default_rng(11)
    k_rounds = np.stack([np.mean([dense_crf(image, maps[i], settings) for i in rng.choice(3, 3, replace=False)],
                                 axis=0) >= settings.threshold for _ in range(3)])
    assert (k_rounds == k_rounds[0]).all() and 0 < k_rounds[0].sum() < k_rounds[0].size
    assert per_round.shape == (1, 16, 16)
    np.testing.assert_array_equal(per_round[0], k_rounds[0])
    np.testing.assert_array_equal(fused, k_rounds.mean(axis=0) >= settings.threshold)


def test_crf_fusion_validates_subset_size():
    image, _, soft, _ = _scene(32)
    with pytest.raises(ValueError, match=r"crf\.subset_size = 4.*T = 3"):
        crf_fusion(image, np.repeat(soft[None], 3, axis=0), np.random.default_rng(0))


def test_write_original_size_pngs_sizes_and_values(tmp_path):
    masks = np.zeros((2, 8, 8), bool)
    masks[:, :, :4] = True  # left half
    write_original_size_pngs(["ISIC_0000001", "ISIC_0000002"], masks, np.array([[16, 24], [8, 8]]), tmp_path)
    big = np.asarray(Image.open(tmp_path / "ISIC_0000001_segmentation.png"))
    assert big.shape == (16, 24) and big.dtype == np.uint8 and set(np.unique(big)) == {0, 255}
    assert (big[:, :12] == 255).all() and (big[:, 12:] == 0).all()  # bilinear keeps the midline
    np.testing.assert_array_equal(read_mask(tmp_path / "ISIC_0000002_segmentation.png"), masks[1])


IDS = ["ISIC_0000010", "ISIC_0000011", "ISIC_0000012", "ISIC_0000013"]
ORIG = {"ISIC_0000010": (40, 50), "ISIC_0000011": (32, 32), "ISIC_0000012": (24, 60),
        "ISIC_0000013": (33, 31)}


def _write_inputs(tmp_path, n_maps=5):
    """dataset.h5 (test split, ids reversed) and inference.h5 with soft maps of noisy discs."""
    scenes = [_scene(32, seed=k) for k in range(len(IDS))]
    maps = np.stack([_noisy_maps(s[2], s[3], n_maps, seed=k) for k, s in enumerate(scenes)])
    order = list(reversed(range(len(IDS))))
    with h5py.File(tmp_path / "dataset.h5", "w") as f:
        g = f.create_group("test")
        g.create_dataset("ids", data=np.array([IDS[k] for k in order], dtype=object),
                         dtype=h5py.string_dtype())
        g.create_dataset("images", data=np.stack([scenes[k][0] for k in order]))
        g.create_dataset("masks", data=np.stack([scenes[k][1] for k in order]).astype(np.uint8))
        g.create_dataset("orig_size", data=np.array([ORIG[IDS[k]] for k in order], np.int32))
    with h5py.File(tmp_path / "inference.h5", "w") as f:
        f.create_dataset("ids", data=np.array(IDS, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("timesteps", data=np.arange(60, 60 + 10 * n_maps, 10, dtype=np.int32))
        f.create_dataset("maps", data=maps.astype(np.float16))
        f.create_dataset("binary", data=(maps >= 0.5).astype(np.uint8))
    return scenes, maps


def test_run_crf_outputs_and_thread_independence(tmp_path):
    scenes, maps = _write_inputs(tmp_path)
    settings = CRFSettings(rounds=3, subset_size=2, seed=5)
    summary = run_crf(tmp_path / "dataset.h5", tmp_path / "inference.h5", tmp_path / "one.h5", settings, threads=1)
    run_crf(tmp_path / "dataset.h5", tmp_path / "inference.h5", tmp_path / "two.h5", settings, threads=2)
    assert summary["n_images"] == 4
    with h5py.File(tmp_path / "one.h5") as one, h5py.File(tmp_path / "two.h5") as two:
        assert list(one["ids"].asstr()[:]) == IDS
        assert one["fused"].dtype == np.uint8 and one["fused"].shape == (4, 32, 32)
        assert one["rounds"].dtype == np.uint8 and one["rounds"].shape == (4, 3, 32, 32)
        for key in ("fused", "rounds"):
            np.testing.assert_array_equal(one[key][:], two[key][:])
        # each image was fused with its own image and its own rng, keyed by the image's content
        fused, per_round = crf_fusion(scenes[2][0], maps[2].astype(np.float16),
                                      image_rng(5, content_key(scenes[2][0])), CRFSettings(rounds=3, subset_size=2))
        np.testing.assert_array_equal(one["fused"][2], fused)
        np.testing.assert_array_equal(one["rounds"][2], per_round)
        for k, image_id in enumerate(IDS):
            assert _dice(one["fused"][k].astype(bool), scenes[k][1]) > 0.9
    # the original-size PNGs are exported from the fused masks (diffseg.export), whatever the threads
    for name in ("one", "two"):
        export_masks(tmp_path / "dataset.h5", tmp_path / f"{name}.h5", tmp_path / f"png_{name}")
    for image_id in IDS:
        png = np.asarray(Image.open(tmp_path / "png_one" / f"{image_id}_segmentation.png"))
        assert png.shape == ORIG[image_id] and set(np.unique(png)) == {0, 255}
        other = np.asarray(Image.open(tmp_path / "png_two" / f"{image_id}_segmentation.png"))
        np.testing.assert_array_equal(png, other)


def test_run_crf_missing_id_names_id_and_files(tmp_path):
    _write_inputs(tmp_path)
    with h5py.File(tmp_path / "dataset.h5", "a") as f:
        ids = f["test/ids"].asstr()[:]
        ids[ids == "ISIC_0000011"] = "ISIC_0000099"
        del f["test/ids"]
        f["test"].create_dataset("ids", data=ids.astype(object), dtype=h5py.string_dtype())
    with pytest.raises(InputError, match=r"inference\.h5: image id ISIC_0000011 .*'test' of .*dataset\.h5"):
        run_crf(tmp_path / "dataset.h5", tmp_path / "inference.h5", tmp_path / "o.h5")
    with pytest.raises(ValueError, match=r"crf\.subset_size = 6.*T = 5"):
        run_crf(tmp_path / "dataset.h5", tmp_path / "inference.h5", tmp_path / "o.h5", CRFSettings(subset_size=6))
    assert not (tmp_path / "o.h5").exists()


def test_run_crf_writes_only_its_h5(tmp_path):
    _write_inputs(tmp_path)
    run_crf(tmp_path / "dataset.h5", tmp_path / "inference.h5", tmp_path / "crf.h5", CRFSettings(subset_size=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crf.h5", "dataset.h5", "inference.h5"]
    with h5py.File(tmp_path / "crf.h5") as f:
        assert f["fused"].shape == (4, 32, 32) and f["rounds"].shape == (4, 3, 32, 32)


def test_run_crf_of_every_output_writes_one_round_and_logs_it(tmp_path, caplog):
    scenes, maps = _write_inputs(tmp_path, n_maps=3)
    with caplog.at_level("INFO", logger="diffseg.crf"):
        run_crf(tmp_path / "dataset.h5", tmp_path / "inference.h5", tmp_path / "crf.h5",
                CRFSettings(rounds=3, subset_size=3, seed=5))
    assert "subset_size = 3 is every output: the 3 rounds would all fuse the same maps, so one round runs" in caplog.text
    with h5py.File(tmp_path / "crf.h5") as f:
        assert f["rounds"].shape == (4, 1, 32, 32) and f.attrs["rounds"] == 3  # the setting, as configured
        np.testing.assert_array_equal(f["fused"][:], f["rounds"][:, 0])
        fused, _ = crf_fusion(scenes[0][0], maps[0].astype(np.float16), image_rng(5, content_key(scenes[0][0])),
                              CRFSettings(rounds=3, subset_size=3))
        np.testing.assert_array_equal(f["fused"][0], fused)
    caplog.clear()
    with caplog.at_level("INFO", logger="diffseg.crf"):  # fewer than every output: K rounds, nothing logged
        run_crf(tmp_path / "dataset.h5", tmp_path / "inference.h5", tmp_path / "two.h5", CRFSettings(subset_size=2))
    assert "one round runs" not in caplog.text


def test_run_crf_with_calibration_writes_both_fusions(tmp_path):
    """A calibrated run fuses the calibrated probabilities and also writes the paper's fusion of the raw maps."""
    from diffseg.calibration import save_calibration
    from diffseg.postprocess import Calibration, apply_calibration

    scenes, maps = _write_inputs(tmp_path)
    cal = Calibration(method="calibrated", threshold=0.4, blur_sigma=0.0, sigmoid_scale=0.1, timesteps=[60] * 5,
                      closing_px=0, fill_holes=False, largest_component=False)
    save_calibration(tmp_path / "cal.h5", cal, maps.shape[1:], {})
    settings = CRFSettings(rounds=3, subset_size=2, seed=5)
    run_crf(tmp_path / "dataset.h5", tmp_path / "inference.h5", tmp_path / "paper.h5", settings)
    run_crf(tmp_path / "dataset.h5", tmp_path / "inference.h5", tmp_path / "cal_out.h5", settings,
            calibration_h5=tmp_path / "cal.h5")
    with h5py.File(tmp_path / "paper.h5") as paper, h5py.File(tmp_path / "cal_out.h5") as calibrated:
        assert "paper_fused" not in paper and calibrated.attrs["calibration"] == "calibrated"
        np.testing.assert_array_equal(calibrated["paper_fused"][:], paper["fused"][:])
        np.testing.assert_array_equal(calibrated["paper_rounds"][:], paper["rounds"][:])
        prob, _ = apply_calibration(maps[1].astype(np.float16), cal)
        fused, _ = crf_fusion(scenes[1][0], prob, image_rng(5, content_key(scenes[1][0])),
                              CRFSettings(rounds=3, subset_size=2))
        np.testing.assert_array_equal(calibrated["fused"][1], fused)


def test_run_crf_accepts_an_empty_shard(tmp_path):
    """More shards than inference batches leave some shards empty: they must pass through."""
    dataset, inference = tmp_path / "dataset.h5", tmp_path / "inference.h5"
    with h5py.File(dataset, "w") as f:
        g = f.create_group("test")
        g.create_dataset("ids", data=np.array(["a"], dtype=object), dtype=h5py.string_dtype())
        g.create_dataset("images", data=np.zeros((1, 8, 8, 3), np.uint8))
        g.create_dataset("masks", data=np.zeros((1, 8, 8), np.uint8))
        g.create_dataset("orig_size", data=np.array([[8, 8]], np.int32))
    with h5py.File(inference, "w") as f:
        f.create_dataset("ids", data=np.array([], dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("timesteps", data=np.array([60, 70], np.int32))
        f.create_dataset("maps", data=np.zeros((0, 2, 8, 8), np.float16))
        f.create_dataset("binary", data=np.zeros((0, 2, 8, 8), np.uint8))
    summary = run_crf(dataset, inference, tmp_path / "crf.h5", CRFSettings(subset_size=2))
    assert summary["n_images"] == 0
    with h5py.File(tmp_path / "crf.h5") as f:
        assert f["fused"].shape == (0, 8, 8) and f["rounds"].shape == (0, 1, 8, 8)  # 2 of 2 maps: one round


def test_crf_settings_from_config_and_defaults():
    s = CRFSettings.from_config({"bilateral_sxy": 20, "rounds": 2})
    assert s.bilateral_sxy == 20 and s.rounds == 2 and s.subset_size == 4  # schema default
    assert CRFSettings.from_config({}) == CRFSettings()
    with pytest.raises(ValueError, match="unknown key.*'crf': round"):
        CRFSettings.from_config({"round": 2})
    with pytest.raises(ValueError, match=r"crf\.rounds = 0"):
        CRFSettings(rounds=0)
