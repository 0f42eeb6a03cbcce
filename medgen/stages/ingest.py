"""``medgen ingest``: turn a folder of scans into NIfTI volumes with JSON sidecars.

Resumable and incremental: ``DST/manifest.sqlite`` remembers every input file and every
series; a series whose files are unchanged and whose outputs are intact is not redone, a
series that gained or lost files is redone, and a run killed half-way picks up where it
stopped. Input files are only ever read.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from medgen.archive.manifest import Manifest, SeriesState
from medgen.errors import InputError
from medgen.io.dicom_limits import DEFAULT_MAX_IMAGE_MB
from medgen.stages.ingest_names import SourceNames
from medgen.stages.ingest_plan import SeriesTask, plan_ingest
from medgen.stages.ingest_run import TaskResult, run_tasks

EXIT_OK = 0
EXIT_QUARANTINED = 3
EXIT_NOTHING_USABLE = 4
LOCK_NAME = ".medgen-ingest.lock"
LOG_NAME = "ingest.log"  # reader warnings, one line each, appended run after run
# Temporary names written by medgen.io.atomic: ".<name>.tmp-<pid>-<hex>".
_TEMP_NAME = re.compile(r"^\..+\.tmp-.+$")


@dataclass
class IngestSummary:
    """What one ``ingest`` run found and did.

    Attributes
    ----------
    series_converted, series_unchanged, series_quarantined : int
        Image series (a DICOM series, or one NIfTI/ITK file) converted in this run, found
        already done with the same files, or that gave no volume (in this run, or in an
        earlier one when its files are unchanged: those are not retried).
    volumes_written : list of Path
        ``.nii.gz`` files written by this run.
    volumes_unchanged : int
        Volumes of unchanged series, left as they were.
    skipped : list of (path, kind, note)
        Files that are not images.
    quarantined : list of (path, reason)
        One line per bad file or series, also from earlier runs when the files are
        unchanged.
    pseudonymous : bool
        Paths here, in the manifest and in the log are pseudonyms of the real paths under
        SRC (the default); false with ``keep_phi``, when they are the real relative paths.
        :func:`medgen.stages.ingest_names.locate` maps pseudonyms back.
    temp_files_removed : int
        Leftovers of a killed run removed from DST at the start.
    warnings_logged : int
        Reader warnings (damaged values pydicom could read past) written to ``log_path``.
    """

    src: Path
    dst: Path
    series_converted: int = 0
    series_unchanged: int = 0
    series_quarantined: int = 0
    volumes_written: list[Path] = field(default_factory=list)
    volumes_unchanged: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    temp_files_removed: int = 0
    warnings_logged: int = 0
    pseudonymous: bool = True

    @property
    def log_path(self) -> Path:
        """``DST/ingest.log``: the reader's warnings, one ``path: warning`` line each."""
        return self.dst / LOG_NAME

    @property
    def n_volumes(self) -> int:
        """Volumes available in DST after this run (written now or unchanged)."""
        return len(self.volumes_written) + self.volumes_unchanged

    @property
    def counts(self) -> dict[str, int]:
        """``converted``/``unchanged``/``quarantined`` series and ``skipped`` files."""
        return {
            "converted": self.series_converted,
            "unchanged": self.series_unchanged,
            "quarantined": self.series_quarantined,
            "skipped": len(self.skipped),
        }

    def skipped_by_kind(self) -> dict[str, int]:
        """Skipped files counted by what they are, e.g. ``{"not DICOM (text)": 2}``."""
        return dict(sorted(Counter(note or kind for _, kind, note in self.skipped).items()))

    @property
    def exit_code(self) -> int:
        """0: every image series usable; 3: something quarantined; 4: no volume at all."""
        if self.n_volumes == 0:
            return EXIT_NOTHING_USABLE
        if self.quarantined:
            return EXIT_QUARANTINED
        return EXIT_OK


