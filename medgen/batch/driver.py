"""``medgen batch``: run a per-study pipeline over a whole archive, resumably.

The driver is the only process that writes the run ledger (:mod:`medgen.archive.ledger`):

1. take the output folder's lock (a second run is refused; a crashed one never blocks);
2. scan the archive like ``medgen ingest`` and group its series into studies by
   StudyInstanceUID (:mod:`medgen.batch.studies`: pseudonymous study keys, input
   fingerprints), record its files in the manifest and its studies in the ledger; steps left ``running``
   by a dead run are taken back, leftover temporary files removed;
3. decide per study which stages must run: a stage is redone when it is not done, its
   fingerprint (settings, model, inputs) changed, or one of its recorded outputs is missing
   or has the wrong size; failed steps stay failed unless ``retry_failed``; studies the
   input gate kept out (``gated``) stay so until the gate's model or policy changes;
4. hand studies to an executor (local processes or Ray actors) and record every stage as
   it ends; a study whose worker dies is given once more to a fresh worker, then failed
   (a worker holds several studies at once: those it had begun run alone from then on, and
   a death is charged to a study only when it was the one study its worker had begun);
5. write ``OUT/studies.csv`` and ``OUT/report.html`` and log one MLflow run for the batch
   with both as artifacts (never one run per study); a restart after a kill continues the
   killed start's run (:mod:`medgen.batch.tracking`).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medgen.archive.ledger import BatchLock, Ledger, StudyEntry
from medgen.batch.spec import SYNTHESIS_STAGE, BatchPipeline, load_batch_pipeline, model_identity, stage_fingerprints
from medgen.batch.work import STUDIES_DIR, StudyTask, study_dir
from medgen.errors import InputError

EXECUTORS = ("local", "ray")
DEPENDS_ON = {"ingest": None, "enhance": "ingest", "export": "enhance", "metrics": "enhance", "synthesize": None}


@dataclass
class BatchSummary:
    """What one batch run found and did (counts are studies)."""

    out: Path
    run_id: str
    total: int = 0
    done_before: int = 0
    done_now: int = 0
    failed_now: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (study key, "stage: reason")
    gated_now: int = 0
    gated: list[tuple[str, str]] = field(default_factory=list)  # kept out by the input gate: (key, "stage: reason")
    pending: int = 0
    broken_files: int = 0
    retried: int = 0
    taken_back: int = 0
    seconds: float = 0.0
    mlflow_run_id: str | None = None
    report: Path | None = None
    interrupted: bool = False

    @property
    def studies_per_second(self) -> float:
        return (self.done_now + self.failed_now + self.gated_now) / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 every study done (or kept out by the input gate, by policy); 3 some failed (each
        with its reason); 4 no study found."""
        if self.total == 0:
            return 4
        return 3 if self.failed else 0

    def lines(self) -> list[str]:
        """The closing summary, one fact per line."""
        if self.done_now == 0 and self.failed_now == 0 and self.gated_now == 0 and not self.interrupted:
            head = f"nothing to do: {self.done_before} of {self.total} studies already done"
            if self.failed:
                head += f", {len(self.failed)} failed before (--retry-failed runs them again)"
            if self.gated:
                head += f", {len(self.gated)} kept out by the input gate (a new gate model or policy runs them again)"
        else:
            gated = f", {self.gated_now} gated out" if self.gated_now else ""
            head = (f"{self.done_now} studies done, {self.failed_now} failed{gated} in {self.seconds:.1f} s "
                    f"({self.studies_per_second:.2f} studies/s); {self.done_before} were already done")
        gated = f", {len(self.gated)} gated out" if self.gated else ""
        out = [head, f"total: {self.total} studies, {len(self.failed)} failed{gated}, {self.pending} pending"]
        if self.taken_back:
            out.append(f"{self.taken_back} studies left running by an earlier run were taken back")
        if self.broken_files:
            out.append(f"{self.broken_files} files are not part of any study (see report)")
        if self.report is not None:
            out.append(f"report: {self.report}")
        return out


