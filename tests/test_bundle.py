"""The model bundle: written from a training run's files, refused when it does not match the config."""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile

import h5py
import numpy as np
import pytest

from diffseg.bundle import (CALIBRATION, CHECKPOINT, MANIFEST, BundleError, bundle_settings, check_manifest_fields,
                            check_runtime, check_settings, content_sha256, export_bundle, load_bundle,
                            optional_member, read_manifest)
from diffseg.imageio import InputError
from diffseg.calibration import Calibration, load_calibration, run_calibrate, save_calibration
from diffseg.ddpm import load_model
from diffseg.inference import run_inference
from diffseg.runtime import resolved_runtime
from diffseg.settings import BUNDLE_SECTIONS, OUTPUT_DEFINING, CRFSettings, InferenceSettings
from test_features import write_dataset
from test_figures import DIFFUSION, R, TINY_MODEL, tiny_checkpoint

INFERENCE = dict(method="paper", timesteps=[60, 70, 80], noise_draws=1, normalise="p99", threshold=0.5,
                 recon_steps=5, recon_compare="c1", splits=["val", "test"], batch_images=4, seed=0, device="cpu",
                 precision="auto", compile=False)
CRF = {"rounds": 2, "subset_size": 2, "iterations": 5, "gaussian_sxy": 3, "gaussian_compat": 3, "bilateral_sxy": 10,
       "bilateral_srgb": 13, "bilateral_compat": 10, "threshold": 0.5, "seed": 0}
RUNTIME = {"precision": "fp32", "device_type": "cpu"}  # what the val inference of run_files resolved to


def config(**changes) -> dict:
    cfg = {"prepare": {"resolution": R, "dilate_px": 1}, "model": dict(TINY_MODEL), "diffusion": dict(DIFFUSION),
           "inference": dict(INFERENCE), "crf": dict(CRF), "calibration": {"method": "calibrated", "bias": False}}
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


@pytest.fixture
def run_files(tmp_path):
    checkpoint = tmp_path / "models" / "ddpm.pt"
    checkpoint.parent.mkdir()
    tiny_checkpoint(checkpoint)
    calibration = tmp_path / "calibration.h5"
    cal = Calibration(method="calibrated", threshold=0.3, sigmoid_scale=0.05, blur_sigma=1.0, closing_px=1,
                      fill_holes=True, largest_component=True, best_timestep=70, timesteps=[60, 70, 80])
    save_calibration(calibration, cal, (3, R, R), {"val_dice_vote": 0.5}, RUNTIME)
    return checkpoint, calibration


def test_bundle_round_trip_gives_the_same_model_and_calibration(run_files, tmp_path):
    checkpoint, calibration = run_files
    bundle = tmp_path / "bundle.zip"
    manifest = export_bundle(checkpoint, calibration, bundle, config=config(), training_data="synthetic demo data")
    assert manifest["members"].keys() == {CHECKPOINT, CALIBRATION}
    assert len(manifest["content_sha256"]) == 64
    assert manifest["settings"]["prepare"]["resolution"] == R
    assert manifest["settings"]["inference"]["timesteps"] == [60, 70, 80]
    # another folder, another machine: only the bundle travels
    unpacked = load_bundle(bundle, tmp_path / "elsewhere", config())
    assert unpacked["content_sha256"] == manifest["content_sha256"]
    model_a, _ = load_model(checkpoint)
    model_b, cfg_b = load_model(tmp_path / "elsewhere" / CHECKPOINT)
    assert cfg_b["image_size"] == R
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), name
    cal = load_calibration(tmp_path / "elsewhere" / CALIBRATION)
    assert cal.threshold == 0.3 and cal.best_timestep == 70
    assert json.loads((tmp_path / "elsewhere" / MANIFEST).read_text())["training_data"] == "synthetic demo data"


def test_same_content_gives_the_same_bundle_bytes(run_files, tmp_path):
    checkpoint, calibration = run_files
    export_bundle(checkpoint, calibration, tmp_path / "a.zip", config=config())
    export_bundle(checkpoint, calibration, tmp_path / "b.zip", config=config())
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()


