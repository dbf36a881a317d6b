"""run_figures with a tiny real checkpoint and hand-made HDF5 files (16 px, 3 timesteps)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import diffseg
from diffseg.ddpm import build_model
from diffseg.evaluate import FINAL_METHOD
from diffseg.figures import FigureInputs, FigureOutputs, run_figures
from diffseg.figures_clinician import CASE_SIZE_IN, SUMMARY_SIZE_IN, percentile_of, pick_cases, score_caption
from diffseg.figures_method import METHOD_SIZE_IN, predict_noise_pair
from diffseg.imageio import InputError
from diffseg.inference import noise_difference
from diffseg.seeding import image_noise
from diffseg.runtime import to_model_range
from diffseg.schedule import Schedule
from diffseg.train import save_checkpoint

R, DPI = 16, 40
IDS = ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003", "ISIC_0000004"]
DICE = {"ISIC_0000001": 0.9, "ISIC_0000002": 0.2, "ISIC_0000003": 0.6, "ISIC_0000004": 0.75}
TINY_MODEL = dict(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[],
                  num_heads=1, dropout=0.0, class_dropout=0.0, padding="zeros")
DIFFUSION = dict(T=200, beta_start=1e-4, beta_end=0.02)
INFERENCE = dict(timesteps=[60, 70, 80], noise_draws=1, normalise="p99", threshold=0.5, seed=3, device="cpu",
                 precision="fp32", batch_images=4)


def write_ids(f, ids):
    f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())


def tiny_checkpoint(path):
    """A 16 px conditional U-Net whose zero-initialised output layer is randomised, so c0 != c1."""
    torch.manual_seed(0)
    net = build_model(TINY_MODEL, R)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    state = net.state_dict()
    save_checkpoint(path, {"model": state, "ema": state, "optimizer": {}, "scaler": None, "step": 0,
                           "config": {"model": TINY_MODEL, "diffusion": DIFFUSION, "image_size": R},
                           "version": diffseg.__version__, "kind": "ddpm", "best_metric": None})
    return net.eval()


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    truth = np.zeros((len(IDS), R, R), np.uint8)
    truth[:, 4:12, 4:12] = 1
    binary = (rng.random((len(IDS), 3, R, R)) < 0.5).astype(np.uint8)
    paths = {k: tmp_path / f"{k}.h5" for k in ("dataset", "inference", "unc", "crf")}
    with h5py.File(paths["dataset"], "w") as f:
        g = f.create_group("test")
        write_ids(g, IDS)
        g["images"] = rng.integers(0, 256, (len(IDS), R, R, 3), dtype=np.uint8)
        g["masks"] = truth
        g["orig_size"] = np.full((len(IDS), 2), R, np.int32)
    with h5py.File(paths["inference"], "w") as f:
        write_ids(f, IDS[::-1])
        f["timesteps"] = np.array(INFERENCE["timesteps"], np.int32)
        f["binary"] = binary
        f["maps"] = binary.astype(np.float16)
        f.attrs["seed"] = INFERENCE["seed"]
    with h5py.File(paths["unc"], "w") as f:
        write_ids(f, IDS)
        f["consistency"] = binary.mean(axis=1).astype(np.float32)
        f["ambiguity"] = binary.var(axis=1).astype(np.float32)
        f["ged"] = np.linspace(0.1, 0.4, len(IDS))
    with h5py.File(paths["crf"], "w") as f:
        write_ids(f, IDS)
        f["fused"] = truth
        f["rounds"] = np.repeat(truth[:, None], 3, axis=1)
    paths["csv"] = tmp_path / "metrics.csv"
    rows = [{"id": i, "method": FINAL_METHOD, "dice": DICE[i], "ged_paper": 0.1} for i in IDS]
    rows += [{"id": i, "method": "Otsu", "dice": 1.0 - DICE[i], "ged_paper": np.nan} for i in IDS]
    pd.DataFrame(rows).to_csv(paths["csv"], index=False)
    paths["checkpoint"] = tmp_path / "ddpm.pt"
    tiny_checkpoint(paths["checkpoint"])
    return paths


def figures(paths, tmp_path, **kwargs):
    inputs = FigureInputs(paths["dataset"], paths["checkpoint"], paths["inference"], paths["unc"], paths["crf"],
                          paths["csv"])
    outputs = FigureOutputs(tmp_path / "figures" / "summary.png", tmp_path / "figures" / "cases",
                            tmp_path / "figures" / "method")
    return run_figures(inputs, outputs, split="test", inference=INFERENCE, dpi=DPI, **kwargs)


def png_size(path):
    assert path.stat().st_size > 0
    with Image.open(path) as img:
        return img.size


def inches_to_px(size_in):
    return tuple(round(s * DPI) for s in size_in)


def test_default_cases_are_best_median_worst(inputs, tmp_path):
    written = figures(inputs, tmp_path)
    cases = tmp_path / "figures" / "cases"
    # final Dice 0.9 (best), 0.6 (lower median of 4), 0.2 (worst); the Otsu rows are ignored
    assert sorted(p.name for p in cases.iterdir()) == ["ISIC_0000001.png", "ISIC_0000002.png", "ISIC_0000003.png"]
    assert written["cases"] == [str(cases / f"{i}.png") for i in ("ISIC_0000001", "ISIC_0000003", "ISIC_0000002")]
    for path in cases.iterdir():
        assert png_size(path) == inches_to_px(CASE_SIZE_IN)
    assert written["method"] == [str(tmp_path / "figures" / "method" / f"{i}.png")
                                 for i in ("ISIC_0000001", "ISIC_0000003", "ISIC_0000002")]
    for path in written["method"]:
        assert png_size(Path(path)) == inches_to_px(METHOD_SIZE_IN)
    assert png_size(tmp_path / "figures" / "summary.png") == inches_to_px(SUMMARY_SIZE_IN)


def test_given_ids_give_one_png_each(inputs, tmp_path):
    figures(inputs, tmp_path, ids=["ISIC_0000004"])
    assert [p.name for p in (tmp_path / "figures" / "cases").iterdir()] == ["ISIC_0000004.png"]


def test_unknown_id_names_it_and_the_split(inputs, tmp_path):
    with pytest.raises(InputError, match="ISIC_0009999 missing from split 'test'"):
        figures(inputs, tmp_path, ids=["ISIC_0009999"])


def test_pick_cases_on_one_image():
    final = pd.DataFrame({"id": ["a"], "dice": [0.5]})
    assert pick_cases(final) == ["a"]


def test_noise_panels_reproduce_the_inference_difference(tmp_path):
    """|eps_c0 - eps_c1| of the figure's predictions equals eq. 2 as inference computes it (same x_t)."""
    torch.set_num_threads(1)
    net = tiny_checkpoint(tmp_path / "ddpm.pt")
    schedule = Schedule.from_config(DIFFUSION, torch.device("cpu"))
    image = np.random.default_rng(1).integers(0, 256, (R, R, 3), dtype=np.uint8)
    eps = predict_noise_pair(net, schedule, image, 70, seed=3, noise_draws=1,
                             device=torch.device("cpu"))
    assert eps.shape == (2, 3, R, R)
    noise = image_noise(image[None], 3, 1)
    expected = noise_difference(net, schedule, to_model_range(image[None], torch.device("cpu")), [70], noise)
    figure_diff = np.abs(eps[0] - eps[1]).mean(axis=0)
    assert figure_diff.max() > 1e-3  # the labels really change the prediction
    np.testing.assert_allclose(figure_diff, expected[0, 0].numpy(), atol=1e-5)


def test_percentile_counts_the_case_among_the_evaluated_set():
    population = [0.1, 0.2, 0.3, 0.4]
    assert percentile_of(0.3, population) == 75.0
    assert percentile_of(0.05, population) == 0.0
    assert percentile_of(0.3, [0.3, float("nan")]) == 100.0  # images without a score are left out
    assert score_caption("GED", 0.27, np.r_[np.linspace(0, 0.26, 63), np.linspace(0.28, 1, 37)]) == \
        "GED 0.270, 63rd percentile of 100 images"


def test_case_page_says_synthetic_demo_data_and_draws_no_equation_numbers(inputs, tmp_path, monkeypatch):
    import matplotlib.figure

    texts = []
    real_savefig = matplotlib.figure.Figure.savefig

    def recording_savefig(fig, *args, **kwargs):
        texts.append([t.get_text() for t in fig.findobj(matplotlib.text.Text)])
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    figures(inputs, tmp_path, ids=["ISIC_0000004"], note="synthetic demo data")
    summary, case, method = texts
    for page in texts:
        assert "synthetic demo data" in page
        assert not any("eq." in t or "eqs." in t for t in page), page
    # the GED panel: value and percentile among the 4 evaluated images (uncertainty GED 0.4 is the largest)
    assert "GED 0.400, 100th percentile of 4 images" in case
    assert any("fraction of outputs" in t for t in case)  # the consistency scale is labelled


def test_risk_figures_from_the_queue_and_the_reliability_bins(tmp_path):
    from diffseg.figures_risk import CURVE_SIZE_IN, run_risk_figures
    from diffseg.risk import reliability_table, review_queue

    table = pd.DataFrame({"id": IDS, "dice": [DICE[i] for i in IDS]})
    review_queue(table, np.array([0.1, 0.9, 0.5, 0.3])).to_csv(tmp_path / "queue.csv", index=False)
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(4, R, R))
    reliability_table(p, rng.uniform(size=p.shape) < p).to_csv(tmp_path / "bins.csv", index=False)
    run_risk_figures(tmp_path / "queue.csv", tmp_path / "bins.csv", tmp_path / "curve.png", tmp_path / "rel.png", dpi=DPI)
    for name in ("curve.png", "rel.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size == (round(CURVE_SIZE_IN[0] * DPI), round(CURVE_SIZE_IN[1] * DPI))
    pd.DataFrame({"id": IDS, "risk": 0.5}).to_csv(tmp_path / "no_dice.csv", index=False)
    with pytest.raises(InputError, match=r"no_dice\.csv.*dice"):
        run_risk_figures(tmp_path / "no_dice.csv", tmp_path / "bins.csv", tmp_path / "c.png", tmp_path / "r.png")
