"""One source of defaults: every package keyword that a config key sets defaults to config/schema.yaml's value.

For every section of the schema, CONSUMERS lists the functions, classes and default dicts the rules
pass that section's keys to (directly or one call down, as the fitted Calibration and cleanup are).
Each such keyword either has no default or has the schema's default; every key of every section is
taken by at least one consumer (or is listed in PASSED_DIFFERENTLY), so a new key cannot be forgotten.
"""

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from diffseg import (calibration, data, ddpm, demo, evaluate, export, features, figures, figures_risk, postprocess,
                     predict, risk, settings, unet)
from diffseg.augment import PairedAugment
from diffseg.schedule import linear_betas

SCHEMA = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"
SECTIONS = {name: spec for name, spec in yaml.safe_load(SCHEMA.read_text())["properties"].items()
            if spec.get("type") == "object"}

# section -> consumers: a callable, a dict of defaults, or (consumer, {config key: keyword name}) where the
# mapping is complete (a consumer that takes a key under another name is checked for those keys only)
CONSUMERS = {
    "demo": [demo.make_demo_dataset],
    "prepare": [settings.PrepareSettings, data.write_preview,
                (data.prepare_images, {"resolution": "resolution", "on_bad_file": "on_bad_file"})],
    "augment": [PairedAugment],
    "diffusion": [linear_betas, ddpm.DIFFUSION_DEFAULTS],
    "model": [unet.ConditionalUNet, ddpm.MODEL_DEFAULTS, ddpm.PairSampler],
    "train": [settings.TrainSettings],
    "inference": [settings.InferenceSettings, postprocess.postprocess_image, postprocess.binarize,
                  (postprocess.normalise, {"normalise": "method"}),
                  # rule calibrate passes inference.threshold (their 'method' is calibration.method)
                  *[(fn, {"threshold": "threshold"}) for fn in (postprocess.Calibration, calibration.fit_calibration,
                                                                 calibration.run_calibrate)]],
    "calibration": [calibration.run_calibrate, calibration.fit_calibration, postprocess.Calibration,
                    postprocess.cleanup],
    "crf": [settings.CRFSettings],
    "features": [settings.HeadSettings, features.FeatureHead],
    "baselines": [settings.BaselineSettings, unet.SegUNet],
    "risk": [risk.run_fit_risk, risk.fit_risk],
    # rules fit_risk and risk_figures pass evaluate.fail_dice (the risk model's target)
    "evaluate": [evaluate.run_evaluate, figures.run_figures, export.export_masks,
                 *[(fn, {"fail_dice": "fail_dice"}) for fn in (risk.run_fit_risk, risk.fit_risk,
                                                               figures_risk.run_risk_figures,
                                                               predict.score_predictions)]],
    "figures": [figures.run_figures],
    "predict": [predict.write_predictions],
}
# keys a rule passes under another name or handles itself (never as a keyword with a default)
PASSED_DIFFERENTLY = {
    "inference": {"splits"},  # the rule's split wildcard
    "baselines": {"methods"},  # which predict/train jobs exist
    "predict": {"images", "bundle", "masks"},  # the rules' inputs (rules/predict.smk)
    "features": {"targets", "teacher"},  # rule teacher_masks (its inference settings); the head gets its file
}


def keyword_defaults(consumer) -> dict:
    """{name: default} of a consumer's keywords (or dataclass fields); names without a default map to EMPTY."""
    if isinstance(consumer, dict):
        return dict(consumer)
    if dataclasses.is_dataclass(consumer):
        out = {}
        for f in dataclasses.fields(consumer):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = inspect.Parameter.empty
        return out
    target = consumer.__init__ if inspect.isclass(consumer) else consumer
    return {name: p.default for name, p in inspect.signature(target).parameters.items()}


def comparable(value):
    return list(value) if isinstance(value, tuple) else value


def consumers(entries):
    for entry in entries:
        consumer, renames = entry if isinstance(entry, tuple) else (entry, {})
        yield getattr(consumer, "__qualname__", repr(consumer)[:40]), keyword_defaults(consumer), renames


def schema_drifts(section: str, entries) -> tuple[list[str], set[str]]:
    """The check: (a message per consumer keyword whose default differs from the schema's, the section's keys
    some consumer takes) for ``entries`` (a CONSUMERS list) of config/schema.yaml's ``section``."""
    props = SECTIONS[section]["properties"]
    drifts, taken = [], set()
    for name, defaults, renames in consumers(entries):
        for key, spec in props.items():
            if renames and key not in renames:
                continue
            keyword = renames.get(key, key)
            if keyword not in defaults:
                continue
            taken.add(key)
            if defaults[keyword] is inspect.Parameter.empty:
                continue  # no default: the config is the only source
            if comparable(defaults[keyword]) != spec["default"]:
                drifts.append(f"{name}: keyword {keyword}={defaults[keyword]!r} but config/schema.yaml "
                              f"{section}.{key} defaults to {spec['default']!r}")
    return drifts, taken


def test_every_schema_section_has_consumers():
    assert sorted(CONSUMERS) == sorted(SECTIONS)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_keyword_defaults_equal_the_schema(section):
    drifts, taken = schema_drifts(section, CONSUMERS[section])
    assert not drifts, "\n".join(drifts)
    taken |= PASSED_DIFFERENTLY.get(section, set())
    props = SECTIONS[section]["properties"]
    assert taken == set(props), f"{section}: keys no consumer takes: {sorted(set(props) - taken)}"


def test_a_drift_is_caught():
    """The check itself on drifted consumers of the crf section: each drift is reported, nothing else is."""
    def drifted(*, rounds=4, subset_size=4, threshold=0.5, seed):  # rounds: the schema says 3; seed: no default
        return rounds, subset_size, threshold, seed

    def renamed(*, random_seed=1):  # takes crf.seed (schema default 0) under another name
        return random_seed

    drifts, taken = schema_drifts("crf", [drifted, (renamed, {"seed": "random_seed"})])
    assert drifts == [
        f"{drifted.__qualname__}: keyword rounds=4 but config/schema.yaml crf.rounds defaults to 3",
        f"{renamed.__qualname__}: keyword random_seed=1 but config/schema.yaml crf.seed defaults to 0"]
    assert taken == {"rounds", "subset_size", "threshold", "seed"}  # the kernel keys: no consumer takes them
    assert schema_drifts("crf", [settings.CRFSettings]) == ([], set(SECTIONS["crf"]["properties"]))


def test_settings_objects_skip_exactly_the_keys_passed_differently():
    """from_config ignores the keys the rule passes another way, and no other."""
    for cls in (settings.PrepareSettings, settings.TrainSettings, settings.HeadSettings, settings.BaselineSettings,
                settings.InferenceSettings, settings.CRFSettings):
        assert set(cls.IGNORED) == PASSED_DIFFERENTLY.get(cls.SECTION, set()), cls.__name__
        section = {key: spec["default"] for key, spec in SECTIONS[cls.SECTION]["properties"].items()}
        assert cls.from_config(section) == cls(), cls.__name__  # the schema's defaults build the default object
        with pytest.raises(ValueError, match=f"config section '{cls.SECTION}': typo"):
            cls.from_config({"typo": 1})
