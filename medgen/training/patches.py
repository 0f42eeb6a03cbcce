"""Training pairs made on the fly: random patches of clean volumes, degraded as configured.

For step ``s`` on rank ``r`` everything random (which volume, where, which degradation
parameters, which noise) comes from ``numpy.random.default_rng([seed, r, s])``, so a batch
depends only on ``(seed, rank, step)``: resuming at step ``s`` needs no sampler state, and
ranks see different patches.

A pair is built in physical units (HU for CT): the clean patch is degraded by
:class:`medgen.data.degrade_base.RandomDegradation` transforms (recording their parameters),
put back on the clean grid when a degradation changed it (grid-aligned cubic up-sampling, the
same as at inference), and both are normalised with the volume's :class:`IntensityNorm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medgen.inference.grid import resample_onto
from medgen.inference.normalise import IntensityNorm
from medgen.volume import Volume

_MAX_CENTRES = 200_000
_FRACTION_KEYS = {"sigma_fraction": "sigma"}


@dataclass
class TrainingVolume:
    """One clean volume ready for sampling: physical values, normalisation, voxel size."""

    values: np.ndarray  # (I, J, K) float32, physical units
    norm: IntensityNorm
    spacing_mm: tuple[float, float, float]
    centres: np.ndarray  # (N, 3) int32 voxel indices patch centres are drawn from
    name: str = ""
    intensity_span: float = 1.0  # robust span (p99.5 - p0.5) in physical units

    @classmethod
    def from_volume(
        cls,
        volume: Volume,
        norm_mode: str = "percentile",
        norm_lower: float = 0.5,
        norm_upper: float = 99.5,
        foreground_only: bool = True,
        name: str = "",
    ) -> TrainingVolume:
        """Prepare a (3D, or first frame of a 4D) volume."""
        values = volume.values(np.float32)
        if values.ndim == 4:
            values = values[..., 0]
        norm = IntensityNorm.fit(values, norm_mode, norm_lower, norm_upper)
        lo, hi = np.percentile(values, [0.5, 99.5])
        centres = _centres(values, foreground_only)
        return cls(
            values=np.ascontiguousarray(values),
            norm=norm,
            spacing_mm=volume.spacing_mm,
            centres=centres,
            name=name,
            intensity_span=float(hi - lo) if hi > lo else 1.0,
        )


def _centres(values: np.ndarray, foreground_only: bool) -> np.ndarray:
    """Voxel indices to centre patches on: the foreground (Otsu, via the metrics' mask when
    available) or every voxel; thinned to at most 200k with a fixed stride."""
    mask = None
    if foreground_only:
        try:
            from medgen.metrics.masks import foreground_mask

            mask = np.asarray(foreground_mask(values), dtype=bool)
        except ImportError:  # the metrics layer is optional for training
            from skimage.filters import threshold_otsu

            mask = values > threshold_otsu(values)
        if mask.shape != values.shape or not mask.any():
            mask = None
    if mask is None:
        mask = np.ones(values.shape, dtype=bool)
    idx = np.argwhere(mask).astype(np.int32)
    if len(idx) > _MAX_CENTRES:
        idx = idx[:: int(np.ceil(len(idx) / _MAX_CENTRES))]
    return idx


def _crop(values: np.ndarray, centre: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A ``size`` patch around ``centre``, shifted to stay inside; edge-padded if the volume
    is smaller than the patch."""
    pads = [(0, max(s - n, 0)) for s, n in zip(size, values.shape)]
    if any(p[1] for p in pads):
        values = np.pad(values, pads, mode="edge")
    starts = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, size, values.shape)]
    return values[tuple(slice(b, b + s) for b, s in zip(starts, size))]


def _absolute_params(params: dict[str, Any], span: float) -> dict[str, Any]:
    """Relative noise levels (``sigma_fraction``) -> absolute ones of this volume.

    The fraction refers to the robust span of the *whole* volume; applied to a patch it would
    be measured on the patch (often background) and come out far too small.
    """
    out = {}
    for key, value in params.items():
        if key in _FRACTION_KEYS:
            target = _FRACTION_KEYS[key]
            if isinstance(value, (list, tuple)):
                out[target] = [float(v) * span for v in value]
            else:
                out[target] = float(value) * span
        else:
            out[key] = value
    return out


