"""The SQLite ingest manifest: file fates, series states, transactions."""

from __future__ import annotations

import sqlite3

import pytest

from medgen.archive import MANIFEST_NAME, FileRecord, Manifest, fingerprint


def _records(*names: str, series: str = "k1", size: int = 10, mtime: int = 100) -> list[FileRecord]:
    return [FileRecord(n, size, mtime, "dicom", series) for n in names]


@pytest.fixture()
def manifest(tmp_path):
    with Manifest.open(tmp_path) as m:
        yield m


def test_open_creates_wal_database_in_output_folder(tmp_path):
    with Manifest.open(tmp_path) as m:
        assert m.path == tmp_path / MANIFEST_NAME
    db = sqlite3.connect(tmp_path / MANIFEST_NAME)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"files", "series", "info"} <= tables


def test_record_files_counts_new_and_changed_and_prunes_missing(manifest):
    assert manifest.record_files(_records("a/1.dcm", "a/2.dcm")) == 2
    assert manifest.record_files(_records("a/1.dcm", "a/2.dcm")) == 0
    changed = _records("a/1.dcm") + [FileRecord("a/2.dcm", 10, 999, "dicom", "k1")]
    assert manifest.record_files(changed + _records("a/3.dcm")) == 2
    manifest.record_files(_records("a/3.dcm"))
    assert [f.path for f in manifest.files()] == ["a/3.dcm"]


def test_skipped_files_keep_their_note(manifest):
    manifest.record_files(
        [FileRecord("notes.txt", 5, 1, "other", None, "skipped", "not DICOM (text)")]
    )
    (rec,) = manifest.files(fate="skipped")
    assert (rec.path, rec.kind, rec.detail) == ("notes.txt", "other", "not DICOM (text)")


def test_mark_series_done_records_outputs_and_file_fates(manifest, tmp_path):
    manifest.record_files(_records("a/1.dcm", "a/2.dcm", "a/3.dcm"))
    (tmp_path / "k1_s1.nii.gz").write_bytes(b"x" * 7)
    manifest.mark_series_done(
        "k1",
        "fp1",
        [("k1_s1.nii.gz", 7)],
        [
            ("a/1.dcm", "converted", "k1_s1.nii.gz"),
            ("a/2.dcm", "converted", "k1_s1.nii.gz"),
            ("a/3.dcm", "quarantined", "missing pixel data"),
        ],
    )
    state = manifest.series_state("k1")
    assert (state.status, state.fingerprint, state.n_files) == ("done", "fp1", 3)
    assert state.outputs == (("k1_s1.nii.gz", 7),)
    assert state.outputs_intact(tmp_path)
    fates = {f.path: (f.fate, f.detail) for f in manifest.files(series_key="k1")}
    assert fates == {
        "a/1.dcm": ("converted", "k1_s1.nii.gz"),
        "a/2.dcm": ("converted", "k1_s1.nii.gz"),
        "a/3.dcm": ("quarantined", "missing pixel data"),
    }
    counts = manifest.counts()
    assert (counts["converted"], counts["quarantined"], counts["series_done"]) == (2, 1, 1)


def test_outputs_intact_notices_missing_or_resized_outputs(manifest, tmp_path):
    manifest.record_files(_records("a/1.dcm"))
    manifest.mark_series_done(
        "k1", "fp", [("k1.nii.gz", 4)], [("a/1.dcm", "converted", "k1.nii.gz")]
    )
    state = manifest.series_state("k1")
    assert not state.outputs_intact(tmp_path)  # never written
    (tmp_path / "k1.nii.gz").write_bytes(b"abc")
    assert not state.outputs_intact(tmp_path)  # truncated
    (tmp_path / "k1.nii.gz").write_bytes(b"abcd")
    assert state.outputs_intact(tmp_path)