def run_batch(
    pipeline: str | Path | BatchPipeline,
    src: str | Path | None,
    out: str | Path,
    *,
    workers: int = 1,
    executor: str = "local",
    retry_failed: bool = False,
    ray_address: str | None = None,
    tracking_uri: str | None = None,
    track: bool = True,
    progress: bool = True,
    heartbeat_s: float = 5.0,
    max_attempts: int = 2,
    on_event: Callable[[str, str], None] | None = None,
    overlap_io: bool = True,
) -> BatchSummary:
    """Run ``pipeline`` over every study under ``src``, writing to ``out``.

    Parameters
    ----------
    pipeline : path or BatchPipeline
        A batch pipeline file (see :mod:`medgen.batch.spec`).
    src, out : path
        The archive (only read; None for a synthesis pipeline) and the output folder
        (created; holds the ledger).
    workers : int
        Worker processes (local) or actors (Ray).
    executor : {"local", "ray"}
    retry_failed : bool
        Run failed studies again.
    track : bool
        Log the batch to MLflow (one run).
    max_attempts : int
        How many workers a study may take down before it is failed.
    overlap_io : bool
        Local workers read the next study and write the last one while the model works
        (:mod:`medgen.batch.local`); False runs each study's stages one after the other.

    Raises
    ------
    InputError
        Unusable folders, or another batch holds ``out``; bad studies never raise.
    """
    from medgen.validate import look_up_option

    executor = look_up_option("executor", executor, EXECUTORS)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be an integer >= 1, got {workers!r}")
    pipeline_path = None
    if not isinstance(pipeline, BatchPipeline):
        pipeline_path = Path(pipeline)
        pipeline = load_batch_pipeline(pipeline_path)
    if pipeline.is_synthesis and src is not None:
        raise InputError(src, "a synthesis pipeline reads no archive: leave out the input folder")
    if not pipeline.is_synthesis and src is None:
        raise InputError(pipeline_path or pipeline.name,
                         "this pipeline enhances an archive: give the archive folder (--input)")
    src_path, out_path = _check_folders(src, out)
    if pipeline.is_synthesis:
        _check_synthesis(pipeline, pipeline_path or pipeline.name, tracking_uri)
    started = time.perf_counter()
    summary = BatchSummary(out=out_path, run_id=time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3))
    with BatchLock(out_path), Ledger.open(out_path) as ledger:
        plan = _plan(pipeline, src_path, out_path, ledger, summary, retry_failed)
        ledger.begin_run(summary.run_id)
        tracker_run = None
        if track:
            from medgen.batch.tracking import start_batch_run

            tracker_run = start_batch_run(ledger, pipeline, pipeline_path, summary, workers, executor, tracking_uri)
        status = "interrupted"
        try:
            if plan.todo:  # nothing to do: no workers to start (they import torch and load models)
                ex = _make_executor(pipeline, executor, workers, heartbeat_s, ray_address, overlap_io)
                try:
                    _Scheduler(ledger, ex, plan, summary, max_attempts, progress, on_event).run()
                finally:
                    ex.close()
            status = "finished"
        except KeyboardInterrupt:
            summary.interrupted = True
            raise
        finally:
            summary.seconds = time.perf_counter() - started
            _finish(ledger, pipeline, summary, status)
            if tracker_run is not None:
                from medgen.batch.tracking import end_batch_run

                end_batch_run(tracker_run, summary, status)
    return summary


def _check_synthesis(pipeline: BatchPipeline, source, tracking_uri: str | None) -> None:
    """Load the synthesis model once and check every condition's request before any work:
    a request the model cannot serve would otherwise fail every sample, one by one."""
    from medgen.errors import MedgenError
    from medgen.inference.loading import load_synthesis_model

    settings = pipeline.settings(SYNTHESIS_STAGE)
    try:
        loaded = load_synthesis_model(settings.model, device="cpu", tracking_uri=tracking_uri)
        for condition in settings.conditions:
            loaded.check(settings.request(condition, 0))
    except MedgenError as error:  # ParameterError included
        raise InputError(source, f"synthesize: {error}") from error


def _check_folders(src: str | Path | None, out: str | Path) -> tuple[Path | None, Path]:
    src_path = None if src is None else Path(os.path.realpath(src))
    if src_path is not None and not src_path.is_dir():
        raise InputError(src, "no such folder (give the folder that holds the archive)")
    out_path = Path(os.path.realpath(out))
    if out_path.exists() and not out_path.is_dir():
        raise InputError(out, "output exists and is not a folder")
    if src_path is not None and (out_path == src_path or src_path in out_path.parents):
        raise InputError(out, "the output folder must lie outside the input archive (inputs are never written to)")
    out_path.mkdir(parents=True, exist_ok=True)
    return src_path, out_path


