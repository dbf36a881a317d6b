"""Images/s of the DDPM training step (the real Trainer.train_step: forward, backward, clip, AdamW, EMA).

    python bench/train_throughput.py --device cuda --precision bf16 --batch-size 256 --compile --channels-last
    python bench/train_throughput.py --device cpu --precision fp32 --batch-size 8 --steps 3 --warmup 1

Synthetic uint8 pairs at --image-size; warm-up steps (compilation included) are not timed.
Prints one line with the settings and images/s.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np
import torch

from diffseg.augment import PairedAugment
from diffseg.ddpm import DIFFUSION_DEFAULTS, MODEL_DEFAULTS, PairSampler, build_model, epsilon_loss
from diffseg.schedule import Schedule
from diffseg.train import Trainer
from diffseg.unet import count_parameters


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--augment", action="store_true", help="include PairedAugment (default off: model step only)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    return p.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    shape = (64, args.image_size, args.image_size, 3)
    lesion, healthy = rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 256, shape, dtype=np.uint8)
    model = build_model(MODEL_DEFAULTS, args.image_size)
    sampler = PairSampler(lesion, healthy, args.batch_size, PairedAugment() if args.augment else None)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model, None, sampler, checkpoint=f"{tmp}/m.pt", resume_path=f"{tmp}/m.resume.pt", metrics_csv=f"{tmp}/l.csv",
            config={}, steps=args.warmup + args.steps, precision=args.precision, compile=args.compile,
            channels_last=args.channels_last, device=args.device,
        )
        schedule = Schedule.from_config(DIFFUSION_DEFAULTS, trainer.device)
        trainer.loss_fn = lambda m, batch, g: epsilon_loss(m, batch[0], batch[1], schedule, g)
        sampler.to(trainer.device, trainer.memory_format)
        for step in range(args.warmup):
            trainer.train_step(step)
        synchronize(trainer.device)
        start = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            loss, _ = trainer.train_step(step)
        loss = float(loss)  # waits for the last step
        synchronize(trainer.device)
        seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"
    print(
        f"train_throughput device={trainer.device} ({name}) torch={torch.__version__} precision={args.precision} "
        f"batch={args.batch_size} compile={args.compile} channels_last={args.channels_last} augment={args.augment} "
        f"image={args.image_size} params={count_parameters(model)} threads={torch.get_num_threads()} "
        f"timed_steps={args.steps} warmup={args.warmup} loss={loss:.4f}: "
        f"{args.batch_size * args.steps / seconds:.1f} images/s"
    )


if __name__ == "__main__":
    main()
