"""Baselines on the same split as DiffSeg: Otsu thresholding, supervised U-Net and Attention U-Net.

Otsu is training-free; its colour channel is chosen on the val split (never on the split being
predicted). The U-Nets are trained by the one trainer (diffseg.train.Trainer) with Dice + BCE and
early stopping on the val split's Dice; their checkpoints have kind "baseline".
Prediction files (`results/baselines/{name}/{split}.h5`): `ids` (N,) UTF-8, `masks` (N, R, R)
uint8 0/1, attributes `method`, `split`, `diffseg_version` and, for Otsu, `channel`,
`channel_chosen_on` and `channel_scores` (JSON), for the U-Nets `checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from diffseg import __version__
from diffseg.atomic import atomic_path
from diffseg.augment import PairedAugment
from diffseg.data import load_split
from diffseg.metrics import mask_metrics
from diffseg.postprocess import OTSU_CHANNELS, otsu_segment
from diffseg.runtime import resolve_device, resolve_dtype, to_model_range
from diffseg.settings import BaselineSettings, TrainSettings
from diffseg.train import CheckpointError, EarlyStopping, RunFiles, Trainer, load_checkpoint, seeded
from diffseg.unet import SegUNet, count_parameters

logger = logging.getLogger(__name__)

METHODS = ("otsu", "unet", "attention_unet")
UNET_ATTENTION = {"unet": False, "attention_unet": True}
CHECKPOINT_KIND = "baseline"
PREDICT_BATCH = 64


def check_name(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"baselines.methods: unknown baseline {name!r}; allowed values are {', '.join(METHODS)}")
    return name


# ----------------------------------------------------------------------------- Otsu


def mean_dice(pred_masks: np.ndarray, truth_masks: np.ndarray) -> float:
    return float(np.mean([mask_metrics(p, t)["dice"] for p, t in zip(pred_masks, truth_masks)]))


def otsu_channel_scores(images: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Mean Dice of otsu_segment on each channel, over (N, H, W, 3) images and (N, H, W) masks."""
    if len(images) == 0 or len(images) != len(masks):
        raise ValueError(f"otsu_channel_scores: need as many masks as images (> 0), got {len(images)} and {len(masks)}")
    return {c: mean_dice([otsu_segment(im, c) for im in images], masks) for c in OTSU_CHANNELS}


