"""A killed batch's MLflow run: the next start of the same batch continues it (one run per
batch over its restarts) or, when it cannot, closes it KILLED and names it in a new one."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medgen.archive.ledger import Ledger
from medgen.batch.driver import run_batch
from medgen.tracking import Tracker
from tests.test_batch import ROOT, make_archive, write_pipeline

_RUN = [sys.executable, "-m", "medgen.stages.batch_cli", "batch"]


def _runs(uri: str, experiment: str = "medgen-batch") -> list:
    tracker = Tracker(experiment, uri=uri)
    return tracker.client.search_runs([tracker.experiment_id])


def _table(uri: str, run_id: str, dst: Path) -> dict:
    tracker = Tracker("medgen-batch", uri=uri)
    path = tracker.client.download_artifacts(run_id, "studies.json", str(dst))
    return json.loads(Path(path).read_text())


def _ledger_rows(out: Path, sql: str) -> list:
    try:
        db = sqlite3.connect(f"file:{out / 'manifest.sqlite'}?mode=ro", uri=True)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()
    except sqlite3.Error:  # not made yet, or a table missing
        return []


def test_sigkilled_batch_is_continued_in_the_same_mlflow_run_with_the_whole_table(tmp_path):
    src = tmp_path / "archive"
    make_archive(src, n_good=12, shape=(40, 36, 16))
    pipeline = write_pipeline(tmp_path / "p.yaml")
    out = tmp_path / "results"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*_RUN, str(pipeline), "--input", str(src), "--out", str(out), "-j", "1", "--tracking-uri", uri, "-q"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    done_at_kill = 0
    while time.monotonic() < deadline and proc.poll() is None:
        done_at_kill = len(_ledger_rows(out, "SELECT study_key FROM ledger_steps WHERE stage='metrics'"
                                             " AND status='done'"))
        tracked = _ledger_rows(out, "SELECT mlflow_run_id FROM ledger_runs WHERE mlflow_run_id IS NOT NULL")
        if done_at_kill >= 2 and tracked:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= done_at_kill < 12, "the kill must land mid-run"
    killed = _runs(uri)
    assert [r.info.status for r in killed] == ["RUNNING"]  # what a SIGKILL leaves behind

    final = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert final.returncode == 3, final.stderr  # DOE_JANE misses a slice
    runs = _runs(uri)
    assert len(runs) == 1 and runs[0].info.run_id == killed[0].info.run_id
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["medgen.batch.attempts"] == "2"
    assert run.data.metrics["studies_done"] == 12 and run.data.metrics["studies_failed"] == 1
    assert run.data.metrics["studies_done_now"] == 12 - done_at_kill
    with Ledger.open(out) as ledger:
        keys = {s.study_key: s.status for s in ledger.studies(("ingest", "enhance", "export", "metrics"))}
        ledger_runs = ledger.runs()
    assert [r["mlflow_run_id"] for r in ledger_runs] == [run.info.run_id] * 2
    table = _table(uri, run.info.run_id, tmp_path / "dl")
    study, status = table["columns"].index("study"), table["columns"].index("status")
    assert {row[study]: row[status] for row in table["data"]} == keys  # every study once, none repeated
    assert len(table["data"]) == 13
    client = Tracker("medgen-batch", uri=uri).client
    history = client.get_metric_history(run.info.run_id, "studies_done_before")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.0), (2, float(done_at_kill))]


def _kill_like_sigkill(out: Path, uri: str, run_id: str) -> None:
    """Leave the ledger and MLflow as a SIGKILL during the last start would have."""
    Tracker("medgen-batch", uri=uri).reopen_run(run_id)
    with Ledger.open(out) as ledger:
        ledger._db.execute("UPDATE ledger_runs SET status='running', finished=NULL")


@pytest.fixture()
def small(tmp_path):
    src = tmp_path / "archive"
    make_archive(src, n_good=2)
    return src, write_pipeline(tmp_path / "p.yaml"), tmp_path / "results", f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_interrupted_start_is_reopened_and_a_finished_batch_gets_a_new_run(small):
    src, pipeline, out, uri = small
    first = run_batch(pipeline, src, out, tracking_uri=uri, progress=False)
    _kill_like_sigkill(out, uri, first.mlflow_run_id)
    again = run_batch(pipeline, src, out, tracking_uri=uri, progress=False)
    assert again.mlflow_run_id == first.mlflow_run_id
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED" and run.data.tags["medgen.batch.attempts"] == "2"
    # Both starts logged the table: the second replaced the first's (MLflow alone would append).
    assert len(_table(uri, run.info.run_id, out.parent / "dl")["data"]) == 3
    later = run_batch(pipeline, src, out, tracking_uri=uri, progress=False)  # after a finished start: a new run
    assert later.mlflow_run_id != first.mlflow_run_id
    assert sorted(r.info.status for r in _runs(uri)) == ["FINISHED", "FINISHED"]


def test_changed_pipeline_closes_the_killed_run_and_names_it_in_the_new_one(small):
    src, pipeline, out, uri = small
    first = run_batch(pipeline, src, out, tracking_uri=uri, progress=False)
    _kill_like_sigkill(out, uri, first.mlflow_run_id)
    write_pipeline(pipeline, dicom=True)
    again = run_batch(pipeline, src, out, tracking_uri=uri, progress=False)
    assert again.mlflow_run_id != first.mlflow_run_id
    runs = {r.info.run_id: r for r in _runs(uri)}
    assert runs[first.mlflow_run_id].info.status == "KILLED"
    assert runs[again.mlflow_run_id].info.status == "FINISHED"
    assert runs[again.mlflow_run_id].data.tags["medgen.batch.continues"] == first.mlflow_run_id


def test_a_run_killed_before_the_ledger_recorded_it_is_found_by_its_batch_tag(small):
    src, pipeline, out, uri = small
    first = run_batch(pipeline, src, out, tracking_uri=uri, progress=False)
    with Ledger.open(out) as ledger:
        batch_id = ledger.batch_id()
        ledger._db.execute("UPDATE ledger_runs SET status='running', finished=NULL, mlflow_run_id=NULL")
    tracker = Tracker("medgen-batch", uri=uri)
    orphan = tracker.start_run("batch:orphan", tags={"medgen.kind": "batch", "medgen.batch.id": batch_id})
    other = tracker.start_run("another batch", tags={"medgen.kind": "batch", "medgen.batch.id": "0" * 16})
    again = run_batch(pipeline, src, out, tracking_uri=uri, progress=False)
    status = {r.info.run_id: r.info.status for r in _runs(uri)}
    assert status[orphan] == "KILLED"  # it never logged its pipeline: closed, and named by the new run
    assert status[other] == "RUNNING"  # another output folder's run is none of this batch's business
    assert status[first.mlflow_run_id] == "FINISHED" and status[again.mlflow_run_id] == "FINISHED"
    assert tracker.client.get_run(again.mlflow_run_id).data.tags["medgen.batch.continues"] == orphan
