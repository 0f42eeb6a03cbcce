"""``medgen.stages.ingest``: scan, convert, skip what is done, survive bad input and kills."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgen.archive import MANIFEST_NAME, Manifest
from medgen.io.dicom_reader import read_dicom_series
from medgen.stages import ingest_run
from medgen.stages.ingest import ingest
from medgen.stages.ingest_run import run_tasks
from tests.dicom_factory import (
    SAGITTAL,
    voxel_pattern,
    write_dicomdir,
    write_series,
    write_structured_report,
)

PHI = ("DOE^JANE", "DOE", "JANE", "PIDQXZ", "19211231")
DICOM_NAME_RE = r"^[0-9a-f]{12}_s\d+(_[A-Za-z0-9.+_-]+)?\.nii\.gz$"


def _named(dst: Path, path: Path, src: Path) -> str:
    """How ingest into ``dst`` names ``path`` (pseudonymous: the default mode)."""
    from medgen.stages.ingest_names import SourceNames

    return SourceNames.for_output(dst).path(path.relative_to(src).as_posix())


def _is_series(name: str, number: int) -> bool:
    """True for the output name of series ``number`` (``<key>_s<number>[_...].nii.gz``)."""
    return re.search(rf"_s{number}[._]", name) is not None


def _series(directory, **kwargs):
    kwargs.setdefault("patient_id", "PIDQXZ")
    kwargs.setdefault("birth_date", "19211231")
    return write_series(directory, **kwargs)


@pytest.fixture()
def archive(tmp_path):
    """A messy folder: nested series, extensionless files, a series over two folders,
    two series in one folder, a NIfTI file, a DICOMDIR, a structured report and junk."""
    src = tmp_path / "src"
    files = {}
    files["ct"] = _series(src / "pat1" / "study" / "ct", shape=(8, 6, 5), series_number=2)
    mr = _series(
        tmp_path / "staging",
        shape=(6, 6, 6),
        modality="MR",
        rescale=None,
        orientation=SAGITTAL,
        series_description="SAG T1",
        extension="",
        series_number=3,
    )
    for i, path in enumerate(mr):  # one series spread over two folders
        dest = src / "pat1" / "study" / ("mr_a" if i < 3 else "mr_b") / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, dest)
    files["mr"] = sorted((src / "pat1" / "study").glob("mr_*/*"))
    files["c"] = _series(
        src / "pat2" / "mixed", shape=(4, 5, 3), series_number=4, name_pattern="C{index:03d}"
    )
    files["d"] = _series(
        src / "pat2" / "mixed", shape=(5, 4, 4), series_number=5, name_pattern="D{index:03d}"
    )
    nifti = nib.Nifti1Image(
        np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.diag([2.0, 2.0, 3.0, 1.0])
    )
    files["nifti"] = src / "nifti" / "brain.nii.gz"
    files["nifti"].parent.mkdir()
    nib.save(nifti, files["nifti"])
    write_dicomdir(src, files["ct"][:2])
    write_structured_report(src / "pat1" / "report", patient_id="PIDQXZ")
    (src / "pat1" / "README.txt").write_text("exported by PACS\n")
    return src, files


def _checksums(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _outputs(dst: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_mtime_ns for p in dst.iterdir() if p.name.endswith((".nii.gz", ".json"))
    }


def _manifest_consistent(dst: Path) -> None:
    """Every done series' outputs exist with their sizes; no temp files anywhere."""
    with Manifest.open(dst) as m:
        for state in m.all_series():
            if state.status == "done":
                assert state.outputs_intact(dst), state
        assert m.counts()["pending"] == 0
    assert not [p for p in dst.rglob("*") if ".tmp-" in p.name]


