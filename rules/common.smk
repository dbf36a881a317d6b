# Config validation (schema with defaults, then the checks a schema cannot express),
# paths and input functions shared by all rules.
import os

from snakemake.utils import validate

from diffseg.methods import FEATURE_HEAD as HEAD_ARTEFACT, inference_method  # torch-free registry
from diffseg.settings import BUNDLE_SECTIONS  # torch-free: the sections a model bundle records and checks


validate(config, schema="../config/schema.yaml")


class ConfigError(ValueError):
    pass


def _fail(key, value, allowed):
    raise ConfigError(
        f"Invalid config value {key} = {value!r}: allowed {allowed}. "
        "See config/schema.yaml for every key and its allowed values."
    )


def check_config(cfg):
    """Cross-key checks that a JSON schema cannot express; fail before any rule runs."""
    T = cfg["diffusion"]["T"]
    for t in cfg["inference"]["timesteps"]:
        if t >= T:
            _fail("inference.timesteps", t, f"integers in [0, diffusion.T) = [0, {T})")
    for t in cfg["features"]["teacher"]["timesteps"]:
        if t >= T:
            _fail("features.teacher.timesteps", t, f"integers in [0, diffusion.T) = [0, {T})")
    n_outputs = len(cfg["inference"]["timesteps"])
    if cfg["crf"]["subset_size"] > n_outputs:
        _fail("crf.subset_size", cfg["crf"]["subset_size"],
              f"1 to len(inference.timesteps) = {n_outputs}")
    fractions = cfg["prepare"]["split_fractions"]
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        _fail("prepare.split_fractions", fractions, "fractions that sum to 1")
    labelled, twins_from = cfg["prepare"]["labelled"], cfg["train"]["twins_from"]
    if twins_from is not None and (labelled is None or twins_from > labelled):
        _fail("train.twins_from", twins_from, "null, or at most prepare.labelled = "
              f"{labelled} (the healthy class sees the twins of the first K labelled images; "
              "it needs prepare.labelled set)")
    if cfg["diffusion"]["beta_start"] > cfg["diffusion"]["beta_end"]:
        _fail("diffusion.beta_start", cfg["diffusion"]["beta_start"],
              f"a value <= diffusion.beta_end = {cfg['diffusion']['beta_end']}")
    if cfg["data_dir"] is not None and not os.path.isdir(cfg["data_dir"]):
        _fail("data_dir", cfg["data_dir"], "an existing folder (ISIC 2018 layout or images/ + masks/), "
              "or null for the synthetic demo data")
    for split in ("val", cfg["evaluate"]["split"]):
        if split not in cfg["inference"]["splits"]:
            _fail("inference.splits", cfg["inference"]["splits"],
                  f"a list that includes '{split}' (needed for calibration and the table)")
    check_predict(cfg["predict"], cfg)


def check_predict(predict, cfg):
    """The prediction folders must exist; a given bundle must exist and match the config in every
    output-defining setting (diffseg.settings.OUTPUT_DEFINING; the runtime is checked by the inference)."""
    if predict["images"] is not None and not os.path.isdir(predict["images"]):
        _fail("predict.images", predict["images"], "an existing folder of JPEG/PNG/BMP images, or null")
    if predict["masks"] is not None and (predict["images"] is None or not os.path.isdir(predict["masks"])):
        _fail("predict.masks", predict["masks"], "an existing folder of masks of the predict.images images "
              "(<id>_segmentation.png or <id>.png), with predict.images set; or null")
    if predict["bundle"] is not None:
        if not os.path.isfile(predict["bundle"]):
            _fail("predict.bundle", predict["bundle"], "an existing model bundle file (rule export_bundle "
                  "writes one: results_dir/models/diffseg_bundle.zip), or null for this results_dir's own")
        from diffseg.bundle import check_settings, read_manifest  # torch-free: reads the manifest only

        check_settings(predict["bundle"], read_manifest(predict["bundle"])["settings"], cfg)


check_config(config)

R = config["results_dir"]
PREDICT = "predict"  # the split name of images without masks (diffseg.data.PREDICT)
P = f"{R}/predict"
PREDICT_IMAGES = f"{P}/images.h5"
BUNDLE = f"{R}/models/diffseg_bundle.zip"
PREDICT_BUNDLE = config["predict"]["bundle"] or BUNDLE
BUNDLE_CONFIG = {section: config[section] for section in BUNDLE_SECTIONS}  # what export and unpack check
PREDICT_MODEL = {"checkpoint": f"{P}/model/ddpm.pt", "calibration": f"{P}/model/calibration.h5",
                 "manifest": f"{P}/model/manifest.json"}
