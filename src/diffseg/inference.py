"""Noise-difference maps (paper eq. 2): |eps(x_t, c0, t) - eps(x_t, c1, t)| per image and timestep.

About 350 lines: the settings, the two model passes (eq. 2 and the DDIM reconstruction lever) and the
inference.h5 writer of one stage; post-processing, schedule and runtime live in their own modules.

Pipeline per batch of images: draw per-image noise -> one forward call per noise draw covering all
images x timesteps x both labels -> raw maps (T, H, W) per image -> per-image post-processing
(diffseg.postprocess: normalise, binarize) -> rows of ``inference.h5`` (layout in docs/ARCHITECTURE.md).
The ``inference`` config section arrives once, as :class:`diffseg.settings.InferenceSettings`.
"""

from __future__ import annotations

import logging
import os
import time
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
from diffseg.postprocess import postprocess_image
from diffseg.runtime import (autocast, name_the_setting_on_oom, resolve_autocast, resolve_device, resolved_runtime,
                             to_model_range)
from diffseg.schedule import Schedule
from diffseg.seeding import image_generator
from diffseg.settings import InferenceSettings
from diffseg.shards import shard_indices

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the model passes


def draw_noise(ids: Sequence[str], seed: int, noise_draws: int, shape: Sequence[int]) -> torch.Tensor:
    """(B, D, *shape) standard normal noise; image i's draws come from image_generator(seed, ids[i])."""
    return torch.stack(
        [torch.randn((noise_draws, *shape), generator=image_generator(seed, image_id)) for image_id in ids]
    )


def _check_noise(images: torch.Tensor, noise: torch.Tensor) -> tuple[int, ...]:
    """images.shape, after checking that noise is (B, D, 3, H, W) for these images."""
    b, _, h, w = images.shape
    if noise.ndim != 5 or noise.shape[0] != b or tuple(noise.shape[2:]) != tuple(images.shape[1:]):
        raise ValueError(f"noise must have shape (B={b}, D, 3, {h}, {w}), got {tuple(noise.shape)}")
    return tuple(images.shape)


