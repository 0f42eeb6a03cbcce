"""The run ledger of a batch: every study and stage with its fate, grown from the manifest.

``OUT/manifest.sqlite`` is the ingest manifest (files and series, :mod:`.manifest`); a batch
adds its ledger tables to the same file, so one SQLite file answers "what happened to this
file?", "which studies are done?" and "why did this one fail?". Only the batch driver writes
the ledger (workers and Ray actors report to it), one short transaction per event, so a run
killed at any moment leaves a ledger that still tells the truth: a stage is ``done`` only
once all its outputs are in their final place, with their sizes and SHA-256 recorded.

Keys are pseudonymous (:func:`medgen.io.deid.pseudonym` of the StudyInstanceUID or of a
file's place, see :mod:`medgen.batch.studies`); the ledger holds no patient name, ID, birth
date, UID or input path.

Tables
------
ledger_studies
    ``study_key``, ``kind`` (``dicom``/``nifti``/``itk``, or ``synthetic``: a sample a
    synthesis pipeline makes), ``n_files``, ``input_fingerprint``
    (hash of the study's files, sizes and mtimes), ``present`` (1 when the last scan of the
    archive saw it), ``added`` (UTC, ISO 8601).
ledger_steps
    one row per study and stage: ``status`` (``pending``/``running``/``done``/``failed``, or
    ``gated``: the input gate kept the study out, by policy; not a failure, not retried),
    ``fingerprint`` (of the stage's inputs and settings), ``worker`` and ``heartbeat`` (unix
    seconds) while running, ``attempts``, ``outputs`` (JSON ``[[name, size, sha256], ...]``,
    names relative to OUT), ``metrics`` (JSON), ``reason`` (one line), ``seconds``,
    ``run_id`` and ``updated`` (unix seconds).
ledger_runs
    one row per batch run: ``run_id``, ``pid``, ``host``, ``started``/``finished`` (unix
    seconds), ``status`` (``running``/``finished``/``interrupted``; a run left ``running``
    was killed), ``summary`` (JSON), ``mlflow_run_id`` (the MLflow run it logged to).
ledger_info
    ``key``/``value`` facts about the output folder: ``batch_id``, a random id made once,
    which tags the folder's MLflow runs (so a restart finds the run a killed start left open).

Examples
--------
>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp())
>>> with Ledger.open(out) as ledger:
...     _ = ledger.sync_studies([StudyEntry("ab12cd34ef56", "nifti", 1, "fp")], ["ingest"])
...     ledger.mark_running("ab12cd34ef56", "ingest", worker="w0", fingerprint="f1", run_id="r1")
...     ledger.mark_done("ab12cd34ef56", "ingest", fingerprint="f1", outputs=[])
...     ledger.step("ab12cd34ef56", "ingest").status
'done'
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medgen.archive.batch_lock import LOCK_NAME, BatchLock
from medgen.archive.manifest import MANIFEST_NAME, Transaction, close_checkpointed, utc_now

__all__ = [
    "LEDGER_NAME",
    "LOCK_NAME",
    "STEP_STATUSES",
    "BatchLock",
    "Ledger",
    "StepState",
    "StudyEntry",
    "StudyState",
    "file_sha256",
    "locked_ledger",
    "one_line",
]

LEDGER_NAME = MANIFEST_NAME  # the ledger's tables live in the manifest file
StepStatus = Literal["pending", "running", "done", "failed", "gated"]
STEP_STATUSES: tuple[str, ...] = ("pending", "running", "done", "failed", "gated")
_MAX_REASON_CHARS = 300

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_studies (
    study_key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    n_files INTEGER NOT NULL,
    input_fingerprint TEXT NOT NULL,
    present INTEGER NOT NULL DEFAULT 1,
    added TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_steps (
    study_key TEXT NOT NULL,
    stage TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    fingerprint TEXT NOT NULL DEFAULT '',
    worker TEXT,
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    outputs TEXT NOT NULL DEFAULT '[]',
    metrics TEXT NOT NULL DEFAULT '{}',
    reason TEXT NOT NULL DEFAULT '',
    seconds REAL,
    run_id TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (study_key, stage)
);
CREATE INDEX IF NOT EXISTS ledger_steps_by_status ON ledger_steps (status);
CREATE TABLE IF NOT EXISTS ledger_runs (
    run_id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS ledger_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Columns added after the first release, for ledgers made before them.
_ADDED_COLUMNS = {"ledger_runs": (("mlflow_run_id", "TEXT"),)}
_STEP_COLUMNS = (
    "study_key, stage, status, fingerprint, worker, heartbeat, attempts, outputs, metrics,"
    " reason, seconds, run_id, updated"
)


def one_line(text: object, limit: int = _MAX_REASON_CHARS) -> str:
    """``text`` on one line (newlines and runs of spaces collapsed), cut to ``limit`` chars.

    Examples
    --------
    >>> one_line("bad file\\n  Traceback ...")
    'bad file Traceback ...'
    """
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class StudyEntry:
    """A study found in the archive: pseudonymous key, kind, file count, input fingerprint."""

    study_key: str
    kind: str
    n_files: int
    input_fingerprint: str


@dataclass(frozen=True)
class StepState:
    """One ``ledger_steps`` row. ``outputs`` holds ``(name, size_bytes, sha256)`` triples,
    names relative to OUT; ``heartbeat``/``updated`` are unix seconds."""

    study_key: str
    stage: str
    status: str
    fingerprint: str
    worker: str | None
    heartbeat: float | None
    attempts: int
    outputs: tuple[tuple[str, int, str], ...]
    metrics: dict[str, Any]
    reason: str
    seconds: float | None
    run_id: str | None
    updated: float

    def outputs_intact(self, out: str | Path, *, checksums: bool = False) -> bool:
        """True when every recorded output exists under ``out`` with its size (and, with
        ``checksums``, its SHA-256)."""
        out = Path(out)
        for name, size, sha in self.outputs:
            path = out / name
            try:
                if path.stat().st_size != size:
                    return False
            except OSError:
                return False
            if checksums and sha and file_sha256(path) != sha:
                return False
        return True


@dataclass
class StudyState:
    """A study's steps in stage order and its overall status.

    ``status``: ``failed`` if a step failed, else ``running`` if one runs, else ``gated`` if
    the input gate kept it out, ``done`` when every step is done, else ``pending``.
    """

    study_key: str
    kind: str
    present: bool
    steps: list[StepState] = field(default_factory=list)

    @property
    def status(self) -> str:
        statuses = [s.status for s in self.steps]
        for wanted in ("failed", "running", "gated"):
            if wanted in statuses:
                return wanted
        return "done" if statuses and all(s == "done" for s in statuses) else "pending"

    @property
    def reason(self) -> str:
        """``"<stage>: <reason>"`` of the failed (else the gated) step, or ''."""
        for wanted in ("failed", "gated"):
            for s in self.steps:
                if s.status == wanted:
                    return f"{s.stage}: {s.reason}"
        return ""

    @property
    def seconds(self) -> float:
        return float(sum(s.seconds or 0.0 for s in self.steps if s.status == "done"))

    @property
    def metrics(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for s in self.steps:
            merged.update(s.metrics)
        return merged


class Ledger:
    """The ledger tables of one output folder (see the module docstring).

    Parameters
    ----------
    path : path-like
        The SQLite file (normally ``OUT/manifest.sqlite``); tables are created when missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            for table, columns in _ADDED_COLUMNS.items():
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns:
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    @classmethod
    def open(cls, out: str | Path) -> Ledger:
        """Open (or create) the ledger of output folder ``out`` (which must exist)."""
        return cls(Path(out) / LEDGER_NAME)

    def close(self) -> None:
        """Checkpoint the write-ahead log and close."""
        if self._db is None:
            return
        close_checkpointed(self._db)
        self._db = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _transaction(self) -> Transaction:
        if self._db is None:
            raise ValueError(f"{self.path}: ledger is closed")
        return Transaction(self._db)

    # -- studies ------------------------------------------------------------------------

    def sync_studies(self, studies: Sequence[StudyEntry], stages: Sequence[str]) -> dict[str, int]:
        """Record the studies of this scan and make sure each has a row per stage.

        New studies are added with every stage ``pending``; studies no longer in the archive
        are kept (with their outputs) but marked absent. Returns counts ``new``, ``changed``
        (input fingerprint differs), ``absent``.
        """
        now = time.time()
        counts = {"new": 0, "changed": 0, "absent": 0}
        with self._transaction() as db:
            db.execute("UPDATE ledger_studies SET present=0")
            for s in studies:
                old = db.execute(
                    "SELECT input_fingerprint FROM ledger_studies WHERE study_key=?", (s.study_key,)
                ).fetchone()
                if old is None:
                    counts["new"] += 1
                    db.execute(
                        "INSERT INTO ledger_studies (study_key, kind, n_files, input_fingerprint,"
                        " present, added) VALUES (?, ?, ?, ?, 1, ?)",
                        (s.study_key, s.kind, int(s.n_files), s.input_fingerprint, utc_now()),
                    )
                else:
                    counts["changed"] += old[0] != s.input_fingerprint
                    db.execute(
                        "UPDATE ledger_studies SET kind=?, n_files=?, input_fingerprint=?, present=1"
                        " WHERE study_key=?",
                        (s.kind, int(s.n_files), s.input_fingerprint, s.study_key),
                    )
                for stage in stages:
                    db.execute(
                        "INSERT OR IGNORE INTO ledger_steps (study_key, stage, updated)"
                        " VALUES (?, ?, ?)",
                        (s.study_key, stage, now),
                    )
            counts["absent"] = db.execute(
                "SELECT COUNT(*) FROM ledger_studies WHERE present=0"
            ).fetchone()[0]
        return counts

    # -- runs ---------------------------------------------------------------------------

    def begin_run(self, run_id: str) -> None:
        """Record the start of a batch run by this process."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO ledger_runs (run_id, pid, host, started, status)"
                " VALUES (?, ?, ?, ?, 'running')",
                (run_id, os.getpid(), socket.gethostname(), time.time()),
            )

    def end_run(self, run_id: str, status: str, summary: dict[str, Any]) -> None:
        """Close a run as ``finished`` or ``interrupted`` with a JSON summary."""
        with self._transaction() as db:
            db.execute(
                "UPDATE ledger_runs SET finished=?, status=?, summary=? WHERE run_id=?",
                (time.time(), status, json.dumps(summary, sort_keys=True), run_id),
            )

    def set_mlflow_run(self, run_id: str, mlflow_run_id: str) -> None:
        """Record the MLflow run that batch run ``run_id`` logs to."""
        with self._transaction() as db:
            db.execute("UPDATE ledger_runs SET mlflow_run_id=? WHERE run_id=?", (mlflow_run_id, run_id))

    def batch_id(self) -> str:
        """This output folder's batch id (random, made on first use, never changes)."""
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO ledger_info (key, value) VALUES ('batch_id', ?)",
                       (secrets.token_hex(8),))
            return db.execute("SELECT value FROM ledger_info WHERE key='batch_id'").fetchone()[0]

    def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first, as dicts (``summary`` decoded)."""
        rows = self._db.execute(
            "SELECT run_id, pid, host, started, finished, status, summary, mlflow_run_id FROM ledger_runs"
            " ORDER BY started"
        ).fetchall()
        keys = ("run_id", "pid", "host", "started", "finished", "status", "summary", "mlflow_run_id")
        out = [dict(zip(keys, r)) for r in rows]
        for r in out:
            r["summary"] = json.loads(r["summary"] or "{}")
        return out

    # -- steps --------------------------------------------------------------------------

    def mark_running(
        self, study_key: str, stage: str, *, worker: str, fingerprint: str, run_id: str
    ) -> None:
        """A worker started ``stage`` of the study: ``running`` with a fresh heartbeat."""
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "UPDATE ledger_steps SET status='running', worker=?, heartbeat=?, fingerprint=?,"
                " attempts=attempts+1, reason='', run_id=?, updated=? WHERE study_key=? AND stage=?",
                (worker, now, fingerprint, run_id, now, study_key, stage),
            )

    def heartbeat(self, study_keys: Iterable[str]) -> None:
        """Refresh the heartbeat of the running steps of these studies."""
        now = time.time()
        with self._transaction() as db:
            for key in study_keys:
                db.execute(
                    "UPDATE ledger_steps SET heartbeat=? WHERE study_key=? AND status='running'",
                    (now, key),
                )

    def mark_done(
        self,
        study_key: str,
        stage: str,
        *,
        fingerprint: str,
        outputs: Sequence[tuple[str, int, str]],
        metrics: dict[str, Any] | None = None,
        seconds: float | None = None,
    ) -> None:
        """The stage finished and its outputs (already in their final place) are recorded."""
        outputs_json = json.dumps([[str(n), int(s), str(h)] for n, s, h in outputs])
        with self._transaction() as db:
            db.execute(
                "UPDATE ledger_steps SET status='done', fingerprint=?, worker=NULL, heartbeat=NULL,"
                " outputs=?, metrics=?, reason='', seconds=?, updated=? WHERE study_key=? AND stage=?",
                (fingerprint, outputs_json, json.dumps(metrics or {}, sort_keys=True), seconds,
                 time.time(), study_key, stage),
            )

    def mark_failed(
        self, study_key: str, stage: str, *, fingerprint: str, reason: str, seconds: float | None = None
    ) -> None:
        """The stage failed; ``reason`` is stored as one line (no traceback)."""
        self._end_without_outputs(study_key, stage, "failed", fingerprint, reason, None, seconds)

    def mark_gated(
        self,
        study_key: str,
        stage: str,
        *,
        fingerprint: str,
        reason: str,
        metrics: dict[str, Any] | None = None,
        seconds: float | None = None,
    ) -> None:
        """The input gate kept the study out of ``stage`` (policy ``skip``): no outputs, the
        verdict in ``metrics`` and ``reason``. Stays so until the stage's fingerprint changes
        (another gate model or policy); ``retry_failed`` leaves it alone."""
        self._end_without_outputs(study_key, stage, "gated", fingerprint, reason, metrics or {}, seconds)

    def _end_without_outputs(
        self, study_key: str, stage: str, status: str, fingerprint: str, reason: str,
        metrics: dict[str, Any] | None, seconds: float | None,
    ) -> None:  # fmt: skip
        """Close a step with no outputs and a one-line ``reason``; ``metrics`` None keeps the
        stored ones (a failure has none to report)."""
        reason = one_line(reason)
        if not reason:
            raise ValueError(f"`reason` must say why the step ended {status}, got ''")
        sets = "status=?, fingerprint=?, worker=NULL, heartbeat=NULL, outputs='[]', reason=?, seconds=?, updated=?"
        values: list[Any] = [status, fingerprint, reason, seconds, time.time()]
        if metrics is not None:
            sets += ", metrics=?"
            values.append(json.dumps(metrics, sort_keys=True))
        with self._transaction() as db:
            db.execute(f"UPDATE ledger_steps SET {sets} WHERE study_key=? AND stage=?", (*values, study_key, stage))  # noqa: S608 - fixed column names

    def mark_pending(self, study_key: str, stage: str, reason: str = "") -> None:
        """Put a step back to ``pending`` (its outputs and metrics are no longer trusted)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE ledger_steps SET status='pending', worker=NULL, heartbeat=NULL,"
                " outputs='[]', metrics='{}', reason=?, updated=? WHERE study_key=? AND stage=?",
                (one_line(reason), time.time(), study_key, stage),
            )

    def reclaim_stale(self, *, max_age_s: float | None = None, not_run: str | None = None) -> list[str]:
        """Take back ``running`` steps whose worker is gone: back to ``pending``.

        A step is stale when its heartbeat is older than ``max_age_s`` seconds, or when it
        belongs to a run other than ``not_run`` (the caller holds the batch lock, so any
        other run is dead). Returns the study keys taken back.
        """
        if max_age_s is None and not_run is None:
            raise ValueError("give `max_age_s` and/or `not_run` to say which steps are stale")
        now = time.time()
        clauses, args = [], []
        if max_age_s is not None:
            clauses.append("COALESCE(heartbeat, 0) < ?")
            args.append(now - float(max_age_s))
        if not_run is not None:
            clauses.append("COALESCE(run_id, '') != ?")
            args.append(not_run)
        where = "status='running' AND (" + " OR ".join(clauses) + ")"
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT study_key, worker, heartbeat FROM ledger_steps WHERE {where}", args
            ).fetchall()
            for key, worker, beat in rows:
                age = now - beat if beat else float("inf")
                db.execute(
                    "UPDATE ledger_steps SET status='pending', worker=NULL, heartbeat=NULL,"
                    " outputs='[]', reason=?, updated=? WHERE study_key=? AND status='running'",
                    (f"taken back from {worker} (last heartbeat {age:.0f} s ago)", now, key),
                )
        return sorted({r[0] for r in rows})

    def retry_failed(self) -> int:
        """Every failed step back to ``pending`` (``--retry-failed``); returns how many."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE ledger_steps SET status='pending', reason='', updated=? WHERE status='failed'",
                (time.time(),),
            ).rowcount

    # -- reading ------------------------------------------------------------------------

    def step(self, study_key: str, stage: str) -> StepState | None:
        """One step, or None when the study or stage is unknown."""
        row = self._db.execute(
            f"SELECT {_STEP_COLUMNS} FROM ledger_steps WHERE study_key=? AND stage=?",
            (study_key, stage),
        ).fetchone()
        return None if row is None else _step_from_row(row)

    def studies(self, stages: Sequence[str] | None = None, *, present_only: bool = True) -> list[StudyState]:
        """Every study (present in the last scan, unless ``present_only=False``) with its steps
        in the order of ``stages`` (default: every stage the ledger knows, by name)."""
        where = " WHERE present=1" if present_only else ""
        head = self._db.execute(
            f"SELECT study_key, kind, present FROM ledger_studies{where} ORDER BY study_key"
        ).fetchall()
        out = {k: StudyState(k, kind, bool(p)) for k, kind, p in head}
        rows = self._db.execute(f"SELECT {_STEP_COLUMNS} FROM ledger_steps").fetchall()
        order = {s: i for i, s in enumerate(stages)} if stages is not None else None
        for row in rows:
            state = out.get(row[0])
            if state is None or (order is not None and row[1] not in order):
                continue
            state.steps.append(_step_from_row(row))
        for state in out.values():
            state.steps.sort(key=lambda s: order[s.stage] if order else s.stage)
        return list(out.values())

    def counts(self, stages: Sequence[str] | None = None) -> dict[str, int]:
        """Studies by overall status: ``done``, ``running``, ``failed``, ``gated``, ``pending``,
        ``total``."""
        out = {s: 0 for s in STEP_STATUSES}
        studies = self.studies(stages)
        for s in studies:
            out[s.status] += 1
        out["total"] = len(studies)
        return out


def _step_from_row(row: tuple) -> StepState:
    (key, stage, status, fp, worker, beat, attempts, outputs, metrics, reason, seconds, run_id,
     updated) = row
    outs = tuple((str(n), int(s), str(h)) for n, s, h in json.loads(outputs or "[]"))
    return StepState(key, stage, status, fp, worker, beat, int(attempts), outs,
                     json.loads(metrics or "{}"), reason, seconds, run_id, float(updated))


@contextmanager
def locked_ledger(out: str | Path) -> Iterator[Ledger]:
    """Hold :class:`BatchLock` on ``out`` and yield its open :class:`Ledger`."""
    with BatchLock(out), Ledger.open(out) as ledger:
        yield ledger
