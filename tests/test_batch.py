"""medgen batch over a generated archive: resumable, idempotent, safe, one MLflow run.

The pipeline uses the ``identity`` model (no torch in the workers), so a run over a dozen
small DICOM studies takes seconds; the faults (SIGKILL of the driver at random moments,
a worker killed mid-study, stale heartbeats, a second run) are the real ones.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from medgen.archive.ledger import BatchLock, Ledger
from medgen.batch.driver import run_batch
from medgen.batch.spec import load_batch_pipeline
from medgen.errors import ConfigError, InputError
from tests.dicom_factory import write_series

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "enhance", "export", "metrics")
PIPELINE = """\
name: test-batch
stages:
  - ingest: {{}}
  - enhance: {{model: identity}}
  - export: {{dicom: {dicom}, montage: true}}
  - metrics: {{}}
"""


def make_archive(root: Path, n_good: int = 6, shape=(20, 18, 12)) -> dict[str, str]:
    """``n_good`` DICOM studies under patient-named folders, one with a missing slice and a
    junk file; returns {folder: patient name}."""
    names = {}
    for i in range(n_good):
        folder = f"SMITH_JOHN_{i}"
        write_series(root / folder / "CT", shape=shape, series_uid=f"1.2.826.0.1.{i}",
                     patient_name=f"SMITH^JOHN{i}", patient_id=f"PID{i:05d}")
        names[folder] = f"SMITH^JOHN{i}"
    write_series(root / "DOE_JANE" / "CT", shape=shape, series_uid="1.2.826.0.1.999", omit_slices=[5],
                 patient_name="DOE^JANE", patient_id="PID99999")
    (root / "notes.txt").write_text("not a scan")
    return names


def write_pipeline(path: Path, dicom: bool = False) -> Path:
    path.write_text(PIPELINE.format(dicom=str(dicom).lower()))
    return path


def tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def check_consistent(out: Path, n_good: int) -> None:
    """Every good study: exactly one complete enhanced volume equal to its input; the broken
    one: a reason; no temporary files; the ledger's outputs match the files byte for byte."""
    from medgen.stages.common import load_volume

    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    with Ledger.open(out) as ledger:
        studies = ledger.studies(STAGES)
        done = [s for s in studies if s.status == "done"]
        failed = [s for s in studies if s.status == "failed"]
        assert len(done) == n_good and len(failed) == 1
        assert "missing slice" in failed[0].reason
        for s in done:
            enhanced = sorted((out / "studies" / s.study_key).glob("*_enhanced.nii.gz"))
            assert len(enhanced) == 1
            before = load_volume(str(enhanced[0]).replace("_enhanced", "")).values(np.float32)
            np.testing.assert_array_equal(load_volume(enhanced[0]).values(np.float32), before)
            for step in s.steps:
                assert step.outputs and step.outputs_intact(out, checksums=True), (s.study_key, step.stage)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    return root, make_archive(root)


