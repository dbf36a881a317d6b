"""Diffusion features (inference.method features): decoder activations, head inputs, the head, its training."""

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import diffseg.features as features
from diffseg.data import load_split
from diffseg.ddpm import build_model
from diffseg.features import (FeatureHead, InputSampler, StreamedInputs, feature_inputs, fit_head, head_probabilities, input_channels,
                              load_head, resolve_blocks, run_teacher_masks, split_inputs,
                              train_feature_head)
from diffseg.inference import noise_difference, run_inference
from diffseg.schedule import Schedule
from diffseg.settings import HeadSettings, InferenceSettings
from diffseg.train import CheckpointError, load_checkpoint, save_checkpoint

RES = 16
DIFFUSION = {"T": 100, "beta_start": 1e-4, "beta_end": 0.02}
MODEL = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
         "dropout": 0.0, "num_heads": 1}
TIMESTEPS = [5, 20]
HEAD_TRAINING = dict(hidden=8, steps=6, batch_size=4, eval_every=2, patience=10)
INPUTS = InferenceSettings(timesteps=TIMESTEPS, device="cpu")  # the head's inputs: timesteps, noise seed, device


def head_settings(**changes) -> HeadSettings:
    return HeadSettings(**{**HEAD_TRAINING, **changes})


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(MODEL, RES)
    for p in model.parameters():  # non-zero output layers: zero-initialised blocks would hide the label
        torch.nn.init.normal_(p, std=0.2) if p.ndim > 1 else None
    return model.eval()


def write_ddpm(path: Path, seed: int = 0) -> Path:
    state = tiny_model(seed).state_dict()
    save_checkpoint(path, {"model": state, "ema": state, "optimizer": {}, "scaler": None, "step": 0,
                           "config": {"model": MODEL, "diffusion": DIFFUSION, "image_size": RES}, "version": "test",
                           "kind": "ddpm", "best_metric": None})
    return path


