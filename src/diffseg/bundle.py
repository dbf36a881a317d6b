"""A trained model as one portable file: checkpoint, calibration, the settings they depend on, a hash.

The bundle is a zip archive (``diffseg_bundle.zip``) holding

| member | what |
|---|---|
| ``manifest.json`` | format version, diffseg version, ``settings`` (below), sha256 of every other member, ``content_sha256``, ``training_data`` |
| ``ddpm.pt`` | the DDPM checkpoint (EMA weights used for inference) |
| ``calibration.h5`` | the calibration fitted on the val split (diffseg.calibration) |
| optional members | any of ``OPTIONAL_MEMBERS`` the training run produced (e.g. a risk model), stored as bytes |

``settings`` are the settings the model's outputs depend on: every one of
diffseg.settings.OUTPUT_DEFINING (``prepare.resolution``, the ``model``, ``diffusion`` and ``crf``
sections, the inference settings the calibration was fitted on, ``inference.seed`` among them), the
``runtime`` the val inference resolved to (``precision``, ``device_type``: diffseg.settings.RUNTIME_DEFINING,
read from calibration.h5) and the ``calibration`` section. A config that predicts with the bundle must
agree on every OUTPUT_DEFINING setting (``settings_mismatch`` names every difference; the workflow's
config check refuses it before any rule runs); the runtime is compared where prediction's inference
resolves it (``check_runtime``); ``calibration`` may differ (the fitted file is used as is).
``content_sha256`` is the sha256 of the canonical JSON of the settings and the member hashes, so it
identifies the model independently of zip metadata.

This module stays torch-free (zipfile, json, hashlib): the workflow's config check reads a
bundle's manifest before any rule starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import zipfile
from pathlib import Path

import diffseg
from diffseg.atomic import atomic_path, file_sha256
from diffseg.imageio import InputError
from diffseg.methods import DEFAULT as DEFAULT_METHOD, METHODS, inference_method
from diffseg.settings import OUTPUT_DEFINING, RECORDED_ONLY, RUNTIME_DEFINING, sections_of

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: settings by section, with crf, inference.seed and the runtime
MANIFEST = "manifest.json"
CHECKPOINT = "ddpm.pt"
CALIBRATION = "calibration.h5"
REQUIRED_MEMBERS = (CHECKPOINT, CALIBRATION)
FEATURE_HEAD = "feature_head.pt"  # required too where inference.method is "features"
# Model artefacts of other stages (risk model, features head); packed when the training run made them.
OPTIONAL_MEMBERS = {
    "risk.json": "per-image risk model fitted on the val split (calibration/risk.json)",
    FEATURE_HEAD: "features head checkpoint (models/feature_head.pt)",
}
# The OUTPUT_DEFINING settings a DDPM checkpoint fixes: export refuses a checkpoint trained with others.
CHECKPOINT_DEFINED = ("prepare.resolution", "model", "diffusion")
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed member dates: the same content gives the same file
_ABSENT = object()  # a setting one side does not record


class BundleError(InputError):
    """A bundle that cannot be used here; the message starts with its path."""


def required_members(settings: dict) -> tuple[str, ...]:
    """The members a bundle with these settings cannot predict without: DDPM, calibration and the trained files
    of its inference method (diffseg.methods; features: the head)."""
    method = inference_method((settings.get("inference") or {}).get("method", DEFAULT_METHOD))
    return (*REQUIRED_MEMBERS, *method.bundle_members)


# ----------------------------------------------------------------------------- settings


def select_settings(config: dict, names: tuple[str, ...]) -> dict:
    """``{section: {key: value}}`` of the named settings ("section" = all of it, "section.key") of a config."""
    out: dict = {}
    for name in names:
        section, _, key = name.partition(".")
        if section not in config or (key and key not in config[section]):
            raise ValueError(f"the config has no {name!r}: pass the validated config with the sections "
                             f"{list(sections_of(names))}")
        out.setdefault(section, {}).update({key: config[section][key]} if key else config[section])
    return out


def bundle_settings(config: dict) -> dict:
    """The config settings a bundle records, from a full (validated, defaults filled) workflow config."""
    return select_settings(config, OUTPUT_DEFINING + RECORDED_ONLY)


def _flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        out = {}
        for key in sorted(value):
            out.update(_flatten(f"{prefix}.{key}", value[key]))
        return out
    return {prefix: value}


def _flat_settings(settings: dict, names: tuple[str, ...]) -> dict:
    """``{"section.key": value}`` of the named settings present, nested dicts flattened (lists stay values)."""
    out = {}
    for name in names:
        section, _, key = name.partition(".")
        if name in settings:  # a whole section, or a dotted name as format 1 recorded prepare.resolution
            value = settings[name]
        elif key and key in (settings.get(section) or {}):
            value = settings[section][key]
        else:
            continue
        out.update(_flatten(name, _canonical(value)))
    return out


def _shown(values: dict, key: str) -> str:
    return repr(values[key]) if key in values else "(absent)"


def settings_mismatch(bundle: dict, config: dict, names: tuple[str, ...] = OUTPUT_DEFINING) -> list[str]:
    """'key: bundle X, config Y' for every setting of ``names`` where a bundle's and a config's settings differ."""
    theirs, ours = _flat_settings(bundle, names), _flat_settings(config, names)
    return [f"{key}: bundle {_shown(theirs, key)}, config {_shown(ours, key)}"
            for key in sorted(set(theirs) | set(ours)) if theirs.get(key, _ABSENT) != ours.get(key, _ABSENT)]


def _canonical(value):
    """JSON round trip: tuples become lists, 1.0 and 1 stay distinct only where JSON keeps them."""
    return json.loads(json.dumps(value))


def check_settings(bundle_path: str | os.PathLike, bundle: dict, config: dict) -> None:
    """Refuse a bundle whose output-defining settings differ from the config's, naming every difference."""
    differences = settings_mismatch(bundle, bundle_settings(config))
    if differences:
        older = any("bundle (absent)" in d for d in differences)
        raise BundleError(bundle_path, "the model bundle does not match the config (" + "; ".join(differences)
                          + "). Predict with the config the bundle was trained with"
                          + ("; a bundle exported by an older diffseg lacks some of these settings: re-export it "
                             "(rule export_bundle)." if older else "."))


