"""The one currency passed between medgen's stages: a voxel array with its geometry.

A :class:`Volume` follows nibabel's conventions so that it maps one-to-one onto NIfTI:

* ``array`` holds the *stored* values, shape ``(I, J, K)`` or ``(I, J, K, T)``; ``I`` runs
  along DICOM columns (image x), ``J`` along rows (image y), ``K`` across slices.
* ``affine`` maps voxel indices ``(i, j, k, 1)`` to RAS+ millimetres (float64, 4x4).
* ``slope``/``intercept`` turn stored values into physical ones (``values()``), the way
  DICOM RescaleSlope/Intercept and NIfTI ``scl_slope``/``scl_inter`` do. Keeping the stored
  integers makes round trips exact and halves memory for CT.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class VolumeMeta:
    """What is known about a volume besides its voxels.

    ``acquisition`` and ``provenance`` must stay JSON-serialisable: they become the sidecar.
    Nothing here may identify a patient unless the user asked to keep PHI.
    """

    modality: str | None = None
    units: str = "arbitrary"  # unit of ``values()``: "HU", "Hz", "arbitrary", ...
    source_files: tuple[str, ...] = ()
    series_key: str | None = None  # pseudonymous key used for output names
    acquisition: dict[str, Any] = field(default_factory=dict)
    provenance: list[str] = field(default_factory=list)

    def copy(self) -> VolumeMeta:
        return dataclasses.replace(
            self,
            source_files=tuple(self.source_files),
            acquisition=dict(self.acquisition),
            provenance=list(self.provenance),
        )


class Volume:
    """A 3D or 4D image in RAS millimetres.

    Parameters
    ----------
    array : array_like, shape (I, J, K) or (I, J, K, T)
        Stored voxel values.
    affine : array_like, shape (4, 4)
        Voxel-to-RAS+ (mm) transform. Copied as float64, so later changes to the caller's
        array do not reach the volume.
    meta : VolumeMeta, optional
    slope, intercept : float
        ``physical = stored * slope + intercept``.

    Examples
    --------
    >>> import numpy as np
    >>> v = Volume(np.zeros((2, 3, 4), np.int16), np.diag([1.0, 1.0, 2.0, 1.0]))
    >>> v.shape, v.spacing_mm
    ((2, 3, 4), (1.0, 1.0, 2.0))
    """

    def __init__(
        self,
        array: np.ndarray,
        affine: np.ndarray,
        meta: VolumeMeta | None = None,
        slope: float = 1.0,
        intercept: float = 0.0,
    ) -> None:
        array = np.asarray(array)
        if array.ndim not in (3, 4):
            raise ValueError(f"`array` must be 3D or 4D, got shape {array.shape}")
        affine = np.array(affine, dtype=np.float64, copy=True)
        if affine.shape != (4, 4):
            raise ValueError(f"`affine` must be 4x4, got shape {affine.shape}")
        if not np.all(np.isfinite(affine)):
            raise ValueError("`affine` must be finite")
        if not np.isfinite(slope) or slope == 0:
            raise ValueError(f"`slope` must be finite and non-zero, got {slope}")
        self.array = array
        self.affine = affine
        self.meta = meta if meta is not None else VolumeMeta()
        self.slope = float(slope)
        self.intercept = float(intercept)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k in millimetres."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def is_scaled(self) -> bool:
        return self.slope != 1.0 or self.intercept != 0.0

    def values(self, dtype: Any = np.float32) -> np.ndarray:
        """Physical values (stored * slope + intercept), e.g. Hounsfield units for CT."""
        if not self.is_scaled:
            return self.array.astype(dtype, copy=False)
        return self.array.astype(dtype) * dtype(self.slope) + dtype(self.intercept)

    def with_array(self, array: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> Volume:
        """A new volume on the same grid and metadata, holding ``array``."""
        return Volume(array, self.affine, self.meta.copy(), slope, intercept)

    def save(self, path: str | Path, **kwargs: Any) -> Path:
        """Write to ``path``; the format follows the suffix (see :func:`medgen.io.save`)."""
        from medgen.io.writers import save

        return save(self, path, **kwargs)

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:.3g}" for s in self.spacing_mm)
        return (
            f"Volume(shape={self.shape}, dtype={self.array.dtype}, spacing_mm=({spacing}), "
            f"modality={self.meta.modality}, units={self.meta.units})"
        )


def split_frames(values: np.ndarray) -> list[np.ndarray]:
    """(I, J, K) -> one frame; (I, J, K, T) -> its T 3D frames (views, not copies)."""
    return [values] if values.ndim == 3 else [values[..., t] for t in range(values.shape[3])]


def join_frames(frames: list[np.ndarray]) -> np.ndarray:
    """Inverse of :func:`split_frames`: one frame -> (I, J, K); several -> (I, J, K, T).

    Examples
    --------
    >>> join_frames(split_frames(np.zeros((2, 3, 4, 5)))).shape
    (2, 3, 4, 5)
    """
    return frames[0] if len(frames) == 1 else np.stack(frames, axis=-1)
