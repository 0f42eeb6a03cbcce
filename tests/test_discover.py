"""Finding DICOM among junk in nested folders, by content rather than by name."""

from __future__ import annotations


from medgen.io.discover import scan_tree
from tests.dicom_factory import write_dicomdir, write_series, write_structured_report


def test_finds_series_in_nested_folders_without_extensions_among_junk(tmp_path):
    a = write_series(tmp_path / "p1" / "study" / "s1", shape=(4, 4, 3), extension="")
    b = write_series(tmp_path / "p1" / "study" / "s1", shape=(4, 4, 2), name_pattern="B{index}")
    # one series spread over two folders
    c = write_series(tmp_path / "x", shape=(4, 4, 2), series_uid="1.2.826.0.1.7", name_pattern="C{index}")
    c += write_series(tmp_path / "y" / "z", shape=(4, 4, 2), series_uid="1.2.826.0.1.7", name_pattern="D{index}",
                      origin=(0, 0, 4.0))
    (tmp_path / "notes.txt").write_text("scan notes\n")
    (tmp_path / "p1" / "junk.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty").write_bytes(b"")
    write_structured_report(tmp_path / "p1" / "report.dcm")
    write_dicomdir(tmp_path / "p1", a)

    entries = {e.path: e for e in scan_tree(tmp_path)}
    dicom = [e for e in entries.values() if e.kind == "dicom"]
    assert len(dicom) == len(a) + len(b) + len(c)
    assert len({e.series_uid for e in dicom}) == 3
    assert {e.series_uid for e in dicom if e.path in set(c)} == {"1.2.826.0.1.7"}
    assert entries[tmp_path / "notes.txt"].note == "not DICOM (text)"
    assert entries[tmp_path / "p1" / "junk.bin"].note == "not DICOM (unknown binary)"
    assert entries[tmp_path / "empty"].note == "empty file"
    assert entries[tmp_path / "p1" / "DICOMDIR"].kind == "dicomdir"
    report = entries[tmp_path / "p1" / "report.dcm"]
    assert report.kind == "other" and "without an image" in report.note


def test_real_dev_data_is_all_dicom(shared_data):
    entries = [e for e in scan_tree(shared_data / "dicom") if e.path.suffix == ".dcm"]
    assert len(entries) == 14 and all(e.kind == "dicom" for e in entries)
    refs = [e for e in scan_tree(shared_data / "dicom") if e.path.suffix == ".nii"]
    assert refs and all(e.kind == "nifti" for e in refs)


def test_hidden_temporaries_are_passed_over(tmp_path):
    write_series(tmp_path, shape=(4, 4, 2))
    (tmp_path / ".out.nii.gz.tmp-1").write_bytes(b"partial")
    assert all(not e.path.name.startswith(".") for e in scan_tree(tmp_path))


def test_a_file_that_cannot_be_read_does_not_end_the_scan(tmp_path, monkeypatch):
    import medgen.io.discover as discover

    paths = write_series(tmp_path, shape=(4, 4, 3))
    real = discover.classify_file

    def flaky(path, *args):
        if path == paths[1]:
            raise PermissionError(13, "Permission denied")
        return real(path, *args)

    monkeypatch.setattr(discover, "classify_file", flaky)
    entries = {e.path: e for e in scan_tree(tmp_path)}
    assert entries[paths[1]].kind == "other" and entries[paths[1]].note == "unreadable file (Permission denied)"
    assert [entries[p].kind for p in (paths[0], paths[2])] == ["dicom", "dicom"]
