"""Local workers overlap reading and writing with the model's work, one study ahead at most,
and give exactly the outputs of a worker that does one thing at a time."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from medgen.archive.ledger import Ledger
from medgen.archive.secret import KEY_NAME
from medgen.batch import local
from medgen.batch.driver import run_batch
from medgen.batch.spec import load_batch_pipeline, stage_fingerprints
from medgen.batch.studies import scan_archive
from medgen.batch.work import StudyTask, StudyWorker
from medgen.errors import ConfigError

STAGES = ("ingest", "enhance", "export", "metrics")
PIPELINE = """\
name: overlap
stages:
  - ingest: {{}}
  - enhance: {{model: identity, identity_seconds: {seconds}}}
  - export: {{montage: true}}
  - metrics: {{}}
"""


def make_archive(root: Path, n: int = 5, shape=(24, 20, 16)) -> None:
    """``n`` gzip-compressed NIfTI scans, one study each."""
    from medgen.io import save
    from medgen.volume import Volume

    rng = np.random.default_rng(3)
    for i in range(n):
        save(Volume(rng.normal(100, 15, shape).astype(np.float32), np.eye(4)), root / f"scan{i}.nii.gz")


def _pipeline(tmp_path: Path, seconds: float) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(seconds=seconds))
    return path


class _Recorded(StudyWorker):
    """A StudyWorker that notes when each phase of each study begins and ends."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.times: dict[tuple[str, str], list[float]] = {}
        self._lock = threading.Lock()

    def _timed(self, phase: str, key: str, work):
        start = time.perf_counter()
        result = work()
        with self._lock:
            self.times[(phase, key)] = [start, time.perf_counter()]
        return result

    def read(self, task, emit):
        return self._timed("read", task.key, lambda: super(_Recorded, self).read(task, emit))

    def think(self, flight):
        return self._timed("think", flight.task.key, lambda: super(_Recorded, self).think(flight))

    def write(self, flight):
        return self._timed("write", flight.task.key, lambda: super(_Recorded, self).write(flight))


def test_reading_and_writing_overlap_the_model_one_study_ahead_at_most(tmp_path):
    src, out = tmp_path / "archive", tmp_path / "out"
    make_archive(src)
    out.mkdir()
    pipeline = load_batch_pipeline(_pipeline(tmp_path, 0.3))
    scan = scan_archive(src, out)
    tasks = [StudyTask(s.key, s.series, str(out), STAGES, stage_fingerprints(pipeline, s.fingerprint, "identity"))
             for s in scan.studies]
    keys = [t.key for t in tasks]
    worker = _Recorded(pipeline, "w0")
    inbox = list(tasks) + [None]
    events: list[tuple] = []
    in_hand: list[str] = []
    most_in_hand = 0

    def begin(key):
        nonlocal most_in_hand
        in_hand.append(key)
        most_in_hand = max(most_in_hand, len(in_hand))
        events.append(("started", key))

    def end(key):
        in_hand.remove(key)
        events.append(("finished", key))

    local._overlapped(worker, lambda: inbox.pop(0), lambda e: events.append(("stage", e[2].key, e[2].stage)),
                      begin, end)
    t = worker.times
    for k in range(len(keys) - 1):
        now, nxt = keys[k], keys[k + 1]
        # Study k+1 is read while the model works on study k ...
        assert t[("read", nxt)][0] < t[("think", now)][1], k
        # ... but study k+2 only once the model is done with study k (one study ahead at most).
        if k + 2 < len(keys):
            assert t[("read", keys[k + 2])][0] >= t[("think", now)][1], k
        # Study k is written while the model works on study k+1.
        assert t[("write", now)][1] > t[("think", nxt)][0], k
    assert most_in_hand <= 3
    for key in keys:  # per study: begun, its stages in order, finished; nothing lost
        mine = [e for e in events if e[1] == key]
        assert mine == [("started", key), *(("stage", key, s) for s in STAGES), ("finished", key)]
    assert [e[1] for e in events if e[0] == "started"] == keys  # in the order given