def test_messy_tree_converts_every_series_and_explains_every_other_file(archive, tmp_path):
    src, files = archive
    dst = tmp_path / "out"
    summary = ingest(src, dst, progress=False)

    assert summary.exit_code == 0, summary.quarantined
    assert summary.quarantined == []
    assert summary.counts == {"converted": 5, "unchanged": 0, "quarantined": 0, "skipped": 3}
    names = sorted(p.name for p in summary.volumes_written)
    dicom_names = [n for n in names if re.match(DICOM_NAME_RE, n)]
    assert sorted(re.split(r"[_.]", n)[1] for n in dicom_names) == ["s2", "s3", "s4", "s5"]
    # A NIfTI input is named by its pseudonymous key alone: file names may name patients.
    assert re.fullmatch(r"[0-9a-f]{12}\.nii\.gz", [n for n in names if n not in dicom_names][0])
    for name in names:  # every volume has its sidecar
        assert (dst / name.replace(".nii.gz", ".json")).is_file()
    skipped = {path: note for path, _, note in summary.skipped}
    assert skipped["DICOMDIR"] == "DICOMDIR index"
    assert skipped[_named(dst, src / "pat1/README.txt", src)] == "not DICOM (text)"
    assert "without an image" in skipped[_named(dst, src / "pat1/report", src)]
    _manifest_consistent(dst)


