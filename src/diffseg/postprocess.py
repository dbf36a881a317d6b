"""Per-image numpy post-processing of difference maps: normalise, binarize, and the calibration's application.

Torch-free (numpy, scipy, scikit-image), so uncertainty, CRF fusion, evaluation and figures use it
without importing the model code. Fitting a calibration on the validation split lives in
``diffseg.calibration``; applying one lives here.

``apply_calibration(maps, calibration)`` turns one image's normalised maps ``(T, H, W)`` (as stored
in ``inference.h5``) into ``(probabilities, binary)``, both ``(T, H, W)``:

- ``method="paper"``: the identity. Probabilities are the normalised maps themselves and the binary
  outputs are ``maps > threshold`` (the configured ``inference.threshold``), exactly what inference
  stores as ``binary``: the paper-faithful path.
- ``method="calibrated"``: per timestep, subtract a per-pixel bias map, Gaussian-blur, threshold at
  the value chosen on the validation split, clean up (closing, hole filling, largest component),
  and give the CRF a probability ``sigmoid((map - threshold) / sigmoid_scale)`` centred on that
  threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage
from skimage.morphology import disk

from diffseg.settings import NORMALISE_METHODS, check_threshold

CALIBRATION_METHODS = ("paper", "calibrated")
OTSU_CHANNELS = ("gray", "red", "green", "blue", "value")


# ----------------------------------------------------------------------------- normalise, binarize


def normalise(maps: np.ndarray, method: str = "p99") -> np.ndarray:
    """Scale one image's maps (T, H, W) to [0, 1] float32 by a statistic over all its timesteps."""
    maps = np.asarray(maps, dtype=np.float32)
    if method == "none":
        return maps
    if method == "p99":
        scale = float(np.percentile(maps, 99))
    elif method == "max":
        scale = float(maps.max())
    else:
        raise ValueError(f"inference.normalise must be one of {NORMALISE_METHODS}, got {method!r}")
    if scale <= 0.0:  # all-zero maps (identical predictions): nothing differs anywhere
        return np.zeros_like(maps)
    return np.clip(maps / scale, 0.0, 1.0)


_normalise = normalise  # postprocess_image's keyword (the config key) shadows the function name


def binarize(maps: np.ndarray, threshold: float | str = 0.5) -> np.ndarray:
    """uint8 0/1 masks, same shape as maps (..., H, W): maps > threshold, or Otsu per (H, W) map."""
    maps = np.asarray(maps)
    if threshold == "otsu":
        from skimage.filters import threshold_otsu

        flat = maps.reshape(-1, *maps.shape[-2:])
        out = np.zeros(flat.shape, dtype=np.uint8)
        for i, m in enumerate(flat):
            if m.max() > m.min():  # Otsu is undefined on a constant map: leave it empty
                out[i] = m > threshold_otsu(m)
        return out.reshape(maps.shape)
    check_threshold(threshold)
    return (maps > threshold).astype(np.uint8)


@dataclass
class ImageMaps:
    """One image's outputs, as written to inference.h5."""

    maps: np.ndarray  # (T, H, W) float32 in [0, 1]
    binary: np.ndarray  # (T, H, W) uint8 0/1


def postprocess_image(raw: np.ndarray, *, normalise: str = "p99", threshold: float | str = 0.5) -> ImageMaps:
    """Raw difference maps (T, H, W) of one image -> normalised maps and binary masks.

    Extra levers (blur, bias-map subtraction, ...) belong here, before normalisation.
    """
    maps = _normalise(raw, normalise)
    return ImageMaps(maps=maps, binary=binarize(maps, threshold))


# ----------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """Settings that turn normalised maps into probabilities and binary outputs (see module doc)."""

    # defaults = config/schema.yaml's (method paper ignores every field but threshold)
    method: str = "paper"
    threshold: float | str = 0.5
    bias_map: np.ndarray | None = None  # (T, H, W) subtracted from the maps; None = no bias map
    blur_sigma: float = 1.0
    sigmoid_scale: float | None = None  # None = not fitted yet (calibration.fit_calibration fits it on val)
    closing_px: int = 1
    fill_holes: bool = True
    largest_component: bool = True
    best_timestep: int | None = None
    timesteps: list = field(default_factory=list)

    def __post_init__(self):
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration.method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        if self.method == "calibrated" and not isinstance(self.threshold, (int, float)):
            raise ValueError(f"calibration.threshold must be a number for method 'calibrated', got {self.threshold!r}")
        if self.sigmoid_scale is not None and self.sigmoid_scale <= 0:
            raise ValueError(f"calibration.sigmoid_scale must be > 0, got {self.sigmoid_scale}")

    @property
    def is_paper(self) -> bool:
        """The identity: the binary outputs are inference's stored ones."""
        return self.method == "paper"

    def replace(self, **changes) -> "Calibration":
        """A copy with some fields changed (validated again)."""
        fields = {k: getattr(self, k) for k in asdict(self)}
        fields.update(changes)
        return Calibration(**fields)


PAPER = Calibration()


def cleanup(mask: np.ndarray, *, closing_px: int, fill_holes: bool, largest_component: bool) -> np.ndarray:
    """Morphological clean-up of one bool mask (H, W): closing (disk radius), hole filling, largest component."""
    mask = np.asarray(mask, bool)
    if closing_px > 0 and mask.any():
        pad = closing_px  # pad so that closing does not erode objects touching the border
        padded = np.pad(mask, pad, mode="edge")
        mask = ndimage.binary_closing(padded, structure=disk(closing_px))[pad:-pad, pad:-pad]
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if largest_component:
        mask = keep_largest_component(mask)
    return mask


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a bool mask (H, W); an empty or one-piece mask unchanged."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return np.asarray(mask, bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