@dataclass
class DegradationSpec:
    """A degradation by registry name with its parameters (``[low, high]`` lists are ranges)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


class PatchPairs:
    """Step-indexed batches of ``(degraded, clean)`` patch pairs.

    Parameters
    ----------
    volumes : list of TrainingVolume
    degradations : list of DegradationSpec
        Applied in order to each clean patch (physical units).
    patch_size_vox : 3 ints
        Clean patch size; best divisible by the decimation of grid-changing degradations
        (otherwise trailing thin slices have no thick slice).
    batch_size : int
    seed, rank : int

    Batches
    -------
    ``batch(step)`` returns a dict of tensors: ``"degraded"`` and ``"clean"`` of shape
    ``(B, 1, *patch_size_vox)`` (normalised units) and ``"noise_level"`` of shape ``(B,)``:
    the noise standard deviation in normalised units (the recorded ``sigma`` of the noise
    degradation when there is one, otherwise estimated from the degraded patch).
    :attr:`last_params` lists what each degradation drew for each sample.
    """

    def __init__(
        self,
        volumes: list[TrainingVolume],
        degradations: list[DegradationSpec],
        patch_size_vox: Sequence[int] = (32, 32, 32),
        batch_size: int = 2,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        from medgen.data.degrade_base import RandomDegradation

        if not volumes:
            raise ValueError("`volumes` must hold at least one training volume, got none")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        self.volumes = volumes
        self.specs = list(degradations)
        self.patch_size_vox = tuple(int(s) for s in patch_size_vox)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        # One random transform per (volume, degradation): fractions become that volume's sigma.
        self._transforms = [
            [
                RandomDegradation(spec.name, seed=0, **_absolute_params(spec.params, vol.intensity_span))
                for spec in self.specs
            ]
            for vol in volumes
        ]
        self.last_params: list[list[dict[str, Any]]] = []

    def pair(
        self, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, float | None, list[dict[str, Any]]]:
        """One ``(degraded, clean)`` pair in normalised units, its noise level and parameters."""
        from medgen.inference.enhance import estimate_noise_level

        index = int(rng.integers(len(self.volumes)))
        vol = self.volumes[index]
        centre = vol.centres[int(rng.integers(len(vol.centres)))]
        clean = _crop(vol.values, centre, self.patch_size_vox)
        clean_affine = np.diag([*vol.spacing_mm, 1.0])
        degraded, affine = clean, clean_affine
        recorded: list[dict[str, Any]] = []
        sigma_phys = None
        for transform in self._transforms[index]:
            transform.set_random_state(state=rng)
            spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
            in_shape = degraded.shape
            degraded = transform(degraded, spacing_mm=spacing)
            _, affine = transform.last_transform.output_geometry(in_shape, affine)
            params = dict(transform.last_params or {})
            recorded.append({"name": transform.name, **params})
            if params.get("sigma") is not None:
                sigma_phys = float(params["sigma"])
        if degraded.shape != clean.shape or not np.allclose(affine, clean_affine):
            # Back onto the clean grid through both affines: what inference does to a scan.
            degraded = resample_onto(degraded, affine, clean.shape, clean_affine)
        clean_n = vol.norm.forward(clean)
        degraded_n = vol.norm.forward(degraded)
        if sigma_phys is not None:
            level = sigma_phys / vol.norm.scale
        else:
            level = estimate_noise_level(degraded_n)
        return degraded_n, clean_n, level, recorded

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of ``step`` (deterministic in ``seed``, ``rank``, ``step``)."""
        rng = np.random.default_rng([self.seed, self.rank, int(step)])
        degraded, clean, levels, params = [], [], [], []
        for _ in range(self.batch_size):
            d, c, level, p = self.pair(rng)
            degraded.append(d)
            clean.append(c)
            levels.append(level)
            params.append(p)
        self.last_params = params
        return {
            "degraded": torch.from_numpy(np.stack(degraded)[:, None]),
            "clean": torch.from_numpy(np.stack(clean)[:, None]),
            "noise_level": torch.tensor(levels, dtype=torch.float32),
        }
