"""Read the files of one DICOM series into one or more :class:`~medgen.Volume` objects.

pydicom (with the pylibjpeg plugins) decodes every transfer syntax; what no library does,
and this module does, is deciding which images belong to which volume: a series is split
by orientation, matrix size, echo and image kind (magnitude, phase, field map ...), and
repeated positions become a 4D volume.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgen.errors import InputError
from medgen.io.dicom_frames import CorruptImageError, Frame, SplitKey, frames_from_dataset
from medgen.io.dicom_geometry import stack_frames, source_files
from medgen.io.dicom_limits import DEFAULT_MAX_IMAGE_MB, check_declared_size, check_deflated_size
from medgen.io.dicom_meta import acquisition_fields
from medgen.volume import Volume, VolumeMeta

_UNITS_BY_CODE = {"Hz": "Hz", "HU": "HU", "[hnsf'U]": "HU"}


@dataclass
class SeriesResult:
    """What one series gave: its volumes, the files left out with a reason each, notes, and
    the reader's warnings as ``(file, one-line text)``."""

    volumes: list[Volume] = field(default_factory=list)
    rejected: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class _Corrupt:
    """A damaged image file: its reason, and its header when one could be read."""

    path: Path
    reason: str
    ds: Any = None


def read_dicom_series(
    paths: Sequence[str | Path],
    *,
    keep_phi: bool = False,
    threads: int | None = None,
    max_image_mb: float | None = DEFAULT_MAX_IMAGE_MB,
    damaged: Mapping[str | Path, str] | None = None,
) -> SeriesResult:
    """Read DICOM files (usually one series) into volumes.

    A file that cannot be read at all, or whose pixel data is missing, cut short or
    undecodable, is a *corrupt image*: the volume it belongs to would be one slice short,
    so that volume is refused as a missing slice (every volume of the series when the
    file's header does not say which). Files that are fine but unusable (no geometry, an
    odd matrix size among a stack) are left out of an otherwise good volume.

    Parameters
    ----------
    paths : sequence of path
        Files of the series, in any order.
    keep_phi : bool
        Copy patient-identifying fields into ``meta.acquisition`` (off by default).
    threads : int, optional
        Files decoded at once; decoding compressed data releases the GIL.
    max_image_mb : float or None
        Refuse, before decoding, any file whose header or compressed frames declare a
        larger decoded image (MB); None for no limit.
    damaged : mapping of path to str, optional
        Files already known to be cut short (from the header scan), with why; they are
        not read again and count as corrupt images.

    Raises
    ------
    InputError
        When no usable volume comes out; the message names a file and the reason.
    """
    from medgen.io.dicom_warnings import routed_warnings

    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError(None, "no DICOM files given")
    known = {os.path.realpath(p): r for p, r in (damaged or {}).items()}
    max_bytes = None if max_image_mb is None else float(max_image_mb) * 2**20
    result = SeriesResult()
    headers: dict[Path, Any] = {}
    frames: list[Frame] = []
    corrupt: list[_Corrupt] = []
    with routed_warnings(lambda text: result.warnings.append((paths[0], text))):
        outcomes = _decode_all(paths, threads, max_bytes, known)
    for path, (outcome, caught) in zip(paths, outcomes):
        result.warnings.extend((path, text) for text in caught)
        if isinstance(outcome, _Corrupt):
            corrupt.append(outcome)
            continue
        if isinstance(outcome, InputError):
            result.rejected.append((path, outcome.reason))
            continue
        ds, file_frames = outcome
        headers[path] = ds
        frames.extend(file_frames)
    groups = _split(frames)
    labels = _part_labels(list(groups))
    broken_by = _corrupt_groups(corrupt, list(groups))
    for key, group in groups.items():
        if key in broken_by:
            bad = broken_by[key]
            reason = f"{bad.reason}; series refused: a slice would be missing"
            result.rejected.append((bad.path, reason))
            result.rejected.extend((Path(f), reason) for f in source_files(group))
            continue
        try:
            stacked = stack_frames(group, single_ok=_single_ok(key, list(groups)))
        except InputError as exc:
            files = source_files(group)
            result.rejected.extend((Path(f), exc.reason) for f in files)
            continue
        first_ds = headers[stacked.frames[0].source]
        result.volumes.append(_volume(stacked, first_ds, labels[key], keep_phi))
        result.notes.extend(stacked.notes)
    for bad in corrupt:  # corrupt files that no volume claimed still get their line
        if not any(p == bad.path for p, _ in result.rejected):
            result.rejected.insert(0, (bad.path, bad.reason))
    result.rejected = list(dict(_dedupe(result.rejected)).items())
    if not result.volumes:
        path, reason = result.rejected[0] if result.rejected else (paths[0], "no image frames")
        error = InputError(path, reason)
        error.warnings = result.warnings  # type: ignore[attr-defined]  # for the caller's log
        raise error
    return result