def test_output_equals_what_the_reader_gives(archive, tmp_path):
    src, files = archive
    dst = tmp_path / "out"
    summary = ingest(src, dst, progress=False)
    (ct_out,) = [p for p in summary.volumes_written if _is_series(p.name, 2)]
    expected = read_dicom_series(files["ct"]).volumes[0]
    img = nib.load(ct_out)
    np.testing.assert_array_equal(np.asarray(img.dataobj.get_unscaled()), expected.array)
    np.testing.assert_allclose(img.affine, expected.affine, atol=1e-4)
    # Physical values are the pattern plus the CT rescale intercept.
    hu = np.sort(np.asarray(img.dataobj, dtype=np.float64).ravel())
    np.testing.assert_array_equal(
        hu, np.sort(voxel_pattern(8, 6, 5).ravel().astype(np.float64) - 1024)
    )
    sidecar = json.loads(ct_out.with_name(ct_out.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["SeriesNumber"] == 2
    assert sidecar["Modality"] == "CT"


def test_series_over_two_folders_is_one_volume_and_one_folder_can_hold_two(archive, tmp_path):
    src, _ = archive
    summary = ingest(src, tmp_path / "out", progress=False)
    by_series = {re.split(r"[_.]", p.name)[1]: p for p in summary.volumes_written if "_" in p.name}
    assert nib.load(by_series["s3"]).shape == (6, 6, 6)  # 3 + 3 slices from mr_a and mr_b
    assert sorted(nib.load(by_series["s4"]).shape) == [3, 4, 5]
    assert sorted(nib.load(by_series["s5"]).shape) == [4, 4, 5]
    nifti_out = [p for p in summary.volumes_written if "_" not in p.name]
    assert len(nifti_out) == 1
    np.testing.assert_array_equal(
        np.asarray(nib.load(nifti_out[0]).dataobj), np.arange(60).reshape(3, 4, 5)
    )


def test_inputs_are_never_modified_or_added_to(archive, tmp_path):
    src, _ = archive
    before = _checksums(src)
    ingest(src, tmp_path / "out", progress=False)
    ingest(src, tmp_path / "out", progress=False)
    assert _checksums(src) == before


def test_second_run_does_no_repeated_work(archive, tmp_path):
    src, _ = archive
    dst = tmp_path / "out"
    first = ingest(src, dst, progress=False)
    mtimes = _outputs(dst)
    second = ingest(src, dst, progress=False)
    assert second.counts == {"converted": 0, "unchanged": 5, "quarantined": 0, "skipped": 3}
    assert second.volumes_written == [] and second.n_volumes == first.n_volumes == 5
    assert second.exit_code == 0
    assert _outputs(dst) == mtimes


def test_added_file_reconverts_only_its_series(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    staged = _series(tmp_path / "staging", shape=(8, 6, 5), series_number=1)
    (src / "a").mkdir(parents=True)
    for path in staged[:4]:
        shutil.copy2(path, src / "a" / path.name)
    _series(src / "b", shape=(4, 4, 3), series_number=2)
    first = ingest(src, dst, progress=False)
    (a_out,) = [p for p in first.volumes_written if _is_series(p.name, 1)]
    assert nib.load(a_out).shape[2] == 4
    b_mtimes = {n: t for n, t in _outputs(dst).items() if _is_series(n, 2)}

    shutil.copy2(staged[4], src / "a" / staged[4].name)
    second = ingest(src, dst, progress=False)
    assert second.counts["converted"] == 1 and second.counts["unchanged"] == 1
    assert second.volumes_written == [a_out]
    assert nib.load(a_out).shape[2] == 5
    assert {n: t for n, t in _outputs(dst).items() if _is_series(n, 2)} == b_mtimes
    _manifest_consistent(dst)


def test_renamed_series_replaces_its_old_outputs(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    uid = "1.2.826.0.1.3680043.8.498.1"
    _series(src / "a", series_uid=uid, study_uid=uid + ".9", series_description="OLD NAME")
    ingest(src, dst, progress=False, keep_phi=True)  # descriptions are in names only then
    _series(src / "a", series_uid=uid, study_uid=uid + ".9", series_description="NEW NAME")
    summary = ingest(src, dst, progress=False, keep_phi=True)
    assert summary.counts["converted"] == 1
    names = sorted(_outputs(dst))
    assert len(names) == 2 and all("NEW_NAME" in n for n in names), names


def test_odd_file_gets_one_line_and_the_rest_converts(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    paths = _series(src / "s", shape=(8, 6, 5), matrix_overrides={4: (10, 6)})
    _series(src / "good", shape=(4, 4, 3), series_number=9)
    summary = ingest(src, dst, progress=False)
    bad = _named(dst, paths[4], src)
    assert [p for p, _ in summary.quarantined] == [bad]
    (reason,) = [r for p, r in summary.quarantined]
    assert reason and "\n" not in reason
    assert summary.exit_code == 3
    assert summary.counts["converted"] == 2  # the series lost one odd file, not its volume
    (s_out,) = [p for p in summary.volumes_written if _is_series(p.name, 1)]
    assert nib.load(s_out).shape[2] == 4
    with Manifest.open(dst) as m:
        fates = {f.path: (f.fate, f.detail) for f in m.files()}
    assert fates[bad] == ("quarantined", reason)
    assert all(fate == "converted" for p, (fate, _) in fates.items() if p != bad)


def _cut(path: Path, n_bytes: int) -> None:
    path.write_bytes(path.read_bytes()[:n_bytes])


@pytest.mark.parametrize(
    ("fault", "bad_slice", "reason_words"),
    [
        ({"truncate": [4]}, 4, "cannot decode pixel data"),
        ({"truncate": [2]}, 2, "cannot decode pixel data"),
        ({"no_pixel_data": [4]}, 4, "missing pixel data"),
        ({"cut_to": 700}, 4, "corrupt image"),  # cut inside the header, as a copy cut short
        ({"cut_to": 1000}, 2, "corrupt image"),
    ],
    ids=["truncated-last", "truncated-middle", "no-pixel-data", "cut-to-700", "cut-to-1000"],
)
def test_corrupt_image_refuses_its_series_as_a_missing_slice(
    tmp_path, fault, bad_slice, reason_words
):
    src, dst = tmp_path / "src", tmp_path / "out"
    fault = dict(fault)
    cut_to = fault.pop("cut_to", None)
    paths = _series(src / "s", shape=(8, 6, 5), **fault)
    if cut_to:
        _cut(paths[bad_slice], cut_to)
    good = _series(src / "good", shape=(4, 4, 3), series_number=9)
    summary = ingest(src, dst, progress=False)
    bad = _named(dst, paths[bad_slice], src)
    assert [p for p, _ in summary.quarantined] == [bad]  # one line, naming the damaged file
    (reason,) = [r for p, r in summary.quarantined]
    assert reason_words in reason and "slice would be missing" in reason and "\n" not in reason
    assert summary.exit_code == 3
    assert summary.counts["converted"] == 1 and summary.counts["quarantined"] == 1
    (out,) = summary.volumes_written
    assert _is_series(out.name, 9) and nib.load(out).shape == (4, 4, 3)  # never one slice short
    with Manifest.open(dst) as m:
        fates = {f.path: f.fate for f in m.files()}
    assert all(fates[_named(dst, p, src)] == "quarantined" for p in paths)
    assert all(fates[_named(dst, p, src)] == "converted" for p in good)


@pytest.mark.parametrize(
    ("fault", "reason_words"),
    [({"same_position": True}, "position"), ({"omit_slices": [2]}, "missing slice")],
    ids=["one-position", "missing-slice"],
)
def test_unusable_series_is_quarantined_in_one_line(tmp_path, fault, reason_words):
    src, dst = tmp_path / "src", tmp_path / "out"
    fault = dict(fault)
    paths = _series(src / "bad", shape=fault.pop("shape", (8, 6, 4)), **fault)
    _series(src / "good", shape=(4, 4, 3), series_number=9)
    summary = ingest(src, dst, progress=False)
    assert len(summary.quarantined) == 1
    path, reason = summary.quarantined[0]
    assert path in {_named(dst, p, src) for p in paths}
    assert reason_words in reason and "\n" not in reason
    assert summary.counts["quarantined"] == 1 and summary.counts["converted"] == 1
    assert summary.exit_code == 3
    # The verdict is remembered: unchanged files are not retried but still reported.
    again = ingest(src, dst, progress=False)
    assert again.quarantined == summary.quarantined and again.exit_code == 3
    assert again.counts["converted"] == 0


def test_nothing_usable_gives_exit_code_4(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("nothing here")
    _series(src / "flat", shape=(4, 4, 3), same_position=True)
    summary = ingest(src, tmp_path / "out", progress=False)
    assert summary.n_volumes == 0 and summary.exit_code == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ingest(empty, tmp_path / "out2", progress=False).exit_code == 4


class _Killed(KeyboardInterrupt):
    """Stands in for Ctrl-C or a kill arriving in the middle of a run."""


def test_killed_run_resumes_without_loss_duplicates_or_leftovers(archive, tmp_path, monkeypatch):
    src, _ = archive
    dst = tmp_path / "out"
    real_write = ingest_run._write_volume
    calls = []

    def write_then_die(volume, out_dir, stem, keep_phi):
        calls.append(stem)
        if len(calls) == 3:
            # Die mid-write: a stray temp file and a half-written final-named output.
            (out_dir / f".{stem}.nii.gz.tmp-4242-deadbeef").write_bytes(b"partial")
            (out_dir / f"{stem}.nii.gz").write_bytes(b"\x1f\x8bhalf")
            raise _Killed
        return real_write(volume, out_dir, stem, keep_phi)

    monkeypatch.setattr(ingest_run, "_write_volume", write_then_die)
    with pytest.raises(_Killed):
        ingest(src, dst, progress=False)
    with Manifest.open(dst) as m:
        assert m.counts()["series_done"] == 2  # what finished before the kill is kept
    monkeypatch.setattr(ingest_run, "_write_volume", real_write)

    summary = ingest(src, dst, progress=False)
    assert summary.temp_files_removed == 1
    assert summary.counts == {"converted": 3, "unchanged": 2, "quarantined": 0, "skipped": 3}
    _manifest_consistent(dst)
    volumes = sorted(p for p in dst.iterdir() if p.name.endswith(".nii.gz"))
    assert len(volumes) == 5  # nothing lost, nothing duplicated
    for path in volumes:
        nib.load(path).get_fdata()  # every output is complete


def test_kill_between_writing_and_recording_redoes_that_series(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "out"
    _series(src / "a", series_number=1)
    real_done = Manifest.mark_series_done

    def die(self, *args, **kwargs):
        raise SystemExit(137)

    monkeypatch.setattr(Manifest, "mark_series_done", die)
    with pytest.raises(SystemExit):
        ingest(src, dst, progress=False)
    assert len(list(dst.glob("*.nii.gz"))) == 1  # written, but not trusted
    monkeypatch.setattr(Manifest, "mark_series_done", real_done)
    summary = ingest(src, dst, progress=False)
    assert summary.counts["converted"] == 1 and summary.counts["unchanged"] == 0
    assert len(list(dst.glob("*.nii.gz"))) == 1
    _manifest_consistent(dst)


def test_deleted_output_is_rewritten(archive, tmp_path):
    src, _ = archive
    dst = tmp_path / "out"
    first = ingest(src, dst, progress=False)
    first.volumes_written[0].unlink()
    second = ingest(src, dst, progress=False)
    assert second.volumes_written == [first.volumes_written[0]]
    assert second.counts["unchanged"] == 4


def _all_text(dst: Path) -> str:
    """Output names, sidecars and the manifest's contents as one string."""
    parts = [p.name for p in dst.rglob("*")]
    parts += [p.read_text() for p in dst.glob("*.json")]
    with Manifest.open(dst) as m:
        parts += [repr(f) for f in m.files()] + [repr(s) for s in m.all_series()]
    parts.append((dst / MANIFEST_NAME).read_bytes().decode("latin-1"))
    return "\n".join(parts)


def test_no_patient_data_in_outputs_by_default_and_kept_on_request(archive, tmp_path):
    src, _ = archive
    default = tmp_path / "out"
    ingest(src, default, progress=False)
    text = _all_text(default)
    for value in PHI:
        assert value not in text

    kept = tmp_path / "kept"
    ingest(src, kept, keep_phi=True, progress=False)
    sidecars = [json.loads(p.read_text()) for p in kept.glob("*_s2_*.json")]
    assert sidecars and sidecars[0]["PatientID"] == "PIDQXZ"
    assert "DOE^JANE" in sidecars[0]["PatientName"]
    assert "19211231" in json.dumps(sidecars[0])
    # Output names stay pseudonymous even then.
    assert not any(v in p.name for p in kept.iterdir() for v in PHI)


def test_switching_keep_phi_redoes_the_sidecars(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    _series(src / "a")
    ingest(src, dst, progress=False)
    summary = ingest(src, dst, keep_phi=True, progress=False)
    assert summary.counts["converted"] == 1
    (sidecar,) = dst.glob("*.json")
    assert json.loads(sidecar.read_text())["PatientID"] == "PIDQXZ"


def test_two_workers_give_the_same_outputs_as_one(archive, tmp_path):
    src, _ = archive
    one, two = tmp_path / "one", tmp_path / "two"
    s1 = ingest(src, one, workers=1, progress=False)
    two.mkdir()  # the same key gives the same pseudonyms (series keys, names)
    shutil.copy(one / "pseudonym.key", two / "pseudonym.key")
    s2 = ingest(src, two, workers=2, progress=False)
    assert s1.counts == s2.counts
    assert sorted(_outputs(one)) == sorted(_outputs(two))
    for name in _outputs(one):
        if name.endswith(".json"):
            assert json.loads((one / name).read_text()) == json.loads((two / name).read_text())
        else:
            a, b = nib.load(one / name), nib.load(two / name)
            np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
            np.testing.assert_array_equal(a.affine, b.affine)
    with Manifest.open(one) as m1, Manifest.open(two) as m2:
        fates = lambda m: [(f.path, f.fate, f.detail) for f in m.files()]  # noqa: E731
        assert fates(m1) == fates(m2)


def test_output_folder_inside_input_is_not_ingested(tmp_path):
    src = tmp_path / "src"
    _series(src / "a")
    dst = src / "converted"
    ingest(src, dst, progress=False)
    again = ingest(src, dst, progress=False)
    assert again.counts == {"converted": 0, "unchanged": 1, "quarantined": 0, "skipped": 0}


def test_unusable_folders_raise_one_line_input_errors(tmp_path):
    from medgen.errors import InputError

    with pytest.raises(InputError, match="no such file or folder"):
        ingest(tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "src").mkdir()
    with pytest.raises(InputError, match="must differ from the input folder"):
        ingest(tmp_path / "src", tmp_path / "src", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="output exists and is not a folder"):
        ingest(tmp_path / "src", tmp_path / "file", progress=False)
    with pytest.raises(ValueError, match="`workers` must be an integer >= 1, got 0"):
        ingest(tmp_path / "src", tmp_path / "out", workers=0, progress=False)


def test_real_enhanced_mr_archive(shared_data, tmp_path):
    src = shared_data / "dicom" / "dcm_qa_enh" / "In"
    before = _checksums(src)
    summary = ingest(src, tmp_path / "out", progress=False)
    assert summary.exit_code == 0, summary.quarantined
    shapes = sorted(nib.load(p).shape for p in summary.volumes_written)
    # Siemens: 4 files of 6 frames -> one 4D volume; Philips: magnitude and field map.
    assert shapes == [(64, 64, 6, 4), (64, 64, 32), (64, 64, 32)]
    assert _checksums(src) == before


def test_unexpected_failure_is_reported_and_retried_next_run(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "out"
    _series(src / "a", series_number=1)
    real_convert = ingest_run._convert

    def broken(task):
        raise RuntimeError("decoder bug\nsecond line")

    monkeypatch.setattr(ingest_run, "_convert", broken)
    summary = ingest(src, dst, progress=False)
    assert summary.quarantined == [
        (_named(dst, src / "a/IM0001.dcm", src),
         "conversion failed (RuntimeError: decoder bug) (whole series: 5 files)")
    ]
    assert summary.exit_code == 4
    monkeypatch.setattr(ingest_run, "_convert", real_convert)
    again = ingest(src, dst, progress=False)  # same files, but the failure was not theirs
    assert again.counts["converted"] == 1 and again.quarantined == []


def test_unwritable_output_stops_the_run_with_one_error(tmp_path, monkeypatch):
    from medgen.errors import InputError

    src, dst = tmp_path / "src", tmp_path / "out"
    _series(src / "a", series_number=1)
    _series(src / "b", series_number=2)

    def disk_full(volume, out_dir, stem, keep_phi):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ingest_run, "_write_volume", disk_full)
    with pytest.raises(InputError, match=r"cannot write .* \(OSError: \[Errno 28\] No space left"):
        ingest(src, dst, progress=False)
    monkeypatch.undo()
    summary = ingest(src, dst, progress=False)
    assert summary.counts["converted"] == 2 and summary.exit_code == 0


def _crash_on_boom(task):
    """A converter whose process dies on one series (like a segfault or the OOM killer)."""
    if "boom" in task.rel_files[0]:
        os._exit(1)
    return ingest_run.convert_task(task)


def test_a_dying_worker_costs_only_its_own_series(tmp_path):
    from medgen.stages.ingest_plan import plan_ingest

    src = tmp_path / "src"
    for name in ("a", "boom", "c"):
        _series(src / name, shape=(4, 4, 3), series_number=len(name))
    (tmp_path / "out").mkdir()
    plan = plan_ingest(src, tmp_path / "out", keep_phi=True)  # real folder names in rel_files
    results = {t.rel_files[0].split("/")[0]: r for t, r in run_tasks(plan.tasks, 2, _crash_on_boom)}
    assert sorted(results) == ["a", "boom", "c"]
    assert results["a"].error is None and results["c"].error is None
    assert "converter process died" in results["boom"].error and results["boom"].transient


def test_itk_file_is_converted_one_to_one(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    src = tmp_path / "src"
    src.mkdir()
    array = np.arange(2 * 3 * 4, dtype=np.int16).reshape(4, 3, 2)  # SimpleITK order: (z, y, x)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.75, 2.0))
    sitk.WriteImage(image, str(src / "scan.mha"))
    summary = ingest(src, tmp_path / "out", progress=False)
    (out,) = summary.volumes_written
    assert "scan" not in out.name and summary.exit_code == 0
    kept = ingest(src, tmp_path / "out_phi", keep_phi=True, progress=False)
    assert kept.volumes_written[0].name.endswith("_scan.nii.gz")
    img = nib.load(out)
    np.testing.assert_allclose(img.header.get_zooms(), (0.5, 0.75, 2.0))
    np.testing.assert_array_equal(np.sort(np.asarray(img.dataobj).ravel()), np.arange(24))


def test_second_ingest_into_the_same_folder_is_refused(tmp_path):
    from medgen.errors import InputError
    from medgen.stages.ingest import _exclusive

    src, dst = tmp_path / "src", tmp_path / "out"
    _series(src / "a")
    dst.mkdir()
    busy = pytest.raises(InputError, match="another medgen ingest is writing to this folder")
    with _exclusive(dst.resolve()), busy:
        ingest(src, dst, progress=False)
    assert ingest(src, dst, progress=False).exit_code == 0
