"""A batch study is every series of one StudyInstanceUID, wherever its files lie; NIfTI
files stay one study each. Keys are pseudonymous: no UID reaches an output."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from medgen.archive.ledger import Ledger
from medgen.batch.driver import run_batch
from tests.dicom_factory import write_series
from tests.test_batch import STAGES, write_pipeline

SHAPE = (20, 18, 12)
STUDY_A, STUDY_B, STUDY_C = "1.2.826.0.9.1", "1.2.826.0.9.2", "1.2.826.0.9.3"
SERIES = {"a1": STUDY_A + ".101", "a2": STUDY_A + ".102", "a3": STUDY_A + ".103",
          "b1": STUDY_B + ".101", "c1": STUDY_C + ".101"}


def make_archive(root: Path) -> None:
    """Study A split over two folders; folder MIXED holds studies B and C; two NIfTI files."""
    from medgen.io import save
    from medgen.volume import Volume

    write_series(root / "PAT_A" / "T1", shape=SHAPE, study_uid=STUDY_A, series_uid=SERIES["a1"], series_number=1)
    write_series(root / "EXPORT_2" / "T2", shape=SHAPE, study_uid=STUDY_A, series_uid=SERIES["a2"], series_number=2)
    write_series(root / "MIXED", shape=SHAPE, study_uid=STUDY_B, series_uid=SERIES["b1"], name_pattern="B{index:04d}")
    write_series(root / "MIXED", shape=SHAPE, study_uid=STUDY_C, series_uid=SERIES["c1"], name_pattern="C{index:04d}")
    rng = np.random.default_rng(0)
    for name in ("one.nii.gz", "two.nii.gz"):
        save(Volume(rng.normal(100, 10, SHAPE).astype(np.float32), np.eye(4)), root / "nifti" / name)


def _studies(out: Path) -> dict[str, tuple[str, int, list[str]]]:
    """key -> (status, files, enhanced volume names)."""
    with Ledger.open(out) as ledger:
        states = ledger.studies(STAGES)
        files = dict(ledger._db.execute("SELECT study_key, n_files FROM ledger_studies").fetchall())
    return {s.study_key: (s.status, files[s.study_key],
                          sorted(p.name for p in (out / "studies" / s.study_key).glob("*_enhanced.nii.gz")))
            for s in states}


def test_dicom_series_are_grouped_by_study_uid_and_nifti_files_stay_apart(tmp_path):
    from medgen.io.deid import pseudonym
    from medgen.stages.ingest_names import SourceNames
    from medgen.stages.ingest_plan import plan_ingest

    src = tmp_path / "archive"
    make_archive(src)
    out = tmp_path / "results"
    summary = run_batch(write_pipeline(tmp_path / "p.yaml", dicom=True), src, out, track=False, progress=False)
    assert (summary.total, summary.done_now, summary.failed_now) == (5, 5, 0)
    studies = _studies(out)
    secret = SourceNames.for_output(out).secret
    key = {uid: pseudonym("study", uid, salt=secret) for uid in (STUDY_A, STUDY_B, STUDY_C)}
    # Study A: two folders, one study with both series; B and C: one folder, two studies.
    assert studies[key[STUDY_A]][:2] == ("done", 2 * SHAPE[2])
    assert len(studies[key[STUDY_A]][2]) == 2
    assert sorted(n.split("_")[1] for n in studies[key[STUDY_A]][2]) == ["s1", "s2"]  # both series
    for uid in (STUDY_B, STUDY_C):
        assert studies[key[uid]][:2] == ("done", SHAPE[2]) and len(studies[key[uid]][2]) == 1
    # NIfTI files: one study each, keyed as ingest keys them.
    nifti_keys = {t.key for t in plan_ingest(src, out).tasks if t.kind == "nifti"}
    assert len(nifti_keys) == 2 and nifti_keys <= set(studies)
    assert set(studies) == set(key.values()) | nifti_keys
    # Derived DICOM: a study's series stay one (new) study under one patient pseudonym.
    import pydicom

    def study_of(folder: Path) -> tuple[str, str]:
        ds = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
        return ds.StudyInstanceUID, ds.PatientID

    derived = {k: {study_of(f) for f in (out / "studies" / k).glob("*_enhanced_dicom")} for k in key.values()}
    assert [len(derived[key[uid]]) for uid in (STUDY_A, STUDY_B, STUDY_C)] == [1, 1, 1]
    assert len(set().union(*derived.values())) == 3  # three studies, three UIDs and pseudonyms
    assert len({f for f in (out / "studies" / key[STUDY_A]).glob("*_enhanced_dicom")}) == 2
    # No UID of the archive anywhere in the outputs (gzip-compressed ones read uncompressed).
    for path in [p for p in out.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        for uid in (STUDY_A, STUDY_B, STUDY_C, *SERIES.values()):
            assert uid.encode() not in data, (path.relative_to(out).as_posix(), uid)


def test_a_new_series_redoes_its_study_only_and_a_bad_series_fails_its_study_with_where(tmp_path):
    src = tmp_path / "archive"
    make_archive(src)
    out = tmp_path / "results"
    pipeline = write_pipeline(tmp_path / "p.yaml")
    run_batch(pipeline, src, out, track=False, progress=False)
    before = _studies(out)
    write_series(src / "LATER" / "FLAIR", shape=SHAPE, study_uid=STUDY_A, series_uid=SERIES["a3"], series_number=3)
    write_series(src / "LATER" / "BAD", shape=SHAPE, study_uid=STUDY_B, series_uid=STUDY_B + ".102",
                 series_number=2, omit_slices=[4])
    summary = run_batch(pipeline, src, out, track=False, progress=False)
    assert (summary.total, summary.done_before, summary.done_now, summary.failed_now) == (5, 3, 1, 1)
    after = _studies(out)
    changed = {k for k in after if after[k] != before[k]}
    assert len(changed) == 2
    grown = next(k for k in changed if after[k][0] == "done")
    assert after[grown][1] == 3 * SHAPE[2] and len(after[grown][2]) == 3
    (failed_key, reason), = summary.failed
    assert failed_key in changed and after[failed_key][0] == "failed"
    assert reason.startswith("ingest: series 1 of 2: ") and "missing slice" in reason  # LATER/ before MIXED/