def disks(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Skin-coloured images with a dark disk (the lesion) of random centre and radius, and the disk masks."""
    yy, xx = np.mgrid[:RES, :RES]
    images = np.empty((n, RES, RES, 3), np.uint8)
    masks = np.empty((n, RES, RES), bool)
    for i in range(n):
        cy, cx, r = rng.integers(5, 11), rng.integers(5, 11), rng.integers(2, 5)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        base = np.where(masks[i][..., None], [90, 50, 40], [220, 170, 150]) + rng.normal(0, 8, (RES, RES, 3))
        images[i] = np.clip(base, 0, 255).astype(np.uint8)
    return images, masks


def write_dataset(path: Path, sizes=(("train", 8), ("val", 4), ("test", 4))) -> Path:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as fh:
        for split, n in sizes:
            images, masks = disks(n, rng)
            g = fh.create_group(split)
            g.create_dataset("ids", data=np.asarray([f"{split}_{i}" for i in range(n)], dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
            g.create_dataset("images", data=images)
            g.create_dataset("masks", data=masks.astype(np.uint8))
            g.create_dataset("orig_size", data=np.full((n, 2), RES, np.int32))
        fh.attrs["resolution"] = RES
    return path


@pytest.fixture
def files(tmp_path):
    return write_dataset(tmp_path / "dataset.h5"), write_ddpm(tmp_path / "ddpm.pt")


def images_and_noise(b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, 3, RES, RES), generator=g) * 2 - 1, torch.randn((b, 3, RES, RES), generator=g)


# ----------------------------------------------------------------------------- decoder activations, inputs


def test_forward_with_features_keeps_the_forward_result_and_reads_each_block():
    model = tiny_model()
    x, _ = images_and_noise(2)
    t, y = torch.tensor([3, 40]), torch.tensor([0, 1])
    with torch.no_grad():
        eps, acts = model.forward_with_features(x, t, y, [0, 2, 3])
        assert torch.equal(eps, model(x, t, y))
    widths = model.decoder_channels()
    assert len(widths) == 4  # 2 levels x (num_res_blocks + 1)
    assert [a.shape[1] for a in acts] == [widths[0], widths[2], widths[3]]
    assert [a.shape[-1] for a in acts] == [RES // 2, RES, RES]  # block 1 upsamples from 8 to 16 px
    with pytest.raises(ValueError, match=r"decoder blocks \[4\]"):
        model.forward_with_features(x, t, y, [4])
    with pytest.raises(ValueError, match="features.blocks"):
        resolve_blocks(model, [0, 9])


def test_feature_inputs_shapes_switches_and_the_noise_channel_is_eq2():
    model, ab = tiny_model(), Schedule.from_config(DIFFUSION)
    x, eps = images_and_noise(3)
    blocks = [0, 3]
    full = feature_inputs(model, ab, x, TIMESTEPS, eps, blocks)
    c = input_channels(model, blocks, True, True, True)
    assert full.shape == (3, len(TIMESTEPS), c, RES, RES) and c == 2 * (16 + 8) + 1
    reference = noise_difference(model, ab, x, TIMESTEPS, eps[:, None])
    torch.testing.assert_close(full[:, :, -1], reference, rtol=1e-5, atol=1e-6)
    no_difference = feature_inputs(model, ab, x, TIMESTEPS, eps, blocks, use_difference=False, use_noise=False)
    assert no_difference.shape[2] == 16 + 8
    torch.testing.assert_close(no_difference, full[:, :, :24])  # h(c1) first, then |h(c0) - h(c1)|
    assert (full[:, :, 24:48] >= 0).all() and full[:, :, 24:48].abs().sum() > 0
    with pytest.raises(ValueError, match="no input"):
        feature_inputs(model, ab, x, TIMESTEPS, eps, blocks, use_features=False, use_difference=False, use_noise=False)


def test_split_inputs_are_deterministic_per_image():
    model, ab = tiny_model(), Schedule.from_config(DIFFUSION)
    images = (np.random.default_rng(0).random((4, RES, RES, 3)) * 255).astype(np.uint8)
    ids = ["a", "b", "c", "d"]
    kw = dict(seed=3, batch_images=2, device=torch.device("cpu"))
    one = split_inputs(model, ab, ids, images, TIMESTEPS, [1], **kw)
    assert one.dtype == torch.float16 and one.shape == (4, 2, 16 + 16 + 1, RES, RES)
    assert torch.equal(one, split_inputs(model, ab, ids, images, TIMESTEPS, [1], **kw))
    other_seed = split_inputs(model, ab, ids, images, TIMESTEPS, [1], **{**kw, "seed": 4})
    assert not torch.equal(one, other_seed)


def test_streamed_inputs_are_the_cached_inputs():
    """Inputs computed per read equal split_inputs' cached ones, for slices and for (row, timestep) batches."""
    model, ab = tiny_model(), Schedule.from_config(DIFFUSION)
    images = (np.random.default_rng(0).random((5, RES, RES, 3)) * 255).astype(np.uint8)
    ids = ["a", "b", "c", "d", "e"]
    kw = dict(seed=3, batch_images=2, device=torch.device("cpu"), switches=head_settings(use_noise=False).switches)
    cached = split_inputs(model, ab, ids, images, TIMESTEPS, [0, 1], **kw)
    streamed = StreamedInputs(model, ab, ids, images, TIMESTEPS, [0, 1], **kw)
    assert streamed.shape == tuple(cached.shape) and len(streamed) == 5
    assert torch.equal(streamed[1:4], cached[1:4]) and torch.equal(streamed[:], cached)
    rows, t_index = torch.tensor([4, 0, 4, 2, 1]), torch.tensor([1, 0, 0, 1, 1])
    # one timestep per forward call here, all of them in split_inputs: equal up to float16 rounding
    torch.testing.assert_close(streamed[rows, t_index], cached[rows, t_index], rtol=2e-3, atol=2e-3)


def test_images_per_call_bounds_the_memory_of_one_feature_call():
    # 3 copies x 4 bytes x T x C x H x W: 1 timestep, 1 channel, 1024 x 1024 px = 12 MiB per image
    assert features.images_per_call(1, 1, 1024, 1024, budget_mb=120) == 10
    assert features.images_per_call(1, 1, 1024, 1024, budget_mb=11) == 1  # never fewer than one image
    # config/isic2018.yaml at 128 px, every decoder block (3,073 channels), 3 timesteps: 1.7 GB per image
    assert features.images_per_call(3073, 3, 128, 128) == 1
    assert features.images_per_call(641, 3, 32, 32) == 90  # the quick config: its batch of 32 stays one call


def test_feature_maps_in_memory_bounded_chunks_equal_one_call(monkeypatch):
    model, ab = tiny_model(), Schedule.from_config(DIFFUSION)
    images, _ = images_and_noise(b=5)
    noise = torch.randn((5, 2, 3, RES, RES), generator=torch.Generator().manual_seed(4))
    blocks = [0, 1]
    head = FeatureHead(input_channels(model, blocks, True, True, True), len(TIMESTEPS), hidden=8).eval()
    cfg = {"blocks": blocks, "use_features": True, "use_difference": True, "use_noise": True}
    whole = features.feature_maps(model, head, cfg, ab, images, TIMESTEPS, noise)
    monkeypatch.setattr(features.images_per_call, "__defaults__", (0.0,))  # a zero budget: one image per call
    chunked = features.feature_maps(model, head, cfg, ab, images, TIMESTEPS, noise)
    assert whole.shape == (5, len(TIMESTEPS), RES, RES)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_a_head_trained_on_streamed_inputs_is_the_cached_one(files, tmp_path):
    """Over features.input_cache_mb the inputs are computed per batch: same values, so the same head."""
    dataset_h5, ddpm = files
    heads = {}
    for name, cache_mb in (("cached", 8000), ("streamed", 1e-6)):
        summary = train_feature_head(dataset_h5, ddpm, tmp_path / f"{name}.pt", tmp_path / f"{name}.csv",
                                     head_settings(blocks=[1, 3], input_cache_mb=cache_mb), INPUTS)
        assert summary["inputs_streamed"] == (name == "streamed")
        heads[name] = load_checkpoint(tmp_path / f"{name}.pt")
    assert heads["cached"]["best_metric"] == pytest.approx(heads["streamed"]["best_metric"], abs=0.01)
    for key, value in heads["cached"]["ema"].items():  # equal up to the inputs' float16 rounding
        torch.testing.assert_close(heads["streamed"]["ema"][key], value, rtol=1e-2, atol=1e-3, msg=key)


# ----------------------------------------------------------------------------- the head


def synthetic_inputs(n: int, seed: int, n_t: int = 2, channels: int = 5):
    """Inputs whose channel 0 is 6 + noise on the lesion and noise elsewhere (other channels: noise, other scales)."""
    rng = np.random.default_rng(seed)
    _, masks = disks(n, rng)
    x = rng.normal(0, 1, (n, n_t, channels, RES, RES)) * np.arange(1, channels + 1)[None, None, :, None, None] + 7.0
    x[:, :, 0] += 6.0 * masks[:, None]
    return torch.as_tensor(x, dtype=torch.float16), masks


def test_head_learns_a_synthetic_case_and_standardises_on_train(tmp_path):
    train_x, train_y = synthetic_inputs(24, 0)
    val_x, val_y = synthetic_inputs(8, 1)
    summary = fit_head(train_x, train_y, val_x, val_y, tmp_path / "head.pt", tmp_path / "log.csv", {"note": 1},
                       HeadSettings(hidden=16, steps=120, batch_size=8, lr=0.01, eval_every=20, patience=10),
                       device="cpu")
    assert summary["best_metric"] > 0.9
    ckpt = load_checkpoint(tmp_path / "head.pt", kind="feature_head")
    head = FeatureHead(**ckpt["config"]["model"])
    head.load_state_dict(ckpt["ema"])
    expected_mean = train_x.double().mean(dim=(0, 3, 4)).float()
    torch.testing.assert_close(head.mean, expected_mean, rtol=1e-4, atol=1e-4)
    probs = head_probabilities(head.eval(), val_x)
    assert probs.shape == (8, 2, RES, RES) and 0 <= probs.min() and probs.max() <= 1
    assert ckpt["config"]["note"] == 1


def test_conv3x3_head_keeps_the_resolution():
    head = FeatureHead(5, 2, kind="conv3x3", hidden=4, layers=3).eval()
    assert head(torch.zeros(2, 5, RES, RES), torch.tensor([0, 1])).shape == (2, 1, RES, RES)
    with pytest.raises(ValueError, match="features.head"):
        FeatureHead(5, 2, kind="transformer")


def test_val_masks_only_choose_the_kept_weights_never_the_training(tmp_path):
    """The optimiser's weights after training are the same whatever the val masks say."""
    train_x, train_y = synthetic_inputs(12, 0)
    val_x, val_y = synthetic_inputs(4, 1)
    final = []
    for name, masks in (("right", val_y), ("inverted", ~val_y)):
        fit_head(train_x, train_y, val_x, masks, tmp_path / f"{name}.pt", tmp_path / f"{name}.csv", {},
                 HeadSettings(hidden=8, steps=20, batch_size=4, eval_every=5, patience=100), device="cpu")
        final.append(load_checkpoint(tmp_path / f"{name}.pt")["model"])
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key]), key


