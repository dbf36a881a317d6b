"""Device, precision and the image <-> model-range convention: one place for every torch stage.

Training, inference, figures and the baselines resolve the configured ``device``/``precision``
here and convert uint8 images to the model's range with :func:`to_model_range`.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(device: str) -> torch.device:
    """torch.device for a config value: "auto" = CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles), from its capability flags.

    There bf16 autocast pays (training 4.3 -> 6.2 images/s measured on an AVX512-BF16 CPU); without,
    bf16 is emulated and slower than fp32. A torch without these probes counts as without.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_dtype(precision: str, device: torch.device, key: str = "train.precision") -> torch.dtype:
    """Autocast dtype (``key`` names the setting). "auto": bf16 on CUDA and on CPUs with native bf16
    (:func:`cpu_has_native_bf16`), fp32 elsewhere; an explicit value is taken as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"{key} must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        native_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native_bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_autocast(device: torch.device, precision: str = "auto",
                     key: str = "inference.precision") -> torch.dtype | None:
    """The autocast dtype of :func:`resolve_dtype`, or None where that is plain fp32 (no autocast)."""
    dtype = resolve_dtype(precision, device, key=key)
    return None if dtype == torch.float32 else dtype


def resolved_runtime(device: str | torch.device, precision: str, key: str = "inference.precision") -> dict[str, str]:
    """What ``device``/``precision`` config values resolve to on this machine: ``{"precision": "fp32" | "bf16" |
    "fp16", "device_type": "cpu" | "cuda" | "mps"}`` (diffseg.settings.RUNTIME_DEFINING: maps made under
    another precision or device type differ in rounding, so a calibration fitted on them may not transfer)."""
    resolved = resolve_device(device) if isinstance(device, str) else device
    return {"precision": PRECISION_NAMES[resolve_dtype(precision, resolved, key=key)], "device_type": resolved.type}


def uses_channels_last(device: torch.device) -> bool:
    """Whether the models run channels_last on device: CUDA and CPU (oneDNN; same outputs as contiguous up to
    float rounding), not MPS."""
    return device.type in ("cuda", "cpu")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast on device's type with dtype; a no-op context for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def name_the_setting_on_oom(setting: str, value: int, where: str, then: str = ""):
    """Re-raise a GPU out-of-memory error inside the block naming the config key to lower and its value.

    torch's own message names only bytes; a user needs the setting. ``then`` is appended (e.g. what was kept).
    """
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise torch.OutOfMemoryError(
            f"out of GPU memory {where} with {setting} = {value}: lower {setting} and rerun"
            f"{'; ' + then if then else ''} (torch: {str(err).splitlines()[0] if str(err) else 'no detail'})"
        ) from err


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on `device`: the given one if it lives there, else one seeded from it (deterministic)."""
    if generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def to_model_range(images: np.ndarray | torch.Tensor, device: torch.device | None = None, *,
                   channels_last_input: bool = True) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1], the models' input range.

    ``channels_last_input``: the input is (N, H, W, 3) (files, numpy) and comes back as the torch
    convention (N, 3, H, W) (a permuted view, no copy before the cast); False: it is already
    (N, 3, H, W). A numpy input is moved to ``device`` (default CPU) first.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if device is not None:
        images = images.to(device)
    if channels_last_input:
        images = images.permute(0, 3, 1, 2)
    return images.float().div(127.5).sub(1.0)
