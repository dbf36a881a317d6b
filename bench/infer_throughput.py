"""Noise-difference inference throughput: test images/s through the real pipeline.

Counts, per image, all 2 x len(timesteps) x noise_draws forward passes, the per-image
normalisation and binarization, and the HDF5 write (diffseg.inference.infer_batches).
One untimed warm-up batch comes first (it also triggers torch.compile).

    python bench/infer_throughput.py --device cpu --n-images 8 --resolution 64
    python bench/infer_throughput.py --device cuda --batch-images 32 --compile --n-images 2048
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from diffseg.inference import check_timesteps, create_output, infer_batches, noise_difference
from diffseg.runtime import resolve_autocast, resolve_device
from diffseg.schedule import Schedule
from diffseg.settings import DEFAULT_TIMESTEPS, InferenceSettings

def load(args, device: torch.device):
    """(model, diffusion config, image size) from --checkpoint, or the default model with random weights."""
    from diffseg.ddpm import DIFFUSION_DEFAULTS, build_model, load_model

    if args.checkpoint:
        model, cfg = load_model(args.checkpoint, device=str(device), use_ema=True)
        return model, cfg["diffusion"], int(cfg["image_size"])
    model = build_model({}, args.resolution).to(device).eval()  # ddpm's default (paper-size) model
    for p in model.parameters():  # untrained: fill zero-initialised layers so maps are non-trivial
        if not p.any():
            torch.nn.init.normal_(p, std=0.02)
    return model, dict(DIFFUSION_DEFAULTS), args.resolution


def batches(images: np.ndarray, size: int):
    for start in range(0, len(images), size):
        yield images[start : start + size]


def run_once(model, schedule, images, out_path, args, device) -> float:
    ids = [f"bench_{i:06d}" for i in range(len(images))]
    settings = InferenceSettings(timesteps=args.timesteps, noise_draws=args.noise_draws, precision=args.precision)
    start = time.perf_counter()
    with h5py.File(out_path, "w") as out:
        create_output(out, ids, args.timesteps, images.shape[1], {"method": "paper"})
        infer_batches(model, schedule, ids, batches(images, args.batch_images), out, settings, noise_difference,
                      device=device, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="ddpm.pt to load (default: the default model config, random weights)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--batch-images", type=int, default=16)
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--noise-draws", type=int, default=1)
    parser.add_argument("--timesteps", type=int, nargs="+", default=list(DEFAULT_TIMESTEPS))
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--json", help="also write the settings and figures to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    autocast_dtype = resolve_autocast(device, args.precision)
    model, diffusion, size = load(args, device)
    args.resolution = size
    check_timesteps(args.timesteps, int(diffusion["T"]))
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model)
    schedule = Schedule.from_config(diffusion, device)
    n_params = sum(p.numel() for p in model.parameters())
    images = np.random.default_rng(0).integers(0, 256, (args.n_images, size, size, 3), dtype=np.uint8)

    with tempfile.TemporaryDirectory() as tmp:
        run_once(model, schedule, images[: args.batch_images], Path(tmp) / "warm.h5", args, device)
        seconds = run_once(model, schedule, images, Path(tmp) / "bench.h5", args, device)
    passes = 2 * len(args.timesteps) * args.noise_draws
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, autocast {autocast_dtype or 'fp32'}, compile {args.compile}, "
          f"{n_params / 1e6:.2f}M params, {size} px, batch {args.batch_images} images "
          f"({passes * args.batch_images} passes), {passes} passes/image")
    print(f"{args.n_images} images in {seconds:.2f} s: {args.n_images / seconds:.2f} images/s, "
          f"{args.n_images * passes / seconds:.1f} forward passes/s (incl. HDF5 write)")
    if args.json:
        result = {"device": name, "torch": torch.__version__, "autocast": str(autocast_dtype or "fp32"),
                  "compile": args.compile, "params": n_params, "resolution": size, "batch_images": args.batch_images,
                  "timesteps": args.timesteps, "noise_draws": args.noise_draws, "passes_per_image": passes,
                  "n_images": args.n_images, "seconds": seconds, "images_per_s": args.n_images / seconds,
                  "forward_passes_per_s": args.n_images * passes / seconds}
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