def test_files_not_named_in_a_done_series_are_marked_unused(manifest):
    manifest.record_files(_records("a/1.dcm", "a/2.dcm"))
    manifest.mark_series_done("k1", "fp", [], [("a/1.dcm", "converted", "out.nii.gz")])
    fates = {f.path: (f.fate, f.detail) for f in manifest.files()}
    assert fates["a/2.dcm"] == ("skipped", "not used in any volume")


def test_quarantine_marks_every_file_and_keeps_the_named_path(manifest):
    manifest.record_files(_records("c/1.dcm", "c/2.dcm"))
    manifest.quarantine("k1", "fp", "lone slice", path="c/2.dcm")
    state = manifest.series_state("k1")
    assert (state.status, state.reason, state.problem_path, state.outputs) == (
        "quarantined",
        "lone slice",
        "c/2.dcm",
        (),
    )
    assert {f.fate for f in manifest.files()} == {"quarantined"}
    with pytest.raises(ValueError, match="`reason` must say why"):
        manifest.quarantine("k1", "fp", "")


def test_redone_series_replaces_its_row_and_fates(manifest):
    manifest.record_files(_records("a/1.dcm"))
    manifest.quarantine("k1", "fp1", "unreadable")
    manifest.mark_series_done(
        "k1", "fp2", [("o.nii.gz", 1)], [("a/1.dcm", "converted", "o.nii.gz")]
    )
    assert manifest.series_state("k1").status == "done"
    assert [f.fate for f in manifest.files()] == ["converted"]
    assert len(manifest.all_series()) == 1


def test_interrupted_write_leaves_nothing_half_recorded(manifest):
    manifest.record_files(_records("a/1.dcm", "a/2.dcm"))

    def fates_then_interrupt():
        yield ("a/1.dcm", "converted", "o.nii.gz")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the transaction

    with pytest.raises(KeyboardInterrupt):
        manifest.mark_series_done("k1", "fp", [("o.nii.gz", 1)], fates_then_interrupt())
    assert manifest.series_state("k1") is None
    assert {f.fate for f in manifest.files()} == {"pending"}


def test_unknown_fate_is_refused_with_a_suggestion(manifest):
    manifest.record_files(_records("a/1.dcm"))
    with pytest.raises(
        ValueError, match=r"`fate` must be one of .*got 'skiped'; did you mean 'skipped'\?"
    ):
        manifest.mark_series_done("k1", "fp", [], [("a/1.dcm", "skiped", "")])


def test_state_survives_reopening(tmp_path):
    with Manifest.open(tmp_path) as m:
        m.record_files(_records("a/1.dcm"))
        m.mark_series_done("k1", "fp", [("o.nii.gz", 3)], [("a/1.dcm", "converted", "o.nii.gz")])
    with Manifest.open(tmp_path) as m:
        assert m.series_state("k1").outputs == (("o.nii.gz", 3),)
        assert m.series_state("nope") is None


def test_newer_schema_is_refused(tmp_path):
    with Manifest.open(tmp_path):
        pass
    db = sqlite3.connect(tmp_path / MANIFEST_NAME)
    db.execute("UPDATE info SET value='99' WHERE key='schema'")
    db.commit()
    db.close()
    from medgen.errors import InputError

    with pytest.raises(InputError, match="manifest schema 99 is not the supported 1"):
        Manifest.open(tmp_path)


def test_fingerprint_follows_paths_sizes_mtimes_and_salt():
    base = [("s/1.dcm", 10, 5), ("s/2.dcm", 10, 6)]
    fp = fingerprint(base)
    assert fingerprint(list(reversed(base))) == fp
    assert fingerprint(base + [("s/3.dcm", 10, 7)]) != fp
    assert fingerprint([("s/1.dcm", 11, 5), ("s/2.dcm", 10, 6)]) != fp
    assert fingerprint([("s/1.dcm", 10, 5), ("s/2.dcm", 10, 8)]) != fp
    assert fingerprint(base, salt="keep_phi=1") != fp