def test_overlapped_and_sequential_workers_give_the_same_outputs(tmp_path):
    src = tmp_path / "archive"
    make_archive(src, n=4)
    pipeline = _pipeline(tmp_path, 0.05)
    outputs = {}
    for overlap in (True, False):
        out = tmp_path / f"out-{overlap}"
        if not overlap:  # the same pseudonym key: the same study keys and file names
            out.mkdir()
            shutil.copy(tmp_path / "out-True" / KEY_NAME, out / KEY_NAME)
        summary = run_batch(pipeline, src, out, workers=1, track=False, progress=False, overlap_io=overlap)
        assert summary.done_now == 4
        with Ledger.open(out) as ledger:
            outputs[overlap] = {(s.study_key, st.stage): st.outputs for s in ledger.studies(STAGES) for st in s.steps}
    assert outputs[True] == outputs[False]  # names, sizes and SHA-256


def test_identity_seconds_is_for_the_identity_model_only(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nstages:\n  - ingest: {}\n  - enhance: {model: m.pt, identity_seconds: 1}\n")
    with pytest.raises(ConfigError, match="identity_seconds"):
        load_batch_pipeline(path)


class _FakeExecutor:
    """Workers that take ``depth`` studies each and do nothing: the test says what happens."""

    def __init__(self, depth: int = 3) -> None:
        self.depth, self.held, self.submitted = depth, {"w0": []}, []

    def free_slots(self):
        return [w for w, held in self.held.items() for _ in range(self.depth - len(held))]

    def submit(self, wid, task):
        self.held[wid].append(task.key)
        self.submitted.append((wid, task.key))

    def die(self, wid, replacement):
        keys = self.held.pop(wid)
        self.held[replacement] = []
        return keys


def test_a_death_is_charged_only_to_the_one_study_begun_and_suspects_then_run_alone(tmp_path):
    from collections import deque

    from medgen.archive.ledger import StudyEntry
    from medgen.batch.driver import BatchSummary, _Plan, _Scheduler

    keys = ["k0", "k1", "k2", "k3"]
    with Ledger.open(tmp_path) as ledger:
        ledger.sync_studies([StudyEntry(k, "nifti", 1, "fp") for k in keys], STAGES)
        todo = deque(StudyTask(k, (), str(tmp_path), STAGES, dict.fromkeys(STAGES, "f")) for k in keys)
        ex = _FakeExecutor()
        sched = _Scheduler(ledger, ex, _Plan(STAGES, todo), BatchSummary(tmp_path, "r"), 2, False, None)
        sched._dispatch()
        assert ex.submitted == [("w0", "k0"), ("w0", "k1"), ("w0", "k2")]
        sched._started("w0", "k0")
        sched._started("w0", "k1")  # the worker read k1 ahead while its model had k0
        sched._died("w0", ex.die("w0", "w1"), "worker process died (killed by signal SIGKILL)")
        assert sched.deaths == {} and sched.isolated == {"k0", "k1"}  # two begun: nobody to blame
        assert ledger.step("k0", "ingest").status == "pending"
        ex.submitted.clear()
        sched._dispatch()
        assert ex.submitted == [("w1", "k0")]  # a suspect runs alone, back at the head of the queue
        sched._started("w1", "k0")
        sched._died("w1", ex.die("w1", "w2"), "worker process died (killed by signal SIGKILL)")
        assert sched.deaths == {"k0": 1}  # alone on its worker: this death is its own
        ex.submitted.clear()
        sched._dispatch()
        assert ex.submitted == [("w2", "k0")]
        sched._started("w2", "k0")
        sched._died("w2", ex.die("w2", "w3"), "worker process died (killed by signal SIGKILL)")
        step = ledger.step("k0", "ingest")
        assert step.status == "failed" and "2 times" in step.reason  # max_attempts=2
        assert ledger.step("k1", "ingest").status == "pending"  # never blamed
        ex.submitted.clear()
        sched._dispatch()
        assert ex.submitted == [("w3", "k1")]  # the other suspect, alone
        ex.held["w3"].clear()
        sched._finished("k1")
        ex.submitted.clear()
        sched._dispatch()
        assert ex.submitted == [("w3", "k2"), ("w3", "k3")]  # the rest, together again
