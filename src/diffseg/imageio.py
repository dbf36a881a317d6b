"""Reading and writing images and masks: the one place where an input file is validated."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class InputError(ValueError):
    """A problem with one input file; the message starts with the file's path."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _open(path: str | os.PathLike) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        img = Image.open(path)
        img.load()  # forces a full decode: truncated files fail here, not later
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InputError(path, f"unreadable or truncated image ({err})") from err
    return ImageOps.exif_transpose(img)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 (H, W, 3), EXIF orientation applied; grayscale, RGBA, palette and 16-bit converted."""
    img = _open(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Binary mask (H, W) bool. Accepts 0/255 or 0/1 (any channel layout); anything else is an error."""
    img = _open(path)
    arr = np.asarray(img)
    if arr.ndim == 3:
        if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, min(arr.shape[2], 3))):
            raise InputError(path, "mask has differing colour channels; expected a grey-level 0/255 mask")
        arr = arr[..., 0]
    values = np.unique(arr)
    if set(values.tolist()) <= {0, 255}:
        return arr > 127
    if set(values.tolist()) <= {0, 1}:
        return arr > 0
    shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
    raise InputError(path, f"mask is not binary: values {shown} (expected 0/255 or 0/1)")


def write_mask_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a boolean mask as a 0/255 8-bit PNG (the ISIC scorer's format), atomically."""
    from diffseg.atomic import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(tmp, format="PNG")


def resize_float(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float map (H, W) to (height, width), float32 (e.g. a mask fraction to original size)."""
    values = np.asarray(values, np.float32)
    if values.shape == (height, width):
        return values
    return np.asarray(Image.fromarray(values).resize((int(width), int(height)), Image.Resampling.BILINEAR))


def write_grey_png(path: str | os.PathLike, values: np.ndarray, vmax: float) -> None:
    """Write a map (H, W) in [0, vmax] as an 8-bit grey PNG (0 -> 0, vmax -> 255), atomically."""
    from diffseg.atomic import atomic_path

    grey = np.clip(np.asarray(values, np.float64) / vmax * 255.0 + 0.5, 0, 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(grey).save(tmp, format="PNG")
