"""Write a volume as a derived DICOM series and/or a PNG montage, for PACS and for people.

Given a tracking target (``parent_run_id`` or ``tracking_uri``) the export is an MLflow run
too, named ``export:<dicom+montage>:<input key>``, holding the exported montage (or, with
DICOM only, a montage of the exported volume) and the number of files written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ExportSummary:
    dicom_files: list[Path]
    montage: Path | None
    run_id: str | None = None


def export(volume_path: str | Path, *, dicom: str | Path | None = None,
           montage: str | Path | None = None, tracking_uri: str | None = None,
           parent_run_id: str | None = None, experiment: str = "medgen") -> ExportSummary:
    """Export the volume at ``volume_path``; a DICOM folder is replaced if it exists.

    Parameters
    ----------
    volume_path : path
        NIfTI/NRRD/MHA file or DICOM file/folder (one series).
    dicom : path, optional
        Folder of the derived DICOM series.
    montage : path, optional
        ``.png`` montage (axial, coronal, sagittal).
    tracking_uri, parent_run_id, experiment
        Where the MLflow run goes. Without ``tracking_uri`` and ``parent_run_id`` nothing is
        tracked (an export on its own is a file conversion).
    """
    from medgen.io.dicom_writer import write_dicom_series
    from medgen.io.montage import save_montage
    from medgen.stages.common import load_volume

    volume = load_volume(volume_path)
    files = []
    if dicom is not None:
        files = write_dicom_series(volume, dicom, series_description="medgen enhanced", overwrite=True)
    picture = Path(save_montage(volume, montage)) if montage is not None else None
    summary = ExportSummary(files, picture)
    if tracking_uri is None and parent_run_id is None:
        return summary

    from medgen.stages.common import volume_facts
    from medgen.run_names import input_key, run_name
    from medgen.tracking import Tracker

    formats = "+".join(f for f, given in (("dicom", dicom), ("montage", montage)) if given is not None)
    name = run_name("export", formats or "nothing", input_key(volume_path, volume))
    tracker = Tracker(experiment, uri=tracking_uri)
    with tracker.run(name, parent_id=parent_run_id, tags={"medgen.stage": "export"}) as run:
        run.log_params({**volume_facts(volume, "input"), "formats": formats or "none"})
        run.log_metrics({"dicom_files": len(files)})
        if picture is not None:  # under a fixed name: the output's own name is the user's
            import shutil
            import tempfile

            with tempfile.TemporaryDirectory(prefix="medgen-export-") as tmp:
                run.log_artifact(shutil.copyfile(picture, Path(tmp) / "montage.png"))
        else:
            run.log_montage({"exported": volume}, "montage.png")
        summary.run_id = run.run_id
    return summary
