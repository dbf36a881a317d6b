"""Per-image seeds: results must not depend on batch composition or shard count."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def image_seed(seed: int, image_id: str) -> int:
    """A 63-bit seed derived from the run seed and the image id (stable across Python runs)."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    return np.random.default_rng(image_seed(seed, image_id))


def image_generator(seed: int, image_id: str) -> torch.Generator:
    return torch.Generator().manual_seed(image_seed(seed, image_id))
