"""Configs as the workflow resolves them: every ablation overlay says what it does, and does only that.

Each overlay is loaded the way Snakemake loads it (config/config.yaml, then the base config, then the
overlay, merged with snakemake.utils.update_config) and validated with defaults filled in, exactly as
rules/common.smk does (snakemake.utils.validate with set_default). CLAIMS states, for each overlay,
what its header comment says it is: the overlay it builds on (or the quick config itself) and the few
settings it changes on top of that. The test resolves both on the quick config and requires that they
differ in exactly those settings: an overlay that changes more, or other, keys than its claim fails.
"""

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config, validate

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "config" / "schema.yaml"
QUICK = "config/isic2018_quick.yaml"
FULL = "config/isic2018.yaml"
MEDIUM = "config/isic2018_medium.yaml"
ABLATION = REPO / "config" / "ablation"

PAPER_TIMESTEPS = [60, 70, 80, 90, 100, 110, 120, 130, 140, 150]  # t = 60, 70, ..., 150: 10 outputs
LARGER_T = [100, 200, 300, 400, 500]


@dataclass(frozen=True)
class Claim:
    """What an overlay's header says: it is ``builds_on`` (another overlay; None = the config it is added to)
    with ``changes`` ("section.key": value), every setting that differs and nothing else. ``header_says``:
    the words of its header comment that name that base; ``keeps``: values the header states that the base
    already has (checked too, not counted as changes)."""

    header_says: str
    changes: dict
    builds_on: str | None = None
    keeps: dict = field(default_factory=dict)


NO_CLEANUP = {"calibration.closing_px": 0, "calibration.fill_holes": False, "calibration.largest_component": False}
CLAIMS = {
    # the method as written: eq. 2 at the 10 timesteps, one draw, identity calibration, K = 3 rounds of 4
    "paper.yaml": Claim("the paper as written", {
        "inference.method": "paper", "inference.timesteps": PAPER_TIMESTEPS, "inference.noise_draws": 1,
        "calibration.method": "paper", "crf.subset_size": 4, "crf.bilateral_compat": 10},
        keeps={"inference.normalise": "p99", "inference.threshold": 0.5, "crf.rounds": 3}),
    # the path from the paper to the noise-difference method, one lever at a time
    "a1_val_threshold.yaml": Claim("paper maps; threshold chosen on val", {
        "calibration.method": "calibrated", "calibration.blur_sigma": 0, **NO_CLEANUP},
        builds_on="paper.yaml", keeps={"calibration.bias": False}),
    "a2_bias.yaml": Claim("a1 + per-pixel bias map", {"calibration.bias": True}, builds_on="a1_val_threshold.yaml"),
    "a3_blur.yaml": Claim("a2 + Gaussian blur (sigma 1 px)", {"calibration.blur_sigma": 1.0}, builds_on="a2_bias.yaml"),
    "a4_cleanup.yaml": Claim("a3 + clean-up (closing 1 px, hole filling, largest component)", {
        "calibration.closing_px": 1, "calibration.fill_holes": True, "calibration.largest_component": True},
        builds_on="a3_blur.yaml"),
    "a5_larger_t.yaml": Claim("a4 + larger t (100..500), still one noise draw", {"inference.timesteps": LARGER_T},
                              builds_on="a4_cleanup.yaml", keeps={"inference.noise_draws": 1}),
    # the noise-difference method (the default before issue 19) and the levers measured on it
    "noise_difference.yaml": Claim("the noise-difference default of the quick benchmark before issue 19", {
        "inference.method": "paper", "inference.timesteps": LARGER_T, "inference.noise_draws": 4,
        "crf.subset_size": 4}, keeps={"calibration.method": "calibrated"}),
    "with_bias.yaml": Claim("noise_difference.yaml) plus the per-pixel bias map", {"calibration.bias": True},
                            builds_on="noise_difference.yaml"),
    "border_model.yaml": Claim("with_bias.yaml plus reflect padding and random shifts of up to 4 px", {
        "model.padding": "reflect", "augment.shift_px": 4}, builds_on="with_bias.yaml"),
    "reconstruct_c1.yaml": Claim("with_bias.yaml with region-level maps |x0_c0 - x0_c1|", {
        "inference.method": "reconstruct", "inference.noise_draws": 1}, builds_on="with_bias.yaml",
        keeps={"inference.recon_steps": 5, "inference.recon_compare": "c1"}),
    "reconstruct_input.yaml": Claim("with_bias.yaml with |image - x0_c0|", {
        "inference.method": "reconstruct", "inference.noise_draws": 1, "inference.recon_compare": "input"},
        builds_on="with_bias.yaml", keeps={"inference.recon_steps": 5}),
    "twins_biharmonic.yaml": Claim("noise_difference.yaml) with healthy twins by biharmonic inpainting", {
        "prepare.inpaint": "biharmonic"}, builds_on="noise_difference.yaml"),
    "twins_pushpull.yaml": Claim("noise_difference.yaml) with healthy twins by a smooth push-pull fill", {
        "prepare.inpaint": "pushpull"}, builds_on="noise_difference.yaml"),
    # the features method (the quick config's default) and its variants
    "features.yaml": Claim("as the quick config's default sets it", {}),
    "features_no_difference.yaml": Claim("the features method without the difference inputs", {
        "features.use_difference": False, "features.use_noise": False}, keeps={"features.use_features": True}),
    "features_conv3x3.yaml": Claim("the features method with a 3x3-convolution head", {"features.head": "conv3x3"}),
    "features_weak.yaml": Claim("the features method with the head trained on DiffSeg's own calibrated masks", {
        "features.targets": "diffseg"}, keeps={"features.teacher": {"timesteps": LARGER_T, "noise_draws": 4}}),
    "crf_library_kernel.yaml": Claim("the CRF's bilateral kernel of pydensecrf's example", {
        "crf.bilateral_sxy": 20, "crf.bilateral_compat": 10}),
    # the runtime: fp32 where precision auto would autocast (CUDA, CPUs with native bf16), over any config
    "precision_fp32.yaml": Claim("added to any config: plain fp32 everywhere (no autocast)", {
        f"{section}.precision": "fp32" for section in ("train", "inference", "baselines")}),
}


