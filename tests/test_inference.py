"""Noise-difference inference (eq. 2): batching, seeding, sharding, normalisation, inference.h5 layout."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from torch import nn

import diffseg
import diffseg.inference
from diffseg.imageio import InputError
from diffseg.inference import noise_difference, paired_forward, run_inference
from diffseg.seeding import draw_noise
from diffseg.postprocess import binarize, normalise
from diffseg.schedule import Schedule, q_sample
from diffseg.settings import InferenceSettings

torch.set_num_threads(1)

T_STEPS = 50
DIFFUSION = {"T": T_STEPS, "beta_start": 1e-4, "beta_end": 0.02}
RES = 16
TIMESTEPS = [5, 20, 35]


class StandIn(nn.Module):
    """Tiny eps-predictor with the ConditionalUNet signature: forward(x, t, y)."""

    def __init__(self, num_classes: int = 2, width: int = 8):
        super().__init__()
        self.inp = nn.Conv2d(3, width, 3, padding=1)
        self.label = nn.Embedding(num_classes, width)
        self.time = nn.Embedding(T_STEPS, width)
        self.out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x, t, y):
        h = self.inp(x) + (self.label(y) + self.time(t))[:, :, None, None]
        return self.out(torch.tanh(h))


def make_model(seed: int = 0) -> StandIn:
    torch.manual_seed(seed)
    return StandIn().eval()


def schedule() -> Schedule:
    return Schedule.from_config(DIFFUSION)


def write_dataset(path: Path, n: int = 7, res: int = RES, split: str = "test", images: np.ndarray | None = None,
                  ids: list[str] | None = None) -> list[str]:
    """A dataset.h5 with one split, laid out as docs/ARCHITECTURE.md says (random images unless given)."""
    if images is None:
        images = np.random.default_rng(1).integers(0, 256, (n, res, res, 3), dtype=np.uint8)
    n, res = len(images), images.shape[1]
    ids = ids or [f"ISIC_{i:07d}" for i in range(n)]
    with h5py.File(path, "w") as fh:
        g = fh.create_group(split)
        g.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        g.create_dataset("images", data=images)
        g.create_dataset("masks", data=np.zeros((n, res, res), dtype=np.uint8))
        g.create_dataset("orig_size", data=np.full((n, 2), res, dtype=np.int32))
        fh.attrs["resolution"] = res
    return ids


@pytest.fixture
def fake_ddpm(monkeypatch, tmp_path):
    """run_inference loads StandIn checkpoints instead of DDPM ones; returns the checkpoint path."""
    ckpt = tmp_path / "ddpm.pt"
    torch.save({"state": make_model().state_dict()}, ckpt)
    calls = {"n": 0}

    def load_model(checkpoint, device="cpu", use_ema=True):
        calls["n"] += 1
        model = StandIn()
        model.load_state_dict(torch.load(checkpoint)["state"])
        return model.to(device).eval(), {"diffusion": dict(DIFFUSION), "image_size": RES, "model": {}}

    monkeypatch.setattr(diffseg.inference, "load_model", load_model)
    return ckpt


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "dataset.h5"
    return path, write_dataset(path)


RUN_ARGS = ("split", "shard", "n_shards")  # run_inference's own; the rest are InferenceSettings


def run(dataset_h5, ckpt, out, **kw):
    kw = {"timesteps": TIMESTEPS, "device": "cpu", **kw}
    settings = InferenceSettings(**{k: v for k, v in kw.items() if k not in RUN_ARGS})
    return run_inference(dataset_h5, ckpt, out, settings, **{k: v for k, v in kw.items() if k in RUN_ARGS})


def read_all(path):
    with h5py.File(path, "r") as fh:
        return {k: fh[k][()] for k in fh}, dict(fh.attrs)


# ----------------------------------------------------------------------------- the paired c0/c1 pass


def tiny_unet(seed: int = 0):
    from diffseg.unet import ConditionalUNet

    torch.manual_seed(seed)
    model = ConditionalUNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                            dropout=0.0, image_size=RES).eval()
    for p in model.parameters():  # zero-initialised output convs would hide the label
        if not p.any():
            nn.init.normal_(p, std=0.1)
    return model


def test_paired_forward_equals_separate_c0_then_c1_calls_on_the_same_x_t():
    """Rows image-major (image i, timestep k at i*T + k); one call under both labels = one call per label."""
    model, sched = tiny_unet(), schedule()
    images = torch.rand(2, 3, RES, RES) * 2 - 1
    eps = torch.randn(2, 3, RES, RES, generator=torch.Generator().manual_seed(3))
    pair = paired_forward(model, sched, images, TIMESTEPS, eps, blocks=[0, 3])
    n = 2 * len(TIMESTEPS)
    assert pair.x_t.shape == (n, 3, RES, RES) and pair.noise_c0.dtype == torch.float32
    assert pair.t.tolist() == TIMESTEPS * 2
    for i in range(2):
        for k, t in enumerate(TIMESTEPS):
            expected = q_sample(images[i : i + 1], torch.tensor([t]), eps[i : i + 1], sched.alpha_bar)
            assert torch.equal(pair.x_t[i * len(TIMESTEPS) + k : i * len(TIMESTEPS) + k + 1], expected)
    with torch.no_grad():
        for label, noise, feats in ((0, pair.noise_c0, pair.features_c0), (1, pair.noise_c1, pair.features_c1)):
            alone, alone_feats = model.forward_with_features(pair.x_t, pair.t, torch.full((n,), label), [0, 3])
            torch.testing.assert_close(noise, alone, rtol=1e-5, atol=1e-6)
            assert [f.shape for f in feats] == [a.shape for a in alone_feats] and len(feats) == 2
            for f, a in zip(feats, alone_feats):
                torch.testing.assert_close(f, a, rtol=1e-5, atol=1e-6)
    assert (pair.noise_c0 - pair.noise_c1).abs().mean() > 1e-3  # the labels do differ
    assert not paired_forward(model, sched, images, TIMESTEPS, eps).features_c0  # no blocks asked: none


def test_paired_forward_with_the_same_label_twice_gives_exactly_zero_difference():
    model, sched = tiny_unet(), schedule()
    images, eps = torch.rand(3, 3, RES, RES) * 2 - 1, torch.randn(3, 3, RES, RES)
    pair = paired_forward(model, sched, images, TIMESTEPS, eps, labels=(1, 1), blocks=[1, 2])
    assert torch.count_nonzero(pair.noise_c0 - pair.noise_c1) == 0
    assert all(torch.count_nonzero(f0 - f1) == 0 for f0, f1 in zip(pair.features_c0, pair.features_c1))
    assert pair.noise_c0.abs().sum() > 0


# ----------------------------------------------------------------------------- noise_difference


def test_same_label_twice_gives_exactly_zero():
    images = torch.rand(2, 3, RES, RES) * 2 - 1
    noise = draw_noise(["a", "b"], 0, 2, (3, RES, RES))
    diff = noise_difference(make_model(), schedule(), images, TIMESTEPS, noise, labels=(1, 1))
    assert diff.shape == (2, len(TIMESTEPS), RES, RES) and diff.dtype == torch.float32
    assert torch.count_nonzero(diff) == 0


def test_noise_difference_equals_per_image_per_timestep_reference():
    """The single batched call must reproduce separate forward passes under c0 and c1 on the same x_t."""
    model, sched = make_model(), schedule()
    abar = sched.alpha_bar
    images = torch.rand(3, 3, RES, RES) * 2 - 1
    noise = draw_noise(["a", "b", "c"], 4, 2, (3, RES, RES))
    got = noise_difference(model, sched, images, TIMESTEPS, noise)
    ref = torch.zeros_like(got)
    with torch.no_grad():
        for i in range(3):
            for j, t in enumerate(TIMESTEPS):
                for d in range(2):
                    tt = torch.tensor([t])
                    x_t = q_sample(images[i : i + 1], tt, noise[i : i + 1, d], abar)
                    e0, e1 = model(x_t, tt, torch.tensor([0])), model(x_t, tt, torch.tensor([1]))
                    ref[i, j] += (e0 - e1).abs().mean(dim=1)[0] / 2
    assert got.abs().max() > 1e-3  # the labels do differ in the stand-in
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_draw_noise_depends_only_on_seed_and_id():
    both = draw_noise(["x", "y"], 7, 3, (3, 4, 4))
    assert both.shape == (2, 3, 3, 4, 4)
    assert torch.equal(both[1], draw_noise(["y"], 7, 3, (3, 4, 4))[0])
    assert not torch.equal(both[0], draw_noise(["x"], 8, 3, (3, 4, 4))[0])
    assert not torch.equal(both[0, 0], both[0, 1])  # the draws of one image differ


def test_noise_difference_batch_invariant_for_conditional_unet():
    """Real U-Net: an image's map does not depend on its batch mates (to float rounding)."""
    from diffseg.unet import ConditionalUNet

    torch.manual_seed(0)
    model = ConditionalUNet(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                            dropout=0.0, image_size=RES).eval()
    for p in model.parameters():  # zero-initialised output convs would make every map zero
        if not p.any():
            nn.init.normal_(p, std=0.1)
    images = torch.rand(4, 3, RES, RES) * 2 - 1
    noise = draw_noise(list("abcd"), 0, 1, (3, RES, RES))
    together = noise_difference(model, schedule(), images, TIMESTEPS, noise)
    alone = torch.cat([noise_difference(model, schedule(), images[i : i + 1], TIMESTEPS, noise[i : i + 1])
                       for i in range(4)])
    assert together.mean() > 1e-3
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_noise_shape_is_checked():
    with pytest.raises(ValueError, match="noise must have shape"):
        noise_difference(make_model(), schedule(), torch.zeros(2, 3, RES, RES), TIMESTEPS,
                         torch.zeros(2, 3, RES, RES))