# ----------------------------------------------------------------------------- U-Net training


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + (1 - soft Dice over the batch); computed in fp32 whatever the autocast dtype."""
    logits, target = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    dice = (2 * (prob * target).sum() + 1.0) / (prob.sum() + target.sum() + 1.0)
    return bce + (1.0 - dice)


class MaskSampler:
    """Random batches of (image, mask) from the train split, held on the device as uint8, paired augmentation."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, batch_size: int, augment: PairedAugment | None):
        if batch_size < 1:
            raise ValueError(f"baselines.batch_size must be >= 1, got {batch_size}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.masks = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))
        self.batch_size, self.augment = batch_size, augment
        self.memory_format = torch.contiguous_format

    def to(self, device: torch.device, memory_format: torch.memory_format) -> "MaskSampler":
        self.images, self.masks, self.memory_format = self.images.to(device), self.masks.to(device), memory_format
        return self

    def __call__(self, step: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(0, self.images.shape[0], (self.batch_size,), generator=generator).to(self.images.device)
        images = to_model_range(self.images.index_select(0, idx))
        masks = self.masks.index_select(0, idx)[:, None].float()
        if self.augment is not None:
            images, masks = self.augment(images, generator, masks)
        return images.contiguous(memory_format=self.memory_format), masks


@torch.no_grad()
def predict_masks(model: torch.nn.Module, images: np.ndarray, device: torch.device, dtype: torch.dtype,
                  batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """(N, R, R, 3) uint8 -> (N, R, R) bool: lesion where the logit is > 0 (probability > 0.5)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_range(images[start:start + batch_size], device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        out.append((logits[:, 0].float() > 0).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, *images.shape[1:3]), bool)


def check_size(image_size: int, depth: int, dataset_h5: str | os.PathLike) -> None:
    if image_size % 2**depth:
        raise ValueError(f"{dataset_h5}: resolution {image_size} is not divisible by 2**baselines.depth "
                         f"= {2**depth}; lower baselines.depth or change prepare.resolution")


def build_unet(model_cfg: dict) -> SegUNet:
    return SegUNet(base_channels=model_cfg["base_channels"], depth=model_cfg["depth"], attention=model_cfg["attention"])



def schedule_for(steps: int) -> dict:
    """Warm-up and EMA horizon scaled to the run (about 5% of it), so short runs are not all warm-up/EMA lag."""
    return {"warmup_steps": min(200, steps // 20), "ema_decay": min(0.999, max(0.0, 1.0 - 20.0 / steps))}


def supervised_train_settings(steps: int, batch_size: int, lr: float, seed: int, **rest) -> TrainSettings:
    """The Trainer settings of a supervised network (the U-Nets, the features head): AdamW with weight decay
    1e-4, warm-up and EMA horizon scaled to the run (:func:`schedule_for`); ``rest``: other TrainSettings."""
    return TrainSettings(steps=steps, batch_size=batch_size, lr=lr, seed=seed, weight_decay=1e-4,
                         **schedule_for(steps), **rest)


def train_baseline(
    name: str,
    dataset_h5: str | os.PathLike,
    checkpoint: str | os.PathLike,
    log_csv: str | os.PathLike,
    settings: BaselineSettings | None = None,
    *,
    augment: dict | None = None,
) -> dict:
    """Train the supervised U-Net (name "unet") or Attention U-Net ("attention_unet"); returns the trainer summary.

    settings None means the ``baselines`` section's defaults; augment None or {} means PairedAugment's
    defaults. Otsu has nothing to train (ValueError). The train and val images whose masks were read
    (prepare.labelled) are used (:func:`fit_unet`).
    """
    s = settings if settings is not None else BaselineSettings()
    if check_name(name) == "otsu":
        raise ValueError("baselines: 'otsu' is training-free; train_baseline accepts only unet and attention_unet")
    train, val = (load_split(dataset_h5, split, labelled_only=True) for split in ("train", "val"))
    check_size(int(train["images"].shape[1]), s.depth, dataset_h5)
    return fit_unet(name, train, val, checkpoint, log_csv, s, augment=augment)


def fit_unet(name: str, train: dict, val: dict, checkpoint: str | os.PathLike, log_csv: str | os.PathLike,
             settings: BaselineSettings, *, augment: dict | None = None) -> dict:
    """Train U-Net ``name`` on ``train``'s images and masks, early-stopped on ``val``'s Dice (dicts with
    ``ids``, ``images`` (N, R, R, 3) uint8 and ``masks`` (N, R, R)). The resume file is
    `<checkpoint>.resume.pt`; the final checkpoint keeps the best-val-Dice EMA weights.
    ``settings.max_minutes``: wall-time budget of the training loop (diffseg.train.TimeBudget), None = until
    ``steps``."""
    s = settings
    image_size = int(train["images"].shape[1])
    model_cfg = {"name": name, "base_channels": s.base_channels, "depth": s.depth, "attention": UNET_ATTENTION[name]}
    with seeded(s.seed):  # the same initial weights in every run with this seed
        net = build_unet(model_cfg)
    logger.info("%s: %d parameters at %d px, %d train / %d val images", name, count_parameters(net), image_size,
                len(train["ids"]), len(val["ids"]))
    config = {"model": model_cfg, "image_size": image_size, "augment": dict(augment or {}),
              "train": {"steps": s.steps, "batch_size": s.batch_size, "lr": s.lr, "eval_every": s.eval_every,
                        "patience": s.patience, "seed": s.seed, "precision": s.precision,
                        "max_minutes": s.max_minutes}}
    sampler = MaskSampler(train["images"], train["masks"], s.batch_size, PairedAugment(**(augment or {})))
    torch_device = resolve_device(s.device)
    dtype = resolve_dtype(s.precision, torch_device)

    def val_dice(model: torch.nn.Module) -> float:
        return mean_dice(predict_masks(model, val["images"], torch_device, dtype), val["masks"])

    trainer = Trainer(
        net, lambda model, batch, generator: dice_bce_loss(model(batch[0]), batch[1]), sampler,
        supervised_train_settings(s.steps, s.batch_size, s.lr, s.seed, precision=s.precision, device=s.device,
                                  max_minutes=s.max_minutes),
        RunFiles(checkpoint, log_csv, kind=CHECKPOINT_KIND, config=config),
        stopping=EarlyStopping(val_dice, s.eval_every, s.patience), batch_setting="baselines.batch_size",
    )
    sampler.to(trainer.device, trainer.memory_format)
    return {**trainer.fit(), "name": name, "image_size": image_size, "parameters": count_parameters(net)}


def load_baseline(checkpoint: str | os.PathLike, name: str, device: str = "cpu") -> tuple[SegUNet, dict]:
    """(network with the best EMA weights in eval mode on `device`, checkpoint config); checks it is `name`'s."""
    ckpt = load_checkpoint(checkpoint, map_location="cpu", kind=CHECKPOINT_KIND)
    cfg = ckpt["config"]
    saved_name = cfg.get("model", {}).get("name")
    if saved_name != name:
        raise CheckpointError(checkpoint, f"checkpoint is for baseline {saved_name!r}, expected {name!r}")
    try:
        net = build_unet(cfg["model"])
        net.load_state_dict(ckpt["ema"])
    except (KeyError, RuntimeError) as err:
        problem = f"config and weights do not build a SegUNet ({type(err).__name__}: {err})"
        raise CheckpointError(checkpoint, problem) from err
    return net.to(resolve_device(device)).eval(), cfg


# ----------------------------------------------------------------------------- prediction files


def otsu_predict(dataset_h5: str | os.PathLike, split: str) -> tuple[np.ndarray, dict]:
    """Otsu masks for `split`, channel chosen on val (on train when val itself is predicted)."""
    choice_split = "train" if split == "val" else "val"
    ref = load_split(dataset_h5, choice_split, labelled_only=True)
    channel, scores = otsu_channel(ref["images"], ref["masks"])
    logger.info("Otsu channel %r chosen on %s (mean Dice %s)", channel, choice_split,
                ", ".join(f"{c} {s:.4f}" for c, s in scores.items()))
    masks = otsu_masks(load_split(dataset_h5, split)["images"], channel)
    return masks, {"channel": channel, "channel_chosen_on": choice_split, "channel_scores": json.dumps(scores)}


def otsu_channel(images: np.ndarray, masks: np.ndarray) -> tuple[str, dict[str, float]]:
    """(the channel of the best mean Dice on these labelled images, every channel's mean Dice)."""
    scores = otsu_channel_scores(images, masks)
    return max(OTSU_CHANNELS, key=lambda c: scores[c]), scores


def otsu_masks(images: np.ndarray, channel: str) -> np.ndarray:
    """(N, R, R) bool Otsu masks of (N, R, R, 3) uint8 images on ``channel``."""
    masks = np.zeros(images.shape[:3], bool)
    for row, image in enumerate(images):
        masks[row] = otsu_segment(image, channel)
    return masks


def unet_predict(name: str, dataset_h5: str | os.PathLike, checkpoint: str | os.PathLike, split: str,
                 device: str, precision: str) -> tuple[np.ndarray, dict]:
    torch_device = resolve_device(device)
    net, cfg = load_baseline(checkpoint, name, str(torch_device))
    images = load_split(dataset_h5, split)["images"]
    if images.shape[1] != cfg["image_size"]:
        raise ValueError(f"{dataset_h5}: images are {images.shape[1]} px but {checkpoint} was trained at "
                         f"{cfg['image_size']} px; retrain the baseline on this dataset")
    masks = predict_masks(net, images, torch_device, resolve_dtype(precision, torch_device))
    return masks, {"checkpoint": str(checkpoint)}


def write_predictions(out_h5: str | os.PathLike, ids: list[str], masks: np.ndarray, attrs: dict) -> None:
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("masks", data=masks.astype(np.uint8), compression="gzip")
        for key, value in attrs.items():
            f.attrs[key] = value


def predict_baseline(
    name: str,
    dataset_h5: str | os.PathLike,
    checkpoint: str | os.PathLike | None,
    out_h5: str | os.PathLike,
    settings: BaselineSettings | None = None,
    *,
    split: str = "test",
) -> dict:
    """Masks of baseline `name` for `split`, written to out_h5 (layout in the module docstring).

    Otsu takes no checkpoint (None); the U-Nets need theirs, and run with ``settings.device`` and
    ``settings.precision`` (the checkpoint fixes the network). Returns a summary dict.
    """
    s = settings if settings is not None else BaselineSettings()
    check_name(name)
    ids = load_split(dataset_h5, split)["ids"]
    if name == "otsu":
        masks, extra = otsu_predict(dataset_h5, split)
    elif checkpoint is None:
        raise ValueError(f"baseline {name!r} needs a checkpoint from train_baseline; got None")
    else:
        masks, extra = unet_predict(name, dataset_h5, checkpoint, split, s.device, s.precision)
    write_predictions(out_h5, ids, masks, {"method": name, "split": split, "diffseg_version": __version__, **extra})
    logger.info("%s: %d %s masks written to %s", name, len(ids), split, out_h5)
    return {"method": name, "split": split, "n": len(ids), "out_h5": str(out_h5), **extra}
