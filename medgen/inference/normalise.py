"""Intensity normalisation with an exact, stored inverse.

Networks see ``(values - offset) / scale``; outputs go back through ``y * scale + offset``,
so Hounsfield units come out as Hounsfield units. ``offset`` and ``scale`` are in the
physical units of the volume and travel with checkpoints and outputs as plain floats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class IntensityNorm:
    """``normalised = (physical - offset) / scale``.

    Examples
    --------
    >>> norm = IntensityNorm(offset=-1000.0, scale=2000.0)
    >>> hu = np.array([-1000.0, 0.0, 1000.0], dtype=np.float32)
    >>> norm.forward(hu)
    array([0. , 0.5, 1. ], dtype=float32)
    >>> norm.inverse(norm.forward(hu))
    array([-1000.,     0.,  1000.], dtype=float32)
    """

    offset: float
    scale: float

    def __post_init__(self) -> None:
        if not np.isfinite(self.offset):
            raise ValueError(f"`offset` must be finite, got {self.offset}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"`scale` must be > 0, got {self.scale}")

    def forward(self, values: np.ndarray) -> np.ndarray:
        """Physical values (any shape) -> normalised float32 (same shape)."""
        out = (np.asarray(values, dtype=np.float64) - self.offset) / self.scale
        return out.astype(np.float32)

    def inverse(self, normalised: np.ndarray) -> np.ndarray:
        """Normalised values (any shape) -> physical float32 (same shape)."""
        out = np.asarray(normalised, dtype=np.float64) * self.scale + self.offset
        return out.astype(np.float32)

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntensityNorm:
        return cls(offset=float(data["offset"]), scale=float(data["scale"]))

    @classmethod
    def fit(
        cls, values: np.ndarray, mode: str = "percentile", lower: float = 0.5, upper: float = 99.5
    ) -> IntensityNorm:
        """Normalisation for one volume.

        Parameters
        ----------
        values : np.ndarray
            Physical values (e.g. HU), any shape.
        mode : {"percentile", "fixed"}
            ``percentile``: ``lower``/``upper`` are percentiles of ``values`` mapped to 0 and 1.
            ``fixed``: ``lower``/``upper`` are physical values mapped to 0 and 1.

        Examples
        --------
        >>> IntensityNorm.fit(np.arange(101.0), "percentile", 0.0, 100.0)
        IntensityNorm(offset=0.0, scale=100.0)
        >>> IntensityNorm.fit(np.zeros(3), "fixed", -1000.0, 1000.0)
        IntensityNorm(offset=-1000.0, scale=2000.0)
        """
        if mode == "fixed":
            lo, hi = float(lower), float(upper)
        elif mode == "percentile":
            finite = np.asarray(values, dtype=np.float32)
            lo, hi = (float(v) for v in np.percentile(finite, [lower, upper]))
        else:
            raise ValueError(f"`mode` must be one of 'percentile', 'fixed', got {mode!r}")
        if not hi > lo:
            # A constant volume (or a degenerate window): keep the offset, unit scale.
            return cls(offset=lo, scale=1.0)
        return cls(offset=lo, scale=hi - lo)