# ----------------------------------------------------------------------------- normalise, binarize


def test_normalise_p99_max_none():
    maps = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    p99 = np.percentile(np.arange(1000), 99)  # 989.01
    out = normalise(maps, "p99")
    assert out.dtype == np.float32 and out.shape == maps.shape
    assert out.flat[0] == 0 and out.flat[500] == pytest.approx(500 / p99, rel=1e-6)
    assert out.max() == 1.0 and np.count_nonzero(out == 1.0) == 10  # values 990..999 clip
    assert normalise(maps, "max").flat[999] == 1.0
    assert normalise(maps, "max").flat[500] == pytest.approx(500 / 999, rel=1e-6)
    np.testing.assert_array_equal(normalise(maps, "none"), maps)
    assert np.count_nonzero(normalise(np.zeros((2, 4, 4)), "p99")) == 0
    with pytest.raises(ValueError, match="inference.normalise"):
        normalise(maps, "mean")


def test_binarize_fixed_and_otsu():
    maps = np.array([[[0.2, 0.5], [0.51, 0.9]]], dtype=np.float32)
    np.testing.assert_array_equal(binarize(maps, 0.5), [[[0, 0], [1, 1]]])
    assert binarize(maps, 0.5).dtype == np.uint8
    bimodal = np.full((2, 8, 8), 0.1, dtype=np.float32)
    bimodal[0, 2:5, 3:6] = 0.8  # map 0: a bright square; map 1: constant -> empty
    out = binarize(bimodal, "otsu")
    expected = np.zeros((2, 8, 8), dtype=np.uint8)
    expected[0, 2:5, 3:6] = 1
    np.testing.assert_array_equal(out, expected)
    for bad in (0.0, 1.0, 1.5, "median", True):
        with pytest.raises(ValueError, match="inference.threshold"):
            binarize(maps, bad)