@pytest.mark.parametrize("change, named", [
    ({"prepare__resolution": 32}, "prepare.resolution: bundle 16, config 32"),
    ({"model__base_channels": 16}, "model.base_channels: bundle 8, config 16"),
    ({"diffusion__T": 1000}, "diffusion.T: bundle 200, config 1000"),
    ({"inference__timesteps": [60, 70]}, "inference.timesteps: bundle [60, 70, 80], config [60, 70]"),
    ({"inference__noise_draws": 4}, "inference.noise_draws: bundle 1, config 4"),
    ({"inference__seed": 5}, "inference.seed: bundle 0, config 5"),
    ({"crf__rounds": 3}, "crf.rounds: bundle 2, config 3"),
    ({"crf__bilateral_sxy": 80}, "crf.bilateral_sxy: bundle 10, config 80"),
    ({"crf__seed": 1}, "crf.seed: bundle 0, config 1"),
])
def test_a_bundle_that_does_not_match_the_config_is_refused_naming_the_difference(run_files, tmp_path, change,
                                                                                   named):
    checkpoint, calibration = run_files
    bundle = tmp_path / "bundle.zip"
    export_bundle(checkpoint, calibration, bundle, config=config())
    with pytest.raises(BundleError, match="does not match the config") as err:
        load_bundle(bundle, tmp_path / "out", config(**change))
    assert str(err.value).startswith(str(bundle)) and named in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_one_list_covers_every_output_defining_section_and_key():
    """OUTPUT_DEFINING names whole sections or single keys; the bundle records exactly those (and calibration)."""
    recorded = bundle_settings(config())
    assert set(recorded) == set(BUNDLE_SECTIONS) == {"prepare", "model", "diffusion", "inference", "crf",
                                                     "calibration"}
    assert recorded["crf"] == CRF and set(CRF) == set(vars(CRFSettings()))  # every crf key defines the outputs
    assert set(recorded["inference"]) == {name.split(".")[1] for name in OUTPUT_DEFINING
                                          if name.startswith("inference.")}
    assert set(recorded["inference"]) <= set(vars(InferenceSettings())) and "seed" in recorded["inference"]
    assert recorded["prepare"] == {"resolution": R}
    with pytest.raises(ValueError, match="the config has no 'crf'"):
        bundle_settings({k: v for k, v in config().items() if k != "crf"})


def test_a_bundle_of_an_older_format_is_refused_naming_what_it_lacks(tmp_path):
    """Format 1 recorded no crf, no inference.seed: refused, and told to re-export (its resolution still reads)."""
    old = {"prepare.resolution": R, "model": dict(TINY_MODEL), "diffusion": dict(DIFFUSION),
           "inference": {k: INFERENCE[k] for k in ("method", "timesteps", "noise_draws", "normalise", "threshold",
                                                    "recon_steps", "recon_compare")}}
    with pytest.raises(BundleError, match="re-export it") as err:
        check_settings(tmp_path / "old.zip", old, config())
    assert "crf.rounds: bundle (absent), config 2" in str(err.value)
    assert "inference.seed: bundle (absent), config 0" in str(err.value)
    assert "prepare.resolution" not in str(err.value) and "model." not in str(err.value)


def test_the_field_check_reads_format_1_settings_and_format_2_needs_sections_and_the_runtime(tmp_path):
    """Format 1 (flat prepare.resolution, no runtime) passes the field check and is refused later by the settings
    check, naming what it lacks; the same settings claimed as format 2 are refused for their layout."""
    settings = {"prepare.resolution": R, "model": dict(TINY_MODEL), "diffusion": dict(DIFFUSION),
                "inference": {"method": "paper"}}
    manifest = {"format_version": 1, "settings": settings, "members": {CHECKPOINT: "0" * 64},
                "content_sha256": "0" * 64}
    check_manifest_fields(tmp_path / "v1.zip", manifest)
    with pytest.raises(BundleError, match=r"settings.prepare.resolution must be a JSON object \(format 2"):
        check_manifest_fields(tmp_path / "v2.zip", {**manifest, "format_version": 2})
    settings_v2 = {**{k: v for k, v in settings.items() if k != "prepare.resolution"}, "prepare": {"resolution": R}}
    with pytest.raises(BundleError, match="lack the runtime"):
        check_manifest_fields(tmp_path / "v2.zip", {**manifest, "format_version": 2, "settings": settings_v2})
    runtime = {"precision": "fp32", "device_type": "cpu"}
    check_manifest_fields(tmp_path / "v2.zip", {**manifest, "format_version": 2,
                                                "settings": {**settings_v2, "runtime": runtime}})


