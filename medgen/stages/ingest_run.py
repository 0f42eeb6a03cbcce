"""Ingest, step 2: convert series, in worker processes or inline.

A worker reads one series, writes each volume as ``.nii.gz`` plus a ``.json`` sidecar
(both atomically, straight to their final names in DST) and returns what it wrote. It
never touches the manifest and never raises for bad input: the parent records results.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medgen.errors import InputError
from medgen.io.deid import output_stem, safe_name
from medgen.io.suffixes import image_suffix
from medgen.stages.ingest_plan import SeriesTask


@dataclass
class TaskResult:
    """What converting one :class:`SeriesTask` gave.

    Attributes
    ----------
    outputs : list of (name, size_bytes)
        Files written, names relative to DST (volumes and their sidecars).
    volumes : list of str
        The ``.nii.gz`` names among ``outputs``.
    file_fates : list of (path, fate, detail)
        Per input file (named as in ``SeriesTask.rel_files``): ``converted`` -> output
        names, ``quarantined`` -> reason.
    error : str or None
        Why the whole series gave nothing; ``error_path`` (named the same way) is the file
        the reason refers to. Reasons, notes and warnings are scrubbed of quoted values
        and paths unless the task keeps patient data.
    transient : bool
        The failure may not happen again (out of memory, a crashed process, an unexpected
        error): the next run retries the series even if its files are unchanged.
    fatal : str or None
        Outputs cannot be written at all (disk full, no permission): the run must stop.
    """

    key: str
    outputs: list[tuple[str, int]] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    file_fates: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    error_path: str | None = None
    transient: bool = False
    fatal: str | None = None
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (named path, text)

    def scrubbed(self, task: SeriesTask) -> TaskResult:
        """This result with every reason, note and warning as ``task`` may show it."""
        self.error = None if self.error is None else task.text(self.error)
        self.file_fates = [
            (p, fate, task.text(d) if fate == "quarantined" else d) for p, fate, d in self.file_fates
        ]
        self.notes = [task.text(n) for n in self.notes]
        self.warnings = [(p, task.text(t)) for p, t in self.warnings]
        return self


class _OutputError(Exception):
    """Writing to DST failed: not the input's fault, so not a reason to quarantine."""


def convert_task(task: SeriesTask) -> TaskResult:
    """Convert one series; bad input becomes ``TaskResult.error``, never an exception.

    Library warnings raised meanwhile end up in ``TaskResult.warnings``, not on stderr.
    """
    from medgen.io.dicom_warnings import routed_warnings

    stray: list[str] = []
    with routed_warnings(stray.append):
        result = _convert_safely(task)
    where = task.rel_files[0] if task.rel_files else ""
    result.warnings.extend((where, text) for text in stray)
    return result.scrubbed(task)