# ----------------------------------------------------------------------------- run_inference


def test_file_layout(fake_ddpm, dataset, tmp_path):
    path, ids = dataset
    out = tmp_path / "inference" / "test.h5"
    summary = run(path, fake_ddpm, out, noise_draws=2, seed=3, precision="fp32")
    assert summary["n_images"] == 7 and summary["device"] == "cpu" and summary["autocast"] == "fp32"
    with h5py.File(out, "r") as fh:
        assert set(fh.keys()) == {"ids", "timesteps", "maps", "binary"}
        assert [s.decode() for s in fh["ids"][()]] == ids
        assert h5py.check_string_dtype(fh["ids"].dtype).encoding == "utf-8"
        assert fh["timesteps"].dtype == np.int32 and fh["timesteps"][()].tolist() == TIMESTEPS
        assert fh["maps"].dtype == np.float16 and fh["maps"].shape == (7, 3, RES, RES)
        assert fh["binary"].dtype == np.uint8 and fh["binary"].shape == (7, 3, RES, RES)
        maps, binary = fh["maps"][()].astype(np.float32), fh["binary"][()]
        assert maps.min() >= 0 and maps.max() == 1.0
        assert set(np.unique(binary).tolist()) == {0, 1}
        away = np.abs(maps - 0.5) > 1e-3  # float16 storage may round a value just above 0.5 onto 0.5
        np.testing.assert_array_equal(binary[away], (maps[away] > 0.5).astype(np.uint8))
        a = dict(fh.attrs)
    assert a["checkpoint"] == str(fake_ddpm) and len(a["checkpoint_sha256"]) == 64
    assert a["threshold"] == 0.5 and a["normalise"] == "p99" and a["noise_draws"] == 2 and a["seed"] == 3
    assert a["method"] == "paper" and a["T"] == T_STEPS and a["diffseg_version"] == diffseg.__version__
    # per image, the 99th percentile over all timesteps maps to 1: about 1 % of pixels clip
    clipped = (maps == 1.0).reshape(7, -1).mean(axis=1)
    assert np.all(clipped <= 0.02) and np.all(clipped > 0)