def test_the_bundle_records_crf_the_inference_seed_and_the_runtime_of_its_calibration(tmp_path):
    """From a run's own files: inference on val records the resolved runtime, the calibration copies it, export
    puts it in the manifest beside the crf section and inference.seed."""
    dataset = write_dataset(tmp_path / "dataset.h5")
    checkpoint = tmp_path / "ddpm.pt"
    tiny_checkpoint(checkpoint)
    settings = InferenceSettings.from_config(config()["inference"])
    run_inference(dataset, checkpoint, tmp_path / "val.h5", settings, split="val")
    with h5py.File(tmp_path / "val.h5") as f:
        runtime = {"precision": f.attrs["precision"], "device_type": f.attrs["device_type"]}
    assert runtime == resolved_runtime("cpu", "auto") and runtime["device_type"] == "cpu"
    run_calibrate(dataset, tmp_path / "val.h5", tmp_path / "calibration.h5", method="calibrated")
    manifest = export_bundle(checkpoint, tmp_path / "calibration.h5", tmp_path / "bundle.zip", config=config())
    recorded = read_manifest(tmp_path / "bundle.zip")["settings"]
    assert recorded == manifest["settings"]
    assert recorded["runtime"] == runtime and recorded["crf"] == CRF and recorded["inference"]["seed"] == 0
    assert recorded["prepare"] == {"resolution": R} and manifest["format_version"] == 2


def test_export_refuses_a_calibration_without_its_runtime(run_files, tmp_path):
    checkpoint, _ = run_files
    old = tmp_path / "old_calibration.h5"
    save_calibration(old, Calibration(method="paper", threshold=0.5, timesteps=[60, 70, 80]), (3, R, R), {})
    with pytest.raises(InputError, match=r"old_calibration.h5: no attribute\(s\) \['precision', 'device_type'\]"):
        export_bundle(checkpoint, old, tmp_path / "b.zip", config=config())
    assert not (tmp_path / "b.zip").exists()


def test_prediction_refuses_another_precision_or_device_type(run_files, tmp_path):
    """The runtime is compared where prediction's inference resolves it, naming each difference."""
    checkpoint, calibration = run_files
    bundle = tmp_path / "bundle.zip"
    export_bundle(checkpoint, calibration, bundle, config=config())
    load_bundle(bundle, tmp_path / "model", config())
    manifest = tmp_path / "model" / MANIFEST
    check_runtime(manifest, {"precision": "fp32", "device_type": "cpu"})  # the same: accepted
    with pytest.raises(BundleError, match="another precision or device type") as err:
        check_runtime(manifest, {"precision": "bf16", "device_type": "cuda"})
    assert str(err.value).startswith(str(manifest))
    assert "precision: bundle 'fp32', this machine 'bf16'" in str(err.value)
    assert "device_type: bundle 'cpu', this machine 'cuda'" in str(err.value)
    assert "inference.precision and inference.device" in str(err.value)


def test_export_refuses_a_checkpoint_trained_with_another_config(run_files, tmp_path):
    checkpoint, calibration = run_files
    with pytest.raises(BundleError, match="not trained with this config.*model.base_channels: bundle 8, config 32"):
        export_bundle(checkpoint, calibration, tmp_path / "b.zip", config=config(model__base_channels=32))
    assert not (tmp_path / "b.zip").exists()


