"""Synthetic dermoscopy images and exact lesion masks in the ISIC 2018 Task 1 folder layout.

About 350 lines: one generator whose colour model, shapes and artefacts only make sense together.

Colour is modelled as skin reflectance times per-pigment transmittance (melanin, deep dermal
melanin, haemoglobin), so lesions darken any skin tone plausibly. The mask is the exact set of
pixels inside the lesion's own field; artefacts (hairs, bubbles, ruler, vignette) are drawn after
it and never change it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import line_aa
from skimage.transform import resize

from diffseg.atomic import atomic_path
from diffseg.imageio import write_mask_png
from diffseg.seeding import image_rng

log = logging.getLogger(__name__)

IMAGE_DIR = "ISIC2018_Task1-2_Training_Input"
MASK_DIR = "ISIC2018_Task1_Training_GroundTruth"
JPEG_QUALITY = 92

# Log-transmittance per unit density (R, G, B): melanin browns, deep melanin greys-blue,
# haemoglobin reddens.
MELANIN = np.array([0.55, 0.85, 1.05])
DEEP_MELANIN = np.array([1.0, 0.85, 0.6])
HAEMOGLOBIN = np.array([0.06, 0.55, 0.55])

SKIN_TONES = np.array([[240, 204, 190], [214, 162, 132], [165, 112, 82]], dtype=float)

# Lesion kinds: weight, melanin range, deep-melanin range, haemoglobin range,
# probabilities of pigment network, blotches, dots, whitish regression areas.
LESION_KINDS = {
    "nevus": (0.35, (0.5, 1.0), (0.0, 0.1), (0.0, 0.15), 0.5, 0.3, 0.25, 0.0),
    "melanoma": (0.30, (0.9, 1.6), (0.2, 0.8), (0.0, 0.3), 0.4, 0.9, 0.4, 0.4),
    "vascular": (0.15, (0.1, 0.35), (0.0, 0.0), (0.3, 0.7), 0.1, 0.0, 0.4, 0.2),
    "faint": (0.20, (0.3, 0.55), (0.0, 0.0), (0.0, 0.2), 0.3, 0.3, 0.2, 0.0),
}


def demo_id(index: int) -> str:
    """ISIC-style id of the index-th demo image."""
    return f"ISIC_{index:07d}"


def make_demo_dataset(out_dir: str | os.PathLike, *, n_images: int = 60, image_size: int = 128,
                      seed: int = 0) -> list[str]:
    """Write n_images synthetic image/mask pairs under out_dir in ISIC 2018 layout; return the ids."""
    _check_arguments(n_images, image_size)
    out = Path(out_dir)
    ids = [demo_id(i) for i in range(n_images)]
    for image_id in ids:
        rgb, mask = render_sample(image_rng(seed, image_id), image_size)
        with atomic_path(out / IMAGE_DIR / f"{image_id}.jpg") as tmp:
            Image.fromarray(rgb).save(tmp, format="JPEG", quality=JPEG_QUALITY)
        write_mask_png(out / MASK_DIR / f"{image_id}_segmentation.png", mask)
    log.info("wrote %d synthetic dermoscopy pairs (%d px, seed %d) to %s", n_images, image_size, seed, out)
    return ids


def _check_arguments(n_images: int, image_size: int) -> None:
    if int(n_images) != n_images or n_images < 1:
        raise ValueError(f"n_images must be an integer >= 1, got {n_images!r}")
    if int(image_size) != image_size or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")


def render_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic dermoscopy image (uint8 HxWx3) and its exact lesion mask (bool HxW)."""
    scale = size / 128.0  # pixel-sized features (hair width, dots) follow the resolution
    mask = _lesion_mask(rng, size)
    alpha, depth = _lesion_geometry(rng, mask, scale)
    skin_rgb, skin_density = _skin(rng, size, scale)
    lesion_density, whitening = _lesion_pigment(rng, mask, alpha, depth, scale)
    rgb = skin_rgb * np.exp(-(skin_density + lesion_density))
    rgb += whitening[..., None] * (np.array([232.0, 222.0, 226.0]) - rgb)
    rgb = _draw_artefacts(rng, rgb, mask, scale)
    rgb = ndimage.gaussian_filter(rgb, sigma=(0.5 * scale, 0.5 * scale, 0))  # optics blur
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mask


