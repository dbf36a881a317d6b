"""Configs as the workflow resolves them: every ablation overlay says what it does, and does only that.

Each overlay is loaded the way Snakemake loads it (config/config.yaml, then the base config, then the
overlay, merged with snakemake.utils.update_config) and validated with defaults filled in, exactly as
rules/common.smk does (snakemake.utils.validate with set_default). The result must equal the base's
resolved config with exactly the changes the overlay's first comment line claims.
"""

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config, validate

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "config" / "schema.yaml"
QUICK = "config/isic2018_quick.yaml"
FULL = "config/isic2018.yaml"
ABLATION = REPO / "config" / "ablation"

PAPER_TIMESTEPS = [60, 70, 80, 90, 100, 110, 120, 130, 140, 150]  # t = 60, 70, ..., 150: 10 outputs
# The method as written: eq. 2 at the 10 timesteps, one draw, identity calibration, K = 3 rounds of 4.
PAPER = {"inference": {"method": "paper", "timesteps": PAPER_TIMESTEPS, "noise_draws": 1,
                       "normalise": "p99", "threshold": 0.5},
         "calibration": {"method": "paper"},
         "crf": {"rounds": 3, "subset_size": 4, "bilateral_compat": 10}}
NO_CLEANUP = {"blur_sigma": 0, "closing_px": 0, "fill_holes": False, "largest_component": False}
A1 = {**PAPER, "calibration": {"method": "calibrated", "bias": False, **NO_CLEANUP}}
A2 = {**A1, "calibration": {**A1["calibration"], "bias": True}}
A3 = {**A2, "calibration": {**A2["calibration"], "blur_sigma": 1.0}}
A4 = {**A3, "calibration": {**A3["calibration"], "closing_px": 1, "fill_holes": True, "largest_component": True}}
A5 = {**A4, "inference": {**A4["inference"], "timesteps": [100, 200, 300, 400, 500]}}
CALIBRATED = {"method": "calibrated", "bias": False, "blur_sigma": 1.0, "closing_px": 1, "fill_holes": True,
              "largest_component": True}
LARGER_T = [100, 200, 300, 400, 500]
NOISE_DIFFERENCE = {"inference": {"method": "paper", "timesteps": LARGER_T, "noise_draws": 4},
                    "calibration": CALIBRATED, "crf": {"subset_size": 4}}
# The ablations measured on the noise-difference method spell it out: they mean the same on any base.
WITH_BIAS = {**NOISE_DIFFERENCE, "calibration": {**CALIBRATED, "bias": True}}
FEATURE_HEAD = {"blocks": None, "use_features": True, "use_difference": True, "use_noise": True, "head": "mlp",
                "targets": "truth"}
FEATURES = {"inference": {"method": "features", "timesteps": [10, 25, 50], "noise_draws": 2},
            "features": FEATURE_HEAD, "calibration": CALIBRATED, "crf": {"subset_size": 3}}

# What each overlay's label claims, as changes to the base config it is added to.
CLAIMS = {
    "paper.yaml": PAPER,
    "a1_val_threshold.yaml": A1,
    "a2_bias.yaml": A2,
    "a3_blur.yaml": A3,
    "a4_cleanup.yaml": A4,
    "a5_larger_t.yaml": A5,
    "with_bias.yaml": WITH_BIAS,
    "border_model.yaml": {**WITH_BIAS, "model": {"padding": "reflect"}, "augment": {"shift_px": 4}},
    "reconstruct_c1.yaml": {**WITH_BIAS, "inference": {"method": "reconstruct", "timesteps": LARGER_T, "recon_steps": 5,
                                                       "recon_compare": "c1", "noise_draws": 1}},
    "reconstruct_input.yaml": {**WITH_BIAS, "inference": {"method": "reconstruct", "timesteps": LARGER_T,
                                                          "recon_steps": 5, "recon_compare": "input", "noise_draws": 1}},
    "twins_biharmonic.yaml": {**NOISE_DIFFERENCE, "prepare": {"inpaint": "biharmonic"}},
    "twins_pushpull.yaml": {**NOISE_DIFFERENCE, "prepare": {"inpaint": "pushpull"}},
    "noise_difference.yaml": NOISE_DIFFERENCE,
    "features.yaml": FEATURES,
    "features_no_difference.yaml": {**FEATURES, "features": {**FEATURE_HEAD, "use_difference": False,
                                                             "use_noise": False}},
    "features_conv3x3.yaml": {"features": {"head": "conv3x3"}},
    "crf_library_kernel.yaml": {"crf": {"bilateral_sxy": 20, "bilateral_compat": 10}},
    "precision_fp32.yaml": {section: {"precision": "fp32"} for section in ("train", "inference", "baselines")},
    "features_weak.yaml": {**FEATURES, "features": {**FEATURE_HEAD, "targets": "diffseg", "teacher": {
        "timesteps": [100, 200, 300, 400, 500], "noise_draws": 4}}},
}


def resolved_config(*files: str) -> dict:
    """config/config.yaml (the Snakefile's configfile) then ``files``, merged and validated as the workflow does."""
    config = {}
    for name in ("config/config.yaml", *files):
        update_config(config, yaml.safe_load((REPO / name).read_text()) or {})
    validate(config, str(SCHEMA))  # set_default=True: the defaults rules/common.smk fills in
    return config


def with_changes(config: dict, changes: dict) -> dict:
    out = copy.deepcopy(config)
    for section, values in changes.items():
        out[section].update(copy.deepcopy(values))
    return out


def test_every_overlay_has_a_claim():
    assert sorted(p.name for p in ABLATION.glob("*.yaml")) == sorted(CLAIMS)


@pytest.mark.parametrize("overlay", sorted(CLAIMS))
def test_overlay_resolves_to_its_claim_on_the_quick_benchmark(overlay):
    resolved = resolved_config(QUICK, f"config/ablation/{overlay}")
    assert resolved == with_changes(resolved_config(QUICK), CLAIMS[overlay])


@pytest.mark.parametrize("base", [QUICK, FULL])
def test_paper_overlay_is_the_paper_on_either_base(base):
    """The values of the paper, spelled out (not derived from the claim table above)."""
    cfg = resolved_config(base, "config/ablation/paper.yaml")
    assert cfg["inference"]["method"] == "paper"
    assert cfg["inference"]["timesteps"] == list(range(60, 151, 10))
    assert len(cfg["inference"]["timesteps"]) == 10
    assert cfg["inference"]["noise_draws"] == 1
    assert cfg["calibration"]["method"] == "paper"
    assert (cfg["crf"]["rounds"], cfg["crf"]["subset_size"]) == (3, 4)
    assert (cfg["crf"]["bilateral_srgb"], cfg["crf"]["bilateral_compat"], cfg["crf"]["iterations"]) == (13, 10, 5)
    assert cfg["diffusion"] == {"T": 1000, "beta_start": 0.0001, "beta_end": 0.02}
    # kernel widths the paper does not give: the base's (pixels at its resolution), see paper.yaml
    assert cfg["crf"]["bilateral_sxy"] == resolved_config(base)["crf"]["bilateral_sxy"]


def test_a1_to_a4_start_from_the_paper_inference():
    paper = resolved_config(QUICK, "config/ablation/paper.yaml")["inference"]
    for overlay in ("a1_val_threshold", "a2_bias", "a3_blur", "a4_cleanup"):
        assert resolved_config(QUICK, f"config/ablation/{overlay}.yaml")["inference"] == paper, overlay
