"""Diffusion features (inference.method "features"): a small head on the frozen DDPM's decoder activations.

After Baranchuk et al. (ICLR 2022, "Label-Efficient Semantic Segmentation with Diffusion Models"),
in DiffSeg's spirit: for an image, a timestep t and a noise draw, x_t is formed once and the frozen
class-conditional DDPM runs under the healthy (c0) and the lesion (c1) label. The head's per-pixel
inputs, each switchable (``use_features``, ``use_difference``, ``use_noise``), are

- the decoder activations under the lesion label, h(x_t, c1, t), of the chosen decoder blocks,
  upsampled (bilinear) to the working resolution;
- the feature difference |h(x_t, c0, t) - h(x_t, c1, t)|;
- the noise difference of paper eq. 2, channel mean of |eps(x_t, c0, t) - eps(x_t, c1, t)|.

The inputs are standardised per (timestep, channel) with statistics of the TRAIN split. One head
(per-pixel MLP = 1x1 convolutions, or 3x3 convolutions) serves every timestep; it is trained by the
one Trainer on the train split's masks (or on DiffSeg's own calibrated masks of the train split,
``targets="diffseg"``, :func:`run_teacher_masks`), early-stopped on the val split's Dice. At inference
each timestep gives one lesion-probability map, averaged over the noise draws: the same ``(T, H, W)``
per image as the difference methods, so ``inference.h5`` and every later stage are unchanged.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffseg import __version__
from diffseg.atomic import atomic_path
from diffseg.baselines import dice_bce_loss, mean_dice, supervised_train_settings
from diffseg.data import load_split
from diffseg.ddpm import load_model
from diffseg.imageio import InputError
from diffseg.inference import check_timesteps, file_sha256, paired_forward, run_inference
from diffseg.h5io import match_rows, read_h5, write_ids
from diffseg.runtime import resolve_autocast, resolve_device, to_model_range
from diffseg.schedule import Schedule
from diffseg.seeding import image_noise
from diffseg.settings import HeadSettings, InferenceSettings
from diffseg.train import CheckpointError, EarlyStopping, RunFiles, Trainer, load_checkpoint, seeded

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "feature_head"
HEADS = ("mlp", "conv3x3")
TARGETS = ("truth", "diffseg")
LABELS = (0, 1)  # healthy c0, lesion c1
FEATURE_CALL_MB = 2048  # memory of one feature_inputs call (images_per_call)


# ----------------------------------------------------------------------------- the per-pixel inputs


def check_inputs(use_features: bool, use_difference: bool, use_noise: bool) -> None:
    if not (use_features or use_difference or use_noise):
        raise ValueError("features: use_features, use_difference and use_noise are all false: the head has no input")


def resolve_blocks(model, blocks: Sequence[int] | None) -> list[int]:
    """The decoder blocks to read (None = all of them), checked against the model."""
    n = len(model.decoder_channels())
    chosen = list(range(n)) if blocks is None else [int(b) for b in blocks]
    bad = [b for b in chosen if not 0 <= b < n]
    if not chosen or bad:
        raise ValueError(f"features.blocks {blocks} must be a non-empty list of decoder blocks in [0, {n}) "
                         f"for this model (0 = deepest)")
    return chosen


def input_channels(model, blocks: Sequence[int], use_features: bool, use_difference: bool, use_noise: bool) -> int:
    widths = sum(model.decoder_channels()[b] for b in blocks)
    return widths * (int(use_features) + int(use_difference)) + int(use_noise)


def images_per_call(channels: int, n_timesteps: int, height: int, width: int,
                    budget_mb: float = FEATURE_CALL_MB) -> int:
    """How many images one :func:`feature_inputs` call may hold within ``budget_mb`` (at least 1).

    A call holds its (B, T, C, H, W) float32 result about three times over (both labels' upsampled
    activations and their concatenation); at 128 px with every decoder block that is 1.7 GB per image,
    so a GPU-sized ``inference.batch_images`` would exhaust a CPU machine's memory.
    """
    per_image = 3 * 4 * n_timesteps * channels * height * width / 2**20
    return max(1, int(budget_mb // per_image))


def feature_inputs(model, schedule: Schedule, images: torch.Tensor, timesteps: Sequence[int],
                   eps: torch.Tensor, blocks: Sequence[int], *, use_features: bool = True,
                   use_difference: bool = True, use_noise: bool = True,
                   autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, T, C, H, W) float32 head inputs of images (B, 3, H, W) for one noise draw eps (B, 3, H, W).

    One forward call holds every image x timestep x label (batch 2*B*T), c0 and c1 on the same x_t
    (diffseg.inference.paired_forward).
    """
    check_inputs(use_features, use_difference, use_noise)
    b, _, h, w = images.shape
    pair = paired_forward(model, schedule, images, timesteps, eps, labels=LABELS, autocast_dtype=autocast_dtype,
                          blocks=blocks)

    def upsampled(acts) -> torch.Tensor:
        return torch.cat([F.interpolate(a.float(), size=(h, w), mode="bilinear", align_corners=False)
                          for a in acts], dim=1)

    parts = []
    h0, h1 = upsampled(pair.features_c0), upsampled(pair.features_c1)
    if use_features:
        parts.append(h1)
    if use_difference:
        parts.append((h0 - h1).abs())
    if use_noise:
        parts.append((pair.noise_c0 - pair.noise_c1).abs().mean(dim=1, keepdim=True))
    return torch.cat(parts, dim=1).reshape(b, len(timesteps), -1, h, w)