def _convert_safely(task: SeriesTask) -> TaskResult:
    try:
        return _convert(task)
    except InputError as exc:
        failed = _failed(task, exc.reason, exc.path)
        failed.warnings = [(task.name_of(p), text) for p, text in getattr(exc, "warnings", ())]
        return failed
    except _OutputError as exc:
        return TaskResult(task.key, error=str(exc), fatal=str(exc))
    except MemoryError:
        return _failed(task, "out of memory while converting", None, transient=True)
    except Exception as exc:  # noqa: BLE001 - one broken series must not stop the archive
        return _failed(task, f"conversion failed ({_one_line(exc)})", None, transient=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _convert(task: SeriesTask) -> TaskResult:
    dst = Path(task.dst)
    result = TaskResult(task.key)
    if task.kind == "dicom":
        from medgen.io.dicom_reader import read_dicom_series

        series = read_dicom_series(
            [Path(p) for p in task.files],
            keep_phi=task.keep_phi,
            max_image_mb=task.max_image_mb,
            damaged=dict(task.damaged),
        )
        volumes, rejected, result.notes = series.volumes, series.rejected, list(series.notes)
        result.warnings = [(task.name_of(p), text) for p, text in series.warnings]
    else:
        from medgen.io import load

        loaded = load(task.files[0])
        volumes = loaded if isinstance(loaded, list) else [loaded]
        rejected = []
    used: dict[str, list[str]] = {}
    stems: set[str] = set()
    for index, volume in enumerate(volumes):
        stem = _unique(_stem_for(task, volume, index, len(volumes)), stems)
        sources = [task.name_of(p) for p in volume.meta.source_files]
        volume.meta.series_key = task.key
        # Named as in the manifest: relative to SRC with keep_phi, else pseudonymous.
        volume.meta.source_files = tuple(sources)
        try:
            names = _write_volume(volume, dst, stem, task.keep_phi)
        except OSError as exc:
            raise _OutputError(f"cannot write {stem} to {dst} ({_one_line(exc)})") from exc
        result.outputs.extend((n, (dst / n).stat().st_size) for n in names)
        result.volumes.append(names[0])
        for rel in sources:
            used.setdefault(rel, []).append(names[0])
    for path, reason in rejected:
        result.file_fates.append((task.name_of(path), "quarantined", reason))
    for rel, names in used.items():
        result.file_fates.append((rel, "converted", ", ".join(names)))
    return result


def _stem_for(task: SeriesTask, volume, index: int, n_volumes: int) -> str:
    acq = volume.meta.acquisition or {}
    if task.kind == "dicom":
        part = acq.get("VolumePart") or (str(index + 1) if n_volumes > 1 else None)
        # The description is free text (it may name the patient): only with keep_phi.
        description = acq.get("SeriesDescription") if task.keep_phi else None
        return output_stem(task.key, acq.get("SeriesNumber"), description, part)
    if not task.keep_phi:  # file names are often patient names: only the key by default
        return task.key if n_volumes == 1 else f"{task.key}_{index + 1}"
    name = task.real_name or Path(task.rel_files[0]).name
    suffix = image_suffix(name, also=(".hdr",))
    name = name[: -len(suffix)] if suffix else name
    stem = f"{task.key}_{safe_name(name, empty=task.kind)}"
    return stem if n_volumes == 1 else f"{stem}_{index + 1}"


def _unique(stem: str, taken: set[str]) -> str:
    candidate, n = stem, 2
    while candidate in taken:
        candidate, n = f"{stem}_{n}", n + 1
    taken.add(candidate)
    return candidate


def _write_volume(volume, dst: Path, stem: str, keep_phi: bool) -> list[str]:
    """Write ``<stem>.nii.gz`` and ``<stem>.json``; return their names (volume first)."""
    from medgen.io.nifti import write_nifti
    from medgen.io.sidecar import write_sidecar

    nifti_name, sidecar_name = f"{stem}.nii.gz", f"{stem}.json"
    write_nifti(volume, dst / nifti_name)
    write_sidecar(volume, dst / sidecar_name, keep_phi=keep_phi)
    return [nifti_name, sidecar_name]


def _failed(
    task: SeriesTask, reason: str, path: str | Path | None, *, transient: bool = False
) -> TaskResult:
    rel = None if path is None else task.name_of(path)
    return TaskResult(
        task.key, error=reason, error_path=rel or task.rel_files[0], transient=transient
    )


# -- running many tasks -------------------------------------------------------------------


def run_tasks(
    tasks: Sequence[SeriesTask],
    workers: int,
    convert: Callable[[SeriesTask], TaskResult] = convert_task,
) -> Iterator[tuple[SeriesTask, TaskResult]]:
    """Yield ``(task, result)`` as each task finishes, converting ``workers`` at a time.

    ``workers == 1`` converts inline, in this process. Otherwise a process pool does the
    work; if a worker process dies (killed for memory, a crash in a decoder), the tasks it
    took down are retried one at a time in a fresh process and the one that kills it again
    is reported as failed, while the others carry on.
    """
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield task, convert(task)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    # "spawn": workers start clean; forking a parent that runs a progress thread can hang.
    context = multiprocessing.get_context("spawn")
    retry: list[SeriesTask] = []
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)), mp_context=context,
        initializer=die_with_parent, initargs=(os.getpid(),),
    )
    try:
        futures = {pool.submit(convert, task): task for task in tasks}
        for future in as_completed(futures):
            task = futures[future]
            try:
                result = future.result()
            except BrokenProcessPool:
                retry.append(task)
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be pickled
                result = _failed(
                    task, f"conversion failed ({_one_line(exc)})", None, transient=True
                )
            yield task, result
    finally:
        # On Ctrl-C or a closed generator, drop the queued work instead of finishing it.
        pool.shutdown(wait=True, cancel_futures=True)
    for task in retry:
        with ProcessPoolExecutor(
            max_workers=1, mp_context=context, initializer=die_with_parent,
            initargs=(os.getpid(),),
        ) as single:
            try:
                result = single.submit(convert, task).result()
            except BrokenProcessPool:
                reason = "the converter process died (out of memory or a crash)"
                result = _failed(task, reason, None, transient=True)
        yield task, result


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this process when the parent ingest dies (even by SIGKILL).

    A killed parent otherwise leaves its workers blocked forever on their task queue,
    holding the caller's stdout open. Linux delivers SIGKILL on the parent's death
    (``PR_SET_PDEATHSIG``); elsewhere, and as a backstop, a thread watches the parent.
    """
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="medgen-parent-watch", daemon=True).start()
