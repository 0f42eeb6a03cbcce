"""The run ledger and the batch lock (medgen.archive.ledger): facts, no model, no torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medgen.archive.ledger import BatchLock, Ledger, StudyEntry, one_line
from medgen.archive.manifest import Manifest
from medgen.errors import InputError

STAGES = ("ingest", "enhance")


def _entries(n: int, fp: str = "fp") -> list[StudyEntry]:
    return [StudyEntry(f"key{i:04d}", "dicom", 3, fp) for i in range(n)]


def test_sync_adds_studies_with_every_stage_pending_and_notices_changes(tmp_path):
    with Ledger.open(tmp_path) as ledger:
        assert ledger.sync_studies(_entries(3), STAGES) == {"new": 3, "changed": 0, "absent": 0}
        assert ledger.counts(STAGES) == {"pending": 3, "running": 0, "done": 0, "failed": 0, "gated": 0, "total": 3}
        entries = _entries(2) + [StudyEntry("key0002", "dicom", 4, "other")]
        assert ledger.sync_studies(entries[:1] + entries[2:], STAGES) == {"new": 0, "changed": 1, "absent": 1}
        assert [s.study_key for s in ledger.studies(STAGES)] == ["key0000", "key0002"]
        assert len(ledger.studies(STAGES, present_only=False)) == 3


def test_ledger_shares_the_manifest_file_without_disturbing_it(tmp_path):
    with Ledger.open(tmp_path) as ledger:
        ledger.sync_studies(_entries(1), STAGES)
    with Manifest.open(tmp_path) as manifest:  # the manifest still opens: same file, more tables
        assert manifest.counts()["series_done"] == 0
    with Ledger.open(tmp_path) as ledger:
        assert ledger.counts(STAGES)["total"] == 1


def test_step_life_cycle_records_outputs_metrics_and_one_line_reasons(tmp_path):
    out = tmp_path
    (out / "a.nii.gz").write_bytes(b"12345")
    with Ledger.open(out) as ledger:
        ledger.sync_studies(_entries(2), STAGES)
        ledger.mark_running("key0000", "ingest", worker="w1", fingerprint="f", run_id="r1")
        step = ledger.step("key0000", "ingest")
        assert (step.status, step.worker, step.attempts) == ("running", "w1", 1)
        assert step.heartbeat == pytest.approx(time.time(), abs=5)
        ledger.mark_done("key0000", "ingest", fingerprint="f", outputs=[("a.nii.gz", 5, "")],
                         metrics={"psnr": 30.0}, seconds=1.5)
        step = ledger.step("key0000", "ingest")
        assert step.status == "done" and step.outputs_intact(out)
        assert step.metrics == {"psnr": 30.0}
        (out / "a.nii.gz").write_bytes(b"123")
        assert not step.outputs_intact(out)
        ledger.mark_failed("key0001", "ingest", fingerprint="f", reason="bad file\nTraceback (most recent call last):")
        assert ledger.step("key0001", "ingest").reason == "bad file Traceback (most recent call last):"
        states = {s.study_key: s for s in ledger.studies(STAGES)}
        assert states["key0001"].status == "failed"
        assert states["key0001"].reason.startswith("ingest: bad file")
        with pytest.raises(ValueError, match="`reason` must say why"):
            ledger.mark_failed("key0001", "ingest", fingerprint="f", reason="  ")
        assert ledger.retry_failed() == 1
        assert ledger.step("key0001", "ingest").status == "pending"


def test_stale_heartbeats_are_taken_back_fresh_ones_are_not(tmp_path):
    with Ledger.open(tmp_path) as ledger:
        ledger.sync_studies(_entries(3), STAGES)
        for key in ("key0000", "key0001"):
            ledger.mark_running(key, "ingest", worker="w9", fingerprint="f", run_id="old")
        ledger._db.execute("UPDATE ledger_steps SET heartbeat=? WHERE study_key='key0000'", (time.time() - 600,))
        assert ledger.reclaim_stale(max_age_s=60) == ["key0000"]
        step = ledger.step("key0000", "ingest")
        assert step.status == "pending" and "taken back from w9" in step.reason
        assert ledger.step("key0001", "ingest").status == "running"
        # Holding the lock, every step of another run is stale whatever its heartbeat.
        assert ledger.reclaim_stale(not_run="new") == ["key0001"]
        with pytest.raises(ValueError, match="max_age_s"):
            ledger.reclaim_stale()


def test_one_line_cuts_long_text():
    assert len(one_line("x" * 1000)) == 300
    assert "\n" not in one_line("a\nb\r\nc")


_HOLDER = """
import sys, time
from medgen.archive.ledger import BatchLock
lock = BatchLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_refuses_a_second_run_naming_the_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=rf"another medgen batch \(pid {holder.pid} on .*\) is writing"):
            BatchLock(tmp_path).acquire()
        os.kill(holder.pid, signal.SIGKILL)  # a crash: no clean-up code runs
        holder.wait(timeout=10)
        lock = BatchLock(tmp_path).acquire()  # the kernel dropped the dead holder's lock
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_lock_is_reentrant_after_release_in_one_process(tmp_path):
    with BatchLock(tmp_path):
        pass
    with BatchLock(tmp_path):
        pass
