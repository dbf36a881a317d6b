"""Paired augmentation on torch batches: one random transform per sample, applied to image and twins/masks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class PairedAugment:
    """Random flips, rot90, small rotation + shift, blur and sharpening, identical across paired tensors.

    ``aug(images, generator, *extra)`` -> tuple ``(images, *extra)``. ``images`` is (B, C, H, W)
    float; each ``extra`` is (B, C', H, W) with the same B, H, W. Extras with one channel are
    treated as masks: nearest-neighbour resampling, no blur/sharpen, dtype kept (so they stay
    binary). All random numbers come from ``generator`` on the CPU, in a fixed order whatever
    options are on, so results are reproducible and independent of the tensors' device.
    Sharpened images are clamped to [-1, 1] (the torch image convention).
    """

    def __init__(
        self,
        hflip: bool = True,
        vflip: bool = True,
        rot90: bool = True,
        rotate_deg: float = 10.0,
        shift_px: float = 0,
        blur_prob: float = 0.2,
        blur_sigma: float = 1.0,
        sharpen_prob: float = 0.2,
        sharpen_amount: float = 0.5,
    ):
        for name, p in (("blur_prob", blur_prob), ("sharpen_prob", sharpen_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {p}")
        if rotate_deg < 0 or shift_px < 0 or blur_sigma <= 0:
            raise ValueError(
                f"augment: rotate_deg and shift_px must be >= 0 and blur_sigma > 0, "
                f"got {rotate_deg}, {shift_px}, {blur_sigma}"
            )
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.rotate_deg, self.shift_px = float(rotate_deg), float(shift_px)
        self.blur_prob, self.blur_sigma = float(blur_prob), float(blur_sigma)
        self.sharpen_prob, self.sharpen_amount = float(sharpen_prob), float(sharpen_amount)

    def draw(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-sample parameters, on the CPU; every draw happens even when its option is off."""
        u = torch.rand(batch, 8, generator=generator, dtype=torch.float64)
        return {
            "hflip": (u[:, 0] < 0.5) & self.hflip,
            "vflip": (u[:, 1] < 0.5) & self.vflip,
            "rot90": torch.floor(u[:, 2] * 4).long().clamp(max=3) * int(self.rot90),
            "angle": (u[:, 3] * 2 - 1) * math.radians(self.rotate_deg),
            "shift": (u[:, 4:6] * 2 - 1) * self.shift_px,  # (dx, dy) in pixels
            "blur": u[:, 6] < self.blur_prob,
            "sharpen": u[:, 7] < self.sharpen_prob,
        }

    def __call__(self, images: torch.Tensor, generator: torch.Generator, *extra: torch.Tensor) -> tuple:
        tensors = (images, *extra)
        _check_shapes(tensors)
        b, _, h, w = images.shape
        if self.rot90 and h != w:
            raise ValueError(f"augment.rot90 needs square images, got {h}x{w}")
        p = {k: v.to(images.device) for k, v in self.draw(b, generator).items()}
        out = []
        for index, x in enumerate(tensors):
            is_mask = index > 0 and x.shape[1] == 1
            x = _flips(x, p["hflip"], p["vflip"], p["rot90"])
            x = self._affine(x, p["angle"], p["shift"], is_mask)
            if not is_mask:
                x = self._filters(x, p["blur"], p["sharpen"])
            out.append(x)
        return tuple(out)

    def _affine(self, x: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor, is_mask: bool) -> torch.Tensor:
        """Rotation about the centre and shift; reflection padding; nearest for masks."""
        if self.rotate_deg == 0 and self.shift_px == 0:
            return x
        b, _, h, w = x.shape
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(b, 2, 3, dtype=torch.float32, device=x.device)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin * h / w, sin * w / h, cos
        theta[:, 0, 2] = -shift[:, 0] * 2 / w  # normalised coords: 2 units span the image
        theta[:, 1, 2] = -shift[:, 1] * 2 / h
        grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)
        src = x.float()
        moved = F.grid_sample(
            src, grid.to(src.dtype), mode="nearest" if is_mask else "bilinear", padding_mode="reflection",
            align_corners=False,
        )
        return moved.to(x.dtype)

    def _filters(self, x: torch.Tensor, blur: torch.Tensor, sharpen: torch.Tensor) -> torch.Tensor:
        """Gaussian blur or unsharp-mask sharpening, per selected sample."""
        if not (blur.any() or sharpen.any()):
            return x
        smooth = gaussian_blur(x, self.blur_sigma)
        sharp = (x + self.sharpen_amount * (x - smooth)).clamp(-1.0, 1.0)
        x = torch.where(sharpen[:, None, None, None], sharp, x)
        return torch.where(blur[:, None, None, None], smooth, x)


def _check_shapes(tensors: tuple[torch.Tensor, ...]) -> None:
    ref = tensors[0].shape
    if len(ref) != 4:
        raise ValueError(f"augment: images must be (B, C, H, W), got shape {tuple(ref)}")
    for i, t in enumerate(tensors[1:], 1):
        if t.ndim != 4 or t.shape[0] != ref[0] or t.shape[2:] != ref[2:]:
            raise ValueError(f"augment: extra tensor {i} has shape {tuple(t.shape)}, images {tuple(ref)}")


def _flips(x: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor, rot90: torch.Tensor) -> torch.Tensor:
    """Exact flips and quarter turns, selected per sample by index masks."""
    x = torch.where(hflip[:, None, None, None], x.flip(-1), x)
    x = torch.where(vflip[:, None, None, None], x.flip(-2), x)
    if bool((rot90 > 0).any()):
        turned = x
        for k in (1, 2, 3):
            turned = torch.where((rot90 == k)[:, None, None, None], torch.rot90(x, k, dims=(-2, -1)), turned)
        x = turned
    return x


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable depthwise Gaussian blur of (B, C, H, W), reflect padding, radius 3 sigma."""
    radius = max(1, int(math.ceil(3 * sigma)))
    c = x.shape[1]
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    pad_h = min(radius, x.shape[-1] - 1)
    pad_v = min(radius, x.shape[-2] - 1)
    if pad_h < radius or pad_v < radius:
        raise ValueError(f"gaussian_blur: image {tuple(x.shape[-2:])} too small for sigma {sigma}")
    out = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
