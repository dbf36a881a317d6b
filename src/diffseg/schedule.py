"""Noise schedule: small pure functions and the Schedule object built on them (improved-diffusion / diffusers conventions)."""

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


class Schedule:
    """A noise schedule with alpha_bar precomputed (float32) on one device, in the style of diffusers' schedulers.

    ``q_sample`` noises clean images, ``predict_x0`` inverts it from a noise prediction, and
    ``ddim_step`` takes one deterministic DDIM step (eta = 0). Training, inference and the
    figures all build theirs with :meth:`from_config` from a checkpoint's ``diffusion`` section.
    """

    def __init__(self, betas: np.ndarray, device: torch.device | str | None = None):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.alpha_bar = torch.as_tensor(alpha_bars(self.betas), dtype=torch.float32, device=device)

    @classmethod
    def from_config(cls, diffusion: dict, device: torch.device | str | None = None) -> "Schedule":
        """The linear schedule of a ``diffusion`` config section (keys T, beta_start, beta_end)."""
        return cls(linear_betas(int(diffusion["T"]), float(diffusion["beta_start"]), float(diffusion["beta_end"])),
                   device)

    @property
    def T(self) -> int:
        return int(self.alpha_bar.shape[0])

    @property
    def device(self) -> torch.device:
        return self.alpha_bar.device

    def to(self, device: torch.device | str) -> "Schedule":
        """This schedule with alpha_bar on ``device``."""
        return Schedule(self.betas, device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (see :func:`q_sample`)."""
        return q_sample(x0, t, noise, self.alpha_bar)

    def _at(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar[t] shaped (B, 1, 1, 1) for a batch of image tensors."""
        return self.alpha_bar[t].view(-1, 1, 1, 1)

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), clipped to the image range [-1, 1] unless ``clip`` is False."""
        a = self._at(t)
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        return x0.clamp(-1.0, 1.0) if clip else x0

    def ddim_step(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM step (eta = 0) from step t to t_next, per batch item; t_next = -1 means x0."""
        x0_hat = self.predict_x0(x_t, eps, t)
        a_next = torch.where(t_next >= 0, self.alpha_bar[t_next.clamp(min=0)],
                             torch.ones_like(self.alpha_bar[:1])).view(-1, 1, 1, 1)
        return a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps
