"""diffseg.risk: features with known values, the val-only logistic model, rankings, risk-coverage, reliability."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest

from diffseg.calibration import Calibration, save_calibration
from diffseg.imageio import InputError
from diffseg.metrics import auroc, average_precision
from diffseg.risk import (FEATURE_LABELS, FEATURES, apply_risk, border_fraction, expected_calibration_error, fit_risk,
                          load_risk_model, output_dice_spread, reliability_table, review_queue, risk_coverage,
                          risk_features, risk_markdown, run_fit_risk, save_risk_model, score_rankings, soft_margin)

R = 16


def square(top, left, size):
    m = np.zeros((R, R), np.uint8)
    m[top:top + size, left:left + size] = 1
    return m


# ----------------------------------------------------------------------------- rankings


def test_auroc_and_average_precision_of_known_rankings():
    positive = [True, True, False, False]
    assert auroc([0.9, 0.8, 0.2, 0.1], positive) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], positive) == 0.0
    assert average_precision([0.9, 0.8, 0.2, 0.1], positive) == 1.0
    # ranked: pos, neg, pos, neg -> precisions at the positives 1/1 and 2/3
    assert average_precision([0.9, 0.8, 0.7, 0.6], [True, False, True, False]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0.3, 0.2], [False, False]) is None


def test_risk_coverage_keeps_the_least_risky_and_the_oracle_the_best():
    dice = np.array([0.9, 0.1, 0.8, 0.5, 0.7, 0.6, 0.95, 0.85, 0.75, 0.65])
    risk = np.array([0.0, 0.9, 0.1, 0.2, 0.3, 0.8, 0.05, 0.1, 0.2, 0.3])  # image 1 (0.1) and 5 (0.6) riskiest
    ids = [f"ISIC_{i:07d}" for i in range(10)]
    cov = risk_coverage(dice, risk, ids, (0.0, 0.1, 0.2, 0.3))
    assert cov["n_kept"].tolist() == [10, 9, 8, 7]
    assert cov["kept_mean_dice"].iloc[0] == pytest.approx(dice.mean())
    assert cov["kept_mean_dice"].iloc[1] == pytest.approx(np.delete(dice, [1]).mean())
    assert cov["kept_mean_dice"].iloc[2] == pytest.approx(np.delete(dice, [1, 5]).mean())
    # 30 %: the third riskiest is a tie at 0.3 (images 4 and 9): the lower id (4) goes first
    assert cov["kept_mean_dice"].iloc[3] == pytest.approx(np.delete(dice, [1, 5, 4]).mean())
    assert cov["oracle_mean_dice"].iloc[3] == pytest.approx(np.sort(dice)[3:].mean())
    with pytest.raises(ValueError, match="leaves none"):
        risk_coverage(dice, risk, ids, (1.0,))


def test_review_queue_is_sorted_by_risk_and_carries_dice_only_where_present():
    table = pd.DataFrame({"id": ["b", "a", "c"], **{f: [0.1, 0.2, 0.3] for f in FEATURES}})
    queue = review_queue(table, np.array([0.5, 0.5, 0.9]))
    assert queue["id"].tolist() == ["c", "a", "b"] and queue["rank"].tolist() == [1, 2, 3]
    assert list(queue.columns) == ["rank", "sorted_by", "id", "risk", *FEATURES]
    with_truth = review_queue(table.assign(dice=[0.9, 0.8, 0.1]), np.array([0.1, 0.2, 0.3]))
    assert with_truth["dice"].tolist() == [0.1, 0.8, 0.9]


# ----------------------------------------------------------------------------- reliability


def test_ece_of_a_perfectly_calibrated_map_is_zero():
    # in every bin the observed lesion fraction equals the predicted value exactly
    predicted, truth = [], []
    for p, n_pos, n in ((0.0, 0, 10), (0.25, 1, 4), (0.5, 2, 4), (0.75, 3, 4), (1.0, 5, 5)):
        predicted += [p] * n
        truth += [1] * n_pos + [0] * (n - n_pos)
    table = reliability_table(np.array(predicted), np.array(truth))
    assert expected_calibration_error(table) == pytest.approx(0.0, abs=1e-12)
    assert table["n_pixels"].sum() == 27 and table["n_pixels"].iloc[-1] == 5  # 1.0 falls in the last bin


def test_ece_of_a_random_calibrated_map_is_small_and_of_an_overconfident_one_known():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(50, 32, 32))
    y = rng.uniform(size=p.shape) < p
    assert expected_calibration_error(reliability_table(p, y)) < 0.01
    # always certain of lesion, half of the pixels are lesion: ECE = |1 - 0.5|
    assert expected_calibration_error(reliability_table(np.ones(8), np.arange(8) % 2)) == pytest.approx(0.5)


def test_reliability_refuses_values_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability_table(np.array([1.2]), np.array([1]))


# ----------------------------------------------------------------------------- features


def test_features_of_identical_outputs_and_a_frame_filling_mask():
    fused = np.ones((R, R), np.uint8)
    binary = np.stack([fused] * 3)
    probabilities = np.full((3, R, R), 0.9, np.float32)
    rounds = np.stack([fused] * 2)
    image = np.full((R, R, 3), 120, np.uint8)
    f = risk_features(image, probabilities, binary, fused, rounds, best_index=1, centre=0.5)
    assert list(f) == list(FEATURES)
    assert f["ged_paper"] == 0 and f["output_dice_spread"] == 0 and f["ambiguity_area"] == 0
    assert f["crf_disagreement"] == 0 and f["lesion_area"] == 1 and f["border_fraction"] == 1
    assert f["soft_margin"] == pytest.approx(0.4) and f["best_vs_fused_dice"] == 1
    assert f["otsu_vs_fused_dice"] == 0  # a flat image has no Otsu threshold: empty mask vs full mask


def test_single_features_with_known_values():
    centre = square(4, 4, 8)
    assert border_fraction(centre) == 0
    top_row = np.zeros((R, R), np.uint8)
    top_row[0, :] = 1  # 16 of the 60 ring pixels
    assert border_fraction(top_row) == pytest.approx(16 / 60)
    a, b = square(4, 4, 8), square(4, 4, 4)  # Dice(a, b) = 2*16 / (64 + 16) = 0.4
    assert output_dice_spread(np.stack([a, a, b])) == pytest.approx(1 - (1 + 0.4 + 0.4) / 3)
    p = np.where(np.stack([a, b]) > 0, 0.7, 0.45)  # union = a: 64 px x 2 outputs, margins 0.2 and (0.2 or 0.05)
    assert soft_margin(p, np.stack([a, b]), 0.5) == pytest.approx((64 * 0.2 + 16 * 0.2 + 48 * 0.05) / 128)


def test_features_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        risk_features(np.zeros((R, R, 3), np.uint8), np.zeros((2, R, R)), np.zeros((2, R, R)),
                      np.zeros((8, 8)), np.zeros((2, R, R)), best_index=0)


# ----------------------------------------------------------------------------- the model


def synthetic_table(n=40, seed=0):
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({f: rng.normal(size=n) for f in FEATURES})
    table.insert(0, "id", [f"ISIC_{i:07d}" for i in range(n)])
    # failures: high CRF disagreement, low agreement with Otsu
    table["dice"] = np.where(table["crf_disagreement"] - table["otsu_vs_fused_dice"] > 0.5, 0.3, 0.9)
    return table


def test_fitted_model_ranks_a_separable_set_and_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    table = synthetic_table()
    model, report = fit_risk(table, fail_dice=0.7, C=10.0)
    risk = apply_risk(model, table)
    failed = table["dice"] < 0.7
    assert report["n_failures"] == int(failed.sum()) > 0 and model.fitted
    assert auroc(risk, failed) > 0.97
    x = table[list(FEATURES)].to_numpy()
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    reference = LogisticRegression(C=10.0, max_iter=1000).fit(z, failed).predict_proba(z)[:, 1]
    np.testing.assert_allclose(risk, reference, rtol=1e-6)
    assert dict(zip(model.features, model.directions))["otsu_vs_fused_dice"] == -1
    # one image as a dict gives the same risk as its row
    assert apply_risk(model, table.iloc[3].to_dict())[0] == pytest.approx(risk[3])


def test_one_class_val_gives_a_constant_unfitted_model(caplog):
    table = synthetic_table().assign(dice=0.95)
    model, report = fit_risk(table)
    assert not model.fitted and not report["fitted"] and "one side" in caplog.text
    risk = apply_risk(model, table)
    assert np.ptp(risk) == 0 and risk[0] == pytest.approx(0.5 / (len(table) + 1))  # (0 + 0.5) / (n + 1)


def test_model_file_round_trip_and_errors(tmp_path):
    model, report = fit_risk(synthetic_table(), features=["crf_disagreement", "lesion_area"])
    save_risk_model(tmp_path / "risk.json", model, report)
    back = load_risk_model(tmp_path / "risk.json")
    assert back == model
    payload = json.loads((tmp_path / "risk.json").read_text())
    assert payload["fitted_on"] == "val" and payload["features"] == ["crf_disagreement", "lesion_area"]
    del payload["coef"]
    (tmp_path / "bad.json").write_text(json.dumps(payload))
    with pytest.raises(InputError, match=r"bad\.json.*coef"):
        load_risk_model(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="missing"):
        apply_risk(model, pd.DataFrame({"lesion_area": [0.1]}))


def test_a_constant_feature_changes_no_risk_and_no_other_coefficient():
    """A constant column standardises to zeros: fitting with or without it gives the same model elsewhere."""
    table = synthetic_table().assign(crf_disagreement=0.0)
    table["dice"] = np.where(table["output_dice_spread"] - table["otsu_vs_fused_dice"] > 0.5, 0.3, 0.9)
    others = [f for f in FEATURES if f != "crf_disagreement"]
    with_constant, _ = fit_risk(table, features=FEATURES)
    without, _ = fit_risk(table, features=others)
    coef = dict(zip(with_constant.features, with_constant.coef))
    assert coef["crf_disagreement"] == 0 and with_constant.scale[FEATURES.index("crf_disagreement")] == 1.0
    np.testing.assert_allclose([coef[f] for f in others], without.coef, rtol=0, atol=1e-9)
    assert with_constant.intercept == pytest.approx(without.intercept, abs=1e-9)
    risk = apply_risk(with_constant, table)
    assert 0 < (table["dice"] < 0.7).sum() < len(table) and np.ptp(risk) > 0.5
    np.testing.assert_allclose(risk, apply_risk(without, table), rtol=0, atol=1e-9)


def test_rankings_read_each_feature_in_its_val_direction():
    table = synthetic_table()
    model, _ = fit_risk(table)
    rankings = score_rankings(table, apply_risk(model, table), model, 0.7).set_index("score")
    assert rankings.loc["otsu_vs_fused_dice", "direction"] == -1
    assert rankings.loc["otsu_vs_fused_dice", "auroc"] > 0.5  # read as lower = riskier


# ----------------------------------------------------------------------------- fitted on val only


def write_split_files(tmp_path, test_images_value=128, n_rounds=2):
    """dataset.h5 (val + test), val inference / CRF files (``n_rounds`` CRF rounds) and a paper calibration,
    6 val images."""
    val_ids = [f"ISIC_{i:07d}" for i in range(6)]
    truth = [square(2 + i, 3, 6) for i in range(6)]
    outputs = {i: np.stack([truth[k], truth[k], square(0, 0, 3 + k)]) for k, i in enumerate(val_ids)}
    fused = {i: (truth[k] if k % 2 else square(9, 9, 5)) for k, i in enumerate(val_ids)}  # odd: right; even: wrong
    with h5py.File(tmp_path / "dataset.h5", "w") as f:
        for split, ids, value in (("val", val_ids, 128), ("test", ["ISIC_0000100"], test_images_value)):
            g = f.create_group(split)
            g.create_dataset("ids", data=np.asarray(ids, object), dtype=h5py.string_dtype())
            g["images"] = np.full((len(ids), R, R, 3), value, np.uint8)
            g["masks"] = np.stack(truth[:len(ids)])
    for name, data in (("val_inference.h5", outputs), ("val_crf.h5", fused)):
        with h5py.File(tmp_path / name, "w") as f:
            f.create_dataset("ids", data=np.asarray(val_ids[::-1], object), dtype=h5py.string_dtype())
            if name == "val_inference.h5":
                f["maps"] = np.stack([data[i] for i in val_ids[::-1]]).astype(np.float16)
                f["timesteps"] = np.array([60, 70, 80], np.int32)
                f.attrs["split"] = "val"
            else:
                f["fused"] = np.stack([data[i] for i in val_ids[::-1]]).astype(np.uint8)
                f["rounds"] = np.stack([np.stack([data[i]] * n_rounds) for i in val_ids[::-1]]).astype(np.uint8)
    save_calibration(tmp_path / "calibration.h5", Calibration(method="paper", threshold=0.5, best_timestep=70,
                                                              timesteps=[60, 70, 80]), (3, R, R), {})
    return [tmp_path / n for n in ("dataset.h5", "val_inference.h5", "val_crf.h5", "calibration.h5")]


def test_fit_reads_the_val_split_only(tmp_path, monkeypatch):
    import diffseg.risk

    seen = []
    real_fit = diffseg.risk.fit_risk
    monkeypatch.setattr(diffseg.risk, "fit_risk", lambda table, **kw: seen.append(list(table["id"])) or real_fit(table, **kw))
    first = tmp_path / "a"
    second = tmp_path / "b"
    first.mkdir(), second.mkdir()
    report = run_fit_risk(*write_split_files(first), first / "risk.json", features=["best_vs_fused_dice", "lesion_area"])
    assert report["n_images"] == 6 and report["n_failures"] == 3
    assert sorted(seen[0]) == [f"ISIC_{i:07d}" for i in range(6)]  # the val ids, never ISIC_0000100 (test)
    # other test images (and test masks) change nothing: no test row reaches the fit
    files = write_split_files(second, test_images_value=7)
    with h5py.File(files[0], "a") as f:
        f["test/masks"][...] = 1 - f["test/masks"][()]
    run_fit_risk(*files, second / "risk.json", features=["best_vs_fused_dice", "lesion_area"])
    assert (first / "risk.json").read_text() == (second / "risk.json").read_text()


def test_crf_disagreement_leaves_the_model_only_when_the_crf_ran_one_round(tmp_path, caplog):
    features = ["crf_disagreement", "best_vs_fused_dice", "lesion_area"]
    (tmp_path / "two").mkdir(), (tmp_path / "one").mkdir()
    run_fit_risk(*write_split_files(tmp_path / "two", n_rounds=2), tmp_path / "two/risk.json", features=features)
    assert load_risk_model(tmp_path / "two/risk.json").features == features
    assert "left out of the model" not in caplog.text
    with caplog.at_level("INFO", logger="diffseg.risk"):
        run_fit_risk(*write_split_files(tmp_path / "one", n_rounds=1), tmp_path / "one/risk.json", features=features)
    one = load_risk_model(tmp_path / "one/risk.json")
    assert one.features == features[1:] and "CRF disagreement is 0 on every image: left out" in caplog.text
    # the rounds of the two-round file agree everywhere too, so the other numbers are the same
    two = load_risk_model(tmp_path / "two/risk.json")
    np.testing.assert_allclose(one.coef, two.coef[1:], rtol=0, atol=1e-9)
    assert one.intercept == pytest.approx(two.intercept, abs=1e-9)
    with pytest.raises(InputError, match=r"val_crf\.h5.*crf_disagreement\] only.*single round"):
        run_fit_risk(*write_split_files(tmp_path / "one", n_rounds=1), tmp_path / "x.json",
                     features=["crf_disagreement"])


def test_fit_refuses_an_inference_file_of_another_split(tmp_path):
    files = write_split_files(tmp_path)
    with h5py.File(files[1], "a") as f:
        f.attrs["split"] = "test"
    with pytest.raises(InputError, match="val_inference.h5.*'test', expected 'val'"):
        run_fit_risk(*files, tmp_path / "risk.json")


def test_a_feature_equal_on_every_image_leaves_the_ranking_table_with_a_note():
    """CRF disagreement is 0 on every image where the CRF ran one round: no AUROC-0.5 row, a note instead."""
    table = synthetic_table()
    table["crf_disagreement"] = 0.0
    model, _ = fit_risk(table, features=[f for f in FEATURES if f != "crf_disagreement"])
    risk = apply_risk(model, table)
    scores = list(score_rankings(table, risk, model, 0.7)["score"])
    assert "crf_disagreement" not in scores and scores[0] == "risk" and len(scores) == len(FEATURES)
    lines = risk_markdown(table, risk, model, 0.7)
    note = next(line for line in lines if line.startswith("Left out of the ranking"))
    assert FEATURE_LABELS["crf_disagreement"] in note
    assert not any(line.startswith("| " + FEATURE_LABELS["crf_disagreement"]) for line in lines)
    table["crf_disagreement"] = np.linspace(0, 0.1, len(table))  # varies: ranked again, no note
    assert "crf_disagreement" in list(score_rankings(table, risk, model, 0.7)["score"])
    assert not any(line.startswith("Left out") for line in risk_markdown(table, risk, model, 0.7))