# Model artefacts that other rules save beside the calibration register here (bundle member name ->
# path, names from diffseg.bundle.OPTIONAL_MEMBERS); rule export_bundle then waits for them and packs them.
DATA_NOTE = "synthetic demo data" if config["data_dir"] is None else ""
SHARDS = config["shards"]
ENV = "../envs/diffseg.yaml"
CALIBRATION = f"{R}/calibration/calibration.h5"
RISK_MODEL = f"{R}/calibration/risk.json"
BUNDLE_OPTIONAL = {"risk.json": RISK_MODEL}
SPLITS = config["inference"]["splits"]
EVAL_SPLIT = config["evaluate"]["split"]
BASELINES = config["baselines"]["methods"]
TRAINED_BASELINES = [b for b in BASELINES if b != "otsu"]
# The GPU rules' resources, in one place (the SLURM profile adds only the partition and CPU count).
GPU_RESOURCES = {
    "train_ddpm": {"gpu": 1, "mem_mb": 32000, "runtime": 480},
    "train_baseline": {"gpu": 1, "mem_mb": 16000, "runtime": 120},
    "infer": {"gpu": 1, "mem_mb": 16000, "runtime": 60},
    "teacher_masks": {"gpu": 1, "mem_mb": 16000, "runtime": 60},
    "train_feature_head": {"gpu": 1, "mem_mb": 16000, "runtime": 60},  # holds the train split's inputs in memory
}


wildcard_constraints:
    split="train|val|test|predict",
    shard=r"\d+",
    baseline="|".join(["otsu", "unet", "attention_unet"]),


def data_dir():
    """The user's data folder, or the synthetic demo data made by rule make_demo_data."""
    return config["data_dir"] if config["data_dir"] is not None else f"{R}/demo_data"


def shard_file(stage, split, shard, ext="h5"):
    return f"{R}/{stage}/{split}/shard-{shard}-of-{SHARDS}.{ext}"


def all_shards(stage, ext="h5"):
    """Input function: every shard file of one stage for the split wildcard."""

    def inputs(wildcards):
        return [shard_file(stage, wildcards.split, k, ext) for k in range(SHARDS)]

    return inputs


def without(section, *keys):
    """A config section minus the keys the rule passes differently (e.g. the split list)."""
    return {k: v for k, v in config[section].items() if k not in keys}


def split_dataset(wildcards):
    """The images of a split: the prepared dataset, or the images to predict on (no masks)."""
    return PREDICT_IMAGES if wildcards.split == PREDICT else f"{R}/data/dataset.h5"


def split_checkpoint(wildcards):
    """The DDPM of a split: this run's, or for prediction the one unpacked from the model bundle."""
    return PREDICT_MODEL["checkpoint"] if wildcards.split == PREDICT else f"{R}/models/ddpm.pt"


def split_calibration(wildcards):
    return PREDICT_MODEL["calibration"] if wildcards.split == PREDICT else CALIBRATION


def split_manifest(wildcards):
    """For prediction, the unpacked bundle's manifest: its inference must resolve to the recorded runtime."""
    return PREDICT_MODEL["manifest"] if wildcards.split == PREDICT else []


def baseline_checkpoint(wildcards):
    """Otsu is training-free: it has no checkpoint."""
    if wildcards.baseline == "otsu":
        return []
    return f"{R}/models/baseline_{wildcards.baseline}.pt"


PREDICT_OUTPUTS = [f"{P}/masks", f"{P}/maps", f"{P}/review_queue.csv", f"{P}/contact_sheet.png"]
if config["predict"]["masks"] is not None:
    PREDICT_OUTPUTS += [f"{P}/metrics.csv", f"{P}/table.md"]  # rule score_predictions


# The inference method's entry in diffseg.methods: the trained files its maps read besides the DDPM
# (features: the head of rule train_feature_head) are inputs of rule infer, members of the model bundle
# and, for prediction, unpacked from it by rule unpack_bundle.
METHOD = inference_method(config["inference"]["method"])
FEATURE_HEAD = f"{R}/{HEAD_ARTEFACT.path}"
TEACHER_MASKS = f"{R}/features/teacher_masks.h5"
for artefact in METHOD.artefacts:
    BUNDLE_OPTIONAL[artefact.member] = f"{R}/{artefact.path}"
    PREDICT_MODEL[artefact.name] = f"{P}/model/{artefact.member}"


def method_artefacts(wildcards):
    """This run's trained files of the method, or for split predict the bundle's, as named inputs of rule infer."""
    if wildcards.split == PREDICT:
        return {a.name: PREDICT_MODEL[a.name] for a in METHOD.artefacts}
    return {a.name: f"{R}/{a.path}" for a in METHOD.artefacts}


def head_targets(wildcards):
    """DiffSeg's own train masks when the head learns from them (features.targets diffseg)."""
    return TEACHER_MASKS if config["features"]["targets"] == "diffseg" else []


def final_targets():
    """With predict.images set: the predictions only (the bundle's training runs only if it is this run's)."""
    if config["predict"]["images"] is not None:
        return PREDICT_OUTPUTS
    return [
        f"{R}/metrics/table.md",
        f"{R}/metrics/{EVAL_SPLIT}.csv",
        f"{R}/figures/summary.png",
        f"{R}/figures/risk_coverage.png",
        f"{R}/figures/reliability.png",
        f"{R}/crf/{EVAL_SPLIT}_png",
        BUNDLE,
    ]


# Bookkeeping rules run on the submit node under a cluster executor instead of queueing.
localrules:
    make_demo_data,
    gather_inference,
    gather_uncertainty,
    gather_crf,
    export_masks,
    fit_risk,
    evaluate,
    export_bundle,
    unpack_bundle,
    predict_outputs,
    score_predictions,
    risk_figures,
