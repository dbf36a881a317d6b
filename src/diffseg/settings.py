"""The settings objects of the stages with many options, each built once from its validated config section.

Every field's default equals config/schema.yaml's (tests/test_defaults.py checks it). The module is a leaf
that imports only the standard library and the torch-free method registry (diffseg.methods, itself
standard library only): the workflow's config check (rules/common.smk) reads
``OUTPUT_DEFINING`` and ``BUNDLE_SECTIONS`` before any rule runs, without torch or numpy. Helpers that need
torch (e.g. the autocast dtype of ``precision`` on a device) live in diffseg.runtime.

``OUTPUT_DEFINING`` is the one list of the settings that define what a trained model bundle predicts:
rule export_bundle records them in the bundle's manifest, and a config that predicts with the bundle must
equal every one of them (diffseg.bundle.settings_mismatch names each difference; rules/common.smk refuses
such a config before any rule runs). ``RUNTIME_DEFINING`` are the two settings that the machine resolves
(``precision: auto``, ``device: auto``): they are recorded where they are resolved (the inference file,
then the calibration fitted on it) and compared where prediction's inference resolves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Sequence

from diffseg.methods import inference_method

DEFAULT_TIMESTEPS = tuple(range(60, 151, 10))
NORMALISE_METHODS = ("p99", "max", "none")
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}

# Settings that define a bundle's outputs: "section" = every key of that config section, "section.key" = one key.
OUTPUT_DEFINING = (
    "prepare.resolution", "model", "diffusion",
    "inference.method", "inference.timesteps", "inference.noise_draws", "inference.normalise",
    "inference.threshold", "inference.recon_steps", "inference.recon_compare", "inference.seed",
    "crf",  # kernels, rounds, subset size, iterations, threshold and the subset-sampling seed
)
# Resolved by the machine that runs inference (diffseg.runtime.resolved_runtime): the calibration was fitted
# on maps made with these, so prediction's inference must resolve to the same.
RUNTIME_DEFINING = ("precision", "device_type")
# Recorded in a bundle but free to differ in a predicting config: the fitted calibration.h5 is used as is.
RECORDED_ONLY = ("calibration",)


def sections_of(names: Sequence[str]) -> tuple[str, ...]:
    """The config sections of setting names ("section" or "section.key"), in first-seen order."""
    return tuple(dict.fromkeys(name.split(".")[0] for name in names))


# the config sections a bundle is built and checked from (the export and unpack rules' params)
BUNDLE_SECTIONS = (*sections_of(OUTPUT_DEFINING), *RECORDED_ONLY)


def check_threshold(threshold) -> None:
    """ValueError unless threshold is 'otsu' or a number in (0, 1) (the inference.threshold setting)."""
    if threshold == "otsu":
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise ValueError(f"inference.threshold must be a number in (0, 1) or 'otsu', got {threshold!r}")


class FromConfig:
    """``from_config(section)`` for the settings dataclasses: keys in IGNORED (those the rule passes another
    way) are skipped, any other unknown key is an error naming the section and the key."""

    SECTION: ClassVar[str]
    IGNORED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, section: dict | None, ignore: Sequence[str] | None = None):
        skipped = cls.IGNORED if ignore is None else tuple(ignore)
        given = {k: v for k, v in (section or {}).items() if k not in skipped}
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown key(s) in config section {cls.SECTION!r}: {', '.join(unknown)}")
        return cls(**given)


@dataclass(frozen=True)
class PrepareSettings(FromConfig):
    """The ``prepare`` section (rule prepare_dataset); checked by diffseg.data.prepare_dataset."""

    SECTION: ClassVar[str] = "prepare"

    resolution: int = 128
    dilate_px: int = 3
    inpaint: str = "texture"
    split_fractions: dict = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    split_seed: int = 0
    on_bad_file: str = "error"
    preview_n: int = 4
    limit: int | None = None
    labelled: int | None = None
    labelled_seed: int = 0


@dataclass(frozen=True)
class TrainSettings(FromConfig):
    """The ``train`` section (rule train_ddpm), and the optimisation settings the one Trainer runs with.

    The supervised U-Nets and the features head train with a TrainSettings built from their own section
    (diffseg.baselines.supervised_train_settings). ``batch_size`` is the sampler's, not the Trainer's.
    """

    SECTION: ClassVar[str] = "train"

    steps: int = 20000
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    precision: str = "auto"
    compile: bool = False
    channels_last: bool = True
    device: str = "auto"
    max_minutes: float | None = None
    twins_from: int | None = None

    def __post_init__(self):
        if self.steps < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError(f"train: steps, checkpoint_every and log_every must be >= 1, "
                             f"got {self.steps}, {self.checkpoint_every}, {self.log_every}")


@dataclass(frozen=True)
class HeadSettings(FromConfig):
    """The ``features`` section's head and training keys (rule train_feature_head).

    ``targets`` and ``teacher`` reach the head another way (the teacher_masks file, rule teacher_masks).
    """

    SECTION: ClassVar[str] = "features"
    IGNORED: ClassVar[tuple[str, ...]] = ("targets", "teacher")

    blocks: tuple | None = None
    use_features: bool = True
    use_difference: bool = True
    use_noise: bool = True
    head: str = "mlp"
    hidden: int = 64
    layers: int = 2
    steps: int = 400
    batch_size: int = 32
    lr: float = 0.001
    eval_every: int = 50
    patience: int = 4
    seed: int = 0
    input_cache_mb: float = 8000

    def __post_init__(self):
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))

    @property
    def switches(self) -> dict[str, bool]:
        """The three input switches, as diffseg.features.feature_inputs takes them."""
        return {"use_features": self.use_features, "use_difference": self.use_difference,
                "use_noise": self.use_noise}


@dataclass(frozen=True)
class BaselineSettings(FromConfig):
    """The ``baselines`` section (rules train_baseline and predict_baseline); ``methods`` picks the jobs."""

    SECTION: ClassVar[str] = "baselines"
    IGNORED: ClassVar[tuple[str, ...]] = ("methods",)

    base_channels: int = 32
    depth: int = 4
    steps: int = 4000
    batch_size: int = 32
    lr: float = 0.001
    eval_every: int = 200
    patience: int = 5
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    max_minutes: float | None = None


@dataclass(frozen=True)
class InferenceSettings(FromConfig):
    """The ``inference`` section (rule infer); ``splits`` is the rule's split wildcard."""

    SECTION: ClassVar[str] = "inference"
    IGNORED: ClassVar[tuple[str, ...]] = ("splits",)

    timesteps: tuple = DEFAULT_TIMESTEPS
    noise_draws: int = 1
    normalise: str = "p99"
    threshold: float | str = 0.5
    batch_images: int = 16
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    method: str = "paper"
    recon_steps: int = 5
    recon_compare: str = "c1"
    compile: bool = False

    def __post_init__(self):
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        if not self.timesteps:
            raise ValueError("inference.timesteps is empty: give at least one diffusion step")
        if self.noise_draws < 1:
            raise ValueError(f"inference.noise_draws must be >= 1, got {self.noise_draws}")
        if self.batch_images < 1:
            raise ValueError(f"inference.batch_images must be >= 1, got {self.batch_images}")
        if self.normalise not in NORMALISE_METHODS:
            raise ValueError(f"inference.normalise must be one of {NORMALISE_METHODS}, got {self.normalise!r}")
        check_threshold(self.threshold)
        inference_method(self.method)  # the registry (diffseg.methods) names the known methods
        if self.recon_steps < 1:
            raise ValueError(f"inference.recon_steps must be >= 1, got {self.recon_steps}")
        if self.recon_compare not in ("c1", "input"):
            raise ValueError(f"inference.recon_compare must be 'c1' or 'input', got {self.recon_compare!r}")


@dataclass(frozen=True)
class CRFSettings(FromConfig):
    """The ``crf`` section (rule crf_fusion)."""

    SECTION: ClassVar[str] = "crf"

    rounds: int = 3
    subset_size: int = 4
    iterations: int = 5
    gaussian_sxy: float = 3
    gaussian_compat: float = 3
    bilateral_sxy: float = 80
    bilateral_srgb: float = 13
    bilateral_compat: float = 10
    threshold: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"crf.rounds = {self.rounds} must be at least 1")
        if self.subset_size < 1:
            raise ValueError(f"crf.subset_size = {self.subset_size} must be at least 1")
