"""Synthetic data for classifiers: datasets that mix generated volumes into real ones,
deterministically, and a small 3D classifier (the experiment that asks whether synthetic data
helps is the pipeline stage :mod:`medgen.stages.augment`).

* :class:`SyntheticDataset`, :class:`CohortDataset` (:mod:`medgen.augment.dataset`)
* :func:`train_classifier`, :func:`evaluate` (:mod:`medgen.augment.classifier`)

Names are imported on first use, so ``import medgen.augment`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CohortDataset": "medgen.augment.dataset",
    "SyntheticDataset": "medgen.augment.dataset",
    "normalise_values": "medgen.augment.dataset",
    "ClassifierSettings": "medgen.augment.classifier",
    "evaluate": "medgen.augment.classifier",
    "train_classifier": "medgen.augment.classifier",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medgen.augment' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