@dataclass
class _Plan:
    stages: tuple[str, ...]
    todo: deque  # StudyTask, in archive order


def _plan(pipeline: BatchPipeline, src: Path, out: Path, ledger: Ledger, summary: BatchSummary,
          retry_failed: bool) -> _Plan:
    """Scan the archive (or list the samples to make), sync the ledger, and list the work
    still to do."""
    from medgen.stages.ingest import remove_stale_temp_files

    studies = _find_studies(pipeline, src, out, summary)
    stages = pipeline.stage_names
    ledger.sync_studies([StudyEntry(t.key, t.kind, t.n_files, t.fingerprint) for t in studies], stages)
    summary.taken_back = len(ledger.reclaim_stale(not_run=summary.run_id))
    if retry_failed:
        summary.retried = ledger.retry_failed()
    settings = pipeline.model_settings()
    model_id = model_identity(settings.model)
    gate = getattr(settings, "gate", None)
    gate_id = model_identity(gate.model) if gate is not None else None
    steps = {s.study_key: {st.stage: st for st in s.steps} for s in ledger.studies(stages)}
    todo: deque = deque()
    summary.total = len(studies)
    for task in studies:
        folder = study_dir(out, task.key)
        if folder.is_dir():
            remove_stale_temp_files(folder)
        fps = stage_fingerprints(pipeline, task.fingerprint, model_id, gate_id)
        rerun: list[str] = []
        for stage in stages:
            st = steps[task.key][stage]
            upstream = DEPENDS_ON[stage]
            current = st.status == "done" and st.fingerprint == fps[stage] and st.outputs_intact(out)
            # Failed, or kept out by the gate: the same inputs and settings would end the same way.
            stopped_same = st.status in ("failed", "gated") and st.fingerprint == fps[stage]
            if upstream in rerun or (not current and not stopped_same):
                rerun.append(stage)
            elif stopped_same:
                break  # later stages wait
        if any(steps[task.key][s].status in ("failed", "gated") and s not in rerun for s in stages):
            continue
        if not rerun:
            summary.done_before += 1
            continue
        volumes: tuple[str, ...] = ()
        if "ingest" in stages and "ingest" not in rerun:
            volumes = tuple(n for n, _, _ in steps[task.key]["ingest"].outputs if n.endswith(".nii.gz"))
        todo.append(StudyTask(task.key, task.series, str(out), tuple(rerun), fps, volumes, task.sample))
    return _Plan(stages, todo)


def _find_studies(pipeline: BatchPipeline, src: Path | None, out: Path, summary: BatchSummary) -> tuple:
    """The archive's studies, its files recorded in the manifest; or the samples to make."""
    from medgen.archive.manifest import Manifest
    from medgen.batch.studies import scan_archive, synthetic_studies

    if pipeline.is_synthesis:
        return synthetic_studies(pipeline)
    ingest = pipeline.settings("ingest")
    scan = scan_archive(src, out, keep_phi=ingest.keep_phi, max_image_mb=ingest.max_image_mb)
    with Manifest.open(out) as manifest:
        manifest.record_files(scan.records)
    summary.broken_files = sum(r.fate == "quarantined" and not r.series_key for r in scan.records)
    return scan.studies


def _make_executor(pipeline: BatchPipeline, executor: str, workers: int, heartbeat_s: float, ray_address,
                   overlap_io: bool = True):
    if executor == "ray":
        from medgen.batch.ray_executor import RayExecutor

        ex = RayExecutor(pipeline, workers, address=ray_address)
    else:
        from medgen.batch.local import LocalExecutor

        ex = LocalExecutor(pipeline, workers, heartbeat_s=heartbeat_s, overlap=overlap_io)
    ex.start()
    return ex