def ingest(
    src: str | Path,
    dst: str | Path,
    *,
    workers: int = 1,
    keep_phi: bool = False,
    progress: bool = True,
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB,
) -> IngestSummary:
    """Convert every image series under ``src`` into ``dst`` (NIfTI + JSON sidecar).

    Parameters
    ----------
    src : path-like
        Folder searched recursively (DICOM with or without extension, DICOMDIR, NIfTI,
        NRRD/MHA, anything else is recorded as skipped). Never modified.
    dst : path-like
        Output folder (created); holds ``<key>_s<SeriesNumber>_<description>.nii.gz``,
        their ``.json`` sidecars and ``manifest.sqlite``. May lie inside ``src``.
    workers : int
        Series converted at once in separate processes; 1 converts in this process.
    keep_phi : bool
        Keep patient identifiers in the sidecars, the series description in output names
        and real source paths in messages, the manifest and the log. Off (the default),
        files are named by keyed pseudonyms (``DST/pseudonym.key``) and reasons are
        scrubbed of quoted values and paths.
    progress : bool
        Show a progress bar over the series on stderr.
    max_image_mb : float
        Largest decoded image (rows x columns x frames x bytes, and what a compressed
        frame's own header claims) a file may declare; larger ones are refused before
        decoding, as decompression bombs.

    Returns
    -------
    IngestSummary
        Its ``exit_code`` is what ``medgen ingest`` exits with.

    Raises
    ------
    InputError
        Only for unusable folders (``src`` missing, ``dst`` is a file or is ``src``, another
        ingest is writing to ``dst``, outputs cannot be written). Bad files and series never
        raise: they are reported in the summary and the manifest, and the rest is converted.
        Series that failed for a passing reason (out of memory, a crashed worker) are
        retried by the next run.
    """
    from medgen.io.dicom_warnings import routed_warnings

    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be an integer >= 1, got {workers!r}")
    if not isinstance(max_image_mb, (int, float)) or not max_image_mb > 0:
        raise ValueError(
            f"`max_image_mb` must be > 0, got {max_image_mb!r}; e.g. 2048 allows 2 GB images"
        )
    src_path, dst_path = _check_folders(src, dst)
    summary = IngestSummary(src=src_path, dst=dst_path, pseudonymous=not keep_phi)
    with _exclusive(dst_path):
        names = SourceNames.for_output(dst_path, keep_phi=keep_phi)
        with _WarningLog(summary, names) as log:
            summary.temp_files_removed = remove_stale_temp_files(dst_path)
            with routed_warnings(lambda text: log.write("", text)), \
                    Manifest.open(dst_path) as manifest:
                _ingest(
                    manifest, summary, log, names, workers=workers, keep_phi=keep_phi,
                    progress=progress, max_image_mb=float(max_image_mb),
                )
    return summary


class _WarningLog:
    """Appends ``path: warning`` lines to ``DST/ingest.log``, opened on the first line.

    ``path`` is named as everywhere else; the text is scrubbed unless patient data is kept.
    """

    def __init__(self, summary: IngestSummary, names: SourceNames) -> None:
        self.summary = summary
        self.names = names
        self._handle = None

    def __enter__(self) -> _WarningLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.close()

    def write(self, path: str, text: str) -> None:
        if self._handle is None:
            from datetime import datetime, timezone

            self._handle = open(self.summary.log_path, "a", encoding="utf-8", errors="replace")
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._handle.write(f"# medgen ingest {stamp}\n")
        text = self.names.text(text)
        self._handle.write(f"{path}: {text}\n" if path else f"{text}\n")
        self.summary.warnings_logged += 1


def _ingest(
    manifest: Manifest,
    summary: IngestSummary,
    log: _WarningLog,
    names: SourceNames,
    *,
    workers: int,
    keep_phi: bool,
    progress: bool,
    max_image_mb: float,
) -> None:
    src, dst = summary.src, summary.dst
    plan = plan_ingest(src, dst, keep_phi=keep_phi, max_image_mb=max_image_mb, names=names)
    for path, text in plan.warnings:
        log.write(path, text)
    manifest.record_files(plan.records)
    summary.skipped = [(r.path, r.kind, r.detail) for r in plan.records if r.fate == "skipped"]
    todo: list[SeriesTask] = []
    for task in plan.tasks:
        state = manifest.series_state(task.key)
        if _is_current(state, task, dst):
            if state.status == "quarantined":
                summary.series_quarantined += 1
            else:
                summary.series_unchanged += 1
                summary.volumes_unchanged += sum(n.endswith(".nii.gz") for n, _ in state.outputs)
        else:
            todo.append(task)
    results = closing(run_tasks(todo, workers))
    with _progress_bar(len(todo), enabled=progress and bool(todo)) as advance, results as done:
        for task, result in done:
            if result.fatal is not None:
                raise InputError(dst, result.fatal)  # e.g. disk full: stop, resume later
            result = result.scrubbed(task)  # also what the pool itself reported
            _record(manifest, dst, task, result, manifest.series_state(task.key))
            for path, text in result.warnings:
                log.write(path, text)
            if result.error is None:
                summary.series_converted += 1
                summary.volumes_written.extend(dst / n for n in result.volumes)
                summary.notes.extend(f"{task.label}: {note}" for note in result.notes)
            else:
                summary.series_quarantined += 1
            advance(task.label)
    for task in plan.tasks:
        summary.quarantined.extend(problem_lines(manifest, task.key))
    # Files that look like DICOM but belong to no series (unreadable header, no series UID).
    summary.quarantined.extend(
        (r.path, r.detail) for r in plan.records if r.fate == "quarantined" and not r.series_key
    )


