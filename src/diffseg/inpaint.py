"""Lesion removal: the "healthy twin" of a training image (label c0).

Methods:
- ``"biharmonic"``: ``skimage.restoration.inpaint_biharmonic``; smooth, and slow on large lesions.
- ``"pushpull"``: multi-scale push-pull fill (normalised pyramid averaging); smooth and fast.
- ``"texture"`` (default): push-pull fill plus skin texture copied from the surrounding skin by random
  translations, so twins are not smooth blobs (design.md section 5: smooth twins teach the model
  that "healthy" means "smooth").

In all methods the pixels outside the dilated mask are returned exactly unchanged.
Biharmonic extrapolates the boundary gradients, so skin noise and the dark halo just outside a
tight mask pull its fill away from the skin colour (on real ISIC images at 64 px the twin of
ISIC_0000036 ends further from the skin than the lesion was); push-pull averages wider skin.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from skimage.morphology import disk
from skimage.restoration import inpaint_biharmonic
from skimage.transform import resize

logger = logging.getLogger(__name__)

METHODS = ("biharmonic", "pushpull", "texture")
TEXTURE_SIGMA = 2.0  # texture = image minus its Gaussian blur at this scale (pixels)
TEXTURE_OFFSETS = 96  # random translations tried when copying texture into the hole


def dilate_mask(mask: np.ndarray, dilate_px: int) -> np.ndarray:
    """Mask grown by a disk of radius ``dilate_px`` (0: unchanged)."""
    mask = np.asarray(mask, dtype=bool)
    if dilate_px <= 0 or not mask.any():
        return mask.copy()
    return ndimage.binary_dilation(mask, structure=disk(int(dilate_px)))


def remove_lesion(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    dilate_px: int = 3,
    method: str = "texture",
    seed: int = 0,
    min_skin_fraction: float = 0.02,
) -> np.ndarray | None:
    """Inpaint the dilated lesion from the surrounding skin; uint8 (H, W, 3), or None if no skin is left.

    None means the dilated mask leaves less than ``min_skin_fraction`` of the image as skin.
    ``seed`` only affects ``"texture"``.
    """
    if method not in METHODS:
        raise ValueError(f"prepare.inpaint: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"remove_lesion: expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"remove_lesion: mask shape {mask.shape} differs from image shape {image.shape[:2]}")
    hole = dilate_mask(mask, dilate_px)
    if not hole.any():
        return image.copy()
    if 1.0 - hole.mean() < min_skin_fraction:
        logger.debug("no skin left: the dilated lesion covers %.1f%% of the image", 100 * hole.mean())
        return None
    if method == "biharmonic":
        filled = inpaint_biharmonic(image.astype(np.float64) / 255.0, hole, channel_axis=-1) * 255.0
    else:
        filled = push_pull_fill(image.astype(np.float64), ~hole)
        if method == "texture":
            filled = filled + skin_texture(image, hole, np.random.default_rng(seed))
    filled = np.clip(np.rint(filled), 0, 255).astype(np.uint8)
    return np.where(hole[..., None], filled, image)


def push_pull_fill(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill unknown pixels of (H, W, C) float ``values`` by push-pull over a 2x pyramid.

    Push: average known pixels into coarser levels, with a weight saturating at 1.
    Pull: from the coarsest level down, each level blends its own average (by its weight)
    with the bilinearly upsampled coarser estimate. Known pixels keep their values.
    """
    levels = [(values, known.astype(np.float64))]
    while min(levels[-1][0].shape[:2]) > 1:
        levels.append(_push(*levels[-1]))
    estimate = levels[-1][0]
    for colour, weight in reversed(levels[:-1]):
        coarse = resize(estimate, colour.shape, order=1, mode="edge", anti_aliasing=False)
        estimate = weight[..., None] * colour + (1.0 - weight[..., None]) * coarse
    return estimate


def _push(colour: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One pyramid level down: weighted 2x2 average of colour, weights summed and capped at 1."""
    h, w = weight.shape
    pad = ((0, h % 2), (0, w % 2))  # zero weight padding: padded pixels contribute nothing
    weight = np.pad(weight, pad)
    colour = np.pad(colour, pad + ((0, 0),))
    wsum = _sum2x2(weight)
    csum = _sum2x2(colour * weight[..., None])
    mean = csum / np.maximum(wsum, 1e-12)[..., None]
    return mean, np.minimum(wsum, 1.0)


def _sum2x2(arr: np.ndarray) -> np.ndarray:
    return arr[0::2, 0::2] + arr[1::2, 0::2] + arr[0::2, 1::2] + arr[1::2, 1::2]


def skin_texture(image: np.ndarray, hole: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """High-frequency skin texture for the hole, copied from skin at random translations; 0 elsewhere.

    Texture is the image minus a blur normalised over skin only (the lesion does not leak in).
    Each hole pixel takes the texture at the first random offset whose source is clean skin;
    whole regions share an offset, so copied texture stays spatially coherent.
    """
    skin = ~hole
    img = image.astype(np.float64)
    sigma = (TEXTURE_SIGMA, TEXTURE_SIGMA, 0)
    smooth = ndimage.gaussian_filter(img * skin[..., None], sigma) / np.maximum(
        ndimage.gaussian_filter(skin.astype(np.float64), TEXTURE_SIGMA), 1e-6
    )[..., None]
    detail = img - smooth
    # sources: skin whose blur neighbourhood is skin too, so the texture there is not lesion edge
    source_ok = ~dilate_mask(hole, int(np.ceil(2 * TEXTURE_SIGMA)))
    out = np.zeros_like(img)
    todo_y, todo_x = np.nonzero(hole)
    h, w = hole.shape
    for dy, dx in rng.integers(-max(h, w), max(h, w) + 1, size=(TEXTURE_OFFSETS, 2)):
        if todo_y.size == 0:
            break
        sy, sx = todo_y + dy, todo_x + dx
        inside = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
        ok = np.zeros_like(inside)
        ok[inside] = source_ok[sy[inside], sx[inside]]
        out[todo_y[ok], todo_x[ok]] = detail[sy[ok], sx[ok]]
        todo_y, todo_x = todo_y[~ok], todo_x[~ok]
    return out