def resolved_config(*files: str) -> dict:
    """config/config.yaml (the Snakefile's configfile) then ``files``, merged and validated as the workflow does."""
    config = {}
    for name in ("config/config.yaml", *files):
        update_config(config, yaml.safe_load((REPO / name).read_text()) or {})
    validate(config, str(SCHEMA))  # set_default=True: the defaults rules/common.smk fills in
    return config


def settings(config: dict) -> dict:
    """{"section.key": value} of a resolved config (top-level keys as they are)."""
    flat = {}
    for name, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{key}": v for key, v in value.items()})
        else:
            flat[name] = value
    return flat


def differences(base: dict, other: dict) -> dict:
    """The settings of ``other`` that differ from ``base`` (None where ``other`` lacks one)."""
    a, b = settings(base), settings(other)
    return {key: b.get(key) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)}


def header(overlay: str) -> str:
    """The overlay's leading comment lines, joined."""
    lines = (ABLATION / overlay).read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    comment = [line.lstrip("# ") for line in lines[:end]]
    return " ".join(comment)


def test_every_overlay_has_a_claim():
    assert sorted(p.name for p in ABLATION.glob("*.yaml")) == sorted(CLAIMS)


@pytest.mark.parametrize("overlay", sorted(CLAIMS))
def test_overlay_changes_exactly_what_its_header_claims(overlay):
    claim = CLAIMS[overlay]
    assert claim.header_says in header(overlay), f"{overlay}'s header no longer says: {claim.header_says}"
    base = resolved_config(QUICK, *([f"config/ablation/{claim.builds_on}"] if claim.builds_on else []))
    resolved = resolved_config(QUICK, f"config/ablation/{overlay}")
    assert differences(base, resolved) == claim.changes
    assert {key: settings(resolved)[key] for key in claim.keeps} == claim.keeps


def test_the_check_catches_an_overlay_that_changes_more_than_it_claims():
    quick = resolved_config(QUICK)
    drifted = resolved_config(QUICK, "config/ablation/features_conv3x3.yaml")
    drifted["crf"]["rounds"] = 5
    assert differences(quick, drifted) == {"crf.rounds": 5, "features.head": "conv3x3"}
    assert differences(quick, drifted) != CLAIMS["features_conv3x3.yaml"].changes


def test_features_overlay_restores_the_quick_default_over_another_method():
    """Its header: the quick config's default, for use over other bases."""
    quick = resolved_config(QUICK)
    assert differences(quick, resolved_config(QUICK, "config/ablation/noise_difference.yaml",
                                              "config/ablation/features.yaml")) == {}


@pytest.mark.parametrize("base", [QUICK, MEDIUM, FULL])
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


def test_medium_config_is_the_quick_one_at_64_px():
    """Its header: the quick benchmark at 64 px with a 3.5M-parameter DDPM, same images and split, the pixel
    sizes scaled; the features head reads one decoder block per level (every block would not fit in memory)."""
    assert differences(resolved_config(QUICK), resolved_config(MEDIUM)) == {
        "results_dir": "results/isic2018_medium",
        "prepare.resolution": 64, "prepare.dilate_px": 2,
        "model.base_channels": 48, "model.channel_mult": [1, 2, 2, 2],
        "train.steps": 1200, "train.checkpoint_every": 250,
        "inference.batch_images": 16,
        "features.blocks": [1, 3, 5, 7],
        "crf.bilateral_sxy": 6,
    }