class _Scheduler:
    """Feeds studies to the executor and writes every event to the ledger."""

    def __init__(self, ledger: Ledger, ex, plan: _Plan, summary: BatchSummary, max_attempts: int,
                 progress: bool, on_event) -> None:
        self.ledger, self.ex, self.plan, self.summary = ledger, ex, plan, summary
        self.max_attempts = max_attempts
        self.on_event = on_event or (lambda kind, key: None)
        self.tasks: dict[str, StudyTask] = {}
        self.remaining: dict[str, list[str]] = {}  # stages not yet reported, per study in flight
        self.deaths: dict[str, int] = {}
        self.started_on: dict[str, list[str]] = {}  # worker -> the studies it has begun, oldest first
        self.held_by: dict[str, set[str]] = {}  # worker -> the studies given to it, not finished
        # Studies in hand when a worker died: each runs alone on a worker from then on, so
        # that a death can be charged to the study that caused it.
        self.isolated: set[str] = set()
        self.progress = _Progress(len(plan.todo), enabled=progress)

    def run(self) -> None:
        last_beat: dict[str, float] = {}
        with self.progress:
            while self.plan.todo or self.tasks:
                self._dispatch()
                for event in self.ex.poll(timeout=0.5):
                    kind = event[0]
                    if kind == "started":
                        self._started(event[1], event[2])
                    elif kind == "stage":
                        self._stage(event[1], event[2])
                    elif kind == "finished":
                        self._finished(event[2])
                    elif kind == "beat":
                        last_beat[event[2]] = time.time()
                    elif kind == "died":
                        self._died(event[1], event[2], event[3])
                if last_beat:
                    self.ledger.heartbeat(k for k in last_beat if k in self.tasks)
                    last_beat.clear()

    def _dispatch(self) -> None:
        for wid in self.ex.free_slots():
            if not self.plan.todo:
                return
            held = self.held_by.setdefault(wid, set())
            if held & self.isolated:
                continue
            task = self._next_for(empty=not held)
            if task is None:
                continue
            held.add(task.key)
            for stage in task.stages:  # outputs of stages about to be redone are no longer trusted
                self.ledger.mark_pending(task.key, stage, f"queued on {wid}")
            self.tasks[task.key] = task
            self.remaining[task.key] = list(task.stages)
            self.ex.submit(wid, task)

    def _started(self, wid: str, key: str) -> None:
        task = self.tasks.get(key)
        if task is None:
            return
        self.started_on.setdefault(wid, []).append(key)
        stage = self.remaining[key][0]
        self.ledger.mark_running(key, stage, worker=wid, fingerprint=task.fingerprints[stage],
                                 run_id=self.summary.run_id)

    def _stage(self, wid: str, outcome) -> None:
        key = outcome.key
        if key not in self.tasks:
            return
        if outcome.ok:
            self.ledger.mark_done(key, outcome.stage, fingerprint=outcome.fingerprint, outputs=outcome.outputs,
                                  metrics=outcome.metrics, seconds=outcome.seconds)
            if outcome.metrics.get("gate") == "out":  # policy warn: enhanced, but say so loudly
                self.progress.note(f"WARNING: input gate: study {key} is OUT ({outcome.metrics.get('gate_reason')}); "
                                   "enhanced anyway (gate policy warn)")
        elif outcome.gated:
            self.ledger.mark_gated(key, outcome.stage, fingerprint=outcome.fingerprint, reason=outcome.reason,
                                   metrics=outcome.metrics, seconds=outcome.seconds)
        else:
            self.ledger.mark_failed(key, outcome.stage, fingerprint=outcome.fingerprint,
                                    reason=outcome.reason, seconds=outcome.seconds)
        rest = self.remaining[key]
        if outcome.stage in rest:
            rest.remove(outcome.stage)
        if outcome.ok and rest:
            task = self.tasks[key]
            self.ledger.mark_running(key, rest[0], worker=wid, fingerprint=task.fingerprints[rest[0]],
                                     run_id=self.summary.run_id)
        if outcome.gated:
            self.summary.gated_now += 1  # listed with the failures at the end
            self.on_event("gated", key)
        elif not outcome.ok:
            self.summary.failed_now += 1
            self.summary.failed.append((key, f"{outcome.stage}: {outcome.reason}"))
            self.on_event("failed", key)

    def _finished(self, key: str) -> None:
        task = self.tasks.pop(key, None)
        if task is None:
            return
        for keys in (*self.started_on.values(), *self.held_by.values()):
            if key in keys:
                keys.remove(key)
        rest = self.remaining.pop(key)
        step = self.ledger.step(key, task.stages[-1])
        if not rest and step is not None and step.status == "done":
            self.summary.done_now += 1
            self.on_event("done", key)
        elif rest and self.ledger.step(key, rest[0]).status == "running":
            self.ledger.mark_pending(key, rest[0], "stopped after a failed stage")
        self.progress.advance()

    def _next_for(self, *, empty: bool) -> StudyTask | None:
        """The next study for a worker: any when it holds none, else the first that need not run alone."""
        if empty:
            return self.plan.todo.popleft()
        for i, task in enumerate(self.plan.todo):
            if task.key not in self.isolated:
                del self.plan.todo[i]
                return task
        return None

    def _died(self, wid: str, keys: list[str], why: str) -> None:
        begun = self.started_on.pop(wid, [])
        self.held_by.pop(wid, None)
        for key in reversed(keys):  # put back at the head, in the order they were given
            task = self.tasks.pop(key, None)
            rest = self.remaining.pop(key, None)
            if task is None or not rest:
                continue
            remaining_task = dataclasses.replace(task, stages=tuple(rest), volumes=self._volumes(task, rest))
            if key in begun:
                self.isolated.add(key)
            if begun == [key]:  # it was the only study the worker had begun: the death is its doing
                self.deaths[key] = self.deaths.get(key, 0) + 1
                if self.deaths[key] >= self.max_attempts:
                    times = "once" if self.deaths[key] == 1 else f"{self.deaths[key]} times"
                    reason = f"{why} during {rest[0]}, {times}"
                    self.ledger.mark_failed(key, rest[0], fingerprint=task.fingerprints[rest[0]], reason=reason)
                    self.summary.failed_now += 1
                    self.summary.failed.append((key, f"{rest[0]}: {reason}"))
                    self.on_event("failed", key)
                    self.progress.advance()
                    continue
            self.ledger.mark_pending(key, rest[0], f"{why}; given to another worker")
            self.plan.todo.appendleft(remaining_task)
        self.on_event("died", wid)

    def _volumes(self, task: StudyTask, rest: list[str]) -> tuple[str, ...]:
        step = self.ledger.step(task.key, "ingest")
        if "ingest" in rest or step is None:  # to be ingested, or a synthetic sample (no ingest)
            return ()
        return tuple(n for n, _, _ in step.outputs if n.endswith(".nii.gz"))