def test_same_seed_identical_file_and_batch_size_does_not_matter(fake_ddpm, dataset, tmp_path):
    path, _ = dataset
    run(path, fake_ddpm, tmp_path / "a.h5", batch_images=16)
    run(path, fake_ddpm, tmp_path / "b.h5", batch_images=16)
    run(path, fake_ddpm, tmp_path / "c.h5", batch_images=3)
    run(path, fake_ddpm, tmp_path / "d.h5", batch_images=16, seed=1)
    (a, attrs_a), (b, attrs_b), (c, _), (d, _) = (read_all(tmp_path / f"{x}.h5") for x in "abcd")
    assert attrs_a == attrs_b
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_allclose(c["maps"].astype(np.float32), a["maps"].astype(np.float32), atol=1e-3, rtol=0)
    assert np.mean(c["binary"] != a["binary"]) <= 1e-3
    assert np.abs(d["maps"].astype(np.float32) - a["maps"].astype(np.float32)).mean() > 0.01  # seed matters


def test_shards_gather_to_exactly_the_single_run(fake_ddpm, dataset, tmp_path):
    from diffseg.shards import gather

    path, ids = dataset
    run(path, fake_ddpm, tmp_path / "all.h5", batch_images=2)
    whole, whole_attrs = read_all(tmp_path / "all.h5")
    parts = [tmp_path / f"s{k}.h5" for k in range(4)]
    for k, part in enumerate(parts):
        run(path, fake_ddpm, part, shard=k, n_shards=4, batch_images=2)
    assert [len(read_all(p)[0]["ids"]) for p in parts] == [2, 2, 2, 1]  # whole batches of 2
    gather([str(p) for p in parts], [str(tmp_path / "gathered.h5")])
    gathered, gathered_attrs = read_all(tmp_path / "gathered.h5")
    assert gathered_attrs == whole_attrs
    for key in whole:  # bit-identical: every image met the same batch mates
        np.testing.assert_array_equal(gathered[key], whole[key], err_msg=key)


def test_renamed_and_reordered_images_get_identical_maps(fake_ddpm, dataset, tmp_path):
    """The noise is keyed by each image's content: other names, another order and other shards change no map.

    One image per batch: batch mates change float rounding (test_same_seed_identical_file_and_batch_size...).
    """
    path, ids = dataset
    with h5py.File(path, "r") as fh:
        images = fh["test/images"][()]
    renamed = tmp_path / "renamed.h5"
    write_dataset(renamed, images=images[::-1], ids=[f"new_{k}" for k in range(len(ids))])
    run(path, fake_ddpm, tmp_path / "a.h5", batch_images=1, noise_draws=2)
    for k in range(2):
        run(renamed, fake_ddpm, tmp_path / f"b{k}.h5", batch_images=1, noise_draws=2, shard=k, n_shards=2)
    a, _ = read_all(tmp_path / "a.h5")
    b = [read_all(tmp_path / f"b{k}.h5")[0] for k in range(2)]
    for key in ("maps", "binary"):
        np.testing.assert_array_equal(np.concatenate([part[key] for part in b])[::-1], a[key], err_msg=key)
    assert not np.array_equal(a["maps"][0], a["maps"][1])  # the maps do differ between images