def test_batch_runs_every_study_once_and_a_rerun_does_nothing(archive, tmp_path):
    src, names = archive
    before = tree_digest(src)
    pipeline = write_pipeline(tmp_path / "p.yaml", dicom=True)
    out = tmp_path / "results"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_batch(pipeline, src, out, workers=2, tracking_uri=uri, progress=False)
    assert (summary.done_now, summary.failed_now, summary.total) == (6, 1, 7)
    assert summary.exit_code == 3 and "missing slice" in summary.failed[0][1]
    check_consistent(out, 6)
    assert tree_digest(src) == before  # the archive is only read
    again = run_batch(pipeline, src, out, workers=2, track=False, progress=False)
    assert (again.done_now, again.failed_now, again.done_before) == (0, 0, 6)
    assert again.lines()[0].startswith("nothing to do: 6 of 7 studies already done")
    # No patient identity anywhere in the ledger, the table, the report or the logs.
    for path in [out / "manifest.sqlite", out / "studies.csv", out / "report.html"]:
        text = path.read_bytes()
        for name in [*names.values(), "DOE^JANE", "PID0000", "PID99999"]:
            assert name.encode() not in text, (path.name, name)
    db = sqlite3.connect(out / "manifest.sqlite")
    ledger_text = repr(db.execute("SELECT * FROM ledger_steps").fetchall() + db.execute(
        "SELECT * FROM ledger_studies").fetchall())
    db.close()
    assert "SMITH" not in ledger_text and "DOE" not in ledger_text
    # One MLflow run for the whole batch, with the per-study table and the report.
    from medgen.tracking import Tracker

    tracker = Tracker("medgen-batch", uri=uri)
    runs = tracker.client.search_runs([tracker.experiment_id])
    assert len(runs) == 1
    artifacts = {a.path for a in tracker.client.list_artifacts(runs[0].info.run_id)}
    assert {"studies.csv", "report.html", "p.yaml"} <= artifacts
    assert runs[0].data.metrics["studies_done"] == 6


def test_new_studies_and_changed_settings_redo_only_what_they_affect(tmp_path):
    src = tmp_path / "archive"
    make_archive(src, n_good=3)
    pipeline = write_pipeline(tmp_path / "p.yaml")
    out = tmp_path / "results"
    run_batch(pipeline, src, out, workers=1, track=False, progress=False)
    with Ledger.open(out) as ledger:
        first = {(s.study_key, st.stage): st.updated for s in ledger.studies(STAGES) for st in s.steps}
    write_series(src / "NEW_PATIENT" / "CT", shape=(20, 18, 12), series_uid="1.2.826.0.1.77")
    summary = run_batch(pipeline, src, out, workers=1, track=False, progress=False)
    assert (summary.done_now, summary.done_before, summary.total) == (1, 3, 5)
    write_pipeline(pipeline, dicom=True)  # export changed: only export runs again
    summary = run_batch(pipeline, src, out, workers=1, track=False, progress=False)
    assert summary.done_now == 4
    with Ledger.open(out) as ledger:
        for s in ledger.studies(STAGES):
            for st in s.steps:
                if (s.study_key, st.stage) in first and st.status == "done":
                    changed = st.updated != first[(s.study_key, st.stage)]
                    assert changed == (st.stage == "export"), (s.study_key, st.stage)
    assert len(list(out.glob("studies/*/*_enhanced_dicom"))) == 4


def test_retry_failed_runs_failed_studies_again(archive, tmp_path):
    src, _ = archive
    pipeline = write_pipeline(tmp_path / "p.yaml")
    out = tmp_path / "results"
    run_batch(pipeline, src, out, workers=1, track=False, progress=False)
    again = run_batch(pipeline, src, out, workers=1, retry_failed=True, track=False, progress=False)
    assert (again.retried, again.failed_now, again.done_now) == (1, 1, 0)


def test_a_second_run_on_the_same_output_is_refused(archive, tmp_path):
    src, _ = archive
    out = tmp_path / "results"
    out.mkdir()
    with BatchLock(out), pytest.raises(InputError, match="another medgen batch .* is writing to this folder"):
        run_batch(write_pipeline(tmp_path / "p.yaml"), src, out, track=False, progress=False)


def test_output_inside_the_archive_is_refused(archive, tmp_path):
    src, _ = archive
    with pytest.raises(InputError, match="outside the input archive"):
        run_batch(write_pipeline(tmp_path / "p.yaml"), src, src / "out", track=False, progress=False)


