"""The registry of inference methods (diffseg.methods): schema, bundle, workflow and inference read one entry."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffseg import bundle, methods
from diffseg.methods import FEATURE_HEAD, METHODS, NAMES, inference_method

REPO = Path(__file__).resolve().parents[1]


def test_schema_enum_and_default_are_the_registry_names():
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    method = schema["properties"]["inference"]["properties"]["method"]
    assert method["enum"] == list(NAMES) == ["paper", "reconstruct", "features"]
    assert method["default"] == methods.DEFAULT


def test_the_registry_imports_neither_torch_nor_diffseg_modules():
    """The Snakefile and the bundle reader import it before any rule runs."""
    probe = ("import sys, diffseg.methods; "
             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('diffseg.')))")
    assert subprocess.check_output([sys.executable, "-c", probe], text=True).strip() == "['diffseg.methods']"


def test_unknown_method_names_the_key_and_the_known_ones():
    with pytest.raises(ValueError, match=r"inference.method must be one of \('paper', 'reconstruct', 'features'\), "
                                         r"got 'bogus'"):
        inference_method("bogus")
    assert inference_method("features") is METHODS["features"]


def test_each_method_resolves_its_maps_factory_and_stored_normalisation():
    import diffseg.features
    import diffseg.inference

    factories = {"paper": diffseg.inference.paper_maps, "reconstruct": diffseg.inference.reconstruct_maps,
                 "features": diffseg.features.head_maps}
    for name, method in METHODS.items():
        module, function = method.maps.split(":")
        assert getattr(sys.modules[module], function) is factories[name]
    assert inference_method("paper").stored_normalise("p99") == "p99"
    assert inference_method("reconstruct").stored_normalise("max") == "max"
    assert inference_method("features").stored_normalise("p99") == "none"


def test_make_maps_checks_the_trained_files_then_calls_the_factory():
    from diffseg.inference import noise_difference, reconstruction_difference
    from diffseg.settings import InferenceSettings

    assert inference_method("paper").make_maps(InferenceSettings(), "ddpm.pt") is noise_difference
    maps = inference_method("reconstruct").make_maps(InferenceSettings(method="reconstruct", recon_steps=3,
                                                                       recon_compare="input"), "ddpm.pt")
    assert maps.func is reconstruction_difference and maps.keywords == {"steps": 3, "compare": "input"}
    with pytest.raises(ValueError, match=r"'features' needs its trained file\(s\) 'head' \(models/feature_head.pt"):
        inference_method("features").make_maps(InferenceSettings(method="features"), "ddpm.pt")
    with pytest.raises(ValueError, match=r"'paper' takes no trained file\(s\) \['head'\]"):
        inference_method("paper").make_maps(InferenceSettings(), "ddpm.pt", {"head": "feature_head.pt"})


def test_bundle_members_come_from_the_registry():
    assert FEATURE_HEAD.member == bundle.FEATURE_HEAD == "feature_head.pt"
    for name, method in METHODS.items():
        assert set(method.bundle_members) <= set(bundle.OPTIONAL_MEMBERS), name
        assert bundle.required_members({"inference": {"method": name}}) == (*bundle.REQUIRED_MEMBERS,
                                                                              *method.bundle_members)
    assert bundle.required_members({"inference": {"method": "features"}})[-1] == "feature_head.pt"
    assert bundle.required_members({}) == bundle.REQUIRED_MEMBERS  # a manifest without inference: the default


def test_each_artefact_names_a_rule_of_the_workflow():
    rules = "".join(p.read_text() for p in (REPO / "rules").glob("*.smk"))
    artefacts = [a for method in METHODS.values() for a in method.artefacts]
    assert artefacts == [FEATURE_HEAD]
    for artefact in artefacts:
        assert re.search(rf"^rule {artefact.rule}:$", rules, re.M), f"rule {artefact.rule} not found"
