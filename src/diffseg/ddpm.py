"""DDPM training of the class-conditional U-Net on lesion images (label 1) and their healthy twins (label 0)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from diffseg.atomic import atomic_path
from diffseg.augment import PairedAugment
from diffseg.data import labelled_counts, labelled_setting, load_split
from diffseg.imageio import InputError
from diffseg.runtime import device_generator, resolve_device, to_model_range
from diffseg.schedule import Schedule
from diffseg.seeding import image_noise
from diffseg.settings import TrainSettings
from diffseg.train import CheckpointError, RunFiles, Trainer, load_checkpoint, seeded
from diffseg.unet import ConditionalUNet, count_parameters

logger = logging.getLogger(__name__)

MODEL_DEFAULTS = dict(base_channels=64, channel_mult=[1, 2, 2, 3], num_res_blocks=2, attention_resolutions=[16],
                      num_heads=4, dropout=0.1, class_dropout=0.0, padding="zeros")
DIFFUSION_DEFAULTS = dict(T=1000, beta_start=1e-4, beta_end=0.02)
LESION, HEALTHY = 1, 0


def with_defaults(section: str, given: dict | None, defaults: dict) -> dict:
    """The config section completed with defaults; unknown keys are an error naming section.key."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown key(s) in config section {section!r}: {', '.join(unknown)}")
    return {**defaults, **given}


def build_model(model_cfg: dict, image_size: int) -> ConditionalUNet:
    """ConditionalUNet from the `model` config section (2 classes: healthy, lesion; + null when class_dropout > 0)."""
    cfg = with_defaults("model", model_cfg, MODEL_DEFAULTS)
    return ConditionalUNet(
        in_channels=3, num_classes=2, image_size=int(image_size),
        base_channels=cfg["base_channels"], channel_mult=tuple(cfg["channel_mult"]),
        num_res_blocks=cfg["num_res_blocks"], attention_resolutions=tuple(cfg["attention_resolutions"]),
        num_heads=cfg["num_heads"], dropout=cfg["dropout"], class_dropout=cfg["class_dropout"], padding=cfg["padding"],
    )


def epsilon_loss(
    model, x0: torch.Tensor, y: torch.Tensor, schedule: Schedule, generator: torch.Generator
) -> torch.Tensor:
    """Paper eq. 1: || eps_theta(sqrt(a_t) x0 + sqrt(1-a_t) eps, y, t) - eps ||^2, t ~ U{0..T-1}."""
    gen = device_generator(generator, x0.device)
    t = torch.randint(0, schedule.T, (x0.shape[0],), generator=gen, device=x0.device)
    noise = torch.empty_like(x0).normal_(generator=gen)  # keeps x0's memory format (channels_last)
    x_t = schedule.q_sample(x0, t, noise)
    return F.mse_loss(model(x_t, t, y).float(), noise.float())


@torch.no_grad()
def val_epsilon_loss(model, schedule: Schedule, images_uint8: np.ndarray, t: int, label: int, seed: int,
                     batch_images: int = 32) -> float:
    """Eq. 1's loss on held-out images at one timestep and label: the mean over images and pixels of
    (eps_theta(x_t, t, label) - eps)^2, with x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps.

    Each image's eps comes from (seed, its content) (diffseg.seeding), so the value depends neither on the
    images' order nor on ``batch_images``; a model that predicts zeros scores mean(eps^2), about 1. The
    model runs on the schedule's device.
    """
    images_uint8 = np.ascontiguousarray(images_uint8)  # a reversed view: torch takes no negative strides
    if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3 or images_uint8.dtype != np.uint8 or not len(images_uint8):
        raise ValueError(f"val_epsilon_loss: images must be a non-empty uint8 (N, H, W, 3) array, got "
                         f"{images_uint8.dtype} {images_uint8.shape}")
    if not 0 <= t < schedule.T:
        raise ValueError(f"val_epsilon_loss: t = {t} outside [0, {schedule.T})")
    device = schedule.device
    total = 0.0
    for start in range(0, len(images_uint8), batch_images):
        part = images_uint8[start:start + batch_images]
        x0 = to_model_range(part, device)
        eps = image_noise(part, seed, 1)[:, 0].to(device)
        steps = torch.full((len(part),), t, dtype=torch.long, device=device)
        labels = torch.full((len(part),), label, dtype=torch.long, device=device)
        predicted = model(schedule.q_sample(x0, steps, eps), steps, labels).float()
        total += (predicted - eps).square().mean(dim=(1, 2, 3)).double().sum().item()
    return total / len(images_uint8)