def test_pipeline_typo_stops_before_any_work_naming_file_and_key(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nstages:\n  - ingest: {}\n  - enhance: {model: identity, adapt_secs: 3}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: stages\.1\.enhance\.adapt_secs: unknown key"):
        load_batch_pipeline(path)
    path.write_text("name: x\nstages:\n  - enhance: {model: identity}\n  - ingest: {}\n")
    with pytest.raises(ConfigError, match="must run in the order ingest -> enhance"):
        load_batch_pipeline(path)


def test_stale_running_entries_of_a_dead_run_are_taken_back(archive, tmp_path):
    src, _ = archive
    pipeline = write_pipeline(tmp_path / "p.yaml")
    out = tmp_path / "results"
    run_batch(pipeline, src, out, workers=1, track=False, progress=False)
    with Ledger.open(out) as ledger:
        key = next(s.study_key for s in ledger.studies(STAGES) if s.status == "done")
        ledger.mark_running(key, "enhance", worker="local-7", fingerprint="x", run_id="dead-run")
        ledger._db.execute("UPDATE ledger_steps SET heartbeat=heartbeat-3600 WHERE study_key=?", (key,))
    enhanced = next((out / "studies" / key).glob("*_enhanced.nii.gz"))
    enhanced.unlink()  # the dead worker never finished writing it
    summary = run_batch(pipeline, src, out, workers=1, track=False, progress=False)
    assert (summary.taken_back, summary.done_now) == (1, 1)
    check_consistent(out, 6)


def test_a_worker_that_dies_mid_study_is_replaced_and_the_study_failed_after_two(tmp_path):
    src = tmp_path / "archive"
    make_archive(src, n_good=3)
    write_series(src / "BIG" / "CT", shape=(192, 192, 60), series_uid="1.2.826.0.1.555")
    pipeline = write_pipeline(tmp_path / "p.yaml", dicom=True)
    out = tmp_path / "results"
    out.mkdir()
    kills: list[str] = []
    stop = threading.Event()

    def killer() -> None:
        import multiprocessing

        from medgen.io.deid import pseudonym  # noqa: F401 - the key is found through the ledger

        while not stop.is_set() and len(kills) < 2:
            time.sleep(0.02)
            try:
                db = sqlite3.connect(f"file:{out / 'manifest.sqlite'}?mode=ro", uri=True)
                rows = db.execute("SELECT s.study_key, t.worker FROM ledger_steps t JOIN ledger_studies s"
                                  " ON s.study_key=t.study_key WHERE t.status='running' AND s.n_files=60").fetchall()
                db.close()
            except sqlite3.Error:
                continue
            for _key, worker in rows:
                held = [p for p in multiprocessing.active_children() if p.name == f"medgen-batch-{worker}"]
                if held and worker not in kills:
                    time.sleep(0.05)
                    os.kill(held[0].pid, signal.SIGKILL)
                    kills.append(worker)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        summary = run_batch(pipeline, src, out, workers=1, track=False, progress=False)
    finally:
        stop.set()
        thread.join()
    assert len(kills) == 2
    assert summary.done_now == 3
    big = [r for k, r in summary.failed if "worker process died (killed by signal SIGKILL)" in r]
    assert len(big) == 1 and "2 times" in big[0]


_RUN = [sys.executable, "-m", "medgen.stages.batch_cli", "batch"]


def test_sigkill_at_random_moments_then_resume_leaves_every_output_once(tmp_path):
    src = tmp_path / "archive"
    make_archive(src, n_good=10)
    before = tree_digest(src)
    pipeline = write_pipeline(tmp_path / "p.yaml", dicom=True)
    out = tmp_path / "results"
    args = [*_RUN, str(pipeline), "--input", str(src), "--out", str(out), "-j", "2", "--no-tracking", "-q"]
    rng = random.Random(11)
    for _ in range(4):
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.8, 3.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert final.returncode == 3, final.stderr  # one study is broken, with its reason
    assert "missing slice" in final.stderr
    check_consistent(out, 10)
    assert tree_digest(src) == before
    status = subprocess.run([sys.executable, "-m", "medgen.stages.batch_cli", "status", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert "11 studies: 10 done, 0 running, 1 failed, 0 pending" in status.stdout
