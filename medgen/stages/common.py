"""Small helpers shared by the enhancement stages (train, enhance, evaluate, degrade)."""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medgen.errors import InputError
from medgen.volume import Volume


def load_volume(path: str | Path) -> Volume:
    """One volume from a NIfTI/NRRD/MHA file or a DICOM file/folder holding one series."""
    from medgen.io import load

    loaded = load(path)
    if isinstance(loaded, list):
        if len(loaded) != 1:
            raise InputError(
                path, f"holds {len(loaded)} volumes; point at one series (a file or its own folder)"
            )
        loaded = loaded[0]
    return loaded


def require_3d(volume: Volume, path: str | Path) -> Volume:
    """``volume`` itself, or an :class:`InputError` naming ``path`` when it is one image.

    The one check for stages whose models need 3D (train, enhance, synthesis): ingest
    turns a one-image series into a one-slice volume and marks it ``ImageDimensions: 2``
    in its sidecar; loaded again from NIfTI, it has a spatial axis of one voxel.
    """
    marked_2d = volume.meta.acquisition.get("ImageDimensions") == 2
    if marked_2d or min(volume.shape[:3]) < 2:
        shape = "x".join(str(n) for n in volume.shape)
        raise InputError(
            path, f"is a 2D image ({shape} voxels); this stage needs a 3D volume of several slices"
        )
    return volume


def expand_paths(entries: Iterable[str], what: str) -> list[Path]:
    """Glob patterns and plain paths -> existing paths, in order, without duplicates."""
    found: list[Path] = []
    for entry in entries:
        matches = sorted(glob.glob(entry)) if any(c in entry for c in "*?[") else [entry]
        if not matches:
            raise InputError(entry, f"`{what}`: the pattern matches no file")
        for m in matches:
            p = Path(m)
            if not p.exists():
                raise InputError(p, f"`{what}`: no such file or folder")
            if p not in found:
                found.append(p)
    return found


def files_sha256(paths: Sequence[Path]) -> str:
    """SHA-256 over the contents of the given files (folders: every file inside, sorted).

    Identifies the exact training data of a run (logged as ``data.sha256``); file names and
    locations do not enter the hash, so moving the data keeps it.
    """
    digest = hashlib.sha256()
    for path in paths:
        files = (
            sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        )
        for f in files:
            file_digest = hashlib.sha256()
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    file_digest.update(block)
            digest.update(file_digest.digest())
    return digest.hexdigest()


def absolute_noise_params(params: dict[str, Any], values: np.ndarray) -> dict[str, Any]:
    """``sigma_fraction`` (of the robust span of the whole ``values``) -> absolute ``sigma``."""
    from medgen.training.patches import _absolute_params

    lo, hi = np.percentile(np.asarray(values, np.float32), [0.5, 99.5])
    return _absolute_params(params, float(hi - lo) if hi > lo else 1.0)


def reference_data_range(values: np.ndarray) -> float:
    """PSNR/SSIM data range of a reference volume: its max minus its min (at least 1e-6)."""
    values = np.asarray(values)
    return float(max(float(values.max()) - float(values.min()), 1e-6))


def volume_facts(volume: Volume, prefix: str) -> dict[str, Any]:
    """Shape, voxel size, modality and units of a volume as flat MLflow params (no paths, no PHI)."""
    return {
        f"{prefix}.shape": list(volume.shape),
        f"{prefix}.spacing_mm": [round(s, 4) for s in volume.spacing_mm],
        f"{prefix}.modality": volume.meta.modality or "unknown",
        f"{prefix}.units": volume.meta.units,
    }


def central_crop(volume: Volume, max_shape_vox: Sequence[int], multiple: Sequence[int] = (1, 1, 1)) -> Volume:
    """The central block of at most ``max_shape_vox`` voxels (sides cut to a multiple of
    ``multiple``), with the affine moved so that it stays in place."""
    shape = volume.shape[:3]
    size = [max(m, (min(s, c) // m) * m) for s, c, m in zip(shape, max_shape_vox, multiple)]
    size = [min(z, s) for z, s in zip(size, shape)]
    starts = [(s - z) // 2 for s, z in zip(shape, size)]
    array = volume.array[tuple(slice(b, b + z) for b, z in zip(starts, size))]
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ np.asarray(starts, float) + volume.affine[:3, 3]
    return Volume(np.ascontiguousarray(array), affine, volume.meta.copy(), volume.slope, volume.intercept)
