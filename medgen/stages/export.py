"""Write a volume as a derived DICOM series and/or a PNG montage, for PACS and for people."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ExportSummary:
    dicom_files: list[Path]
    montage: Path | None


def export(volume_path: str | Path, *, dicom: str | Path | None = None,
           montage: str | Path | None = None) -> ExportSummary:
    """Export the volume at ``volume_path``; a DICOM folder is replaced if it exists."""
    from medgen.io.dicom_writer import write_dicom_series
    from medgen.io.montage import save_montage
    from medgen.stages.common import load_volume

    volume = load_volume(volume_path)
    files = []
    if dicom is not None:
        files = write_dicom_series(volume, dicom, series_description="medgen enhanced", overwrite=True)
    picture = Path(save_montage(volume, montage)) if montage is not None else None
    return ExportSummary(files, picture)