def _is_current(state: SeriesState | None, task: SeriesTask, dst: Path) -> bool:
    """True when the manifest says this exact file list was already handled."""
    if state is None or state.fingerprint != task.fingerprint:
        return False
    if state.status == "quarantined":
        return True  # the same files would fail the same way
    return state.status == "done" and state.outputs_intact(dst)


def _record(
    manifest: Manifest, dst: Path, task: SeriesTask, result: TaskResult, old: SeriesState | None
) -> None:
    """Write one series' outcome to the manifest, removing outputs it no longer has.

    Stale outputs go before the commit: if the run dies in between, the manifest still
    holds the old fingerprint and the series is simply redone.
    """
    new_names = {name for name, _ in result.outputs}
    for name, _ in old.outputs if old is not None else ():
        if name not in new_names:
            (dst / name).unlink(missing_ok=True)
    if result.error is None:
        manifest.mark_series_done(
            task.key,
            task.fingerprint,
            result.outputs,
            result.file_fates,
            reason="; ".join(result.notes),
        )
    else:
        # A transient failure is stored without its fingerprint, so the next run retries it.
        fp = "" if result.transient else task.fingerprint
        manifest.quarantine(task.key, fp, result.error, result.file_fates, path=result.error_path)


def problem_lines(manifest: Manifest, series_key: str) -> list[tuple[str, str]]:
    """One ``(path, reason)`` per bad file of a series, or one for a quarantined series."""
    state = manifest.series_state(series_key)
    if state is None:
        return []
    bad = manifest.files(fate="quarantined", series_key=series_key)
    lines: list[tuple[str, str]] = []
    if state.status == "quarantined":
        anchor = state.problem_path or (bad[0].path if bad else "")
        whole = f" (whole series: {state.n_files} files)" if state.n_files > 1 else ""
        lines.append((anchor, state.reason + whole))
        bad = [f for f in bad if f.detail != state.reason]
    lines.extend((f.path, f.detail) for f in bad)
    return lines


def remove_stale_temp_files(dst: Path) -> int:
    """Delete temporary files a killed run left at the top of ``dst``; return how many.

    Only hidden names of the form ``.<name>.tmp-<...>`` (what :mod:`medgen.io.atomic`
    writes) are touched, and only while this process holds the ingest lock of ``dst`` (so
    no other ingest is writing them). Subfolders, where other stages write, are left alone.
    """
    import shutil

    removed = 0
    for entry in os.scandir(dst):
        if not _TEMP_NAME.match(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed += 1
    return removed


def _check_folders(src: str | Path, dst: str | Path) -> tuple[Path, Path]:
    src_path = Path(os.path.realpath(src))
    if not src_path.exists():
        raise InputError(src, "no such file or folder")
    if not src_path.is_dir():
        raise InputError(src, "is not a folder (give the folder that holds the scans)")
    dst_path = Path(os.path.realpath(dst))
    if dst_path.exists() and not dst_path.is_dir():
        raise InputError(dst, "output exists and is not a folder")
    if dst_path == src_path:
        raise InputError(dst, "the output folder must differ from the input folder")
    dst_path.mkdir(parents=True, exist_ok=True)
    return src_path, dst_path


@contextmanager
def _exclusive(dst: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``dst`` so two ingests never write the same outputs."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; run one ingest per folder
        yield
        return
    with open(dst / LOCK_NAME, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(dst, "another medgen ingest is writing to this folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextmanager
def _progress_bar(total: int, *, enabled: bool) -> Iterator:
    """Yield ``advance(label)``; with ``enabled``, a rich progress bar on stderr."""
    if not enabled:
        yield lambda label: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]converting series"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}", style="dim"),
    )
    with Progress(*columns, console=console, transient=not console.is_terminal) as bar:
        job = bar.add_task("", total=total)

        def advance(label: str) -> None:
            bar.update(job, advance=1, description=label[-60:])

        yield advance
