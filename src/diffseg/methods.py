"""The inference methods (``inference.method``), one entry each: what they need and how they make their maps.

Every place that depends on the method reads its entry here instead of comparing names: the settings
check (:class:`diffseg.settings.InferenceSettings`), the inference stage (the maps function and the
stored normalisation), the workflow (``rules/common.smk``: the extra inputs of rule ``infer`` and the
files rule ``export_bundle`` packs) and the model bundle (:func:`diffseg.bundle.required_members`).
``config/schema.yaml``'s enum of ``inference.method`` lists the same names (tests/test_methods.py).

This module is torch-free and imports nothing of diffseg: the Snakefile and the bundle reader import it
before any model code. A method names its maps factory as ``"module:function"``, imported only when
inference runs (:meth:`InferenceMethod.make_maps`); the factory is called as
``factory(settings, checkpoint, **artefacts)`` and returns ``maps_fn(model, schedule, images, timesteps,
noise, autocast_dtype=...)`` -> (B, T, H, W) float32 raw maps of one batch (noise: (B, D, 3, H, W)).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable


@dataclass(frozen=True)
class Artefact:
    """A trained file a method's maps need besides the DDPM checkpoint.

    ``name`` is the maps factory's keyword and the named input of rule ``infer``; ``path`` lies under
    ``results_dir`` and is made by rule ``rule``; the model bundle carries it as ``member`` (its file name),
    and prediction reads it from the unpacked bundle.
    """

    name: str
    path: str
    rule: str

    @property
    def member(self) -> str:
        return PurePosixPath(self.path).name


@dataclass(frozen=True)
class InferenceMethod:
    """One value of ``inference.method``.

    ``maps``: the ``"module:function"`` of its maps factory (module docstring). ``artefacts``: the trained
    files it reads besides the DDPM (inputs of rule ``infer``, members a bundle of it must hold).
    ``normalise``: the normalisation of the stored maps; None = the configured ``inference.normalise``.
    """

    name: str
    summary: str
    maps: str
    artefacts: tuple[Artefact, ...] = ()
    normalise: str | None = None

    @property
    def bundle_members(self) -> tuple[str, ...]:
        """The bundle members a model of this method cannot predict without (besides DDPM and calibration)."""
        return tuple(a.member for a in self.artefacts)

    def stored_normalise(self, configured: str) -> str:
        """The normalisation applied to the stored maps, given ``inference.normalise``."""
        return self.normalise if self.normalise is not None else configured

    def make_maps(self, settings, checkpoint, artefacts: dict | None = None) -> Callable:
        """The maps function of this method for ``settings`` (an InferenceSettings), from its factory."""
        given = dict(artefacts or {})
        missing = [a for a in self.artefacts if a.name not in given]
        if missing:
            needs = ", ".join(f"{a.name!r} ({a.path}, made by rule {a.rule})" for a in missing)
            raise ValueError(f"inference.method {self.name!r} needs its trained file(s) {needs}: pass them as "
                             f"artefacts={{name: path}}")
        unknown = sorted(set(given) - {a.name for a in self.artefacts})
        if unknown:
            raise ValueError(f"inference.method {self.name!r} takes no trained file(s) {unknown}")
        module, _, function = self.maps.partition(":")
        factory = getattr(importlib.import_module(module), function)
        return factory(settings, checkpoint, **given)


FEATURE_HEAD = Artefact(name="head", path="models/feature_head.pt", rule="train_feature_head")

METHODS: dict[str, InferenceMethod] = {
    m.name: m
    for m in (
        InferenceMethod("paper", "eq. 2: channel mean of |eps_c0 - eps_c1| on the same x_t",
                        maps="diffseg.inference:paper_maps"),
        InferenceMethod("reconstruct", "region-level difference after DDIM-denoising x_t toward c0 and c1",
                        maps="diffseg.inference:reconstruct_maps"),
        InferenceMethod("features", "a head on the frozen DDPM's decoder activations under c0/c1 gives lesion "
                        "probabilities", maps="diffseg.features:head_maps", artefacts=(FEATURE_HEAD,),
                        normalise="none"),
    )
}
NAMES = tuple(METHODS)
DEFAULT = "paper"


def inference_method(name: str) -> InferenceMethod:
    """The registry entry of ``inference.method`` = name; an unknown name is an error listing the known ones."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"inference.method must be one of {NAMES}, got {name!r}") from None