# ---------------------------------------------------------------- random fields and helpers

def _noise(rng: np.random.Generator, size: int, feature: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field whose blobs are about feature*size px wide."""
    cells = min(size, 2 * max(1, round(1.0 / feature)) + 4)
    coarse = ndimage.gaussian_filter(rng.standard_normal((cells, cells)), sigma=1.0, mode="wrap")
    field = resize(coarse, (size, size), order=3, mode="reflect", anti_aliasing=False)
    return (field - field.mean()) / (field.std() + 1e-12)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in [0, 1]."""
    axis = (np.arange(size) + 0.5) / size
    return np.meshgrid(axis, axis, indexing="ij")


def _splat(size: int, ys: np.ndarray, xs: np.ndarray, weights: np.ndarray | float) -> np.ndarray:
    """Bilinear splat of weighted sub-pixel points (pixel units) onto a size x size canvas."""
    canvas = np.zeros((size + 2, size + 2))
    ys, xs = np.asarray(ys, float) + 1, np.asarray(xs, float) + 1  # one-pixel pad absorbs edges
    keep = (ys >= 0) & (ys < size + 1) & (xs >= 0) & (xs < size + 1)
    ys, xs = ys[keep], xs[keep]
    w = np.broadcast_to(weights, keep.shape)[keep]
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = ys - y0, xs - x0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            np.add.at(canvas, (y0 + dy, x0 + dx), w * wy * wx)
    return canvas[1:-1, 1:-1]


def _soft_blobs(size: int, ys, xs, sigma: float, weights=1.0) -> np.ndarray:
    """Gaussian blobs of peak ~weight at the given pixel positions."""
    blobs = ndimage.gaussian_filter(_splat(size, ys, xs, weights), sigma)
    return blobs * (2 * np.pi * sigma**2)


# ---------------------------------------------------------------- lesion shape

def _lesion_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Exact mask: one filled component of {field < 1} for an irregular radial field."""
    field = _lesion_field(rng, size)
    inside = field < 1.0
    if not inside.any():  # tiny lesion between pixel centres: keep its innermost pixel
        inside = field <= field.min()
    labels, count = ndimage.label(inside)
    if count > 1:
        sizes = ndimage.sum_labels(inside, labels, index=np.arange(1, count + 1))
        inside = labels == 1 + int(np.argmax(sizes))
    return ndimage.binary_fill_holes(inside)


def _lesion_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """Normalised radius around a random centre (<1 inside): rotated ellipse, lobes, ragged border."""
    area = np.exp(rng.uniform(np.log(0.04), np.log(0.6)))
    radius = np.sqrt(area / np.pi)
    cy, cx = _lesion_centre(rng)
    angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.6, 1.0)
    y, x = _grid(size)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    rho = np.hypot(u * np.sqrt(aspect), v / np.sqrt(aspect))
    theta = np.arctan2(v, u)
    lobes = sum(rng.normal(0, 0.25 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                for k in range(2, 8))
    ragged = np.clip(_noise(rng, size, rng.uniform(0.1, 0.2)), -2.5, 2.5)
    return rho / (radius * np.exp(lobes)) + rng.uniform(0.03, 0.1) * ragged


def _lesion_centre(rng: np.random.Generator) -> tuple[float, float]:
    """Mostly central; in about a quarter of images next to one border so the lesion crosses it."""
    cy, cx = rng.uniform(0.25, 0.75, size=2)
    if rng.random() < 0.25:
        edge = rng.uniform(0.0, 0.12)
        side = rng.integers(4)
        value = edge if side % 2 == 0 else 1.0 - edge
        cy, cx = (value, cx) if side < 2 else (cy, value)
    return float(cy), float(cx)


def _lesion_geometry(rng: np.random.Generator, mask: np.ndarray, scale: float):
    """Soft colour alpha (a few px blend across the exact border) and interior depth in [0, 1]."""
    inside = ndimage.distance_transform_edt(mask) - 0.5
    outside = ndimage.distance_transform_edt(~mask) - 0.5
    signed = np.where(mask, inside, -outside)
    blend = rng.uniform(2.0, 6.0) * scale
    alpha = np.clip(0.5 + signed / blend, 0.0, 1.0)
    depth = np.clip(signed / max(signed.max(), 1.0), 0.0, 1.0)
    return alpha, depth


# ---------------------------------------------------------------- colour

def _skin(rng: np.random.Generator, size: int, scale: float):
    """Base skin colour (per image) and a skin density map: mottling, erythema, furrows, grain."""
    tone = rng.uniform() ** 1.5 * (len(SKIN_TONES) - 1)
    low = int(min(tone, len(SKIN_TONES) - 2))
    base = SKIN_TONES[low] + (tone - low) * (SKIN_TONES[low + 1] - SKIN_TONES[low])
    base = base + rng.uniform(-1, 1) * np.array([4.0, -6.0, 2.0])  # pinkish <-> yellowish
    base = base * rng.uniform(0.88, 1.04) * np.exp(rng.normal(0, 0.035, 3))  # exposure, colour cast
    mottling = 0.06 * _noise(rng, size, 0.45)[..., None]
    erythema = rng.uniform(0.0, 0.12) * np.clip(_noise(rng, size, 0.4) + 0.5, 0, None)
    furrows = np.exp(-(_noise(rng, size, 0.06) / 0.12) ** 2) * rng.uniform(-0.05, 0.04)
    grain = ndimage.gaussian_filter(rng.standard_normal((size, size)), 0.6 * scale) * 0.05
    density = mottling + (erythema[..., None] * HAEMOGLOBIN) + (furrows + grain)[..., None]
    return base, density


def _lesion_pigment(rng: np.random.Generator, mask, alpha, depth, scale):
    """Lesion density (H, W, 3) and whitening map: core/rim gradient, network, blotches, dots."""
    size = mask.shape[0]
    kind = _choose_kind(rng)
    _, mel_range, deep_range, hb_range, p_net, p_blotch, p_dots, p_white = LESION_KINDS[kind]
    rim = rng.uniform(0.3, 0.7)  # rim strength relative to the core
    profile = alpha * (rim + (1 - rim) * depth ** rng.uniform(0.4, 0.9))
    profile *= 1 + 0.3 * _noise(rng, size, 0.15)
    melanin = rng.uniform(*mel_range) * profile
    deep = rng.uniform(*deep_range) * profile * np.clip(_noise(rng, size, 0.2) + 0.5, 0, 2)
    haem = rng.uniform(*hb_range) * alpha * (1 + 0.4 * _noise(rng, size, 0.1))
    if rng.random() < p_net:
        melanin += _pigment_network(rng, size, alpha, depth, scale)
    if rng.random() < p_blotch:
        blotch = np.clip((_noise(rng, size, 0.12) - 0.5) / 0.6, 0, 1) * np.clip(depth * 3, 0, 1)
        melanin += rng.uniform(0.4, 0.9) * blotch
        deep += rng.uniform(0.0, 0.5) * blotch
    if rng.random() < p_dots:
        dots = _dots(rng, mask, scale) * rng.uniform(0.6, 1.4)
        haem, melanin = (haem + dots, melanin) if kind == "vascular" else (haem, melanin + dots)
    whitening = np.zeros_like(alpha)
    if rng.random() < p_white:
        veil = ndimage.gaussian_filter(np.clip(_noise(rng, size, 0.15) - 0.7, 0, 1), 2 * scale)
        whitening = 0.3 * veil * np.clip(depth * 4, 0, 1)
    density = melanin[..., None] * MELANIN + deep[..., None] * DEEP_MELANIN
    return density + haem[..., None] * HAEMOGLOBIN, whitening


def _choose_kind(rng: np.random.Generator) -> str:
    names = list(LESION_KINDS)
    weights = np.array([LESION_KINDS[name][0] for name in names])
    return names[rng.choice(len(names), p=weights / weights.sum())]


def _pigment_network(rng, size, alpha, depth, scale):
    """Brown mesh: the zero-level lines of a fine random field, faded towards the core."""
    cell = rng.uniform(0.03, 0.05) / scale ** 0.5
    lines = np.exp(-(_noise(rng, size, cell) / 0.3) ** 2)
    fade = np.clip(depth * 6, 0, 1) * (1 - 0.6 * depth)  # absent at the very border and the core
    return rng.uniform(0.12, 0.35) * lines * alpha * fade


def _dots(rng: np.random.Generator, mask: np.ndarray, scale: float) -> np.ndarray:
    """A cluster of small dark globules of varied size and strength inside the lesion."""
    ys, xs = np.nonzero(mask)
    centre = rng.integers(len(ys))
    spread = np.sqrt(len(ys)) * rng.uniform(0.15, 0.4)
    count = int(rng.integers(3, 6 + len(ys) // (150 * scale**2)))
    py = ys[centre] + rng.normal(0, spread, count)
    px = xs[centre] + rng.normal(0, spread, count)
    inside = mask[np.clip(py.round().astype(int), 0, mask.shape[0] - 1),
                  np.clip(px.round().astype(int), 0, mask.shape[1] - 1)]
    strength = rng.uniform(0.3, 1.0, count) * inside
    return _soft_blobs(mask.shape[0], py, px, sigma=rng.uniform(0.5, 0.9) * scale, weights=strength)


# ---------------------------------------------------------------- artefacts (mask unchanged)

def _draw_artefacts(rng: np.random.Generator, rgb: np.ndarray, mask: np.ndarray, scale: float):
    size = mask.shape[0]
    rgb = _over(rgb, _hairs(rng, size, scale), rng.uniform(15, 45) * np.array([1.0, 0.8, 0.7]))
    rgb = _over(rgb, _highlights(rng, mask, scale), np.array([250.0, 250.0, 247.0]))
    if rng.random() < 0.2:
        rgb = _over(rgb, _ruler(rng, size, scale), np.full(3, rng.uniform(20, 60)))
    return rgb * _vignette(rng, size)[..., None]


def _over(rgb: np.ndarray, coverage: np.ndarray, colour: np.ndarray) -> np.ndarray:
    a = np.clip(coverage, 0, 1)[..., None]
    return rgb * (1 - a) + colour * a


def _hairs(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Coverage of thin, gently curved dark hairs: none, a few, or many."""
    count = rng.choice([0, int(rng.integers(1, 6)), int(rng.integers(10, 35))], p=[0.45, 0.4, 0.15])
    coverage = np.zeros((size, size))
    for _ in range(count):
        coverage = np.maximum(coverage, _one_hair(rng, size, scale))
    return coverage


def _one_hair(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """One hair: a nearly straight stroke with slow drift and small wobble, tapered at the ends."""
    step = 0.25
    s = np.arange(0.0, rng.uniform(0.3, 1.4) * size, step)
    drift = rng.normal(0, 0.4 / size) * s  # slow, steady bend over the hair
    wobble = ndimage.gaussian_filter1d(rng.normal(0, 0.08, s.size), 12 / step) * np.sqrt(12 / step)
    heading = rng.uniform(0, 2 * np.pi) + drift + wobble
    y0, x0 = rng.uniform(-0.1, 1.1, size=2) * size
    ys, xs = y0 + np.cumsum(np.sin(heading)) * step, x0 + np.cumsum(np.cos(heading)) * step
    taper = np.clip(np.minimum(s, s[-1] - s) / (0.1 * s[-1] + 1), 0.3, 1)
    sigma = rng.uniform(0.35, 0.65) * scale
    line = ndimage.gaussian_filter(_splat(size, ys, xs, step * taper), sigma)
    return line * np.sqrt(2 * np.pi) * sigma * rng.uniform(0.55, 0.95) * 1.3


def _highlights(rng: np.random.Generator, mask: np.ndarray, scale: float) -> np.ndarray:
    """Specular glints (tiny bright spots, often on the lesion) and air bubbles (bright rings)."""
    size = mask.shape[0]
    coverage = np.zeros((size, size))
    if rng.random() < 0.3:
        ys, xs = np.nonzero(mask)
        count = int(rng.integers(1, 10))
        pick = rng.integers(0, len(ys), size=count)
        coverage += _soft_blobs(size, ys[pick], xs[pick], 0.6 * scale, rng.uniform(0.4, 0.9, count))
    if rng.random() < 0.2:
        for _ in range(int(rng.integers(1, 6))):
            coverage = np.maximum(coverage, _bubble(rng, size, scale))
    return coverage


def _bubble(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    cy, cx = rng.uniform(0, size, size=2)
    radius = rng.uniform(1.5, 7.0) * scale
    t = np.linspace(0, 2 * np.pi, int(2 * np.pi * radius * 4) + 8, endpoint=False)
    rim = _soft_blobs(size, cy + radius * np.sin(t), cx + radius * np.cos(t), 0.5 * scale,
                      0.25 * (1 + 0.8 * np.cos(t - rng.uniform(0, 2 * np.pi))))
    glint = _soft_blobs(size, [cy - 0.4 * radius], [cx - 0.4 * radius], 0.4 * radius + 0.3)
    return rim * 0.6 + glint * 0.8


def _ruler(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Millimetre ruler: a line along one border with short ticks and a longer one every fifth."""
    coverage = np.zeros((size, size))
    angle = rng.normal(0, 0.12) + rng.integers(4) * np.pi / 2
    along = np.array([np.cos(angle), np.sin(angle)])
    across = np.array([-along[1], along[0]])
    centre = np.array([size / 2, size / 2]) - across * size * rng.uniform(0.3, 0.45)
    start = centre - along * size * rng.uniform(0.2, 0.45)
    spacing, length = rng.uniform(3.0, 6.0) * scale, int(rng.integers(12, 24))
    _draw_line(coverage, start, start + along * spacing * (length - 1))
    for k in range(length):
        base = start + along * spacing * k
        tick = (6.0 if k % 5 == 0 else 3.0) * scale
        _draw_line(coverage, base, base + across * tick)
    return coverage * rng.uniform(0.6, 0.9)


def _draw_line(canvas: np.ndarray, start: np.ndarray, end: np.ndarray) -> None:
    """Anti-aliased segment between (x, y) points, clipped to the canvas."""
    rows, cols, value = line_aa(int(round(start[1])), int(round(start[0])),
                                int(round(end[1])), int(round(end[0])))
    keep = (rows >= 0) & (rows < canvas.shape[0]) & (cols >= 0) & (cols < canvas.shape[1])
    np.maximum.at(canvas, (rows[keep], cols[keep]), value[keep])


def _vignette(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brightness falloff of the dermoscope; in about a third, black corners outside its field."""
    y, x = _grid(size)
    offset = rng.normal(0, 0.03, size=2)
    r = np.hypot(y - 0.5 - offset[0], x - 0.5 - offset[1])
    gain = 1 - rng.uniform(0.05, 0.25) * (r / 0.707) ** 2
    if rng.random() < 0.35:
        field_radius = rng.uniform(0.55, 0.75)
        edge = rng.uniform(0.01, 0.04)
        gain *= 0.08 + 0.92 * np.clip((field_radius - r) / edge + 0.5, 0, 1)
    return gain