def _label_batch(labels: tuple[int, int], n: int, device: torch.device) -> torch.Tensor:
    """Labels for the doubled batch: n rows of labels[0], then n rows of labels[1]."""
    return torch.cat([torch.full((n,), label, dtype=torch.long, device=device) for label in labels])


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

    One forward call per draw holds every image x timestep x label (batch 2*B*T).
    """
    b, _, h, w = _check_noise(images, noise)
    device = images.device
    n_t = len(timesteps)
    t_per_image = torch.as_tensor(list(timesteps), dtype=torch.long, device=device)
    t_flat = t_per_image.repeat(b)  # image-major: (b0 t0, b0 t1, ..., b1 t0, ...)
    x0_flat = images.repeat_interleave(n_t, dim=0)
    y = _label_batch(labels, b * n_t, device)
    total = torch.zeros((b, n_t, h, w), dtype=torch.float32, device=device)
    with torch.inference_mode():
        for d in range(noise.shape[1]):
            eps = noise[:, d].to(device=device, dtype=images.dtype).repeat_interleave(n_t, dim=0)
            x_t = schedule.q_sample(x0_flat, t_flat, eps)
            x_in = torch.cat([x_t, x_t])
            if device.type == "cuda":
                x_in = x_in.contiguous(memory_format=torch.channels_last)
            with autocast(device, autocast_dtype):
                pred = model(x_in, torch.cat([t_flat, t_flat]), y)
            eps_c0, eps_c1 = pred.float().chunk(2)
            total += (eps_c0 - eps_c1).abs().mean(dim=1).reshape(b, n_t, h, w)
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
            eps = noise[:, d].to(device=device, dtype=images.dtype).repeat_interleave(n_t, dim=0)
            t_first = torch.as_tensor([p[0] for p in paths], dtype=torch.long, device=device).repeat(b)
            x = torch.cat([schedule.q_sample(x0_flat, t_first, eps)] * 2)
            for k in range(n_steps):
                x = _ddim_paths_step(model, schedule, x, paths, k, b, y, autocast_dtype)
            x0_c0, x0_c1 = x.float().chunk(2)
            other = x0_c1 if compare == "c1" else x0_flat.float()
            total += (x0_c0 - other).abs().mean(dim=1).reshape(b, n_t, h, w)
    return total / noise.shape[1]


def _ddim_paths_step(model, schedule: Schedule, x, paths, k, b, y, autocast_dtype):
    """One deterministic DDIM step of every path at step k (a path already at x0 stays unchanged)."""
    device = x.device
    now = torch.as_tensor([p[k] for p in paths], dtype=torch.long, device=device).repeat(2 * b)
    nxt = torch.as_tensor([p[k + 1] if k + 1 < len(p) else -1 for p in paths], dtype=torch.long,
                          device=device).repeat(2 * b)
    active = now >= 0
    if not bool(active.any()):
        return x
    x_in = x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x
    with autocast(device, autocast_dtype):
        eps = model(x_in, now.clamp(min=0), y).float()
    stepped = schedule.ddim_step(x.float(), eps, now.clamp(min=0), nxt)
    return torch.where(active.view(-1, 1, 1, 1), stepped, x.float())


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
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
    maps_fn: Callable | None = None,
) -> int:
    """Difference maps of consecutive uint8 batches (B, H, W, 3) for ids, writing rows of out. Returns count.

    ``settings.method="paper"``: eq. 2 (noise_difference); ``"reconstruct"``: reconstruction_difference;
    ``"features"``: ``maps_fn(model, schedule, images, timesteps, noise, autocast_dtype)`` -> (B, T, H, W)
    lesion probabilities (diffseg.features), stored without normalisation.
    """
    from tqdm.auto import tqdm

    s = settings
    autocast_dtype = resolve_autocast(device, s.precision)
    done = 0
    with tqdm(total=len(ids), unit="img", mininterval=5, disable=not progress) as bar:
        for batch in image_batches:
            batch_ids = ids[done : done + len(batch)]
            images = to_model_range(batch, device)
            noise = draw_noise(batch_ids, s.seed, s.noise_draws, images.shape[1:])
            if s.method == "paper":
                raw = noise_difference(model, schedule, images, s.timesteps, noise, autocast_dtype=autocast_dtype)
            elif s.method == "features":
                raw = maps_fn(model, schedule, images, s.timesteps, noise, autocast_dtype)
            else:
                raw = reconstruction_difference(model, schedule, images, s.timesteps, noise, steps=s.recon_steps,
                                                compare=s.recon_compare, autocast_dtype=autocast_dtype)
            raw = raw.cpu().numpy()
            processed = [postprocess_image(r, normalise=stored_normalise(s), threshold=s.threshold) for r in raw]
            out["maps"][done : done + len(batch)] = np.stack([p.maps for p in processed]).astype(np.float16)
            out["binary"][done : done + len(batch)] = np.stack([p.binary for p in processed])
            done += len(batch)
            bar.update(len(batch))
    if done != len(ids):
        raise RuntimeError(f"inference wrote {done} images but expected {len(ids)}")
    return done


def stored_normalise(settings: InferenceSettings) -> str:
    """The normalisation applied to the stored maps: none for the features method's probabilities."""
    return "none" if settings.method == "features" else settings.normalise


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
    maps_fn: Callable | None = None,
) -> dict:
    """Difference maps (``settings.method``: paper eq. 2 or reconstruct) for one shard of a split -> out_h5.

    ``settings.method="features"`` runs through diffseg.features.run_feature_inference, which passes the
    trained head as ``maps_fn`` and gets its lesion probabilities written in the same layout.

    Returns a summary. ``settings.compile`` wraps the model in torch.compile (worth it on a GPU for
    large splits; the first batch pays the compilation).
    """
    s = settings if settings is not None else InferenceSettings()
    check_shard(shard, n_shards)
    if s.method == "features" and maps_fn is None:
        raise ValueError("inference.method 'features' needs the trained head: run it through "
                         "diffseg.features.run_feature_inference (rule train_feature_head makes the head)")
    if not Path(checkpoint).is_file():
        raise InputError(checkpoint, "checkpoint file not found")
    dev = resolve_device(s.device)
    autocast_dtype = resolve_autocast(dev, s.precision)
    model, cfg = load_model(checkpoint, device=str(dev), use_ema=True)
    T = int(cfg["diffusion"]["T"])
    timesteps = check_timesteps(s.timesteps, T)
    if dev.type == "cuda":
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
        n = infer_batches(model, schedule, ids, _batches(images, s.batch_images), out, s, device=dev,
                          maps_fn=maps_fn)
    seconds = time.perf_counter() - start
    logger.info("wrote %s: %d images in %.1f s (%.2f images/s)", out_h5, n, seconds, n / max(seconds, 1e-9))
    return {"out_h5": str(out_h5), "n_images": n, "seconds": seconds, "device": str(dev),
            "autocast": str(autocast_dtype or "fp32"), "timesteps": timesteps, "shard": shard, "n_shards": n_shards}