def test_sampler_draws_train_rows_and_their_masks():
    x, masks = synthetic_inputs(5, 0)
    batch_x, t_index, batch_y = InputSampler(x, masks, 16)(0, torch.Generator().manual_seed(0), torch.device("cpu"))
    for xi, ti, yi in zip(batch_x, t_index, batch_y):
        row = next(r for r in range(5) if torch.equal(x[r, ti].float(), xi))
        assert torch.equal(yi[0], torch.as_tensor(masks[row], dtype=torch.float32))


# ----------------------------------------------------------------------------- training on a dataset, inference


def without(dataset_h5: Path, member: str, out: Path) -> Path:
    """A copy of dataset.h5 without ``member`` (a split group or one of its datasets): any read of it fails."""
    shutil.copy(dataset_h5, out)
    with h5py.File(out, "a") as fh:
        del fh[member]
    return out


def test_training_reads_only_train_and_val_and_inference_writes_the_standard_layout(files, tmp_path, monkeypatch):
    dataset_h5, ddpm = files
    captured = {}
    real_fit = features.fit_head
    monkeypatch.setattr(features, "fit_head", lambda *a, **k: captured.update(args=a) or real_fit(*a, **k))
    train_feature_head(dataset_h5, ddpm, tmp_path / "head.pt", tmp_path / "log.csv", head_settings(blocks=[1, 3]),
                       INPUTS)
    train_masks = load_split(dataset_h5, "train")["masks"]
    assert np.array_equal(captured["args"][1], train_masks) and len(captured["args"][0]) == len(train_masks)
    # without the test split in the file (any read of it, by whatever path, raises) the head is the same
    no_test = without(dataset_h5, "test", tmp_path / "no_test.h5")
    train_feature_head(no_test, ddpm, tmp_path / "head_no_test.pt", tmp_path / "log2.csv",
                       head_settings(blocks=[1, 3]), INPUTS)
    weights, again = (load_checkpoint(tmp_path / name)["model"] for name in ("head.pt", "head_no_test.pt"))
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)

    out = tmp_path / "test.h5"
    settings = InferenceSettings(timesteps=TIMESTEPS, noise_draws=2, method="features", device="cpu", batch_images=3)
    run_inference(dataset_h5, ddpm, out, settings, split="test", artefacts={"head": tmp_path / "head.pt"})
    with h5py.File(out) as fh:
        assert fh["maps"].shape == (4, 2, RES, RES) and fh["binary"].shape == (4, 2, RES, RES)
        assert list(fh["timesteps"][()]) == TIMESTEPS and fh.attrs["normalise"] == "none"
        maps = fh["maps"][()].astype(np.float32)
        clear = np.abs(maps - 0.5) > 1e-3  # maps are stored as float16, binary from the float32 probabilities
        assert np.array_equal(fh["binary"][()][clear], (maps > 0.5)[clear])
    assert 0 <= maps.min() and maps.max() <= 1
    again = tmp_path / "again.h5"
    run_inference(dataset_h5, ddpm, again, settings, split="test", artefacts={"head": tmp_path / "head.pt"})
    with h5py.File(again) as fh:
        assert np.array_equal(fh["maps"][()].astype(np.float32), maps)