def runtime_mismatch(bundle: dict, runtime: dict) -> list[str]:
    """'key: bundle X, this machine Y' for every RUNTIME_DEFINING value a bundle's settings and a resolved
    runtime (diffseg.runtime.resolved_runtime) disagree on."""
    recorded = bundle.get("runtime") or {}
    return [f"{key}: bundle {_shown(recorded, key)}, this machine {runtime.get(key)!r}"
            for key in RUNTIME_DEFINING if recorded.get(key) != runtime.get(key)]


def check_runtime(manifest_json: str | os.PathLike, runtime: dict) -> None:
    """Refuse to predict where inference resolves to another precision or device type than the bundle's
    calibration was fitted on (``manifest_json``: the unpacked bundle's manifest, rule unpack_bundle)."""
    try:
        settings = json.loads(Path(manifest_json).read_text())["settings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise BundleError(manifest_json, f"cannot read the bundle's settings ({type(err).__name__}: {err})") from err
    differences = runtime_mismatch(settings, runtime)
    if differences:
        raise BundleError(manifest_json, "prediction's inference runs with another precision or device type than "
                          "the bundle's calibration was fitted on (" + "; ".join(differences) + "): set "
                          "inference.precision and inference.device so that they resolve to the bundle's, or "
                          "predict on a machine like the one that trained it")


def calibration_runtime(calibration_h5: str | os.PathLike) -> dict:
    """The runtime (RUNTIME_DEFINING) recorded in calibration.h5: what the val inference resolved to."""
    from diffseg.h5io import open_h5  # h5py: only the export needs it

    with open_h5(calibration_h5) as f:
        missing = [key for key in RUNTIME_DEFINING if key not in f.attrs]
        if missing:
            raise InputError(calibration_h5, f"no attribute(s) {missing}: fitted on an inference file of an "
                             "older diffseg; rerun the val inference and the calibration with this one")
        return {key: str(f.attrs[key]) for key in RUNTIME_DEFINING}


# ----------------------------------------------------------------------------- hashing


def content_sha256(settings: dict, members: dict[str, str]) -> str:
    """sha256 of the canonical JSON of the settings and the member hashes."""
    blob = json.dumps({"settings": settings, "members": members}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------- writing


def write_bundle(out_zip: str | os.PathLike, checkpoint: str | os.PathLike, calibration_h5: str | os.PathLike,
                 settings: dict, optional: dict[str, str | os.PathLike] | None = None,
                 training_data: str = "") -> dict:
    """Write the bundle; ``optional`` maps OPTIONAL_MEMBERS names to files (absent files are left out);
    ``training_data`` says what the model was trained on (shown beside its predictions). Returns the manifest.
    """
    files = {CHECKPOINT: Path(checkpoint), CALIBRATION: Path(calibration_h5)}
    for name, path in (optional or {}).items():
        if name not in OPTIONAL_MEMBERS:
            raise ValueError(f"unknown optional bundle member {name!r}; known: {sorted(OPTIONAL_MEMBERS)}")
        if Path(path).is_file():
            files[name] = Path(path)
    for name in required_members(settings):
        files.setdefault(name, Path((optional or {}).get(name, name)))
    for name, path in files.items():
        if not path.is_file():
            raise InputError(path, f"file not found (bundle member {name})")
    members = {name: file_sha256(path) for name, path in files.items()}
    settings = _canonical(settings)
    manifest = {"format_version": FORMAT_VERSION, "diffseg_version": diffseg.__version__, "settings": settings,
                "members": members, "content_sha256": content_sha256(settings, members),
                "optional_members": sorted(set(files) - set(REQUIRED_MEMBERS)), "training_data": training_data}
    with atomic_path(out_zip) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(zipfile.ZipInfo(MANIFEST, _ZIP_DATE), json.dumps(manifest, indent=2, sort_keys=True))
        for name, path in files.items():
            info = zipfile.ZipInfo(name, _ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(path, "rb") as src, zf.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    logger.info("model bundle %s: content sha256 %s, members %s", out_zip, manifest["content_sha256"],
                sorted(files))
    return manifest


def export_bundle(checkpoint: str | os.PathLike, calibration_h5: str | os.PathLike, out_zip: str | os.PathLike, *,
                  config: dict, optional: dict[str, str | os.PathLike] | None = None,
                  training_data: str = "") -> dict:
    """Bundle a training run (rule export_bundle), after checking the checkpoint was trained with ``config``."""
    from diffseg.train import load_checkpoint  # torch: only the export needs it

    settings = {**bundle_settings(config), "runtime": calibration_runtime(calibration_h5)}
    saved = load_checkpoint(checkpoint, kind="ddpm")["config"]
    trained = {"prepare": {"resolution": saved["image_size"]}, "model": saved["model"],
               "diffusion": saved["diffusion"]}
    differences = settings_mismatch(trained, settings, CHECKPOINT_DEFINED)
    if differences:
        raise BundleError(checkpoint, "the checkpoint was not trained with this config (" + "; ".join(differences)
                          + ")")
    return write_bundle(out_zip, checkpoint, calibration_h5, settings, optional, training_data)


# ----------------------------------------------------------------------------- reading


def optional_member(bundle_path: str | os.PathLike, name: str) -> bytes | None:
    """The bytes of an optional member (e.g. 'risk.json'), hash-checked; None when the bundle has none."""
    if name not in OPTIONAL_MEMBERS:
        raise ValueError(f"unknown optional bundle member {name!r}; known: {sorted(OPTIONAL_MEMBERS)}")
    manifest = read_manifest(bundle_path)
    if name not in manifest["members"]:
        return None
    with _open(bundle_path) as zf:
        data = zf.read(name)
    if hashlib.sha256(data).hexdigest() != manifest["members"][name]:
        raise BundleError(bundle_path, f"member {name} is corrupt (sha256 differs from the manifest)")
    return data


def _open(bundle_path: str | os.PathLike) -> zipfile.ZipFile:
    """The bundle's zip archive, its directory checked (check_directory) before any member is read."""
    path = Path(bundle_path)
    if not path.is_file():
        raise BundleError(path, "model bundle not found")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise BundleError(path, f"not a model bundle (not a readable zip archive: {err})") from err
    try:
        check_directory(path, zf)
    except BundleError:
        zf.close()
        raise
    return zf


def _member_sha256(zf: zipfile.ZipFile, name: str) -> str | None:
    """sha256 of one member's bytes; None where the archive cannot deliver them (CRC error, truncation)."""
    digest = hashlib.sha256()
    try:
        with zf.open(name) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except (zipfile.BadZipFile, OSError, EOFError):
        return None
    return digest.hexdigest()


def read_manifest(bundle_path: str | os.PathLike) -> dict:
    """The bundle's manifest, checked for the keys, types and members it must have (no hashing)."""
    with _open(bundle_path) as zf:
        if MANIFEST not in zf.namelist():
            raise BundleError(bundle_path, f"not a model bundle (no {MANIFEST})")
        try:
            raw = zf.read(MANIFEST)
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise BundleError(bundle_path, f"{MANIFEST} cannot be read from the archive ({err})") from err
        names = set(zf.namelist())
    manifest = parse_manifest(bundle_path, raw)
    check_manifest_fields(bundle_path, manifest)
    try:
        required = required_members(manifest["settings"])
    except ValueError as err:  # e.g. an inference.method this diffseg does not know
        raise BundleError(bundle_path, f"{MANIFEST} settings: {err}") from err
    listed = (*required, *manifest["members"], *manifest.get("optional_members", []))
    absent = sorted({m for m in listed if m not in names or m not in manifest["members"]})
    if absent:
        raise BundleError(bundle_path, f"incomplete bundle: member(s) {absent} "
                          "missing")
    unlisted = sorted(names - set(manifest["members"]) - {MANIFEST})
    if unlisted:
        raise BundleError(bundle_path, f"member(s) {unlisted} are not listed in {MANIFEST} (their content cannot be "
                          "checked): refused")
    return manifest


def load_bundle(bundle_path: str | os.PathLike, out_dir: str | os.PathLike, config: dict) -> dict:
    """Check a bundle against ``config``, verify every member's hash and extract the members into out_dir.

    Returns the manifest. Every check (names, manifest, settings, hashes) passes before anything is
    written; the members then go to a temporary folder beside out_dir and are renamed into it, so a
    failure leaves nothing in out_dir.
    """
    manifest = read_manifest(bundle_path)
    check_settings(bundle_path, manifest["settings"], config)
    if content_sha256(manifest["settings"], manifest["members"]) != manifest["content_sha256"]:
        raise BundleError(bundle_path, f"{MANIFEST} was altered: its content hash does not match")
    with _open(bundle_path) as zf:
        for name, expected in manifest["members"].items():  # verify everything before writing anything
            if _member_sha256(zf, name) != expected:
                raise BundleError(bundle_path, f"member {name} is corrupt (sha256 differs from the manifest)")
    unpack_members(bundle_path, manifest, Path(out_dir))
    logger.info("model bundle %s (content sha256 %s) checked and unpacked into %s", bundle_path,
                manifest["content_sha256"], out_dir)
    return manifest


# ----------------------------------------------------------------------------- an untrusted archive
# A bundle may come from anywhere: every name it holds is one of the plain file names below (so no
# member can be written outside the unpack folder), and the manifest is checked for repeated keys and
# for the type of every field before any of it is used.

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MANIFEST_TYPES = {"settings": dict, "members": dict, "diffseg_version": str, "training_data": str,
                   "optional_members": list}
_JSON_NAMES = {dict: "object", list: "array", str: "string"}


def known_members() -> frozenset[str]:
    """Every member name a bundle may hold (every method's trained files too): plain file names, no paths."""
    methods = {name for method in METHODS.values() for name in method.bundle_members}
    return frozenset({MANIFEST, *REQUIRED_MEMBERS, *OPTIONAL_MEMBERS, *methods})


def check_member_name(bundle_path: str | os.PathLike, name, where: str) -> None:
    """Refuse a member name that is not a known plain file name (a path could point outside the unpack folder)."""
    if isinstance(name, str) and name in known_members():
        return
    if isinstance(name, str) and ("/" in name or "\\" in name or ".." in name or os.path.isabs(name)):
        raise BundleError(bundle_path, f"{where} names an unsafe member {name!r} (a path, not a plain file name; "
                          "it could be written outside the unpack folder): refused, nothing unpacked")
    raise BundleError(bundle_path, f"{where} names an unknown member {name!r}; a bundle holds only "
                      f"{sorted(known_members())}")


def check_directory(bundle_path: str | os.PathLike, zf: zipfile.ZipFile) -> None:
    """Refuse a zip directory that lists a name twice, an unknown or unsafe name, or an entry that is not a file."""
    seen: set[str] = set()
    for info in zf.infolist():
        name = info.filename
        if name in seen:
            raise BundleError(bundle_path, f"the zip directory lists member {name!r} twice (which copy is meant?)")
        seen.add(name)
        kind = stat.S_IFMT(info.external_attr >> 16)  # the Unix file type zip tools record; 0 = not recorded
        if info.is_dir() or kind == stat.S_IFDIR:
            raise BundleError(bundle_path, f"member {name!r} is a directory, not a file")
        if kind not in (0, stat.S_IFREG):
            raise BundleError(bundle_path, f"member {name!r} is not a plain file (a link or special file)")
        check_member_name(bundle_path, name, "the zip directory")


class _RepeatedKey(ValueError):
    pass


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a key given twice would let two readers see two different manifests."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise _RepeatedKey(f"repeats the key(s) {repeated}")
    return dict(pairs)


def parse_manifest(bundle_path: str | os.PathLike, raw: bytes) -> dict:
    """The manifest's JSON object; invalid JSON, a repeated key or another JSON type is a BundleError."""
    try:
        manifest = json.loads(raw, object_pairs_hook=_refuse_repeated_keys)
    except _RepeatedKey as err:
        raise BundleError(bundle_path, f"{MANIFEST} {err} (which value is meant?)") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(bundle_path, f"{MANIFEST} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise BundleError(bundle_path, f"{MANIFEST} is not a JSON object (holds a {type(manifest).__name__})")
    return manifest


def _is_sha256(value) -> bool:
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def check_manifest_fields(bundle_path: str | os.PathLike, manifest: dict) -> None:
    """Refuse a manifest that lacks a key or holds a field of the wrong type (each named with the problem)."""
    missing = [k for k in ("format_version", "settings", "members", "content_sha256") if k not in manifest]
    if missing:
        raise BundleError(bundle_path, f"{MANIFEST} lacks {missing}")
    version = manifest["format_version"]
    if type(version) is not int or version < 1:  # type(): True is an int to isinstance
        raise BundleError(bundle_path, f"{MANIFEST} format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(bundle_path, f"bundle format {version} is newer than this diffseg "
                          f"({diffseg.__version__}) reads (format {FORMAT_VERSION}): update diffseg")
    for key, kind in _MANIFEST_TYPES.items():
        if key in manifest and not isinstance(manifest[key], kind):
            raise BundleError(bundle_path, f"{MANIFEST} {key} must be a JSON {_JSON_NAMES[kind]}, not a "
                              f"{type(manifest[key]).__name__}")
    check_settings_fields(bundle_path, manifest["settings"], version)
    if not _is_sha256(manifest["content_sha256"]):
        raise BundleError(bundle_path, f"{MANIFEST} content_sha256 must be 64 lower-case hex digits, got "
                          f"{manifest['content_sha256']!r}")
    for name, digest in manifest["members"].items():
        check_member_name(bundle_path, name, f"{MANIFEST} members")
        if name == MANIFEST:
            raise BundleError(bundle_path, f"{MANIFEST} members lists the manifest itself")
        if not _is_sha256(digest):
            raise BundleError(bundle_path, f"{MANIFEST} sha256 of member {name!r} must be 64 lower-case hex "
                              f"digits, got {digest!r}")
    for name in manifest.get("optional_members", []):
        check_member_name(bundle_path, name, f"{MANIFEST} optional_members")


def check_settings_fields(bundle_path: str | os.PathLike, settings: dict, version: int) -> None:
    """Refuse settings of the wrong layout: from format 2 one JSON object per config section with the
    ``runtime`` an object of RUNTIME_DEFINING strings; format 1 had ``prepare.resolution`` as a flat key."""
    sections = [key for key in settings if version >= 2 or key != "prepare.resolution"]
    for section in sections:
        if not isinstance(settings[section], dict):
            raise BundleError(bundle_path, f"{MANIFEST} settings.{section} must be a JSON object (format {version} "
                              f"records settings by config section), got {settings[section]!r}")
    if version < 2 and "runtime" not in settings:
        return  # format 1 recorded no runtime; check_runtime refuses such a bundle where it predicts
    runtime = settings.get("runtime")
    if runtime is None:
        raise BundleError(bundle_path, f"{MANIFEST} settings lack the runtime ({list(RUNTIME_DEFINING)}) that "
                          f"format {version} records")
    wrong = [key for key in RUNTIME_DEFINING if not isinstance(runtime.get(key), str)]
    if wrong:
        raise BundleError(bundle_path, f"{MANIFEST} settings.runtime must hold the strings {list(RUNTIME_DEFINING)}; "
                          f"{wrong} missing or not a string")


def unpack_members(bundle_path: str | os.PathLike, manifest: dict, out_dir: Path) -> None:
    """Copy the (checked) members and the manifest into a temporary folder beside out_dir, then rename them in."""
    staging = out_dir.with_name(f".{out_dir.name}.unpack-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with _open(bundle_path) as zf:
            for name in manifest["members"]:
                with zf.open(name) as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (*manifest["members"], MANIFEST):  # the manifest last: it marks a complete unpack
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
