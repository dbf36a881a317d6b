"""Noise-difference maps (paper eq. 2): |eps(x_t, c0, t) - eps(x_t, c1, t)| per image and timestep.

Pipeline per batch of images: draw per-image noise -> one forward call per noise draw covering all
images x timesteps x both labels -> raw maps (T, H, W) per image -> per-image post-processing
(normalise, binarize) -> rows of ``inference.h5`` (layout in docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np
import torch

import diffseg
from diffseg.atomic import atomic_path
from diffseg.data import load_split
from diffseg.ddpm import load_model
from diffseg.imageio import InputError
from diffseg.schedule import alpha_bars, linear_betas, q_sample
from diffseg.seeding import image_generator
from diffseg.shards import shard_indices
from diffseg.train import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

DEFAULT_TIMESTEPS = tuple(range(60, 151, 10))
NORMALISE_METHODS = ("p99", "max", "none")
INFERENCE_METHODS = ("paper", "reconstruct")


# ----------------------------------------------------------------------------- the model passes


def draw_noise(ids: Sequence[str], seed: int, noise_draws: int, shape: Sequence[int]) -> torch.Tensor:
    """(B, D, *shape) standard normal noise; image i's draws come from image_generator(seed, ids[i])."""
    return torch.stack(
        [torch.randn((noise_draws, *shape), generator=image_generator(seed, image_id)) for image_id in ids]
    )


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
    alpha_bar: torch.Tensor,
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
            x_t = q_sample(x0_flat, t_flat, eps, alpha_bar)
            x_in = torch.cat([x_t, x_t])
            if device.type == "cuda":
                x_in = x_in.contiguous(memory_format=torch.channels_last)
            with _autocast(device, autocast_dtype):
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
    alpha_bar: torch.Tensor,
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
            x = torch.cat([q_sample(x0_flat, t_first, eps, alpha_bar)] * 2)
            for k in range(n_steps):
                x = _ddim_step(model, alpha_bar, x, paths, k, b, y, autocast_dtype)
            x0_c0, x0_c1 = x.float().chunk(2)
            other = x0_c1 if compare == "c1" else x0_flat.float()
            total += (x0_c0 - other).abs().mean(dim=1).reshape(b, n_t, h, w)
    return total / noise.shape[1]


def _ddim_step(model, alpha_bar, x, paths, k, b, y, autocast_dtype):
    """One deterministic DDIM step of every path at step k (a path already at x0 stays unchanged)."""
    device = x.device
    now = torch.as_tensor([p[k] for p in paths], dtype=torch.long, device=device).repeat(2 * b)
    nxt = torch.as_tensor([p[k + 1] if k + 1 < len(p) else -1 for p in paths], dtype=torch.long,
                          device=device).repeat(2 * b)
    active = now >= 0
    if not bool(active.any()):
        return x
    x_in = x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x
    with _autocast(device, autocast_dtype):
        eps = model(x_in, now.clamp(min=0), y).float()
    a_now = alpha_bar[now.clamp(min=0)].view(-1, 1, 1, 1)
    a_next = torch.where(nxt >= 0, alpha_bar[nxt.clamp(min=0)], torch.ones_like(alpha_bar[:1])).view(-1, 1, 1, 1)
    x0_hat = ((x.float() - (1 - a_now).sqrt() * eps) / a_now.sqrt()).clamp(-1.0, 1.0)
    stepped = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps
    return torch.where(active.view(-1, 1, 1, 1), stepped, x.float())


# ----------------------------------------------------------------------------- per-image post-processing


def normalise(maps: np.ndarray, method: str = "p99") -> np.ndarray:
    """Scale one image's maps (T, H, W) to [0, 1] float32 by a statistic over all its timesteps."""
    maps = np.asarray(maps, dtype=np.float32)
    if method == "none":
        return maps
    if method == "p99":
        scale = float(np.percentile(maps, 99))
    elif method == "max":
        scale = float(maps.max())
    else:
        raise ValueError(f"inference.normalise must be one of {NORMALISE_METHODS}, got {method!r}")
    if scale <= 0.0:  # all-zero maps (identical predictions): nothing differs anywhere
        return np.zeros_like(maps)
    return np.clip(maps / scale, 0.0, 1.0)


_normalise = normalise  # postprocess_image's keyword (the config key) shadows the function name