def test_inference_refuses_a_head_of_other_timesteps_or_another_ddpm(files, tmp_path):
    dataset_h5, ddpm = files
    train_feature_head(dataset_h5, ddpm, tmp_path / "head.pt", tmp_path / "log.csv", head_settings(blocks=[3]),
                       INPUTS)
    head = {"head": tmp_path / "head.pt"}
    feat = dict(method="features", device="cpu")
    with pytest.raises(CheckpointError, match=r"timesteps \[5, 20\]"):
        run_inference(dataset_h5, ddpm, tmp_path / "a.h5", InferenceSettings(timesteps=[5, 30], **feat), artefacts=head)
    other = write_ddpm(tmp_path / "other.pt", seed=1)
    with pytest.raises(CheckpointError, match="another DDPM"):
        run_inference(dataset_h5, other, tmp_path / "b.h5", InferenceSettings(timesteps=TIMESTEPS, **feat),
                      artefacts=head)
    with pytest.raises(ValueError, match=r"'features' needs its trained file\(s\) 'head' \(models/feature_head.pt, "
                                         r"made by rule train_feature_head\)"):
        run_inference(dataset_h5, ddpm, tmp_path / "c.h5", InferenceSettings(timesteps=TIMESTEPS, **feat))
    assert not list(tmp_path.glob("[abc].h5"))
    with pytest.raises(CheckpointError, match="expected 'feature_head'"):
        load_head(ddpm, ddpm, torch.device("cpu"))


