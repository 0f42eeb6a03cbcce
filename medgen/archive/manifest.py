"""The ingest manifest: one SQLite file recording every input file and every series.

``DST/manifest.sqlite`` answers "what happened to this file?" and "is this series already
done?" across runs. Only the parent ingest process writes it, one transaction per series,
so a run killed at any point leaves a manifest that still tells the truth: a series is
``done`` only once all its outputs were written, and outputs are trusted only when the
manifest says so.

Tables
------
files
    ``path`` (relative to SRC, POSIX separators), ``size``, ``mtime_ns``, ``kind``,
    ``series_key``, ``fate`` (``pending``/``converted``/``skipped``/``quarantined``) and
    ``detail`` (the output names for ``converted``, what the file is for ``skipped``, a
    one-line reason for ``quarantined``).
series
    ``series_key``, ``fingerprint`` (hash of its file list with sizes and mtimes),
    ``status`` (``done``/``quarantined``), ``outputs`` (JSON list of ``[name, size]``,
    names relative to DST), ``reason`` (notes for a done series, why for a quarantined
    one), ``problem_path`` (the file the reason names), ``n_files`` and ``updated`` (UTC,
    ISO 8601).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

MANIFEST_NAME = "manifest.sqlite"
SCHEMA_VERSION = 1

FileFate = Literal["pending", "converted", "skipped", "quarantined"]
SeriesStatus = Literal["done", "quarantined"]
FILE_FATES: tuple[str, ...] = ("pending", "converted", "skipped", "quarantined")
SERIES_STATUSES: tuple[str, ...] = ("done", "quarantined")

_SERIES_COLUMNS = "series_key, fingerprint, status, outputs, reason, problem_path, n_files, updated"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,
    series_key TEXT,
    fate TEXT NOT NULL DEFAULT 'pending',
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS files_by_series ON files (series_key);
CREATE TABLE IF NOT EXISTS series (
    series_key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    status TEXT NOT NULL,
    outputs TEXT NOT NULL DEFAULT '[]',
    reason TEXT NOT NULL DEFAULT '',
    problem_path TEXT,
    n_files INTEGER NOT NULL DEFAULT 0,
    updated TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class FileRecord:
    """One row of the ``files`` table; ``path`` is relative to SRC (POSIX)."""

    path: str
    size: int
    mtime_ns: int
    kind: str
    series_key: str | None = None
    fate: str = "pending"
    detail: str = ""


@dataclass(frozen=True)
class SeriesState:
    """What the manifest knows about one series.

    ``outputs`` holds ``(name, size_bytes)`` pairs, names relative to DST;
    ``problem_path`` the file (relative to SRC) that ``reason`` is about, if any.
    """

    series_key: str
    fingerprint: str
    status: str
    outputs: tuple[tuple[str, int], ...]
    reason: str
    problem_path: str | None
    n_files: int
    updated: str

    def outputs_intact(self, dst: str | Path) -> bool:
        """True when every recorded output exists in ``dst`` with its recorded size."""
        dst = Path(dst)
        for name, size in self.outputs:
            path = dst / name
            try:
                if path.stat().st_size != size:
                    return False
            except OSError:
                return False
        return True


def fingerprint(files: Iterable[tuple[str, int, int]], salt: str = "") -> str:
    """Hash of a series' file list: ``(relative path, size, mtime_ns)`` triples, any order.

    A file added, removed, rewritten or touched changes the fingerprint; ``salt`` carries
    options that change the outputs (e.g. ``keep_phi``).

    Examples
    --------
    >>> a = fingerprint([("s/1.dcm", 10, 5), ("s/2.dcm", 10, 6)])
    >>> a == fingerprint([("s/2.dcm", 10, 6), ("s/1.dcm", 10, 5)])
    True
    >>> a == fingerprint([("s/1.dcm", 10, 5), ("s/2.dcm", 10, 7)])
    False
    """
    digest = hashlib.sha256(salt.encode("utf-8", errors="surrogateescape"))
    for path, size, mtime_ns in sorted(files):
        # surrogateescape: a file name that is not valid UTF-8 hashes as its raw bytes.
        line = f"{path}\x1f{int(size)}\x1f{int(mtime_ns)}\n"
        digest.update(line.encode("utf-8", errors="surrogateescape"))
    return digest.hexdigest()


class Manifest:
    """The SQLite manifest of one output folder.

    Use :meth:`open` (or the constructor) and :meth:`close`, or a ``with`` block. Every
    write method commits its own transaction.

    Parameters
    ----------
    path : path-like
        The ``.sqlite`` file; created with its tables when missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._transaction():
            # executescript() would COMMIT first; run the statements inside the transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(
                "INSERT OR IGNORE INTO info (key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )
        found = self._db.execute("SELECT value FROM info WHERE key='schema'").fetchone()[0]
        if found != str(SCHEMA_VERSION):
            from medgen.errors import InputError

            self._db.close()
            self._db = None
            raise InputError(
                self.path,
                f"manifest schema {found} is not the supported {SCHEMA_VERSION}; "
                "use a new output folder",
            )

    @classmethod
    def open(cls, dst: str | Path) -> Manifest:
        """Open (or create) ``dst/manifest.sqlite``; ``dst`` must exist."""
        return cls(Path(dst) / MANIFEST_NAME)

    def close(self) -> None:
        """Checkpoint the write-ahead log and close the connection."""
        if self._db is not None:
            close_checkpointed(self._db)
        self._db = None

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------

    def record_files(self, records: Sequence[FileRecord], *, prune: bool = True) -> int:
        """Store the files seen by this scan.

        A file whose size and mtime are unchanged keeps its fate; a new or changed file
        becomes ``pending`` with ``records``' fate/detail. With ``prune``, files no longer
        under SRC are dropped from the table (their series rows and outputs stay).

        Returns
        -------
        int
            Number of files that are new or changed since the last scan.
        """
        changed = 0
        with self._transaction():
            self._db.execute("CREATE TEMP TABLE IF NOT EXISTS seen (path TEXT PRIMARY KEY)")
            self._db.execute("DELETE FROM seen")
            for rec in records:
                self._db.execute("INSERT OR IGNORE INTO seen (path) VALUES (?)", (rec.path,))
                old = self._db.execute(
                    "SELECT size, mtime_ns, kind, series_key FROM files WHERE path=?", (rec.path,)
                ).fetchone()
                if old == (rec.size, rec.mtime_ns, rec.kind, rec.series_key):
                    if rec.fate != "pending":  # a skip note or reason may have been reworded
                        self._db.execute(
                            "UPDATE files SET fate=?, detail=? WHERE path=?",
                            (rec.fate, rec.detail, rec.path),
                        )
                    continue
                changed += 1
                self._db.execute(
                    "INSERT OR REPLACE INTO files (path, size, mtime_ns, kind, series_key, fate,"
                    " detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        rec.path,
                        int(rec.size),
                        int(rec.mtime_ns),
                        rec.kind,
                        rec.series_key,
                        _check_fate(rec.fate),
                        rec.detail,
                    ),
                )
            if prune:
                self._db.execute("DELETE FROM files WHERE path NOT IN (SELECT path FROM seen)")
            self._db.execute("DELETE FROM seen")
        return changed

    def mark_series_done(
        self,
        series_key: str,
        fingerprint: str,
        outputs: Sequence[tuple[str, int]],
        file_fates: Iterable[tuple[str, str, str]],
        *,
        reason: str = "",
    ) -> None:
        """Record a converted series and the fate of each of its files, in one transaction.

        Parameters
        ----------
        outputs : sequence of (name, size_bytes)
            Output files relative to DST; they must already exist in their final place.
        file_fates : iterable of (path, fate, detail)
            ``path`` relative to SRC; ``fate`` one of ``converted``/``skipped``/``quarantined``.
        reason : str
            Optional notes about the conversion (e.g. corrections applied).
        """
        self._write_series(series_key, fingerprint, "done", outputs, reason, file_fates)

    def quarantine(
        self,
        series_key: str,
        fingerprint: str,
        reason: str,
        file_fates: Iterable[tuple[str, str, str]] = (),
        *,
        path: str | None = None,
    ) -> None:
        """Record a series that gave no usable volume, in one transaction.

        Every file of the series without another fate in ``file_fates`` is quarantined
        with ``reason``; ``path`` (relative to SRC) is the file the reason names.
        """
        if not reason:
            raise ValueError("`reason` must say why the series was quarantined, got ''")
        self._write_series(
            series_key, fingerprint, "quarantined", (), reason, file_fates, problem_path=path
        )

    def quarantine_file(self, path: str, reason: str) -> None:
        """Quarantine one file that belongs to no series."""
        with self._transaction():
            self._db.execute(
                "UPDATE files SET fate='quarantined', detail=? WHERE path=?", (reason, path)
            )

    def forget_series(self, series_key: str) -> None:
        """Drop a series row, e.g. once its outputs were removed."""
        with self._transaction():
            self._db.execute("DELETE FROM series WHERE series_key=?", (series_key,))

    def _write_series(
        self,
        series_key: str,
        fingerprint: str,
        status: str,
        outputs: Sequence[tuple[str, int]],
        reason: str,
        file_fates: Iterable[tuple[str, str, str]],
        problem_path: str | None = None,
    ) -> None:
        outputs_json = json.dumps([[str(name), int(size)] for name, size in outputs])
        with self._transaction():
            n_files = self._db.execute(
                "SELECT COUNT(*) FROM files WHERE series_key=?", (series_key,)
            ).fetchone()[0]
            self._db.execute(
                "INSERT OR REPLACE INTO series (series_key, fingerprint, status, outputs, reason,"
                " problem_path, n_files, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    series_key,
                    fingerprint,
                    status,
                    outputs_json,
                    reason,
                    problem_path,
                    n_files,
                    utc_now(),
                ),
            )
            default_fate = "quarantined" if status == "quarantined" else "skipped"
            default_detail = reason if status == "quarantined" else "not used in any volume"
            self._db.execute(
                "UPDATE files SET fate=?, detail=? WHERE series_key=?",
                (default_fate, default_detail, series_key),
            )
            for path, fate, detail in file_fates:
                self._db.execute(
                    "UPDATE files SET fate=?, detail=? WHERE path=?",
                    (_check_fate(fate), detail, path),
                )

    # -- reading ---------------------------------------------------------------------------

    def series_state(self, series_key: str) -> SeriesState | None:
        """The stored state of one series, or None if it was never finished."""
        row = self._db.execute(
            f"SELECT {_SERIES_COLUMNS} FROM series WHERE series_key=?",
            (series_key,),
        ).fetchone()
        return None if row is None else _series_from_row(row)

    def all_series(self) -> list[SeriesState]:
        """Every series row, ordered by key."""
        rows = self._db.execute(
            f"SELECT {_SERIES_COLUMNS} FROM series ORDER BY series_key"
        ).fetchall()
        return [_series_from_row(r) for r in rows]

    def files(self, *, fate: str | None = None, series_key: str | None = None) -> list[FileRecord]:
        """File rows, optionally only those with ``fate`` and/or of one series, by path."""
        query = "SELECT path, size, mtime_ns, kind, series_key, fate, detail FROM files"
        clauses, args = [], []
        if fate is not None:
            clauses.append("fate=?")
            args.append(_check_fate(fate))
        if series_key is not None:
            clauses.append("series_key=?")
            args.append(series_key)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        rows = self._db.execute(query + " ORDER BY path", args).fetchall()
        return [FileRecord(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        """How many files have each fate and how many series each status.

        Keys: the file fates (``converted``, ``skipped``, ...) and ``series_done``,
        ``series_quarantined``; absent categories count 0.
        """
        out = {fate: 0 for fate in FILE_FATES}
        out.update({f"series_{s}": 0 for s in SERIES_STATUSES})
        for fate, n in self._db.execute("SELECT fate, COUNT(*) FROM files GROUP BY fate"):
            out[fate] = n
        for status, n in self._db.execute("SELECT status, COUNT(*) FROM series GROUP BY status"):
            out[f"series_{status}"] = n
        return out

    def _transaction(self) -> Transaction:
        if self._db is None:
            raise ValueError(f"{self.path}: manifest is closed")
        return Transaction(self._db)


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises (even on Ctrl-C)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")


def _series_from_row(row: tuple) -> SeriesState:
    key, fp, status, outputs_json, reason, problem_path, n_files, updated = row
    outputs = tuple((str(name), int(size)) for name, size in json.loads(outputs_json))
    return SeriesState(key, fp, status, outputs, reason, problem_path, int(n_files), updated)


def _check_fate(fate: str) -> str:
    if fate not in FILE_FATES:
        import difflib

        close = difflib.get_close_matches(str(fate), FILE_FATES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"`fate` must be one of {', '.join(FILE_FATES)}, got {fate!r}{hint}")
    return fate


def close_checkpointed(db: sqlite3.Connection) -> None:
    """Fold the write-ahead log into the database file, then close the connection."""
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error:
        pass  # another reader holds the log; it is checkpointed on their close
    db.close()


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second (how the manifest stamps rows)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