def test_timestep_out_of_range_names_the_key(fake_ddpm, dataset, tmp_path):
    path, _ = dataset
    out = tmp_path / "bad.h5"
    with pytest.raises(ValueError, match=r"inference\.timesteps \[50\].*T=50"):
        run(path, fake_ddpm, out, timesteps=[10, T_STEPS])
    with pytest.raises(ValueError, match=r"inference\.timesteps \[-1\]"):
        run(path, fake_ddpm, out, timesteps=[-1])
    assert not out.exists()


def test_otsu_threshold_and_max_normalise_run(fake_ddpm, dataset, tmp_path):
    path, _ = dataset
    run(path, fake_ddpm, tmp_path / "o.h5", threshold="otsu", normalise="max")
    data, attrs = read_all(tmp_path / "o.h5")
    assert attrs["threshold"] == "otsu" and attrs["normalise"] == "max"
    assert np.all(data["maps"].reshape(7, -1).max(axis=1) == 1.0)
    assert 0 < data["binary"].mean() < 1


def test_no_partial_file_after_error(fake_ddpm, dataset, tmp_path, monkeypatch):
    path, _ = dataset
    import diffseg.inference as inf

    calls = {"n": 0}
    real = inf.noise_difference

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure in the second batch")
        return real(*args, **kw)

    monkeypatch.setattr(inf, "noise_difference", failing)
    out = tmp_path / "out" / "test.h5"
    with pytest.raises(RuntimeError, match="simulated"):
        run(path, fake_ddpm, out, batch_images=2)
    assert calls["n"] == 2 and list(out.parent.iterdir()) == []


def test_input_errors_name_the_file(fake_ddpm, dataset, tmp_path):
    path, _ = dataset
    with pytest.raises(InputError, match="missing.h5: dataset file not found"):
        run(tmp_path / "missing.h5", fake_ddpm, tmp_path / "o.h5")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="garbage.h5: not a readable HDF5 file"):
        run(garbage, fake_ddpm, tmp_path / "o.h5")
    with pytest.raises(InputError, match=r"dataset.h5: no group 'val' .*\['test'\]"):
        run(path, fake_ddpm, tmp_path / "o.h5", split="val")
    with pytest.raises(InputError, match="nope.pt: checkpoint file not found"):
        run(path, tmp_path / "nope.pt", tmp_path / "o.h5")
    small = tmp_path / "small.h5"
    write_dataset(small, res=8)
    with pytest.raises(InputError, match="small.h5: images are 8 px but checkpoint .* at 16 px"):
        run(small, fake_ddpm, tmp_path / "o.h5")
    with pytest.raises(ValueError, match="shard 4 must lie in"):
        run(path, fake_ddpm, tmp_path / "o.h5", shard=4, n_shards=4)
    assert not (tmp_path / "o.h5").exists()


# ----------------------------------------------------------------------------- end to end: the maps find lesions


