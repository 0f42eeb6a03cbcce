"""Reading and writing volumes: DICOM, NIfTI, NRRD/MHA, derived DICOM and PNG montages.

This layer imports no torch or MONAI, so the ``medgen ingest`` command starts quickly.
"""

from __future__ import annotations

from pathlib import Path

from medgen.errors import InputError
from medgen.volume import Volume

__all__ = ["load", "save"]


def load(path: str | Path, *, keep_phi: bool = False) -> Volume | list[Volume]:
    """Read a NIfTI/NRRD/MHA file, a DICOM file, or every DICOM series under a folder.

    Returns one :class:`Volume`, or a list when a DICOM source holds several volumes.
    """
    from medgen.io.discover import classify_file, scan_tree

    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        series: dict[str, list[Path]] = {}
        for entry in scan_tree(path):
            if entry.kind == "dicom":
                series.setdefault(entry.series_uid or "", []).append(entry.path)
        if not series:
            raise InputError(path, "no DICOM image files found")
        return _single_or_list([v for files in series.values() for v in _read_dicom(files, keep_phi)])
    entry = classify_file(path)
    if entry.kind == "nifti":
        from medgen.io.nifti import read_nifti

        return read_nifti(path)
    if entry.kind == "itk":
        from medgen.io.itk import read_itk

        return read_itk(path)
    if entry.kind == "dicom":
        return _single_or_list(_read_dicom([path], keep_phi))
    raise InputError(path, entry.note or "not an image file medgen can read")


def save(volume: Volume, path: str | Path, **kwargs) -> Path:
    """Write ``volume``; the format follows the suffix (see :mod:`medgen.io.writers`)."""
    from medgen.io.writers import save as _save

    return _save(volume, path, **kwargs)


def _read_dicom(files: list[Path], keep_phi: bool) -> list[Volume]:
    from medgen.io.dicom_reader import read_dicom_series

    return read_dicom_series(files, keep_phi=keep_phi).volumes


def _single_or_list(volumes: list[Volume]) -> Volume | list[Volume]:
    return volumes[0] if len(volumes) == 1 else volumes