class PairSampler:
    """Batches of B/2 lesion images and their healthy twins, held on the device as uint8."""

    def __init__(self, lesion: np.ndarray, healthy: np.ndarray, batch_size: int, augment: PairedAugment | None,
                 class_dropout: float = 0.0, null_label: int | None = None):
        if batch_size % 2:
            raise ValueError(f"train.batch_size must be even (half lesion images, half twins), got {batch_size}")
        self.lesion = torch.from_numpy(np.ascontiguousarray(lesion)).permute(0, 3, 1, 2)  # (N, 3, R, R) uint8
        self.healthy = torch.from_numpy(np.ascontiguousarray(healthy)).permute(0, 3, 1, 2)
        self.half = batch_size // 2
        self.augment, self.class_dropout, self.null_label = augment, class_dropout, null_label
        self.memory_format = torch.contiguous_format

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format) -> "PairSampler":
        self.lesion, self.healthy = self.lesion.to(device), self.healthy.to(device)
        self.memory_format = memory_format
        return self

    def draw(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """B/2 lesion images and their own twins (uint8): one index for both."""
        idx = torch.randint(0, self.lesion.shape[0], (self.half,), generator=generator).to(self.lesion.device)
        return self.lesion.index_select(0, idx), self.healthy.index_select(0, idx)

    def __call__(self, step: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        lesion, healthy = (to_model_range(a, channels_last_input=False) for a in self.draw(generator))
        if self.augment is not None:
            lesion, healthy = self.augment(lesion, generator, healthy)
        x0 = torch.cat([lesion, healthy]).contiguous(memory_format=self.memory_format)
        y = torch.tensor([LESION] * self.half + [HEALTHY] * self.half)
        if self.class_dropout > 0:
            dropped = torch.rand(y.shape[0], generator=generator) < self.class_dropout
            y = torch.where(dropped, torch.full_like(y, self.null_label), y)
        return x0, y.to(x0.device)


class PoolSampler(PairSampler):
    """Batches of B/2 images of the lesion pool and B/2 twins of the healthy pool, drawn independently.

    Unlike PairSampler it drops no lesion image without a twin: with ``prepare.labelled`` the lesion class
    sees every train image, the healthy class the twins of the labelled ones (``train.twins_from``).
    """

    def draw(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        lesion = torch.randint(0, self.lesion.shape[0], (self.half,), generator=generator).to(self.lesion.device)
        healthy = torch.randint(0, self.healthy.shape[0], (self.half,), generator=generator).to(self.healthy.device)
        return self.lesion.index_select(0, lesion), self.healthy.index_select(0, healthy)


def load_pairs(dataset_h5: str | os.PathLike, twins_from: int | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(lesion images, healthy twins, paired) of the train split.

    Every mask read (no ``prepare.labelled``): the images with a twin and their twins, paired row by row
    (images without a twin left out). A labelled subset: every train image, and the twins of the labelled
    set of ``twins_from`` (the first K labelled images; None = every labelled one), not paired.
    """
    split = load_split(dataset_h5, "train")
    if "healthy" not in split:
        raise InputError(dataset_h5, "train split has no 'healthy' twins: rerun prepare_dataset")
    labelled = labelled_setting(dataset_h5)
    if labelled is None:
        if twins_from is not None:
            raise ValueError(f"train.twins_from = {twins_from} needs a labelled subset (prepare.labelled), but "
                             f"{dataset_h5} was prepared with every mask")
        keep = np.asarray(split["has_healthy"], dtype=bool)
        if not keep.any():
            raise InputError(dataset_h5, "no train image has a healthy twin (has_healthy is all false)")
        logger.info("%s: %d train pairs (%d images without a twin left out)", dataset_h5, keep.sum(), (~keep).sum())
        return split["images"][keep], split["healthy"][keep], True
    twins = twin_rows(split, labelled, twins_from, dataset_h5)
    logger.info("%s: %d train images under the lesion label, %d twins (of labelled ranks < %d) under the healthy "
                "label", dataset_h5, len(split["ids"]), len(twins), labelled_counts(twins_from or labelled)[0])
    return split["images"], split["healthy"][twins], False


def twin_rows(split: dict, labelled: int, twins_from: int | None, dataset_h5) -> np.ndarray:
    """Train rows whose twin the DDPM sees: a twin, and among the labelled train images of ``twins_from``."""
    if twins_from is not None and twins_from > labelled:
        raise ValueError(f"train.twins_from = {twins_from} must be at most prepare.labelled = {labelled} "
                         f"(the labelled images of {dataset_h5})")
    n_train = labelled_counts(twins_from if twins_from is not None else labelled)[0]
    rank = np.asarray(split["label_rank"])
    rows = np.flatnonzero(split["has_healthy"] & (rank >= 0) & (rank < n_train))
    if rows.size == 0:
        raise InputError(dataset_h5, f"none of the {n_train} labelled train images of train.twins_from = "
                         f"{twins_from} has a healthy twin")
    return rows


def write_loss_png(loss_png: str | os.PathLike, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    try:
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
        ax.set(xlabel="step", ylabel="epsilon MSE", yscale="log", title="DDPM training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(loss_png) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def train_ddpm(
    dataset_h5: str | os.PathLike,
    checkpoint: str | os.PathLike,
    metrics_csv: str | os.PathLike,
    loss_png: str | os.PathLike,
    *,
    model: dict | None = None,
    diffusion: dict | None = None,
    augment: dict | None = None,
    train: TrainSettings | None = None,
) -> dict:
    """Train the conditional DDPM; writes the checkpoint, the loss CSV and the loss PNG. Returns a summary.

    augment None or {} means PairedAugment's defaults (the config default); train None means the
    ``train`` section's defaults. The resume file is `<checkpoint>.resume.pt`, beside the declared output.
    """
    model_cfg = with_defaults("model", model, MODEL_DEFAULTS)
    diffusion_cfg = with_defaults("diffusion", diffusion, DIFFUSION_DEFAULTS)
    train = train if train is not None else TrainSettings()
    augment_cfg = dict(augment or {})
    lesion, healthy, paired = load_pairs(dataset_h5, train.twins_from)
    image_size = int(lesion.shape[1])
    with seeded(train.seed):  # the same initial weights in every run with this seed
        net = build_model(model_cfg, image_size)
    logger.info("conditional U-Net: %d parameters at %d px", count_parameters(net), image_size)
    sampler = (PairSampler if paired else PoolSampler)(lesion, healthy, train.batch_size, PairedAugment(**augment_cfg),
                                                       model_cfg["class_dropout"], net.null_label)
    train_cfg = asdict(train)
    if train.twins_from is None:  # a checkpoint of every mask records the train section as before the setting
        del train_cfg["twins_from"]
    config = {"model": model_cfg, "diffusion": diffusion_cfg, "train": train_cfg, "augment": augment_cfg,
              "image_size": image_size}
    schedule = Schedule.from_config(diffusion_cfg, resolve_device(train.device))

    def loss_fn(m, batch, generator):
        x0, y = batch
        return epsilon_loss(m, x0, y, schedule, generator)

    trainer = Trainer(net, loss_fn, sampler, train, RunFiles(checkpoint, metrics_csv, kind="ddpm", config=config))
    sampler.to(trainer.device, trainer.memory_format)
    summary = trainer.fit()
    write_loss_png(loss_png, trainer.rows)
    return {**summary, "pairs": int(lesion.shape[0]), "twins": int(healthy.shape[0]), "image_size": image_size,
            "parameters": count_parameters(net)}


def load_model(
    checkpoint: str | os.PathLike, device: str = "cpu", use_ema: bool = True
) -> tuple[ConditionalUNet, dict]:
    """(model in eval mode on `device`, the checkpoint's config) for inference; EMA weights by default."""
    ckpt = load_checkpoint(checkpoint, map_location="cpu", kind="ddpm")
    cfg = ckpt["config"]
    try:
        net = build_model(cfg["model"], cfg["image_size"])
        net.load_state_dict(ckpt["ema" if use_ema else "model"])
    except (KeyError, ValueError, RuntimeError) as err:
        problem = f"config and weights do not build a model ({type(err).__name__}: {err})"
        raise CheckpointError(checkpoint, problem) from err
    return net.to(resolve_device(device)).eval(), cfg