def synthetic_pair(rng: np.random.Generator, size: int = 32):
    """(lesion image, its healthy twin, mask): shaded noisy skin, plus a dark irregular blob."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    skin = np.array([205, 150, 125], np.float32) + rng.normal(0, 8, 3)
    shade = 12 * np.sin(xx / size * rng.uniform(1, 4) + rng.uniform(0, 6)) * np.cos(yy / size * rng.uniform(1, 4))
    healthy = skin + shade[..., None] + rng.normal(0, 6, (size, size, 3))
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    angle = np.arctan2(yy - cy, xx - cx)
    radius = rng.uniform(0.15, 0.28) * size * (1 + 0.25 * np.sin(rng.integers(2, 5) * angle + rng.uniform(0, 6)))
    mask = np.hypot(yy - cy, xx - cx) < radius
    lesion_colour = np.array([110, 70, 50], np.float32) + rng.normal(0, 10, 3)
    image = np.where(mask[..., None], lesion_colour + rng.normal(0, 8, (size, size, 3)), healthy)
    as_uint8 = lambda a: np.clip(a, 0, 255).astype(np.uint8)  # noqa: E731
    return as_uint8(image), as_uint8(healthy), mask


def write_synthetic_dataset(path: Path, n_train: int = 64, n_test: int = 12, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as fh:
        for split, n in (("train", n_train), ("test", n_test)):
            images, healthy, masks = map(np.stack, zip(*(synthetic_pair(rng, size) for _ in range(n))))
            g = fh.create_group(split)
            g.create_dataset("ids", data=np.asarray([f"{split}_{i}" for i in range(n)], dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
            g.create_dataset("images", data=images)
            g.create_dataset("masks", data=masks.astype(np.uint8))
            g.create_dataset("orig_size", data=np.full((n, 2), size, dtype=np.int32))
            if split == "train":
                g.create_dataset("healthy", data=healthy)
                g.create_dataset("has_healthy", data=np.ones(n, dtype=bool))
        fh.attrs["resolution"] = size


def pixel_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC from average ranks (ties count one half)."""
    ranks = rankdata(scores.ravel())
    positive = positive.ravel().astype(bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_pixel_auroc_rank_formula():
    assert pixel_auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert pixel_auroc(np.array([1.0, 1.0, 2.0]), np.array([1, 0, 1])) == 0.75


def test_trained_ddpm_difference_maps_find_lesions(tmp_path):
    """Train a tiny DDPM on synthetic lesion/twin pairs; the mean map over t ranks lesion pixels high.

    Measured pooled AUROC 0.98-0.99 (training seeds 0-2, 100-150 steps), so 0.8 leaves a wide margin.
    """
    from diffseg.ddpm import train_ddpm
    from diffseg.settings import TrainSettings

    dataset_h5, ckpt = tmp_path / "dataset.h5", tmp_path / "ddpm.pt"
    write_synthetic_dataset(dataset_h5)
    no_augment = dict(hflip=True, vflip=False, rot90=False, rotate_deg=0.0, blur_prob=0.0, sharpen_prob=0.0)
    train_ddpm(
        dataset_h5, ckpt, tmp_path / "loss.csv", tmp_path / "loss.png",
        model=dict(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[], dropout=0.0),
        augment=no_augment,
        train=TrainSettings(steps=100, batch_size=32, lr=2e-3, warmup_steps=10, ema_decay=0.9, checkpoint_every=1000,
                            device="cpu", precision="fp32"),
    )
    out = tmp_path / "test.h5"
    run_inference(dataset_h5, ckpt, out, InferenceSettings(device="cpu"))  # the default timesteps 60..150
    with h5py.File(out, "r") as fh:
        mean_map = fh["maps"][()].astype(np.float32).mean(axis=1)
    with h5py.File(dataset_h5, "r") as fh:
        masks = fh["test/masks"][()]
    per_image = [pixel_auroc(m, g) for m, g in zip(mean_map, masks)]
    assert pixel_auroc(mean_map, masks) > 0.8
    assert min(per_image) > 0.7, per_image


# ----------------------------------------------------------------------------- reconstruction lever


def test_ddim_timesteps_descend_from_t0():
    from diffseg.inference import ddim_timesteps

    assert ddim_timesteps(40, 4) == [40, 30, 20, 10]
    assert ddim_timesteps(3, 5) == [3, 2, 1]  # fewer distinct steps than asked: no repeats
    assert ddim_timesteps(0, 3) == [0]
    with pytest.raises(ValueError, match="inference.recon_steps"):
        ddim_timesteps(10, 0)


def test_reconstruction_with_same_label_gives_exactly_zero():
    from diffseg.inference import reconstruction_difference

    images = torch.rand(2, 3, RES, RES) * 2 - 1
    noise = draw_noise(["a", "b"], 0, 2, (3, RES, RES))
    diff = reconstruction_difference(make_model(), schedule(), images, TIMESTEPS, noise, labels=(1, 1), steps=3)
    assert diff.shape == (2, len(TIMESTEPS), RES, RES)
    assert torch.count_nonzero(diff) == 0
    differs = reconstruction_difference(make_model(), schedule(), images, TIMESTEPS, noise, steps=3)
    assert differs.mean() > 1e-3


def test_reconstruction_one_step_is_the_x0_prediction():
    """steps=1: x0_c = clamp((x_t - sqrt(1-a) eps_c) / sqrt(a)); the map is their channel-mean difference."""
    from diffseg.inference import reconstruction_difference

    model, sched = make_model(), schedule()
    abar = sched.alpha_bar
    images = torch.rand(1, 3, RES, RES) * 2 - 1
    noise = draw_noise(["a"], 0, 1, (3, RES, RES))
    got = reconstruction_difference(model, sched, images, [20], noise, steps=1)
    tt = torch.tensor([20])
    x_t = q_sample(images, tt, noise[:, 0], abar)
    with torch.no_grad():
        x0 = [((x_t - (1 - abar[20]).sqrt() * model(x_t, tt, torch.tensor([c]))) / abar[20].sqrt()).clamp(-1, 1)
              for c in (0, 1)]
    torch.testing.assert_close(got[0, 0], (x0[0] - x0[1]).abs().mean(dim=1)[0], atol=1e-5, rtol=1e-5)
    to_input = reconstruction_difference(model, sched, images, [20], noise, steps=1, compare="input")
    torch.testing.assert_close(to_input[0, 0], (x0[0] - images).abs().mean(dim=1)[0], atol=1e-5, rtol=1e-5)


def test_reconstruction_batch_invariant():
    from diffseg.inference import reconstruction_difference

    model, sched = make_model(), schedule()
    images = torch.rand(3, 3, RES, RES) * 2 - 1
    noise = draw_noise(list("abc"), 0, 1, (3, RES, RES))
    together = reconstruction_difference(model, sched, images, TIMESTEPS, noise, steps=4)
    alone = torch.cat([reconstruction_difference(model, sched, images[i:i + 1], TIMESTEPS, noise[i:i + 1], steps=4)
                       for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_reconstruct_shards_gather_bit_identical(fake_ddpm, dataset, tmp_path):
    from diffseg.shards import gather

    path, _ = dataset
    kw = dict(method="reconstruct", recon_steps=3, batch_images=2)
    run(path, fake_ddpm, tmp_path / "all.h5", **kw)
    whole, attrs = read_all(tmp_path / "all.h5")
    assert attrs["method"] == "reconstruct" and attrs["recon_steps"] == 3
    parts = [tmp_path / f"s{k}.h5" for k in range(3)]
    for k, part in enumerate(parts):
        run(path, fake_ddpm, part, shard=k, n_shards=3, **kw)
    gather([str(p) for p in parts], [str(tmp_path / "gathered.h5")])
    gathered, _ = read_all(tmp_path / "gathered.h5")
    for key in whole:
        np.testing.assert_array_equal(gathered[key], whole[key], err_msg=key)


def test_bad_reconstruction_settings_name_the_key(fake_ddpm, dataset, tmp_path):
    path, _ = dataset
    with pytest.raises(ValueError, match="inference.method"):
        run(path, fake_ddpm, tmp_path / "x.h5", method="bogus")
    with pytest.raises(ValueError, match="inference.recon_compare"):
        run(path, fake_ddpm, tmp_path / "x.h5", method="reconstruct", recon_compare="c0")


# ----------------------------------------------------------------------------- settings


def test_inference_settings_from_config_validate_once():
    s = InferenceSettings.from_config({"splits": ["val", "test"], "timesteps": [100, 200], "threshold": "otsu"})
    assert s.timesteps == (100, 200) and s.threshold == "otsu" and s.batch_images == 16  # schema default
    assert InferenceSettings.from_config(None) == InferenceSettings()
    with pytest.raises(ValueError, match="unknown key.*'inference': timestep"):
        InferenceSettings.from_config({"timestep": [1]})
    with pytest.raises(ValueError, match="inference.timesteps is empty"):
        InferenceSettings(timesteps=[])
    with pytest.raises(ValueError, match="inference.noise_draws"):
        InferenceSettings(noise_draws=0)
    with pytest.raises(ValueError, match="inference.threshold"):
        InferenceSettings(threshold=1.5)