def test_optional_members_are_packed_when_present(run_files, tmp_path):
    checkpoint, calibration = run_files
    risk = tmp_path / "risk.json"
    risk.write_text('{"weights": [1, 2]}')
    bundle = tmp_path / "bundle.zip"
    manifest = export_bundle(checkpoint, calibration, bundle, config=config(),
                             optional={"risk.json": risk, "feature_head.pt": tmp_path / "absent.pt"})
    assert manifest["optional_members"] == ["risk.json"]
    assert optional_member(bundle, "risk.json") == risk.read_bytes()
    assert optional_member(bundle, "feature_head.pt") is None
    with pytest.raises(ValueError, match="unknown optional bundle member 'typo.json'"):
        export_bundle(checkpoint, calibration, bundle, config=config(), optional={"typo.json": risk})


def test_a_features_method_bundle_must_carry_its_head(run_files, tmp_path):
    """The features method cannot predict without its head: export refuses to leave it out, reading refuses a
    bundle that lacks it, and a complete one unpacks the head beside the DDPM."""
    checkpoint, calibration = run_files
    features = config(inference__method="features")
    with pytest.raises(InputError, match="absent.pt: file not found .bundle member feature_head.pt"):
        export_bundle(checkpoint, calibration, tmp_path / "b.zip", config=features,
                      optional={"feature_head.pt": tmp_path / "absent.pt"})
    assert not (tmp_path / "b.zip").exists()
    head = tmp_path / "head.pt"
    head.write_bytes(b"head weights")
    bundle = tmp_path / "bundle.zip"
    export_bundle(checkpoint, calibration, bundle, config=features, optional={"feature_head.pt": head})
    load_bundle(bundle, tmp_path / "elsewhere", features)
    assert (tmp_path / "elsewhere" / "feature_head.pt").read_bytes() == b"head weights"
    headless = tmp_path / "headless.zip"
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(headless, "w") as dst:
        manifest = json.loads(src.read(MANIFEST))
        del manifest["members"]["feature_head.pt"]
        dst.writestr(MANIFEST, json.dumps(manifest))
        for name in (CHECKPOINT, CALIBRATION):
            dst.writestr(name, src.read(name))
    with pytest.raises(BundleError, match=r"headless.zip: incomplete bundle: member\(s\) \['feature_head.pt'\]"):
        read_manifest(headless)


def test_a_corrupt_member_is_refused_and_nothing_is_unpacked(run_files, tmp_path):
    checkpoint, calibration = run_files
    bundle = tmp_path / "bundle.zip"
    export_bundle(checkpoint, calibration, bundle, config=config())
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(item, data + b"x" if item.filename == CALIBRATION else data)
    with pytest.raises(BundleError, match="member calibration.h5 is corrupt"):
        load_bundle(tampered, tmp_path / "out", config())
    assert not (tmp_path / "out").exists()


def test_not_a_bundle_is_named(tmp_path):
    text = tmp_path / "model.zip"
    text.write_text("not a zip")
    with pytest.raises(BundleError, match="model.zip: not a model bundle"):
        read_manifest(text)
    with pytest.raises(BundleError, match="model bundle not found"):
        read_manifest(tmp_path / "missing.zip")


def test_reading_a_bundle_needs_no_torch():
    """The workflow's config check imports diffseg.bundle before any rule: it must not pull in torch."""
    import subprocess
    import sys

    probe = "import sys, diffseg.bundle; print(sorted(m for m in ('torch', 'diffseg.train') if m in sys.modules))"
    assert subprocess.check_output([sys.executable, "-c", probe], text=True).strip() == "[]"


# ----------------------------------------------------------------------------- an untrusted archive


def crafted(bundle, dest, *, edit=None, manifest_text=None, extra=(), rehash=True):
    """A copy of ``bundle``: its manifest edited by ``edit`` (content hash recomputed so that check passes) or
    replaced by ``manifest_text``, and the zip entries ``extra`` ((name or ZipInfo, bytes)) appended."""
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(dest, "w") as dst, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about a duplicate name: writing one is the point
        manifest = json.loads(src.read(MANIFEST))
        if edit is not None:
            edit(manifest)
        if rehash:
            manifest["content_sha256"] = content_sha256(manifest["settings"], manifest["members"])
        dst.writestr(MANIFEST, manifest_text(manifest) if manifest_text else json.dumps(manifest))
        for name in (CHECKPOINT, CALIBRATION):
            dst.writestr(name, src.read(name))
        for name, data in extra:
            dst.writestr(name, data)
    return dest


