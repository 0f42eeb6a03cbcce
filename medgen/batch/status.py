"""``medgen status OUT``: what the ledger of a batch output folder says, read-only.

Done / running / failed (with reasons) / gated (kept out by the input gate, with score and
reason) / pending studies, whether a batch is running now,
and the latest run's throughput and ETA. Opens the ledger for reading only; never takes
the batch lock, so it is safe while a batch runs.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from medgen.archive.ledger import LEDGER_NAME, LOCK_NAME
from medgen.errors import InputError


@dataclass
class BatchStatus:
    """Counts of studies by status, failures, and the latest run's pace."""

    out: Path
    counts: dict[str, int]
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (key, stage, reason)
    gated: list[tuple[str, str, str]] = field(default_factory=list)  # (key, stage, reason)
    active_pid: int | None = None
    run_started: float | None = None
    run_finished: float | None = None
    done_in_run: int = 0

    @property
    def studies_per_second(self) -> float:
        if self.run_started is None:
            return 0.0
        end = self.run_finished or time.time()
        return self.done_in_run / max(end - self.run_started, 1e-9)

    @property
    def eta_seconds(self) -> float | None:
        left = self.counts.get("pending", 0) + self.counts.get("running", 0)
        rate = self.studies_per_second
        return left / rate if self.active_pid and rate > 0 else None

    def lines(self, max_failures: int = 20) -> list[str]:
        c = self.counts
        gated = f"{c['gated']} gated out, " if c["gated"] else ""  # only where an input gate kept some out
        out = [f"{self.out}: {c['total']} studies: {c['done']} done, {c['running']} running, "
               f"{c['failed']} failed, {gated}{c['pending']} pending"]
        if self.active_pid:
            out.append(f"a batch is running now (pid {self.active_pid})")
        if self.run_started is not None:
            pace = f"latest run: {self.done_in_run} studies at {self.studies_per_second:.2f} studies/s"
            if self.eta_seconds is not None:
                pace += f", ETA {self.eta_seconds / 60:.1f} min"
            out.append(pace)
        for key, stage, reason in self.failures[:max_failures]:
            out.append(f"failed: {key}: {stage}: {reason}")
        if len(self.failures) > max_failures:
            out.append(f"... and {len(self.failures) - max_failures} more failed (see {self.out / 'report.html'})")
        for key, stage, reason in self.gated[:max_failures]:
            out.append(f"gated: {key}: {stage}: {reason}")
        if len(self.gated) > max_failures:
            out.append(f"... and {len(self.gated) - max_failures} more gated out (see {self.out / 'report.html'})")
        return out


def read_status(out: str | Path) -> BatchStatus:
    """Read ``OUT``'s ledger. Raises :class:`InputError` when there is none."""
    out = Path(out)
    path = out / LEDGER_NAME
    if not path.is_file():
        raise InputError(out, "no batch ledger here (run `medgen batch ... --out` on this folder first)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    try:
        try:
            rows = db.execute(
                "SELECT s.study_key, t.stage, t.status, t.reason, t.updated FROM ledger_studies s"
                " JOIN ledger_steps t ON s.study_key = t.study_key WHERE s.present = 1"
            ).fetchall()
            run = db.execute(
                "SELECT started, finished, status FROM ledger_runs ORDER BY started DESC LIMIT 1"
            ).fetchone()
        except sqlite3.OperationalError:
            raise InputError(out, "the manifest here holds no batch ledger (an ingest output?)") from None
    finally:
        db.close()
    per_study: dict[str, list[tuple]] = {}
    for key, stage, status, reason, updated in rows:
        per_study.setdefault(key, []).append((stage, status, reason, updated))
    counts = {"done": 0, "running": 0, "failed": 0, "gated": 0, "pending": 0, "total": len(per_study)}
    failures = []
    result = BatchStatus(out, counts)
    if run is not None:
        result.run_started, result.run_finished = run[0], run[1]
    for key, steps in sorted(per_study.items()):
        statuses = [s[1] for s in steps]
        if "failed" in statuses:
            status = "failed"
            failures.extend((key, s[0], s[2]) for s in steps if s[1] == "failed")
        elif "running" in statuses:
            status = "running"
        elif "gated" in statuses:  # the same order as StudyState.status
            status = "gated"
            result.gated.extend((key, s[0], s[2]) for s in steps if s[1] == "gated")
        elif all(s == "done" for s in statuses):
            status = "done"
            if result.run_started is not None and max(s[3] for s in steps) >= result.run_started:
                result.done_in_run += 1
        else:
            status = "pending"
        counts[status] += 1
    result.failures = failures
    result.active_pid = _active_pid(out)
    return result


def _active_pid(out: Path) -> int | None:
    """The pid named in the lock file when that process is alive on this host."""
    try:
        info = json.loads((out / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return None
    pid = info.get("pid")
    if not pid or info.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return None
    return int(pid)
