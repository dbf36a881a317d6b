# Config validation (schema with defaults, then the checks a schema cannot express),
# paths and input functions shared by all rules.
import os

from snakemake.utils import validate


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
    n_outputs = len(cfg["inference"]["timesteps"])
    if cfg["crf"]["subset_size"] > n_outputs:
        _fail("crf.subset_size", cfg["crf"]["subset_size"],
              f"1 to len(inference.timesteps) = {n_outputs}")
    fractions = cfg["prepare"]["split_fractions"]
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        _fail("prepare.split_fractions", fractions, "fractions that sum to 1")
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


check_config(config)

R = config["results_dir"]
SHARDS = config["shards"]
ENV = "../envs/diffseg.yaml"
CALIBRATION = f"{R}/calibration/calibration.h5"
SPLITS = config["inference"]["splits"]
EVAL_SPLIT = config["evaluate"]["split"]
BASELINES = config["baselines"]["methods"]
TRAINED_BASELINES = [b for b in BASELINES if b != "otsu"]
# The GPU rules' resources, in one place (the SLURM profile adds only the partition and CPU count).
GPU_RESOURCES = {
    "train_ddpm": {"gpu": 1, "mem_mb": 32000, "runtime": 480},
    "train_baseline": {"gpu": 1, "mem_mb": 16000, "runtime": 120},
    "noise_difference": {"gpu": 1, "mem_mb": 16000, "runtime": 60},
}


wildcard_constraints:
    split="train|val|test",
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


def baseline_checkpoint(wildcards):
    """Otsu is training-free: it has no checkpoint."""
    if wildcards.baseline == "otsu":
        return []
    return f"{R}/models/baseline_{wildcards.baseline}.pt"


def final_targets():
    return [
        f"{R}/metrics/table.md",
        f"{R}/metrics/{EVAL_SPLIT}.csv",
        f"{R}/figures/summary.png",
        f"{R}/crf/{EVAL_SPLIT}_png",
    ]


# Bookkeeping rules run on the submit node under a cluster executor instead of queueing.
localrules:
    make_demo_data,
    gather_inference,
    gather_uncertainty,
    gather_crf,
    export_masks,
    evaluate,