def listed_with_hash(name, data):
    """An edit that lists member ``name`` with the correct sha256 of ``data``."""
    return lambda manifest: manifest["members"].__setitem__(name, hashlib.sha256(data).hexdigest())


def a_directory(name):
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o40755 << 16  # what zip tools write for a folder
    return info


def a_symlink(name):
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16
    return info


def with_duplicate_key(text_of_key):
    """manifest_text: the JSON with a repeated key written in front of the original ones at one level."""
    return lambda manifest: json.dumps(manifest).replace(*text_of_key, 1)


ZERO_HASH = "0" * 64
UNTRUSTED = {
    # the attack of issue 25: a correctly hashed member whose name walks out of the unpack folder
    "escape": (dict(edit=listed_with_hash("../escaped.txt", b"payload"), extra=[("../escaped.txt", b"payload")]),
               "the zip directory names an unsafe member '../escaped.txt' (a path, not a plain file name"),
    "absolute": (dict(edit=listed_with_hash("/tmp/absolute.txt", b"x"), extra=[("/tmp/absolute.txt", b"x")]),
                 "names an unsafe member '/tmp/absolute.txt'"),
    "subfolder_in_manifest": (dict(edit=listed_with_hash("models/risk.json", b"{}")),
                              "manifest.json members names an unsafe member 'models/risk.json'"),
    "unknown_name": (dict(edit=listed_with_hash("notes.txt", b"hi"), extra=[("notes.txt", b"hi")]),
                     "names an unknown member 'notes.txt'; a bundle holds only"),
    "unlisted_member": (dict(extra=[("risk.json", b"{}")]),
                        "member(s) ['risk.json'] are not listed in manifest.json"),
    "name_twice": (dict(extra=[(CHECKPOINT, b"another checkpoint")]),
                   "the zip directory lists member 'ddpm.pt' twice"),
    "directory": (dict(extra=[(a_directory("risk.json/"), b"")]), "member 'risk.json/' is a directory, not a file"),
    "symlink": (dict(edit=listed_with_hash("risk.json", b"/etc/passwd"),
                     extra=[(a_symlink("risk.json"), b"/etc/passwd")]),
                "member 'risk.json' is not a plain file (a link or special file)"),
    "repeated_top_key": (dict(manifest_text=with_duplicate_key(("{", '{"format_version": 1, '))),
                         "manifest.json repeats the key(s) ['format_version'] (which value is meant?)"),
    "repeated_member_hash": (dict(manifest_text=with_duplicate_key(('"members": {', f'"members": {{"{CHECKPOINT}": '
                                                                                   f'"{ZERO_HASH}", '))),
                             "manifest.json repeats the key(s) ['ddpm.pt']"),
    "version_string": (dict(edit=lambda m: m.update(format_version="1")),
                       "format_version must be a positive integer, got '1'"),
    "version_bool": (dict(edit=lambda m: m.update(format_version=True)),
                     "format_version must be a positive integer, got True"),
    "version_float": (dict(edit=lambda m: m.update(format_version=1.0)),
                      "format_version must be a positive integer, got 1.0"),
    "settings_list": (dict(edit=lambda m: m.update(settings=[1, 2])),
                      "manifest.json settings must be a JSON object, not a list"),
    "members_list": (dict(edit=lambda m: m.update(members=[CHECKPOINT, CALIBRATION])),
                     "manifest.json members must be a JSON object, not a list"),
    "short_hash": (dict(edit=lambda m: m["members"].update({CHECKPOINT: "abc123"})),
                   "manifest.json sha256 of member 'ddpm.pt' must be 64 lower-case hex digits, got 'abc123'"),
    "number_hash": (dict(edit=lambda m: m["members"].update({CALIBRATION: 12})),
                    "sha256 of member 'calibration.h5' must be 64 lower-case hex digits, got 12"),
    "content_hash_not_hex": (dict(edit=lambda m: m.update(content_sha256="z" * 64), rehash=False),
                             "content_sha256 must be 64 lower-case hex digits"),
    "unknown_method": (dict(edit=lambda m: m["settings"]["inference"].update(method="bogus")),
                       "manifest.json settings: inference.method must be one of"),
    # format 2: settings by config section, the runtime an object of two strings
    "section_not_object": (dict(edit=lambda m: m["settings"].update(crf=3)),
                           "manifest.json settings.crf must be a JSON object (format 2 records settings by config "
                           "section), got 3"),
    "flat_resolution_in_format_2": (dict(edit=lambda m: m["settings"].update({"prepare.resolution": R})),
                                    "settings.prepare.resolution must be a JSON object (format 2"),
    "runtime_missing": (dict(edit=lambda m: m["settings"].pop("runtime")),
                        "manifest.json settings lack the runtime (['precision', 'device_type']) that format 2 records"),
    "runtime_not_object": (dict(edit=lambda m: m["settings"].update(runtime="bf16")),
                           "manifest.json settings.runtime must be a JSON object (format 2 records settings by config "
                           "section), got 'bf16'"),
    "runtime_not_strings": (dict(edit=lambda m: m["settings"]["runtime"].update(precision=16)),
                            "manifest.json settings.runtime must hold the strings ['precision', 'device_type']; "
                            "['precision'] missing or not a string"),
    "not_an_object": (dict(manifest_text=lambda m: json.dumps([m])),
                      "manifest.json is not a JSON object (holds a list)"),
}


