"""Noise-difference maps (paper eq. 2): |eps(x_t, c0, t) - eps(x_t, c1, t)| per image and timestep.

About 400 lines: the settings, the model passes (the paired c0/c1 forward pass every method builds on, eq. 2
and the DDIM reconstruction lever) and the inference.h5 writer of one stage (rule infer); post-processing,
schedule and runtime live in their own modules, the per-method choices in diffseg.methods.

Pipeline per batch of images: draw per-image noise -> the method's maps function (paper: one forward
call per noise draw covering all images x timesteps x both labels) -> raw maps (T, H, W) per image ->
per-image post-processing (diffseg.postprocess: normalise, binarize) -> rows of ``inference.h5`` (layout
in docs/ARCHITECTURE.md). The ``inference`` config section arrives once, as :class:`diffseg.settings.InferenceSettings`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

import h5py
import numpy as np
import torch

import diffseg
from diffseg.atomic import atomic_path, file_sha256
from diffseg.data import load_split
from diffseg.ddpm import load_model
from diffseg.h5io import write_ids
from diffseg.imageio import InputError
from diffseg.methods import inference_method
from diffseg.postprocess import postprocess_image
from diffseg.runtime import (autocast, name_the_setting_on_oom, resolve_autocast, resolve_device, resolved_runtime,
                             to_model_range, uses_channels_last)
from diffseg.schedule import Schedule
from diffseg.seeding import image_noise
from diffseg.settings import InferenceSettings
from diffseg.shards import shard_indices

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the model passes


def _check_noise(images: torch.Tensor, noise: torch.Tensor) -> tuple[int, ...]:
    """images.shape, after checking that noise is (B, D, 3, H, W) for these images."""
    b, _, h, w = images.shape
    if noise.ndim != 5 or noise.shape[0] != b or tuple(noise.shape[2:]) != tuple(images.shape[1:]):
        raise ValueError(f"noise must have shape (B={b}, D, 3, {h}, {w}), got {tuple(noise.shape)}")
    return tuple(images.shape)


def _label_batch(labels: tuple[int, int], n: int, device: torch.device) -> torch.Tensor:
    """Labels for the doubled batch: n rows of labels[0], then n rows of labels[1]."""
    return torch.cat([torch.full((n,), label, dtype=torch.long, device=device) for label in labels])


@dataclass(frozen=True)
class PairedPass:
    """The model's outputs under labels[0] (c0) and labels[1] (c1) on the same x_t, from one forward call.

    Rows are image-major over (image, timestep): row i * T + k is image i at timesteps[k]. ``noise_c0`` and
    ``noise_c1`` are the predicted noise in float32; ``features_c0``/``features_c1`` hold the requested
    decoder blocks' activations (in the model's output dtype), empty unless blocks were asked for.
    """

    x_t: torch.Tensor
    t: torch.Tensor
    noise_c0: torch.Tensor
    noise_c1: torch.Tensor
    features_c0: tuple[torch.Tensor, ...] = ()
    features_c1: tuple[torch.Tensor, ...] = ()


def paired_forward(
    model: torch.nn.Module,
    schedule: Schedule,
    images: torch.Tensor,
    timesteps: Sequence[int],
    eps: torch.Tensor,
    *,
    labels: tuple[int, int] = (0, 1),
    autocast_dtype: torch.dtype | None = None,
    blocks: Sequence[int] | None = None,
    channels_last: bool = False,
) -> PairedPass:
    """x_t of images (B, 3, H, W) at every timestep with one noise draw eps (B, 3, H, W), and the model run
    under both labels on it in one forward call of batch 2*B*T (c0 rows first, then c1).

    ``blocks``: also return these decoder blocks' activations (``model.forward_with_features``).
    ``channels_last``: feed the batch in channels_last (the inference stage's model is channels_last where
    :func:`diffseg.runtime.uses_channels_last`: CUDA and CPU).
    """
    b, n_t, device = images.shape[0], len(timesteps), images.device
    with torch.inference_mode():
        t_flat = torch.as_tensor(list(timesteps), dtype=torch.long, device=device).repeat(b)  # image-major
        eps_flat = eps.to(device=device, dtype=images.dtype).repeat_interleave(n_t, dim=0)
        x_t = schedule.q_sample(images.repeat_interleave(n_t, dim=0), t_flat, eps_flat)
        x_in = torch.cat([x_t, x_t])
        if channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        t_in, y = torch.cat([t_flat, t_flat]), _label_batch(labels, b * n_t, device)
        with autocast(device, autocast_dtype):
            if blocks is None:
                pred, acts = model(x_in, t_in, y), []
            else:
                pred, acts = model.forward_with_features(x_in, t_in, y, blocks)
        noise_c0, noise_c1 = pred.float().chunk(2)
        halves = [a.chunk(2) for a in acts]
    return PairedPass(x_t, t_flat, noise_c0, noise_c1, tuple(h[0] for h in halves), tuple(h[1] for h in halves))


def noise_difference(
    model: torch.nn.Module,
    schedule: Schedule,
    images: torch.Tensor,
    timesteps: Sequence[int],
    noise: torch.Tensor,
    labels: tuple[int, int] = (0, 1),
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(B, T, H, W) float32: mean over noise draws of channel-mean |eps_c0 - eps_c1| on the same x_t.

    One forward call per draw holds every image x timestep x label (batch 2*B*T, :func:`paired_forward`).
    """
    b, _, h, w = _check_noise(images, noise)
    device = images.device
    n_t = len(timesteps)
    total = torch.zeros((b, n_t, h, w), dtype=torch.float32, device=device)
    with torch.inference_mode():
        for d in range(noise.shape[1]):
            pair = paired_forward(model, schedule, images, timesteps, noise[:, d], labels=labels,
                                  autocast_dtype=autocast_dtype, channels_last=uses_channels_last(device))
            total += (pair.noise_c0 - pair.noise_c1).abs().mean(dim=1).reshape(b, n_t, h, w)
    return total / noise.shape[1]