def binarize(maps: np.ndarray, threshold: float | str = 0.5) -> np.ndarray:
    """uint8 0/1 masks, same shape as maps (..., H, W): maps > threshold, or Otsu per (H, W) map."""
    maps = np.asarray(maps)
    if threshold == "otsu":
        from skimage.filters import threshold_otsu

        flat = maps.reshape(-1, *maps.shape[-2:])
        out = np.zeros(flat.shape, dtype=np.uint8)
        for i, m in enumerate(flat):
            if m.max() > m.min():  # Otsu is undefined on a constant map: leave it empty
                out[i] = m > threshold_otsu(m)
        return out.reshape(maps.shape)
    _check_threshold(threshold)
    return (maps > threshold).astype(np.uint8)


def _check_threshold(threshold) -> None:
    if threshold == "otsu":
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise ValueError(f"inference.threshold must be a number in (0, 1) or 'otsu', got {threshold!r}")


@dataclass
class ImageMaps:
    """One image's outputs, as written to inference.h5."""

    maps: np.ndarray  # (T, H, W) float32 in [0, 1]
    binary: np.ndarray  # (T, H, W) uint8 0/1


def postprocess_image(raw: np.ndarray, *, normalise: str = "p99", threshold: float | str = 0.5) -> ImageMaps:
    """Raw difference maps (T, H, W) of one image -> normalised maps and binary masks.

    Extra levers (blur, bias-map subtraction, ...) belong here, before normalisation.
    """
    maps = _normalise(raw, normalise)
    return ImageMaps(maps=maps, binary=binarize(maps, threshold))


# ----------------------------------------------------------------------------- inputs and settings


def resolve_autocast(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 autocast on CUDA for 'auto'; None (plain fp32) on CPU unless asked explicitly."""
    dtype = resolve_dtype(precision, device, key="inference.precision")
    return None if dtype == torch.float32 else dtype


def alpha_bar_tensor(diffusion_cfg: dict, device: torch.device) -> torch.Tensor:
    """alpha_bar (T,) float32 on device from a checkpoint's "diffusion" section."""
    betas = linear_betas(diffusion_cfg["T"], diffusion_cfg["beta_start"], diffusion_cfg["beta_end"])
    return torch.as_tensor(alpha_bars(betas), dtype=torch.float32, device=device)


def check_timesteps(timesteps: Sequence[int], T: int) -> list[int]:
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
        raise ValueError("inference.timesteps is empty: give at least one diffusion step")
    bad = [t for t in timesteps if not 0 <= t < T]
    if bad:
        raise ValueError(f"inference.timesteps {bad} outside [0, T) with the checkpoint's T={T}")
    return timesteps


def check_settings(*, shard: int, n_shards: int, noise_draws: int, normalise: str, threshold, batch_images: int,
                   method: str = "paper", recon_steps: int = 5, recon_compare: str = "c1"):
    if n_shards < 1 or not 0 <= shard < n_shards:
        raise ValueError(f"inference shard {shard} must lie in [0, n_shards={n_shards})")
    if noise_draws < 1:
        raise ValueError(f"inference.noise_draws must be >= 1, got {noise_draws}")
    if batch_images < 1:
        raise ValueError(f"inference.batch_images must be >= 1, got {batch_images}")
    if normalise not in NORMALISE_METHODS:
        raise ValueError(f"inference.normalise must be one of {NORMALISE_METHODS}, got {normalise!r}")
    _check_threshold(threshold)
    if method not in INFERENCE_METHODS:
        raise ValueError(f"inference.method must be one of {INFERENCE_METHODS}, got {method!r}")
    if recon_steps < 1:
        raise ValueError(f"inference.recon_steps must be >= 1, got {recon_steps}")
    if recon_compare not in ("c1", "input"):
        raise ValueError(f"inference.recon_compare must be 'c1' or 'input', got {recon_compare!r}")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_model_input(images_uint8: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1] on device."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(device)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------- writing inference.h5


def create_output(fh: h5py.File, ids: Sequence[str], timesteps: Sequence[int], resolution: int, attrs: dict) -> None:
    """Create the datasets of the inference.h5 layout (one image per chunk) and the attributes."""
    n, n_t = len(ids), len(timesteps)
    fh.create_dataset("ids", data=np.asarray(list(ids), dtype=object), dtype=h5py.string_dtype("utf-8"))
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
    alpha_bar: torch.Tensor,
    ids: Sequence[str],
    image_batches: Iterable[np.ndarray],
    out: h5py.File,
    *,
    timesteps: Sequence[int],
    noise_draws: int = 1,
    normalise: str = "p99",
    threshold: float | str = 0.5,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
    method: str = "paper",
    recon_steps: int = 5,
    recon_compare: str = "c1",
) -> int:
    """Difference maps of consecutive uint8 batches (B, H, W, 3) for ids, writing rows of out. Returns count.

    ``method="paper"``: eq. 2 (noise_difference); ``"reconstruct"``: reconstruction_difference.
    """
    from tqdm.auto import tqdm

    done = 0
    with tqdm(total=len(ids), unit="img", mininterval=5, disable=not progress) as bar:
        for batch in image_batches:
            batch_ids = ids[done : done + len(batch)]
            images = to_model_input(batch, device)
            noise = draw_noise(batch_ids, seed, noise_draws, images.shape[1:])
            if method == "paper":
                raw = noise_difference(model, alpha_bar, images, timesteps, noise, autocast_dtype=autocast_dtype)
            else:
                raw = reconstruction_difference(model, alpha_bar, images, timesteps, noise, steps=recon_steps,
                                                compare=recon_compare, autocast_dtype=autocast_dtype)
            raw = raw.cpu().numpy()
            processed = [postprocess_image(r, normalise=normalise, threshold=threshold) for r in raw]
            out["maps"][done : done + len(batch)] = np.stack([p.maps for p in processed]).astype(np.float16)
            out["binary"][done : done + len(batch)] = np.stack([p.binary for p in processed])
            done += len(batch)
            bar.update(len(batch))
    if done != len(ids):
        raise RuntimeError(f"inference wrote {done} images but expected {len(ids)}")
    return done


