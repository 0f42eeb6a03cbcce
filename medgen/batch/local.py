"""Local executor: worker processes, each holding one :class:`StudyWorker` (and its model).

The driver talks to each worker over its own pipe (no queue shared between workers, so a
worker killed while writing cannot wedge the others) and gives it at most ``depth`` studies
at a time. Inside a worker, reading and writing overlap the model's work: while the model
(main thread) works on study k, a reader thread ingests and reads study k+1 and a writer
thread writes study k-1's outputs (atomically, as always), one study ahead at most, so
memory stays bounded. Workers send back, as they happen:

* ``("started", worker_id, study_key)`` when it begins a study (several may be in hand),
* ``("stage", worker_id, StageOutcome)`` after each stage of a study,
* ``("finished", worker_id, study_key)`` when the study is over,
* ``("beat", worker_id, study_key)`` every ``heartbeat_s`` seconds for each study in hand.

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
        Studies handed to a worker at once (those in its hands plus those waiting); default
        3 when overlapping, else 2.
    heartbeat_s : float
    overlap : bool
        Overlap reading and writing with the model's work (see :func:`_overlapped`); False:
        each study's stages one after the other.
    """

    name = "local"

    def __init__(self, pipeline: BatchPipeline, n_workers: int, *, depth: int | None = None, heartbeat_s: float = 5.0,
                 overlap: bool = True) -> None:
        if n_workers < 1:
            raise ValueError(f"`n_workers` must be >= 1, got {n_workers}")
        self.pipeline = pipeline
        self.n_workers = n_workers
        self.overlap = overlap
        # Overlapped: one study being written, one in the model, one being read.
        self.depth = max(1, depth if depth is not None else (3 if overlap else 2))
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
            args=(wid, child, self.pipeline.model_dump_json(), os.getpid(), self.heartbeat_s, slot, self.overlap),
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


def worker_main(wid: str, conn, pipeline_json: str, parent_pid: int, heartbeat_s: float, slot: int = 0,
                overlap: bool = True) -> None:
    """A worker process: build the :class:`StudyWorker` once, then run studies until told to stop."""
    from medgen.batch.spec import BatchPipeline
    from medgen.batch.work import StudyWorker
    from medgen.stages.ingest_run import die_with_parent

    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    worker = StudyWorker(BatchPipeline.model_validate_json(pipeline_json), wid, device_index=slot)
    lock = threading.Lock()
    in_flight: list[str] = []  # studies begun and not finished, oldest first
    stop = threading.Event()

    def send(event: Event) -> None:
        with lock:
            conn.send(event)

    def begin(key: str) -> None:
        with lock:
            in_flight.append(key)
            conn.send(("started", wid, key))

    def end(key: str) -> None:
        with lock:
            in_flight.remove(key)
            conn.send(("finished", wid, key))

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            with lock:
                keys = list(in_flight)
            try:
                for key in keys:
                    send(("beat", wid, key))
            except (BrokenPipeError, OSError):
                return

    def receive():
        try:
            return conn.recv()
        except (EOFError, OSError):
            return None

    threading.Thread(target=beat, daemon=True, name="medgen-heartbeat").start()
    try:
        if overlap:
            _overlapped(worker, receive, send, begin, end)
        else:
            while (task := receive()) is not None:
                begin(task.key)
                worker.run(task, lambda outcome: send(("stage", wid, outcome)))
                end(task.key)
    finally:
        stop.set()


def _overlapped(worker, receive, send, begin, end) -> None:
    """Read study k+1 and write study k-1 in threads while the model works on study k.

    Bounded: the reader starts on a study only once the model took the one before it (one
    study read ahead, at most), and the model hands a study on only once the writer finished
    the one before, so a worker holds three studies at most. Stage outcomes leave in stage
    order per study (the ``StudyWorker`` phases).
    """
    import queue

    to_model: queue.Queue = queue.Queue(maxsize=1)
    to_writer: queue.Queue = queue.Queue(maxsize=1)
    read_ahead = threading.Semaphore(1)  # free once the model took the study read before
    writer_idle = threading.Semaphore(1)  # free once the writer finished the study before

    def emit(outcome: StageOutcome) -> None:
        send(("stage", worker.worker_id, outcome))

    def reader() -> None:
        while (task := receive()) is not None:
            read_ahead.acquire()
            begin(task.key)
            to_model.put(worker.read(task, emit))
        to_model.put(None)

    def writer() -> None:
        while (flight := to_writer.get()) is not None:
            worker.write(flight)
            end(flight.task.key)
            writer_idle.release()

    threads = [threading.Thread(target=_or_die(body), daemon=True, name=f"medgen-{body.__name__}")
               for body in (reader, writer)]
    for thread in threads:
        thread.start()
    while (flight := to_model.get()) is not None:
        read_ahead.release()
        worker.think(flight)
        writer_idle.acquire()
        to_writer.put(flight)
    to_writer.put(None)
    threads[1].join()


def _or_die(body):
    """``body`` for a thread: an error in the machinery (never a bad study's: those become
    outcomes) ends the worker process, so the driver sees it die and acts."""

    def run() -> None:
        try:
            body()
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            os._exit(70)

    return run