def split_inputs(model, schedule: Schedule, ids: Sequence[str], images_uint8: np.ndarray,
                 timesteps: Sequence[int], blocks: Sequence[int], *, seed: int, batch_images: int,
                 device: torch.device, autocast_dtype: torch.dtype | None = None,
                 switches: dict[str, bool] | None = None) -> torch.Tensor:
    """(N, T, C, R, R) float16 on the CPU: the head inputs of a whole split under noise draw 0 of each image."""
    source = StreamedInputs(model, schedule, ids, images_uint8, timesteps, blocks, seed=seed,
                            batch_images=batch_images, device=device, autocast_dtype=autocast_dtype, switches=switches)
    return source.read(np.arange(len(ids)), source.timesteps, out_device=torch.device("cpu"))


class StreamedInputs:
    """The (N, T, C, R, R) head inputs of a split, computed from the frozen DDPM whenever they are read.

    For splits whose inputs would not fit in memory (``features.input_cache_mb``; e.g. every decoder
    block at 128 px: about 0.3 GB per image): the float16 values :func:`split_inputs` holds (noise
    draw 0 of each image; it reads them all through this class), so a head trained on them is the head a cached training gives, at the cost
    of one DDPM forward call per batch. Reads: ``inputs[a:b]`` (every timestep of images a..b) and
    ``inputs[rows, t_index]`` ((B, C, R, R), image rows[i] at timestep index t_index[i]).
    ``switches``: the feature_inputs keywords use_features, use_difference, use_noise (None: all on;
    HeadSettings.switches gives them).
    """

    def __init__(self, model, schedule: Schedule, ids: Sequence[str], images_uint8: np.ndarray,
                 timesteps: Sequence[int], blocks: Sequence[int], *, seed: int, batch_images: int,
                 device: torch.device, autocast_dtype: torch.dtype | None = None,
                 switches: dict[str, bool] | None = None):
        self.model, self.schedule, self.ids, self.images = model, schedule, list(ids), images_uint8
        self.timesteps, self.blocks, self.seed, self.batch_images = list(timesteps), list(blocks), seed, batch_images
        self.device, self.autocast_dtype = device, autocast_dtype
        self.switches = dict(switches if switches is not None else HeadSettings().switches)
        channels = input_channels(model, blocks, **self.switches)
        self.shape = (len(self.ids), len(self.timesteps), channels, *images_uint8.shape[1:3])

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows: np.ndarray, timesteps: Sequence[int], out_device: torch.device | None = None) -> torch.Tensor:
        """(B, len(timesteps), C, R, R) float16 of images ``rows``, in batches of batch_images, each batch
        moved to ``out_device`` (default: the model's device) as it is made."""
        out = []
        step = min(self.batch_images, images_per_call(self.shape[2], len(timesteps), *self.shape[3:]))
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            images = to_model_range(self.images[part], self.device)
            eps = image_noise(self.images[part], self.seed, 1)[:, 0]
            out.append(feature_inputs(self.model, self.schedule, images, timesteps, eps.to(self.device), self.blocks,
                                      autocast_dtype=self.autocast_dtype, **self.switches)
                       .to(out_device or self.device, torch.float16))
        return torch.cat(out)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            return self.read(np.arange(len(self))[key], self.timesteps)
        rows, t_index = (torch.as_tensor(k).cpu().numpy() for k in key)
        out = torch.empty((len(rows), *self.shape[2:]), dtype=torch.float16, device=self.device)
        for k in np.unique(t_index):  # one forward call per timestep present in the batch
            pick = np.flatnonzero(t_index == k)
            out[torch.as_tensor(pick, device=self.device)] = self.read(rows[pick], [self.timesteps[k]])[:, 0]
        return out