def _dedupe(pairs: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """First reason per file, in order."""
    seen: dict[str, tuple[Path, str]] = {}
    for path, reason in pairs:
        seen.setdefault(os.path.realpath(path), (path, reason))
    return list(seen.values())


def _single_ok(key: SplitKey, keys: list[SplitKey]) -> bool:
    """A lone image is a 2D volume unless it is the odd one out of a stack in its series."""
    return not any(
        k != key and k.series_uid == key.series_uid and k.orientation == key.orientation
        for k in keys
    )


def _corrupt_groups(corrupt: list[_Corrupt], keys: list[SplitKey]) -> dict[SplitKey, _Corrupt]:
    """Which volumes each corrupt file belongs to: by its header when readable, else all."""
    out: dict[SplitKey, _Corrupt] = {}
    for bad in corrupt:
        matches = [k for k in keys if _could_hold(k, bad.ds)] or keys
        for key in matches:
            out.setdefault(key, bad)
    return out


def _could_hold(key: SplitKey, ds: Any) -> bool:
    if ds is None:
        return False
    try:
        if str(ds.get("SeriesInstanceUID", key.series_uid)) != key.series_uid:
            return False
        rows, cols = ds.get("Rows"), ds.get("Columns")
        if rows is not None and cols is not None and (int(rows), int(cols)) != key.shape:
            return False
        iop = ds.get("ImageOrientationPatient")
        if iop is not None and len(iop) == 6:
            vec = np.array([float(v) for v in iop])
            row, col = vec[:3] / np.linalg.norm(vec[:3]), vec[3:] / np.linalg.norm(vec[3:])
            if tuple(np.round(np.concatenate([row, col]), 3)) != key.orientation:
                return False
    except Exception:  # noqa: BLE001 - a damaged header: it could belong to any volume
        return True
    return True


def _decode_all(
    paths: list[Path], threads: int | None, max_bytes: float | None, known: dict[str, str]
) -> list[Any]:
    threads = threads or min(8, (os.cpu_count() or 1) * 2)

    def one(path: Path) -> tuple[Any, list[str]]:
        return _decode_with_warnings(path, max_bytes, known)

    if threads <= 1 or len(paths) < 4:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, paths))


def _decode_with_warnings(
    path: Path, max_bytes: float | None, known: dict[str, str]
) -> tuple[Any, list[str]]:
    from medgen.io.dicom_warnings import file_warnings

    reason = known.get(os.path.realpath(path))
    if reason:
        return _Corrupt(path, reason), []
    with file_warnings() as caught:
        try:
            outcome = _decode(path, max_bytes)
        except Exception as exc:  # noqa: BLE001 - any failure on one file is that file's
            outcome = _Corrupt(path, f"unreadable DICOM ({_first_line(exc)})")
    return outcome, caught


def _decode(path: Path, max_bytes: float | None) -> tuple[Any, list[Frame]] | InputError | _Corrupt:
    import warnings

    import pydicom

    from medgen.io.dicom_warnings import drop_unreadable_elements

    try:
        bomb = check_deflated_size(path, max_bytes)  # before pydicom inflates all of it
        if bomb:
            return _Corrupt(path, bomb)
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        return _Corrupt(path, f"unreadable DICOM ({_first_line(exc)})")
    for text in drop_unreadable_elements(ds):
        warnings.warn(text, UserWarning, stacklevel=1)  # into this file's warnings
    if max_bytes is not None:
        too_big = check_declared_size(ds, max_bytes)
        if too_big:
            return _Corrupt(path, too_big, ds)
    try:
        return ds, frames_from_dataset(ds, path)
    except CorruptImageError as exc:
        return _Corrupt(path, exc.reason, ds)
    except InputError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - a malformed header in a way we did not foresee
        return InputError(path, f"malformed DICOM header ({_first_line(exc)})")


def _split(frames: list[Frame]) -> dict[SplitKey, list[Frame]]:
    groups: dict[SplitKey, list[Frame]] = {}
    for frame in frames:
        groups.setdefault(frame.split_key, []).append(frame)
    return groups


def _part_labels(keys: list[SplitKey]) -> dict[SplitKey, str]:
    """Short names telling the volumes of one series apart (only what differs among them)."""
    if len(keys) <= 1:
        return {k: "" for k in keys}
    orientations = list(dict.fromkeys(k.orientation for k in keys))
    labels: dict[SplitKey, str] = {}
    for index, key in enumerate(keys):
        parts = []
        if len({k.series_number for k in keys}) > 1:
            parts.append(f"s{key.series_number}")
        if len({k.kind for k in keys}) > 1 and key.kind:
            parts.append("-".join(w.lower().replace(" ", "") for w in key.kind))
        echoes_of_kind = sorted({k.echo for k in keys if k.kind == key.kind}, key=str)
        if len(echoes_of_kind) > 1:
            parts.append(f"e{echoes_of_kind.index(key.echo) + 1}")
        if len(orientations) > 1:
            parts.append(f"o{orientations.index(key.orientation) + 1}")
        if len({k.shape for k in keys}) > 1:
            parts.append("x".join(str(s) for s in key.shape))
        labels[key] = "_".join(parts) or f"part{index + 1}"
    return labels


def _volume(stacked: Any, ds: Any, part: str, keep_phi: bool) -> Volume:
    import medgen

    acquisition = acquisition_fields(ds, keep_phi=keep_phi)
    if part:
        acquisition["VolumePart"] = part
    if stacked.is_2d:
        acquisition["ImageDimensions"] = 2  # one slice: stages that need 3D refuse it
    if stacked.equalized:
        acquisition["SliceSpacingResampled"] = True  # see Provenance for from what
    modality = str(ds.get("Modality", "")) or None
    meta = VolumeMeta(
        modality=modality,
        units=_units(stacked.frames[0], ds, modality),
        source_files=source_files(stacked.frames),
        acquisition=acquisition,
        provenance=[f"medgen {medgen.__version__}: DICOM to volume"] + list(stacked.notes),
    )
    return Volume(stacked.array, stacked.affine, meta, stacked.slope, stacked.intercept)


def _units(frame: Frame, ds: Any, modality: str | None) -> str:
    code = frame.info.get("units")
    if code in _UNITS_BY_CODE:
        return _UNITS_BY_CODE[code]
    rescale_type = str(ds.get("RescaleType", "")).upper()
    if rescale_type == "HU" or (modality == "CT" and rescale_type in ("", "US")):
        return "HU"
    return "arbitrary"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0][:160] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
