"""Read the files of one DICOM series into one or more :class:`~medgen.Volume` objects.

pydicom (with the pylibjpeg plugins) decodes every transfer syntax; what no library does,
and this module does, is deciding which images belong to which volume: a series is split
by orientation, matrix size, echo and image kind (magnitude, phase, field map ...), and
repeated positions become a 4D volume.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgen.errors import InputError
from medgen.io.dicom_frames import Frame, SplitKey, frames_from_dataset
from medgen.io.dicom_geometry import stack_frames, source_files
from medgen.io.dicom_meta import acquisition_fields
from medgen.volume import Volume, VolumeMeta

_UNITS_BY_CODE = {"Hz": "Hz", "HU": "HU", "[hnsf'U]": "HU"}


@dataclass
class SeriesResult:
    """What one series gave: its volumes, and the files left out with a reason each."""

    volumes: list[Volume] = field(default_factory=list)
    rejected: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_dicom_series(
    paths: Sequence[str | Path], *, keep_phi: bool = False, threads: int | None = None
) -> SeriesResult:
    """Read DICOM files (usually one series) into volumes.

    Parameters
    ----------
    paths : sequence of path
        Files of the series, in any order.
    keep_phi : bool
        Copy patient-identifying fields into ``meta.acquisition`` (off by default).
    threads : int, optional
        Files decoded at once; decoding compressed data releases the GIL.

    Raises
    ------
    InputError
        When no usable volume comes out; the message names a file and the reason.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError(None, "no DICOM files given")
    result = SeriesResult()
    headers: dict[Path, Any] = {}
    frames: list[Frame] = []
    for path, outcome in zip(paths, _decode_all(paths, threads)):
        if isinstance(outcome, InputError):
            result.rejected.append((path, outcome.reason))
            continue
        ds, file_frames = outcome
        headers[path] = ds
        frames.extend(file_frames)
    groups = _split(frames)
    labels = _part_labels(list(groups))
    for key, group in groups.items():
        try:
            stacked = stack_frames(group)
        except InputError as exc:
            files = source_files(group)
            result.rejected.extend((Path(f), exc.reason) for f in files)
            continue
        first_ds = headers[stacked.frames[0].source]
        result.volumes.append(_volume(stacked, first_ds, labels[key], keep_phi))
        result.notes.extend(stacked.notes)
    if not result.volumes:
        path, reason = result.rejected[0] if result.rejected else (paths[0], "no image frames")
        raise InputError(path, reason)
    return result


def _decode_all(paths: list[Path], threads: int | None) -> list[Any]:
    threads = threads or min(8, (os.cpu_count() or 1) * 2)
    if threads <= 1 or len(paths) < 4:
        return [_decode(p) for p in paths]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(_decode, paths))


def _decode(path: Path) -> tuple[Any, list[Frame]] | InputError:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        return InputError(path, f"unreadable DICOM ({_first_line(exc)})")
    try:
        return ds, frames_from_dataset(ds, path)
    except InputError as exc:
        return exc
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
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


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]