def ddim_timesteps(t0: int, steps: int) -> list[int]:
    """The model steps of a deterministic DDIM path from t0 down to 0: ``steps`` distinct values, t0 first."""
    if steps < 1:
        raise ValueError(f"inference.recon_steps must be >= 1, got {steps}")
    path = np.unique(np.round(np.linspace(0, t0, steps + 1)[1:]).astype(int))[::-1]
    return [int(t) for t in path] if t0 > 0 else [0]


def reconstruction_difference(
    model: torch.nn.Module,
    schedule: Schedule,
    images: torch.Tensor,
    timesteps: Sequence[int],
    noise: torch.Tensor,
    labels: tuple[int, int] = (0, 1),
    *,
    steps: int = 5,
    compare: str = "c1",
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(B, T, H, W) float32: region-level difference after DDIM-denoising x_t0 toward each label.

    For each t0 in ``timesteps``: x_t0 = q_sample(image, t0, eps); deterministic DDIM (eta = 0) in
    ``steps`` steps down to x0 under labels[0] (healthy) and labels[1] (lesion), all images x t0 x
    labels in one forward call per step. The map is the channel mean of |x0_c0 - x0_c1|
    (``compare="c1"``) or |image - x0_c0| (``compare="input"``), averaged over the noise draws.
    Identical labels give exactly zero with ``compare="c1"``.
    """
    if compare not in ("c1", "input"):
        raise ValueError(f"inference.recon_compare must be 'c1' or 'input', got {compare!r}")
    b, _, h, w = _check_noise(images, noise)
    device, n_t = images.device, len(timesteps)
    paths = [ddim_timesteps(int(t0), steps) for t0 in timesteps]
    n_steps = max(len(p) for p in paths)
    paths = [p + [-1] * (n_steps - len(p)) for p in paths]  # -1: this t0's path is already at x0
    x0_flat = images.repeat_interleave(n_t, dim=0)
    y = _label_batch(labels, b * n_t, device)
    total = torch.zeros((b, n_t, h, w), dtype=torch.float32, device=device)
    with torch.inference_mode():
        for d in range(noise.shape[1]):
            # The first DDIM step is the paired pass on x_t0 (every path starts at its own t0).
            first = paired_forward(model, schedule, images, timesteps, noise[:, d], labels=labels,
                                   autocast_dtype=autocast_dtype, channels_last=uses_channels_last(device))
            x = _ddim_update(schedule, torch.cat([first.x_t, first.x_t]),
                             torch.cat([first.noise_c0, first.noise_c1]), *_path_steps(paths, 0, b, device))
            for k in range(1, n_steps):
                x = _ddim_paths_step(model, schedule, x, paths, k, b, y, autocast_dtype)
            x0_c0, x0_c1 = x.float().chunk(2)
            other = x0_c1 if compare == "c1" else x0_flat.float()
            total += (x0_c0 - other).abs().mean(dim=1).reshape(b, n_t, h, w)
    return total / noise.shape[1]


def _path_steps(paths, k: int, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(now, next): every path's model step at step k and the one after, over the doubled batch (-1 = x0)."""
    now = torch.as_tensor([p[k] for p in paths], dtype=torch.long, device=device).repeat(2 * b)
    nxt = torch.as_tensor([p[k + 1] if k + 1 < len(p) else -1 for p in paths], dtype=torch.long,
                          device=device).repeat(2 * b)
    return now, nxt


def _ddim_update(schedule: Schedule, x, eps, now, nxt):
    """The deterministic DDIM step of every active path (now >= 0); a path already at x0 stays unchanged."""
    stepped = schedule.ddim_step(x.float(), eps, now.clamp(min=0), nxt)
    return torch.where((now >= 0).view(-1, 1, 1, 1), stepped, x.float())


def _ddim_paths_step(model, schedule: Schedule, x, paths, k, b, y, autocast_dtype):
    """One deterministic DDIM step of every path at step k (model call, then :func:`_ddim_update`)."""
    now, nxt = _path_steps(paths, k, b, x.device)
    if not bool((now >= 0).any()):
        return x
    x_in = x.contiguous(memory_format=torch.channels_last) if uses_channels_last(x.device) else x
    with autocast(x.device, autocast_dtype):
        eps = model(x_in, now.clamp(min=0), y).float()
    return _ddim_update(schedule, x, eps, now, nxt)


def paper_maps(settings: InferenceSettings, checkpoint) -> Callable:
    """The maps function of inference.method paper (diffseg.methods): eq. 2, :func:`noise_difference`."""
    return noise_difference


def reconstruct_maps(settings: InferenceSettings, checkpoint) -> Callable:
    """The maps function of inference.method reconstruct: :func:`reconstruction_difference` at its settings."""
    return partial(reconstruction_difference, steps=settings.recon_steps, compare=settings.recon_compare)


# ----------------------------------------------------------------------------- inputs


def check_timesteps(timesteps: Sequence[int], T: int) -> list[int]:
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
        raise ValueError("inference.timesteps is empty: give at least one diffusion step")
    bad = [t for t in timesteps if not 0 <= t < T]
    if bad:
        raise ValueError(f"inference.timesteps {bad} outside [0, T) with the checkpoint's T={T}")
    return timesteps


# ----------------------------------------------------------------------------- writing inference.h5


def create_output(fh: h5py.File, ids: Sequence[str], timesteps: Sequence[int], resolution: int, attrs: dict) -> None:
    """Create the datasets of the inference.h5 layout (one image per chunk) and the attributes."""
    n, n_t = len(ids), len(timesteps)
    write_ids(fh, ids)
    fh.create_dataset("timesteps", data=np.asarray(timesteps, dtype=np.int32))
    chunks = (1, n_t, resolution, resolution) if n else None
    fh.create_dataset("maps", shape=(n, n_t, resolution, resolution), dtype=np.float16, chunks=chunks)
    fh.create_dataset(
        "binary", shape=(n, n_t, resolution, resolution), dtype=np.uint8, chunks=chunks, compression="gzip",
        compression_opts=1,
    )
    for key, value in attrs.items():
        fh.attrs[key] = value


def infer_batches(
    model: torch.nn.Module,
    schedule: Schedule,
    ids: Sequence[str],
    image_batches: Iterable[np.ndarray],
    out: h5py.File,
    settings: InferenceSettings,
    maps_fn: Callable,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
) -> int:
    """Maps of consecutive uint8 batches (B, H, W, 3) for ids, writing rows of out. Returns the count.

    ``maps_fn(model, schedule, images, timesteps, noise, autocast_dtype=...)`` -> (B, T, H, W) raw maps is the
    method's (:meth:`diffseg.methods.InferenceMethod.make_maps`); they are stored with the method's
    normalisation (:func:`stored_normalise`) and binarized at ``settings.threshold``.
    """
    from tqdm.auto import tqdm

    s = settings
    autocast_dtype = resolve_autocast(device, s.precision)
    done = 0
    with tqdm(total=len(ids), unit="img", mininterval=5, disable=not progress) as bar:
        for batch in image_batches:
            images = to_model_range(batch, device)
            noise = image_noise(batch, s.seed, s.noise_draws)
            raw = maps_fn(model, schedule, images, s.timesteps, noise, autocast_dtype=autocast_dtype).cpu().numpy()
            processed = [postprocess_image(r, normalise=stored_normalise(s), threshold=s.threshold) for r in raw]
            out["maps"][done : done + len(batch)] = np.stack([p.maps for p in processed]).astype(np.float16)
            out["binary"][done : done + len(batch)] = np.stack([p.binary for p in processed])
            done += len(batch)
            bar.update(len(batch))
    if done != len(ids):
        raise RuntimeError(f"inference wrote {done} images but expected {len(ids)}")
    return done


def stored_normalise(settings: InferenceSettings) -> str:
    """The normalisation applied to the stored maps (the method's: none for the features head's probabilities)."""
    return inference_method(settings.method).stored_normalise(settings.normalise)


def _batches(images: np.ndarray, batch_images: int) -> Iterable[np.ndarray]:
    for start in range(0, len(images), batch_images):
        yield images[start : start + batch_images]


def check_shard(shard: int, n_shards: int) -> None:
    if n_shards < 1 or not 0 <= shard < n_shards:
        raise ValueError(f"inference shard {shard} must lie in [0, n_shards={n_shards})")


def run_inference(
    dataset_h5: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out_h5: str | os.PathLike,
    settings: InferenceSettings | None = None,
    *,
    split: str = "test",
    shard: int = 0,
    n_shards: int = 1,
    artefacts: dict[str, str | os.PathLike] | None = None,
) -> dict:
    """The maps of ``settings.method`` (diffseg.methods) for one shard of a split -> out_h5 (rule infer).

    ``artefacts``: the method's trained files besides the DDPM checkpoint, by name (method features:
    ``{"head": feature_head.pt}``); the method's maps function is made from them before any image is read.

    Returns a summary. ``settings.compile`` wraps the model in torch.compile (worth it on a GPU for
    large splits; the first batch pays the compilation).
    """
    s = settings if settings is not None else InferenceSettings()
    check_shard(shard, n_shards)
    if not Path(checkpoint).is_file():
        raise InputError(checkpoint, "checkpoint file not found")
    maps_fn = inference_method(s.method).make_maps(s, checkpoint, artefacts)
    dev = resolve_device(s.device)
    autocast_dtype = resolve_autocast(dev, s.precision)
    model, cfg = load_model(checkpoint, device=str(dev), use_ema=True)
    T = int(cfg["diffusion"]["T"])
    timesteps = check_timesteps(s.timesteps, T)
    if uses_channels_last(dev):
        model = model.to(memory_format=torch.channels_last)
    if s.compile:
        model = torch.compile(model)
    schedule = Schedule.from_config(cfg["diffusion"], dev)
    logger.info("inference on %s, autocast %s, %d timesteps, %d noise draw(s)", dev, autocast_dtype or "fp32",
                len(timesteps), s.noise_draws)

    data = load_split(dataset_h5, split, require_masks=False)
    resolution = int(data["images"].shape[1])
    if resolution != int(cfg["image_size"]):
        raise InputError(dataset_h5, f"images are {resolution} px but checkpoint {checkpoint} was trained "
                                     f"at {cfg['image_size']} px")
    rows = shard_indices(len(data["ids"]), shard, n_shards, block=s.batch_images)  # whole batches
    ids, images = [data["ids"][i] for i in rows], data["images"][rows]
    attrs = {
        "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint), "threshold": s.threshold,
        "normalise": stored_normalise(s), "noise_draws": s.noise_draws, "seed": s.seed, "method": s.method, "T": T,
        "recon_steps": s.recon_steps, "recon_compare": s.recon_compare,
        "diffseg_version": diffseg.__version__, "split": split, **resolved_runtime(s.device, s.precision),
    }  # no shard number: diffseg.shards.gather_h5 copies the first shard's attributes
    start = time.perf_counter()
    # No automatic halving on OOM: a batch's composition changes CPU/GPU rounding, so results would differ.
    oom_where = f"in inference ({2 * len(timesteps)} network passes per image in one call)"
    with (name_the_setting_on_oom("inference.batch_images", s.batch_images, oom_where),
          atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as out):
        create_output(out, ids, timesteps, resolution, attrs)
        n = infer_batches(model, schedule, ids, _batches(images, s.batch_images), out, s, maps_fn, device=dev)
    seconds = time.perf_counter() - start
    logger.info("wrote %s: %d images in %.1f s (%.2f images/s)", out_h5, n, seconds, n / max(seconds, 1e-9))
    return {"out_h5": str(out_h5), "n_images": n, "seconds": seconds, "device": str(dev),
            "autocast": str(autocast_dtype or "fp32"), "timesteps": timesteps, "shard": shard, "n_shards": n_shards}
