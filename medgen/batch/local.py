"""Local executor: worker processes, each holding one :class:`StudyWorker` (and its model).

The driver talks to each worker over its own pipe (no queue shared between workers, so a
worker killed while writing cannot wedge the others) and gives it at most ``depth`` studies
at a time: while one is being processed the next is already waiting, so reading the next
study overlaps the current one's model work. Workers send back, as they happen:

* ``("started", worker_id, study_key)`` when it begins a study,
* ``("stage", worker_id, StageOutcome)`` after each stage of a study,
* ``("finished", worker_id, study_key)`` when the study is over,
* ``("beat", worker_id, study_key)`` every ``heartbeat_s`` seconds while one runs.

A worker that dies (killed, out of memory, a crash in native code) is noticed through its
process sentinel and reported as ``("died", worker_id, [study keys it held], why)``; a fresh
worker takes its place. Workers die with the driver (``PR_SET_PDEATHSIG`` on Linux).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import wait
from typing import Any

from medgen.batch.spec import BatchPipeline
from medgen.batch.work import StageOutcome, StudyTask

Event = tuple


class LocalExecutor:
    """``n_workers`` worker processes (``spawn``: they start clean, without the driver's threads).

    Parameters
    ----------
    pipeline : BatchPipeline
    n_workers : int
    depth : int
        Studies handed to a worker at once (the running one plus those waiting).
    heartbeat_s : float
    """

    name = "local"

    def __init__(self, pipeline: BatchPipeline, n_workers: int, *, depth: int = 2, heartbeat_s: float = 5.0) -> None:
        if n_workers < 1:
            raise ValueError(f"`n_workers` must be >= 1, got {n_workers}")
        self.pipeline = pipeline
        self.n_workers = n_workers
        self.depth = max(1, depth)
        self.heartbeat_s = heartbeat_s
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: dict[str, Any] = {}
        self._conns: dict[str, Any] = {}
        self._held: dict[str, list[str]] = {}
        self._serial = 0

    def start(self) -> None:
        for _ in range(self.n_workers):
            self._spawn()

    def _spawn(self) -> str:
        wid = f"local-{self._serial}"
        slot = self._serial % self.n_workers  # worker k uses GPU k (modulo the GPUs there are)
        self._serial += 1
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=worker_main,
            args=(wid, child, self.pipeline.model_dump_json(), os.getpid(), self.heartbeat_s, slot),
            name=f"medgen-batch-{wid}",
            daemon=True,
        )
        proc.start()
        child.close()
        self._procs[wid], self._conns[wid], self._held[wid] = proc, parent, []
        return wid

    def free_slots(self) -> list[str]:
        """Worker ids that can take one more study now (one id per free slot)."""
        return [w for w, held in self._held.items() for _ in range(self.depth - len(held))]

    def submit(self, worker_id: str, task: StudyTask) -> None:
        self._held[worker_id].append(task.key)
        try:
            self._conns[worker_id].send(task)
        except (BrokenPipeError, OSError):
            pass  # the worker is dead: its sentinel reports it on the next poll

    def held(self) -> dict[str, list[str]]:
        """Study keys each worker holds (running first)."""
        return {w: list(k) for w, k in self._held.items()}

    def poll(self, timeout: float) -> list[Event]:
        """Events that arrived within ``timeout`` seconds (maybe none)."""
        events: list[Event] = []
        by_conn = {c: w for w, c in self._conns.items()}
        by_sentinel = {p.sentinel: w for w, p in self._procs.items()}
        ready = wait(list(by_conn) + list(by_sentinel), timeout=timeout)
        for obj in ready:
            if obj in by_conn:
                events.extend(self._drain(by_conn[obj]))
        for obj in ready:
            if obj in by_sentinel:
                wid = by_sentinel[obj]
                events.extend(self._drain(wid))  # what it said before it died comes first
                events.append(self._bury(wid))
        return events

    def _drain(self, wid: str) -> list[Event]:
        conn, out = self._conns.get(wid), []
        while conn is not None:
            try:
                if not conn.poll():
                    break
                event = conn.recv()
            except (EOFError, OSError):
                break
            if event[0] == "finished" and event[2] in self._held[wid]:
                self._held[wid].remove(event[2])
            out.append(event)
        return out

    def _bury(self, wid: str) -> Event:
        proc = self._procs.pop(wid)
        proc.join(timeout=1.0)
        code = proc.exitcode
        why = f"killed by signal {signal.Signals(-code).name}" if code and code < 0 else f"exit status {code}"
        self._conns.pop(wid).close()
        keys = self._held.pop(wid)
        self._spawn()
        return ("died", wid, keys, f"worker process died ({why})")

    def close(self) -> None:
        for conn in self._conns.values():
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 5.0
        for proc in self._procs.values():
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=1.0)
        for conn in self._conns.values():
            conn.close()
        self._procs.clear()
        self._conns.clear()
        self._held.clear()


def worker_main(wid: str, conn, pipeline_json: str, parent_pid: int, heartbeat_s: float, slot: int = 0) -> None:
    """A worker process: build the :class:`StudyWorker` once, then run studies until told to stop."""
    from medgen.batch.spec import BatchPipeline
    from medgen.batch.work import StudyWorker
    from medgen.stages.ingest_run import die_with_parent

    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    worker = StudyWorker(BatchPipeline.model_validate_json(pipeline_json), wid, device_index=slot)
    lock = threading.Lock()
    current: list[str] = []
    stop = threading.Event()

    def send(event: Event) -> None:
        with lock:
            conn.send(event)

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            if current:
                try:
                    send(("beat", wid, current[0]))
                except (BrokenPipeError, OSError):
                    return

    threading.Thread(target=beat, daemon=True, name="medgen-heartbeat").start()
    try:
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):
                break
            if task is None:
                break
            current[:] = [task.key]
            send(("started", wid, task.key))

            def emit(outcome: StageOutcome) -> None:
                send(("stage", wid, outcome))

            worker.run(task, emit)
            current.clear()
            send(("finished", wid, task.key))
    finally:
        stop.set()
