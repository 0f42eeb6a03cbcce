"""No patient data in names (issue 9, item 10).

Folder names, file names and free-text tags of real archives carry patient names, IDs and
dates. By default none of it may reach an output name, a sidecar, the manifest, the log,
stdout or stderr (progress bar and quarantine lines included); ``--keep-phi`` keeps real
paths, and ``--locate`` maps a pseudonym back to its file for whoever holds the key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from medgen.archive import Manifest
from medgen.cli import app
from medgen.stages.ingest import ingest
from tests.dicom_factory import write_series

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")  # writing the fixture
PHI = ("Doe^Jane", "DOE", "JANE", "PHI12345", "19700101", "St Elsewhere")
FREE_TEXT = {
    "ImageComments": "Jane Doe, PHI12345",
    "StudyDescription": "JANE DOE head",
    "ProtocolName": "DOE JANE protocol",
    "InstitutionName": "St Elsewhere",
}


@pytest.fixture()
def phi_archive(tmp_path):
    """PHI in folder names, file names and free-text tags, with one damaged file (so a
    quarantine line and a reader warning exist) and a NIfTI named after the patient."""
    src = tmp_path / "src"
    study = src / "Doe^Jane" / "PHI12345_19700101"
    common = dict(patient_name="DOE^JANE", patient_id="PHI12345", birth_date="19700101",
                  extra=FREE_TEXT)
    good = write_series(study / "CT JANE DOE", shape=(4, 4, 3), series_number=2,
                        series_description="DOE JANE CT", name_pattern="JANE_DOE_{index:04d}",
                        **common)
    invalid = {**FREE_TEXT, "PatientAge": "JANE DOE", "StudyDate": "PHI12345"}  # warned about
    bad = write_series(study / "MR_PHI12345", shape=(4, 4, 3), series_number=3,
                       series_description="JANE PHI12345", **{**common, "extra": invalid})
    data = bad[2].read_bytes()
    uid = pydicom.dcmread(bad[2]).SeriesInstanceUID.encode()
    bad[2].write_bytes(data[: data.index(uid) + 12])  # cut inside the UID: a line and a warning
    nifti = src / "Doe^Jane" / "DOE_JANE_19700101.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), np.eye(4)), nifti)
    (src / "Doe^Jane" / "PHI12345 notes.txt").write_text("Jane Doe, born 19700101\n")
    return src, good, bad


def _everything_in(dst: Path) -> str:
    """Every name under ``dst`` and every file's bytes (manifest, log, sidecars, volumes)."""
    parts = []
    for path in sorted(dst.rglob("*")):
        parts.append(path.name)
        if path.is_file():
            data = path.read_bytes()
            if path.name.endswith(".gz"):
                import gzip

                data = gzip.decompress(data)
            parts.append(data.decode("latin-1"))
    return "\n".join(parts)


def test_no_patient_data_in_names_messages_or_records_by_default(phi_archive, tmp_path):
    src, good, bad = phi_archive
    dst = tmp_path / "out"
    result = runner.invoke(app, ["ingest", str(src), "--out", str(dst)], env={"COLUMNS": "200"})
    assert result.exit_code == 3, result.output
    assert "quarantined:" in result.output and "pseudonyms" in result.output
    assert (dst / "ingest.log").is_file() and (dst / "manifest.sqlite").is_file()
    seen = result.output + _everything_in(dst)
    leaks = [value for value in PHI if value in seen]
    assert not leaks, f"patient data {leaks} in outputs or messages"
    sidecar = json.loads(next(dst.glob("*_s2.json")).read_text())
    assert sidecar["SourceFileCount"] == 3 and all(
        not any(v in name for v in PHI) for name in sidecar["SourceFiles"]
    )
    assert "SeriesDescription" not in sidecar and "ProtocolName" not in sidecar


def test_keep_phi_uses_real_paths_and_descriptions(phi_archive, tmp_path):
    src, good, bad = phi_archive
    dst = tmp_path / "kept"
    result = runner.invoke(app, ["ingest", str(src), "--out", str(dst), "--keep-phi", "-q"])
    assert result.exit_code == 3
    rel_bad = bad[2].relative_to(src).as_posix()
    assert f"quarantined: {rel_bad}: corrupt image" in result.output
    with Manifest.open(dst) as manifest:
        paths = {f.path for f in manifest.files()}
    assert {p.relative_to(src).as_posix() for p in good} <= paths
    assert [p.name for p in dst.glob("*_s2_DOE_JANE_CT.nii.gz")]
    sidecar = json.loads(next(dst.glob("*_s2_*.json")).read_text())
    assert sidecar["SeriesDescription"] == "DOE JANE CT"


def test_locate_maps_pseudonyms_back_for_the_key_holder(phi_archive, tmp_path):
    src, good, bad = phi_archive
    dst = tmp_path / "out"
    summary = ingest(src, dst, progress=False)
    (shown, _), = [line for line in summary.quarantined]
    result = runner.invoke(app, ["ingest", str(src), "-o", str(dst), "--locate", shown])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{shown} -> {bad[2].relative_to(src).as_posix()}"
    # A sidecar's SourceFiles entry (last component only) and a series key work too.
    sidecar_path = next(dst.glob("*_s2.json"))
    first = json.loads(sidecar_path.read_text())["SourceFiles"][0]
    key = sidecar_path.name.split("_")[0]
    result = runner.invoke(app, ["ingest", str(src), "-o", str(dst), "--locate", first,
                                 "--locate", key])
    assert result.exit_code == 0, result.output
    rels = sorted(p.relative_to(src).as_posix() for p in good)
    assert result.output.splitlines() == [f"{first} -> {rels[0]}"] + [f"{key} -> {r}" for r in rels]
    missing = runner.invoke(app, ["ingest", str(src), "-o", str(dst), "--locate", "0123abcd"])
    assert missing.exit_code == 4 and "no file under SRC has this pseudonym" in missing.output


def test_pseudonyms_are_keyed_per_output_folder(phi_archive, tmp_path):
    src, _, _ = phi_archive
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ingest(src, a, progress=False)
    ingest(src, b, progress=False)
    c.mkdir()
    shutil.copy(a / "pseudonym.key", c / "pseudonym.key")
    ingest(src, c, progress=False)
    names = {d: sorted(p.name for p in d.glob("*.nii.gz")) for d in (a, b, c)}
    assert names[a] == names[c] and not set(names[a]) & set(names[b])
    assert (a / "pseudonym.key").stat().st_mode & 0o077 == 0  # the owner's only


def test_a_folder_with_series_but_no_key_is_refused(phi_archive, tmp_path):
    from medgen.errors import InputError

    src, _, _ = phi_archive
    dst = tmp_path / "out"
    ingest(src, dst, progress=False)
    (dst / "pseudonym.key").unlink()
    with pytest.raises(InputError, match="pseudonym.key: missing, but this folder holds"):
        ingest(src, dst, progress=False)
