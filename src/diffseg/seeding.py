"""Per-image seeds: results must not depend on an image's name, batch composition or shard count.

A stage that draws randomness for an image keys it by :func:`content_key` of the prepared image (the
resized uint8 array, the same in evaluation and prediction), so the same image gets the same draws
under any name, in any order. Only where no image exists yet (the synthetic demo renders one from its
id) or the key is not an image (a training step) is a plain string the key.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch


def content_key(image: np.ndarray) -> str:
    """The image's identity: sha256 (hex) of its shape, dtype and bytes, whatever its name."""
    image = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{image.shape}:{image.dtype.str}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def image_seed(seed: int, key: str) -> int:
    """A 63-bit seed derived from the run seed and a key, usually :func:`content_key` (stable across Python runs)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def image_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng(image_seed(seed, key))


def image_generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(image_seed(seed, key))


def draw_noise(keys: Sequence[str], seed: int, noise_draws: int, shape: Sequence[int]) -> torch.Tensor:
    """(B, D, *shape) standard normal noise; row i's draws come from image_generator(seed, keys[i])."""
    return torch.stack(
        [torch.randn((noise_draws, *shape), generator=image_generator(seed, key)) for key in keys]
    )


def image_noise(images_uint8: np.ndarray, seed: int, noise_draws: int) -> torch.Tensor:
    """(B, D, 3, H, W) noise of uint8 images (B, H, W, 3), each image's keyed by its content (not its name)."""
    keys = [content_key(image) for image in images_uint8]
    return draw_noise(keys, seed, noise_draws, (3, *images_uint8.shape[1:3]))