@pytest.mark.parametrize("case", sorted(UNTRUSTED))
def test_an_untrusted_bundle_is_refused_naming_the_problem_and_nothing_is_written(run_files, tmp_path, case):
    """Every crafted bundle below passes the content hash (recomputed by the crafter) yet is refused by both
    readers, with the bundle's path and the problem in the message, before a single file is written."""
    checkpoint, calibration = run_files
    bundle = tmp_path / "bundle.zip"
    export_bundle(checkpoint, calibration, bundle, config=config())
    craft, problem = UNTRUSTED[case]
    evil = crafted(bundle, tmp_path / "evil.zip", **craft)
    parent = tmp_path / "unpack"
    parent.mkdir()
    for read in (lambda: load_bundle(evil, parent / "model", config()), lambda: read_manifest(evil)):
        with pytest.raises(BundleError) as err:
            read()
        assert str(err.value).startswith(f"{evil}: "), str(err.value)
        assert problem in str(err.value), str(err.value)
    assert list(parent.iterdir()) == []  # neither the unpack folder nor anything beside it
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "absolute.txt").exists()


def test_a_member_named_to_escape_the_unpack_folder_is_never_written(run_files, tmp_path):
    """Issue 25: '../escaped.txt', listed with its correct sha256 and a matching content hash, passed every
    check and was written beside the unpack folder."""
    checkpoint, calibration = run_files
    bundle = tmp_path / "bundle.zip"
    export_bundle(checkpoint, calibration, bundle, config=config())
    evil = crafted(bundle, tmp_path / "evil.zip", **UNTRUSTED["escape"][0])
    parent = tmp_path / "unpack"
    parent.mkdir()
    try:
        load_bundle(evil, parent / "model", config())
        refused = None
    except BundleError as err:
        refused = str(err)
    assert not (parent / "escaped.txt").exists()
    assert refused is not None and "unsafe member '../escaped.txt'" in refused
    assert list(parent.iterdir()) == []


def test_the_crafted_bundles_differ_from_a_good_one_only_in_the_named_problem(run_files, tmp_path):
    """The crafter itself keeps a good bundle good: without edits its copy unpacks."""
    checkpoint, calibration = run_files
    bundle = tmp_path / "bundle.zip"
    export_bundle(checkpoint, calibration, bundle, config=config())
    copy = crafted(bundle, tmp_path / "copy.zip")
    manifest = load_bundle(copy, tmp_path / "unpack" / "model", config())
    assert sorted(p.name for p in (tmp_path / "unpack").iterdir()) == ["model"]  # the staging folder is gone
    assert sorted(p.name for p in (tmp_path / "unpack" / "model").iterdir()) == [CALIBRATION, CHECKPOINT, MANIFEST]
    assert manifest["members"][CHECKPOINT] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
