"""Noise schedule: small pure functions (improved-diffusion / diffusers conventions)."""

from __future__ import annotations

import numpy as np
import torch


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """T betas spaced linearly from beta_start to beta_end (float64)."""
    if T < 1:
        raise ValueError(f"diffusion T must be >= 1, got {T}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def alpha_bars(betas: np.ndarray) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float64."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, with a_t = alpha_bar[t] broadcast per batch item."""
    a = alpha_bar.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)]
    a = a.reshape(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise
