"""Per-scan self-supervised adaptation: denoising fitted by SURE, SMORE super-resolution.

``medgen enhance --adapt SECONDS`` calls :func:`adapt_denoise` or
:func:`adapt_super_resolution`; ``bench/quality.py`` measures both against tuned classical
baselines. The submodules import lazily (super-resolution needs torch and MONAI).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LETDenoiser",
    "SubpixelSliceNet",
    "adapt_denoise",
    "adapt_super_resolution",
    "pretrain_denoiser",
    "pretrain_super_resolution",
]

_WHERE = {
    "LETDenoiser": "medgen.adapt.denoise",
    "adapt_denoise": "medgen.adapt.denoise",
    "pretrain_denoiser": "medgen.adapt.denoise",
    "SubpixelSliceNet": "medgen.adapt.super_resolution",
    "adapt_super_resolution": "medgen.adapt.super_resolution",
    "pretrain_super_resolution": "medgen.adapt.super_resolution",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'medgen.adapt' has no attribute {name!r}")