class _Progress:
    """A progress bar on stderr with studies/s and ETA (nothing when disabled)."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total, self.enabled, self._bar, self._job = total, enabled and total > 0, None, None
        self._t0 = time.perf_counter()
        self._n = 0

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            console = Console(stderr=True)
            self._bar = Progress(TextColumn("[bold]studies"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), console=console,
                                 transient=not console.is_terminal)
            self._bar.__enter__()
            self._job = self._bar.add_task("", total=self.total, rate="")
        return self

    def advance(self) -> None:
        self._n += 1
        if self._bar is None:
            return
        elapsed = time.perf_counter() - self._t0
        rate = self._n / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self._n) / rate if rate > 0 else float("nan")
        self._bar.update(self._job, advance=1, rate=f"{rate:.2f} studies/s, ETA {_duration(eta)}")

    def note(self, line: str) -> None:
        """One line on stderr (above the bar when there is one)."""
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _finish(ledger: Ledger, pipeline: BatchPipeline, summary: BatchSummary, status: str) -> None:
    """Counts from the ledger, the per-study table and the report, the run closed."""
    from medgen.batch.report import write_report, write_study_table

    counts = ledger.counts(pipeline.stage_names)
    summary.pending = counts["pending"] + counts["running"]
    studies = ledger.studies(pipeline.stage_names)
    summary.failed = [(s.study_key, s.reason) for s in studies if s.status == "failed"]
    summary.gated = [(s.study_key, s.reason) for s in studies if s.status == "gated"]
    try:
        write_study_table(ledger, pipeline, summary.out)
        summary.report = write_report(ledger, pipeline, summary)
    except OSError as exc:  # a full disk must not hide the run's outcome
        print(f"medgen batch: could not write the report ({exc})", file=sys.stderr)
    ledger.end_run(summary.run_id, status, {"done_now": summary.done_now, "failed_now": summary.failed_now,
                                            "gated_now": summary.gated_now, "seconds": round(summary.seconds, 3),
                                            **counts})


__all__ = ["EXECUTORS", "STUDIES_DIR", "BatchSummary", "run_batch"]