# ----------------------------------------------------------------------------- Otsu (image, no model)


def channel_of(image: np.ndarray, channel: str) -> np.ndarray:
    """One float channel of an RGB uint8 image, in [0, 1]; lesions are darker than skin in all of them."""
    from skimage.color import rgb2gray

    if channel not in OTSU_CHANNELS:
        raise ValueError(f"Otsu channel must be one of {', '.join(OTSU_CHANNELS)}, got {channel!r}")
    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"otsu_segment: image must be (H, W, 3), got shape {rgb.shape}")
    rgb = rgb.astype(np.float32) / 255.0
    if channel == "gray":
        return rgb2gray(rgb)
    if channel == "value":  # HSV value: max over RGB, robust to the lesion's hue
        return rgb.max(axis=2)
    return rgb[..., ("red", "green", "blue").index(channel)]


def otsu_segment(image: np.ndarray, channel: str = "gray") -> np.ndarray:
    """Lesion mask (H, W) bool: the darker side of Otsu's threshold, largest component, holes filled.

    A channel without contrast has no threshold: the mask is empty. The Otsu baseline
    (diffseg.baselines) and the risk score's agreement feature (diffseg.risk) both use it.
    """
    from skimage.filters import threshold_otsu

    values = channel_of(image, channel)
    if values.min() == values.max():
        return np.zeros(values.shape, bool)
    dark = values <= threshold_otsu(values)
    return ndimage.binary_fill_holes(keep_largest_component(dark))


def corrected_maps(maps: np.ndarray, cal: Calibration) -> np.ndarray:
    """Bias-subtracted, blurred maps (T, H, W) float32."""
    maps = np.asarray(maps, np.float32)
    if cal.bias_map is not None:
        if cal.bias_map.shape != maps.shape:
            raise ValueError(f"calibration bias_map has shape {cal.bias_map.shape} but the maps are {maps.shape}")
        maps = maps - cal.bias_map
    if cal.blur_sigma > 0:
        maps = ndimage.gaussian_filter(maps, sigma=(0, cal.blur_sigma, cal.blur_sigma), mode="nearest")
    return maps


def _checked_maps(maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps, np.float32)
    if maps.ndim != 3:
        raise ValueError(f"apply_calibration: maps must be (T, H, W), got {maps.shape}")
    return maps


def calibrated_outputs(maps: np.ndarray, cal: Calibration) -> np.ndarray:
    """One image's binary outputs (T, H, W) uint8 under ``cal`` (no sigmoid scale needed: usable while fitting)."""
    maps = _checked_maps(maps)
    if cal.is_paper:
        return binarize(maps, cal.threshold)
    return np.stack([cleanup(m > cal.threshold, closing_px=cal.closing_px, fill_holes=cal.fill_holes,
                             largest_component=cal.largest_component)
                     for m in corrected_maps(maps, cal)]).astype(np.uint8)


def apply_calibration(maps: np.ndarray, cal: Calibration = PAPER) -> tuple[np.ndarray, np.ndarray]:
    """One image's normalised maps (T, H, W) -> (lesion probabilities float32, binary uint8), both (T, H, W).

    For ``method="paper"`` the probabilities are the maps and the binary outputs equal inference's.
    """
    maps = _checked_maps(maps)
    if cal.is_paper:
        return maps, calibrated_outputs(maps, cal)
    if cal.sigmoid_scale is None:
        raise ValueError("apply_calibration: sigmoid_scale is not fitted (calibration.fit_calibration fits it on val)")
    prob = 1.0 / (1.0 + np.exp(-(corrected_maps(maps, cal) - cal.threshold) / cal.sigmoid_scale))
    return prob.astype(np.float32), calibrated_outputs(maps, cal)


def needs_maps(cal: Calibration | None) -> bool:
    """Whether cal's binary outputs must be computed from the maps (False: inference's stored binary)."""
    return cal is not None and not cal.is_paper


def calibrated_binary(maps: np.ndarray, cal: Calibration) -> np.ndarray:
    """(N, T, H, W) uint8 binary outputs of every image's maps (N, T, H, W) through apply_calibration."""
    return np.stack([calibrated_outputs(m, cal) for m in maps]) if len(maps) else np.zeros_like(maps, np.uint8)


def binary_outputs(cal: Calibration | None, stored_binary: np.ndarray, maps=None) -> np.ndarray:
    """The binary outputs every stage scores: inference's stored ones for no calibration or the paper's
    identity, else the calibration applied to ``maps`` (one image (T, H, W) or a stack (N, T, H, W))."""
    if not needs_maps(cal):
        return stored_binary
    if maps is None:
        raise ValueError("binary_outputs: a non-paper calibration needs the maps")
    maps = np.asarray(maps, np.float32)
    return calibrated_outputs(maps, cal) if maps.ndim == 3 else calibrated_binary(maps, cal)


def vote(binary: np.ndarray) -> np.ndarray:
    """Majority of the T binary outputs (T, H, W) -> bool (H, W) (the 'mean of outputs thresholded' row)."""
    return np.asarray(binary).mean(axis=0) >= 0.5
