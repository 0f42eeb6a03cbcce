"""Ingest, step 1: scan SRC and turn its files into conversion tasks.

DICOM files are grouped by SeriesInstanceUID (wherever they lie under SRC); every NIfTI or
ITK file is a task of its own; everything else is recorded as skipped, with what it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from medgen.archive.manifest import FileRecord, fingerprint
from medgen.io.deid import pseudonym

# Bump when the conversion changes in a way that should redo every series.
CONVERTER_VERSION = "1"
IMAGE_KINDS = ("dicom", "nifti", "itk")


@dataclass(frozen=True)
class SeriesTask:
    """Everything a worker process needs to convert one series (picklable).

    ``files`` are absolute paths, ``rel_files`` the same files relative to SRC (POSIX).
    """

    key: str
    kind: str  # "dicom", "nifti" or "itk"
    files: tuple[str, ...]
    rel_files: tuple[str, ...]
    fingerprint: str
    src: str
    dst: str
    keep_phi: bool

    @property
    def label(self) -> str:
        """Where the series lives, relative to SRC, for progress and messages."""
        if self.kind != "dicom":
            return self.rel_files[0]
        folders = sorted({str(Path(p).parent.as_posix()) for p in self.rel_files})
        where = folders[0] if len(folders) == 1 else f"{folders[0]} (+{len(folders) - 1} folders)"
        return f"{where} [{len(self.files)} files]"


@dataclass(frozen=True)
class Plan:
    """The scan of SRC: every file as a manifest record, and the image series to consider."""

    records: tuple[FileRecord, ...]
    tasks: tuple[SeriesTask, ...]


def relative_posix(path: str | Path, root: Path) -> str:
    """``path`` relative to ``root`` with "/" separators (how the manifest stores paths)."""
    return Path(os.path.relpath(path, root)).as_posix()


def is_within(path: Path, folder: Path) -> bool:
    """True when ``path`` is ``folder`` or lies inside it (both absolute)."""
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def plan_ingest(src: Path, dst: Path, *, keep_phi: bool = False) -> Plan:
    """Scan ``src`` and group its files into tasks; files under ``dst`` are left out.

    Parameters
    ----------
    src, dst : Path
        Absolute, resolved input and output folders.
    keep_phi : bool
        Part of every fingerprint: switching it redoes each series (its sidecar changes).
    """
    from medgen.io.discover import scan_tree

    entries = [e for e in scan_tree(src) if not is_within(_absolute(e.path), dst)]
    return plan_from_entries(entries, src, dst, keep_phi=keep_phi)


def plan_from_entries(entries: Iterable, src: Path, dst: Path, *, keep_phi: bool = False) -> Plan:
    """Build the :class:`Plan` from ``scan_tree`` entries (see :func:`plan_ingest`)."""
    records: list[FileRecord] = []
    groups: dict[str, list[tuple[str, str, int, int]]] = {}
    kinds: dict[str, str] = {}
    for entry in entries:
        abs_path = _absolute(entry.path)
        rel = relative_posix(abs_path, src)
        if entry.kind == "dicom" and entry.series_uid:
            key = pseudonym(entry.series_uid)
        elif entry.kind in IMAGE_KINDS:
            # One task per file; the key hashes its place under SRC, not its name alone.
            key = pseudonym("file", rel)
        else:
            note = entry.note or ("DICOMDIR index" if entry.kind == "dicomdir" else "not an image")
            records.append(
                FileRecord(rel, entry.size, entry.mtime_ns, entry.kind, None, "skipped", note)
            )
            continue
        records.append(FileRecord(rel, entry.size, entry.mtime_ns, entry.kind, key))
        groups.setdefault(key, []).append((str(abs_path), rel, entry.size, entry.mtime_ns))
        kinds[key] = entry.kind
    salt = f"medgen-ingest/{CONVERTER_VERSION}|keep_phi={int(bool(keep_phi))}"
    tasks = []
    for key in sorted(groups, key=lambda k: min(f[1] for f in groups[k])):
        files = sorted(groups[key], key=lambda f: f[1])
        tasks.append(
            SeriesTask(
                key=key,
                kind=kinds[key],
                files=tuple(f[0] for f in files),
                rel_files=tuple(f[1] for f in files),
                fingerprint=fingerprint(((f[1], f[2], f[3]) for f in files), salt=salt),
                src=str(src),
                dst=str(dst),
                keep_phi=bool(keep_phi),
            )
        )
    return Plan(tuple(records), tuple(tasks))


def _absolute(path: str | Path) -> Path:
    # realpath, as the DICOM reader reports its source files, so the two can be matched.
    return Path(os.path.realpath(path))