def test_teacher_masks_never_read_the_train_masks(files, tmp_path):
    dataset_h5, ddpm = files
    calibration = {"method": "calibrated", "bias": False, "blur_sigma": 0.0, "closing_px": 0}
    kw = dict(timesteps=[10, 30], noise_draws=1, calibration=calibration, device="cpu", batch_images=4)
    report = run_teacher_masks(dataset_h5, ddpm, tmp_path / "teacher.h5", **kw)
    # without the train masks in the file (any read of them raises) the teacher masks are the same
    no_train_masks = without(dataset_h5, "train/masks", tmp_path / "no_train_masks.h5")
    run_teacher_masks(no_train_masks, ddpm, tmp_path / "teacher2.h5", **kw)
    with h5py.File(tmp_path / "teacher.h5") as a, h5py.File(tmp_path / "teacher2.h5") as b:
        assert a.attrs["split"] == "train" and a["masks"].shape == (8, RES, RES)
        assert [s.decode() for s in a["ids"][()]] == [f"train_{i}" for i in range(8)]
        masks = a["masks"][()]
        assert np.array_equal(masks, b["masks"][()])
    # non-trivial: every image gets a lesion that is neither empty nor the whole frame
    area = masks.reshape(8, -1).mean(axis=1)
    assert ((0 < area) & (area < 1)).all() and report["lesion_fraction"] == pytest.approx(masks.mean())
    assert report["n_images"] == 8 and not list(tmp_path.glob(".teacher-*"))