def input_megabytes(n_images: int, n_timesteps: int, channels: int, resolution: int) -> float:
    """Memory of a split's cached float16 head inputs."""
    return n_images * n_timesteps * channels * resolution * resolution * 2 / 1e6


# ----------------------------------------------------------------------------- the head


class FeatureHead(nn.Module):
    """Standardise per (timestep, channel), then a per-pixel MLP (1x1 convs) or 3x3 convs -> one lesion logit."""

    def __init__(self, in_channels: int, n_timesteps: int, kind: str = "mlp", hidden: int = 64, layers: int = 2):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"features.head must be one of {HEADS}, got {kind!r}")
        if layers < 1 or hidden < 1:
            raise ValueError(f"features.layers and features.hidden must be >= 1, got {layers}, {hidden}")
        self.register_buffer("mean", torch.zeros(n_timesteps, in_channels))
        self.register_buffer("std", torch.ones(n_timesteps, in_channels))
        k = 1 if kind == "mlp" else 3
        stack: list[nn.Module] = []
        cin = in_channels
        for _ in range(layers):
            stack += [nn.Conv2d(cin, hidden, k, padding=k // 2, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()]
            cin = hidden
        stack.append(nn.Conv2d(hidden, 1, 1))
        self.net = nn.Sequential(*stack)

    def set_standardisation(self, inputs: torch.Tensor | StreamedInputs) -> None:
        """Per (timestep, channel) mean and std of (N, T, C, H, W) inputs (give the TRAIN split's)."""
        total = torch.zeros(inputs.shape[1:3], dtype=torch.float64)
        squares = torch.zeros_like(total)
        for start in range(0, len(inputs), 4):  # chunks: a float copy of the whole split would not fit
            x = inputs[start:start + 4].float()
            total += x.sum(dim=(0, 3, 4)).cpu().double()  # float32 within a few images, float64 across
            squares += x.square().sum(dim=(0, 3, 4)).cpu().double()
        count = inputs.shape[0] * inputs.shape[3] * inputs.shape[4]
        mean = total / count
        self.mean.copy_(mean.float())
        self.std.copy_((squares / count - mean.square()).clamp_min(0).sqrt().float().clamp_min(1e-6))

    def forward(self, x: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) inputs of timestep index t_index (B,) -> logits (B, 1, H, W)."""
        x = (x - self.mean[t_index][:, :, None, None]) / self.std[t_index][:, :, None, None]
        return self.net(x)


@torch.no_grad()
def head_probabilities(head: FeatureHead, inputs: torch.Tensor | StreamedInputs, batch: int = 32) -> torch.Tensor:
    """(N, T, H, W) float32 lesion probabilities of (N, T, C, H, W) inputs (any float dtype, any device)."""
    n, n_t = inputs.shape[:2]
    device = next(head.parameters()).device
    images_per_batch = max(1, batch // n_t)
    out = []
    for start in range(0, n, images_per_batch):
        chunk = inputs[start:start + images_per_batch]
        t_index = torch.arange(n_t, device=device).repeat(len(chunk))
        logits = head(chunk.reshape(-1, *chunk.shape[2:]).to(device, torch.float32), t_index)
        out.append(torch.sigmoid(logits)[:, 0].reshape(len(chunk), n_t, *chunk.shape[3:]).float())
    return torch.cat(out)


def vote_dice(probabilities: torch.Tensor, masks: np.ndarray) -> float:
    """Mean Dice of the majority vote of the T outputs (each probability > 0.5), the early-stopping score."""
    votes = ((probabilities > 0.5).float().mean(dim=1) >= 0.5).cpu().numpy()
    return mean_dice(votes, np.asarray(masks, bool))


class InputSampler:
    """Random (inputs, timestep index, mask) batches of (image, timestep) pairs of (N, T, C, R, R) inputs
    (cached, or StreamedInputs)."""

    def __init__(self, inputs: torch.Tensor | StreamedInputs, masks: np.ndarray, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"features.batch_size must be >= 1, got {batch_size}")
        if len(inputs) != len(masks):
            raise ValueError(f"{len(inputs)} input rows but {len(masks)} target masks")
        self.inputs, self.batch_size = inputs, batch_size
        self.masks = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))

    def __call__(self, step: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        n, n_t = self.inputs.shape[:2]
        pick = torch.randint(0, n * n_t, (self.batch_size,), generator=generator)
        rows, t_index = pick // n_t, pick % n_t
        x = self.inputs[rows, t_index].to(device, torch.float32)
        return x, t_index.to(device), self.masks[rows][:, None].to(device)


# ----------------------------------------------------------------------------- training (rule train_feature_head)


def read_targets(path: str | os.PathLike, ids: Sequence[str]) -> np.ndarray:
    """(N, R, R) bool masks of ``ids`` from a teacher_masks.h5 file (:func:`run_teacher_masks`)."""
    data = read_h5(path, ["masks"])
    if str(data["attrs"].get("split", "train")) != "train":
        raise InputError(path, f"teacher masks must be of the train split, got split {data['attrs'].get('split')!r}")
    return data["masks"][match_rows(ids, data["ids"], path)].astype(bool)


def train_feature_head(dataset_h5: str | os.PathLike, ddpm_checkpoint: str | os.PathLike,
                       head_checkpoint: str | os.PathLike, log_csv: str | os.PathLike, settings: HeadSettings,
                       inference: InferenceSettings, *, targets_h5: str | os.PathLike | None = None) -> dict:
    """Fit the head on the TRAIN split (its masks, or ``targets_h5``'s DiffSeg masks of it); val Dice early-stops.

    ``inference`` gives the timesteps, the noise seed, batch_images, device and precision the inputs are
    computed with (the inference run's, so the head sees the inputs inference gives it). Nothing of the
    test split is read; the val split gives only the early-stopping score. The inputs of both splits are
    computed once and held in memory when they take at most ``settings.input_cache_mb``, and otherwise
    computed from the DDPM per batch (:class:`StreamedInputs`: the same values, more DDPM calls).
    """
    switches = settings.switches
    check_inputs(**switches)
    dev = resolve_device(inference.device)
    autocast_dtype = resolve_autocast(dev, inference.precision)
    model, ddpm_cfg = load_model(ddpm_checkpoint, device=str(dev), use_ema=True)
    timesteps = check_timesteps(inference.timesteps, int(ddpm_cfg["diffusion"]["T"]))
    blocks = resolve_blocks(model, settings.blocks)
    schedule = Schedule.from_config(ddpm_cfg["diffusion"], dev)
    # truth targets: the labelled train images (prepare.labelled); DiffSeg's own masks exist for every one
    train = load_split(dataset_h5, "train", labelled_only=targets_h5 is None)
    val = load_split(dataset_h5, "val", labelled_only=True)  # early stopping scores against masks
    targets = train["masks"] if targets_h5 is None else read_targets(targets_h5, train["ids"])
    channels = input_channels(model, blocks, **switches)
    megabytes = input_megabytes(len(train["ids"]) + len(val["ids"]), len(timesteps), channels,
                                int(train["images"].shape[1]))
    streamed = megabytes > settings.input_cache_mb
    logger.info("head inputs: %d channels (blocks %s, %s) x %d timesteps, %.0f MB for train + val: %s", channels,
                blocks, switches, len(timesteps), megabytes,
                f"computed per batch (over features.input_cache_mb = {settings.input_cache_mb:g})" if streamed
                else "computed once and held in memory")
    source = StreamedInputs if streamed else split_inputs
    inputs = {name: source(model, schedule, split["ids"], split["images"], timesteps, blocks, seed=inference.seed,
                           batch_images=inference.batch_images, device=dev, autocast_dtype=autocast_dtype,
                           switches=switches)
              for name, split in (("train", train), ("val", val))}
    config = {"image_size": int(train["images"].shape[1]), "timesteps": timesteps, "blocks": blocks, **switches,
              "targets": "truth" if targets_h5 is None else "diffseg", "noise_seed": inference.seed,
              "ddpm_sha256": file_sha256(ddpm_checkpoint)}
    summary = fit_head(inputs["train"], targets, inputs["val"], val["masks"], head_checkpoint, log_csv, config,
                       settings, device=inference.device, precision=inference.precision)
    return {**summary, "blocks": blocks, "train_images": len(train["ids"]), "inputs_streamed": streamed}


def fit_head(train_inputs: torch.Tensor, train_targets: np.ndarray, val_inputs: torch.Tensor, val_masks: np.ndarray,
             head_checkpoint: str | os.PathLike, log_csv: str | os.PathLike, config: dict,
             settings: HeadSettings | None = None, *, device: str = "auto", precision: str = "auto") -> dict:
    """Train a FeatureHead on (N, T, C, R, R) train inputs and (N, R, R) targets with the one Trainer.

    Standardisation and every gradient come from the train inputs; the val inputs and masks only score
    the EMA head every ``settings.eval_every`` steps (early stopping, best weights kept). ``config`` is
    stored in the checkpoint beside the head's own settings. settings None: the ``features`` defaults.
    """
    s = settings if settings is not None else HeadSettings()
    spec = {"in_channels": int(train_inputs.shape[2]), "n_timesteps": int(train_inputs.shape[1]), "kind": s.head,
            "hidden": s.hidden, "layers": s.layers}
    if tuple(val_inputs.shape[1:3]) != tuple(train_inputs.shape[1:3]):
        raise ValueError(f"val inputs {tuple(val_inputs.shape)} do not match train inputs {tuple(train_inputs.shape)}")
    with seeded(s.seed):
        net = FeatureHead(**spec)
    net.set_standardisation(train_inputs)
    config = {**config, "model": spec, "train": {"steps": s.steps, "batch_size": s.batch_size, "lr": s.lr,
                                                 "eval_every": s.eval_every, "patience": s.patience, "seed": s.seed}}
    sampler = InputSampler(train_inputs, train_targets, s.batch_size)

    def val_score(ema_head: nn.Module) -> float:
        return vote_dice(head_probabilities(ema_head, val_inputs), val_masks)

    trainer = Trainer(
        net, lambda m, batch, generator: dice_bce_loss(m(batch[0], batch[1]), batch[2]), sampler,
        supervised_train_settings(s.steps, s.batch_size, s.lr, s.seed, precision=precision, device=device,
                                  channels_last=False),
        RunFiles(head_checkpoint, log_csv, kind=CHECKPOINT_KIND, config=config),
        stopping=EarlyStopping(val_score, s.eval_every, s.patience), batch_setting="features.batch_size",
    )
    return {**trainer.fit(), "in_channels": spec["in_channels"]}


def load_head(checkpoint: str | os.PathLike, ddpm_checkpoint: str | os.PathLike,
              device: torch.device) -> tuple[FeatureHead, dict]:
    """(head with its best EMA weights in eval mode, its config); refuses a head trained on another DDPM."""
    ckpt = load_checkpoint(checkpoint, map_location="cpu", kind=CHECKPOINT_KIND)
    cfg = ckpt["config"]
    if cfg.get("ddpm_sha256") != file_sha256(ddpm_checkpoint):
        raise CheckpointError(checkpoint, f"the head was trained on another DDPM than {ddpm_checkpoint}: retrain it "
                                          "(rule train_feature_head)")
    try:
        net = FeatureHead(**cfg["model"])
        net.load_state_dict(ckpt["ema"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(checkpoint, f"config and weights do not build a FeatureHead "
                                          f"({type(err).__name__}: {err})") from err
    return net.to(device).eval(), cfg


def check_head_timesteps(head_cfg: dict, timesteps: Sequence[int], checkpoint) -> None:
    if [int(t) for t in timesteps] != list(head_cfg["timesteps"]):
        raise CheckpointError(checkpoint, f"head trained for timesteps {head_cfg['timesteps']} but inference asks "
                                          f"for {list(timesteps)}: retrain it (rule train_feature_head)")


def feature_maps(model, head: FeatureHead, head_cfg: dict, schedule: Schedule, images: torch.Tensor,
                 timesteps: Sequence[int], noise: torch.Tensor,
                 autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, T, H, W) float32: the head's lesion probability per timestep, averaged over the noise draws.

    ``noise`` is (B, D, 3, H, W), as diffseg.seeding.image_noise gives it.
    """
    switches = {k: head_cfg[k] for k in ("use_features", "use_difference", "use_noise")}
    step = images_per_call(input_channels(model, head_cfg["blocks"], **switches), len(timesteps), *images.shape[2:])
    total = None
    for d in range(noise.shape[1]):
        probs = torch.cat([head_probabilities(head, feature_inputs(
            model, schedule, images[start:start + step], timesteps, noise[start:start + step, d].to(images.device),
            head_cfg["blocks"], autocast_dtype=autocast_dtype, **switches)) for start in range(0, len(images), step)])
        total = probs if total is None else total + probs
    return total / noise.shape[1]


def head_maps(settings: InferenceSettings, checkpoint: str | os.PathLike, head: str | os.PathLike):
    """The maps function of inference.method features (diffseg.methods): the trained head's lesion probabilities.

    Loads the head (``head``: feature_head.pt of rule train_feature_head) once and refuses one trained on
    another DDPM than ``checkpoint`` or for other timesteps; run_inference writes its maps in the inference.h5
    layout.
    """
    net, head_cfg = load_head(head, checkpoint, resolve_device(settings.device))
    check_head_timesteps(head_cfg, settings.timesteps, head)

    def maps_fn(model, schedule, images, timesteps, noise, autocast_dtype=None):
        return feature_maps(model, net, head_cfg, schedule, images, timesteps, noise, autocast_dtype)

    return maps_fn


# ----------------------------------------------------------------------------- weak supervision (rule teacher_masks)


def run_teacher_masks(dataset_h5: str | os.PathLike, ddpm_checkpoint: str | os.PathLike, out_h5: str | os.PathLike,
                      *, timesteps: Sequence[int], noise_draws: int, calibration: dict, seed: int = 0,
                      batch_images: int = 16, device: str = "auto", precision: str = "auto") -> dict:
    """DiffSeg's own calibrated masks of the TRAIN split (eq. 2 noise difference, calibration fitted on val).

    The majority vote of the calibrated outputs per image, written as ``ids``, ``masks`` (N, R, R)
    uint8 with attributes split="train", the calibration's val Dice and settings. No train mask is read.
    """
    from diffseg.calibration import load_calibration, run_calibrate
    from diffseg.postprocess import apply_calibration, vote

    settings = InferenceSettings(timesteps=timesteps, noise_draws=noise_draws, seed=seed, batch_images=batch_images,
                                 device=device, precision=precision, method="paper")
    with tempfile.TemporaryDirectory(dir=Path(out_h5).parent, prefix=".teacher-") as tmp:
        for split in ("val", "train"):
            run_inference(dataset_h5, ddpm_checkpoint, f"{tmp}/{split}.h5", settings, split=split)
        report = run_calibrate(dataset_h5, f"{tmp}/val.h5", f"{tmp}/calibration.h5", **calibration)
        cal = load_calibration(f"{tmp}/calibration.h5")
        inf = read_h5(f"{tmp}/train.h5", ["maps"])
        masks = np.stack([vote(apply_calibration(m, cal)[1]) for m in inf["maps"].astype(np.float32)])
    with atomic_path(out_h5) as tmp_out, h5py.File(tmp_out, "w") as f:
        write_ids(f, inf["ids"])
        f.create_dataset("masks", data=masks.astype(np.uint8), compression="gzip")
        f.attrs.update({"split": "train", "val_dice_vote": report["val_dice_vote"], "threshold": cal.threshold,
                        "timesteps": list(timesteps), "noise_draws": noise_draws, "diffseg_version": __version__})
    logger.info("teacher masks of %d train images (calibration val Dice %.3f) -> %s", len(masks),
                report["val_dice_vote"], out_h5)
    return {"n_images": len(masks), "val_dice_vote": report["val_dice_vote"], "lesion_fraction": float(masks.mean())}