def _batches(images: np.ndarray, batch_images: int) -> Iterable[np.ndarray]:
    for start in range(0, len(images), batch_images):
        yield images[start : start + batch_images]


def run_inference(
    dataset_h5: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out_h5: str | os.PathLike,
    *,
    split: str = "test",
    shard: int = 0,
    n_shards: int = 1,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    noise_draws: int = 1,
    normalise: str = "p99",
    threshold: float | str = 0.5,
    batch_images: int = 16,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    method: str = "paper",
    recon_steps: int = 5,
    recon_compare: str = "c1",
    compile: bool = False,
) -> dict:
    """Difference maps (``method``: paper eq. 2 or reconstruct) for one shard of a split -> out_h5. Returns a summary.

    ``compile`` wraps the model in torch.compile (worth it on a GPU for large splits; the first batch
    pays the compilation).
    """
    check_settings(
        shard=shard, n_shards=n_shards, noise_draws=noise_draws, normalise=normalise, threshold=threshold,
        batch_images=batch_images, method=method, recon_steps=recon_steps, recon_compare=recon_compare,
    )
    if not Path(checkpoint).is_file():
        raise InputError(checkpoint, "checkpoint file not found")
    dev = resolve_device(device)
    autocast_dtype = resolve_autocast(dev, precision)
    model, cfg = load_model(checkpoint, device=str(dev), use_ema=True)
    T = int(cfg["diffusion"]["T"])
    timesteps = check_timesteps(timesteps, T)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    alpha_bar = alpha_bar_tensor(cfg["diffusion"], dev)
    logger.info("inference on %s, autocast %s, %d timesteps, %d noise draw(s)", dev, autocast_dtype or "fp32",
                len(timesteps), noise_draws)

    data = load_split(dataset_h5, split)
    resolution = int(data["images"].shape[1])
    if resolution != int(cfg["image_size"]):
        raise InputError(dataset_h5, f"images are {resolution} px but checkpoint {checkpoint} was trained "
                                     f"at {cfg['image_size']} px")
    rows = shard_indices(len(data["ids"]), shard, n_shards, block=batch_images)  # whole batches
    ids, images = [data["ids"][i] for i in rows], data["images"][rows]
    attrs = {
        "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint), "threshold": threshold,
        "normalise": normalise, "noise_draws": noise_draws, "seed": seed, "method": method, "T": T,
        "recon_steps": recon_steps, "recon_compare": recon_compare,
        "diffseg_version": diffseg.__version__, "split": split,
    }  # no shard number: diffseg.shards.gather_h5 copies the first shard's attributes
    start = time.perf_counter()
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as out:
        create_output(out, ids, timesteps, resolution, attrs)
        n = infer_batches(
            model, alpha_bar, ids, _batches(images, batch_images), out, timesteps=timesteps,
            noise_draws=noise_draws, normalise=normalise, threshold=threshold, seed=seed,
            autocast_dtype=autocast_dtype, device=dev, method=method, recon_steps=recon_steps,
            recon_compare=recon_compare,
        )
    seconds = time.perf_counter() - start
    logger.info("wrote %s: %d images in %.1f s (%.2f images/s)", out_h5, n, seconds, n / max(seconds, 1e-9))
    return {"out_h5": str(out_h5), "n_images": n, "seconds": seconds, "device": str(dev),
            "autocast": str(autocast_dtype or "fp32"), "timesteps": timesteps, "shard": shard, "n_shards": n_shards}
