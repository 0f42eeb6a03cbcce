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
from medgen.io.dicom_limits import DEFAULT_MAX_IMAGE_MB

# Bump when the conversion changes in a way that should redo every series.
CONVERTER_VERSION = "2"
IMAGE_KINDS = ("dicom", "nifti", "itk")


@dataclass(frozen=True)
class SeriesTask:
    """Everything a worker process needs to convert one series (picklable).

    ``files`` are absolute paths, ``rel_files`` the same files relative to SRC (POSIX,
    printable: bytes that are not UTF-8 appear as ``\\xNN``). ``damaged`` pairs files of
    the series whose header is cut short with why (the reader refuses what they belong to);
    ``max_image_mb`` is the largest decoded image the reader may allocate.
    """

    key: str
    kind: str  # "dicom", "nifti" or "itk"
    files: tuple[str, ...]
    rel_files: tuple[str, ...]
    fingerprint: str
    src: str
    dst: str
    keep_phi: bool
    damaged: tuple[tuple[str, str], ...] = ()
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB

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
    """The scan of SRC: every file as a manifest record, the image series to consider, and
    the reader's warnings about headers as ``(relative path, text)``."""

    records: tuple[FileRecord, ...]
    tasks: tuple[SeriesTask, ...]
    warnings: tuple[tuple[str, str], ...] = ()


def printable(text: str) -> str:
    """``text`` with undecodable file-name bytes shown as ``\\xNN`` (safe to store and print).

    Examples
    --------
    >>> printable("ok/\\udcffname")
    'ok/\\\\xffname'
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", errors="backslashreplace")


def relative_posix(path: str | Path, root: Path) -> str:
    """``path`` relative to ``root`` with "/" separators (how the manifest stores paths)."""
    return printable(Path(os.path.relpath(path, root)).as_posix())


def is_within(path: Path, folder: Path) -> bool:
    """True when ``path`` is ``folder`` or lies inside it (both absolute)."""
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def plan_ingest(
    src: Path, dst: Path, *, keep_phi: bool = False, max_image_mb: float = DEFAULT_MAX_IMAGE_MB
) -> Plan:
    """Scan ``src`` and group its files into tasks; files under ``dst`` are left out.

    Parameters
    ----------
    src, dst : Path
        Absolute, resolved input and output folders.
    keep_phi : bool
        Part of every fingerprint: switching it redoes each series (its sidecar changes).
    max_image_mb : float
        Largest decoded image a reader may allocate (see :class:`SeriesTask`).
    """
    from medgen.io.discover import scan_tree

    entries = [e for e in scan_tree(src) if not is_within(_absolute(e.path), dst)]
    return plan_from_entries(entries, src, dst, keep_phi=keep_phi, max_image_mb=max_image_mb)


def plan_from_entries(
    entries: Iterable,
    src: Path,
    dst: Path,
    *,
    keep_phi: bool = False,
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB,
) -> Plan:
    """Build the :class:`Plan` from ``scan_tree`` entries (see :func:`plan_ingest`)."""
    entries = list(entries)
    series_of = _series_of_damaged(entries)
    records: list[FileRecord] = []
    groups: dict[str, list[tuple[str, str, int, int]]] = {}
    kinds: dict[str, str] = {}
    damaged: dict[str, list[tuple[str, str]]] = {}
    warned: list[tuple[str, str]] = []
    for entry in entries:
        # Links are read where they point, but named where they are (under SRC).
        link_path = os.path.abspath(entry.path)
        rel = relative_posix(link_path, src)
        warned.extend((rel, text) for text in getattr(entry, "warnings", ()))
        if entry.kind == "dicom" and entry.series_uid:
            key = pseudonym(series_of.get(id(entry), entry.series_uid))
            if getattr(entry, "damage", ""):
                damaged.setdefault(key, []).append((link_path, entry.damage))
        elif entry.kind in IMAGE_KINDS:
            # One task per file; the key hashes its place under SRC, not its name alone.
            key = pseudonym("file", rel)
        elif entry.kind == "broken":
            records.append(
                FileRecord(rel, entry.size, entry.mtime_ns, entry.kind, None, "quarantined",
                           entry.note or "unusable DICOM file")
            )
            continue
        else:
            note = entry.note or ("DICOMDIR index" if entry.kind == "dicomdir" else "not an image")
            records.append(
                FileRecord(rel, entry.size, entry.mtime_ns, entry.kind, None, "skipped", note)
            )
            continue
        records.append(FileRecord(rel, entry.size, entry.mtime_ns, entry.kind, key))
        groups.setdefault(key, []).append((link_path, rel, entry.size, entry.mtime_ns))
        kinds[key] = entry.kind
    salt = f"medgen-ingest/{CONVERTER_VERSION}|keep_phi={int(bool(keep_phi))}|max_mb={max_image_mb:g}"
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
                damaged=tuple(damaged.get(key, ())),
                max_image_mb=float(max_image_mb),
            )
        )
    return Plan(tuple(records), tuple(tasks), tuple(warned))


def _series_of_damaged(entries: list) -> dict[int, str]:
    """Series UID for each damaged image whose own UID was cut short.

    A copy cut inside SeriesInstanceUID leaves a prefix of the real UID: such a file
    belongs to the one intact series in its folder whose UID starts with that prefix.
    """
    intact: dict[str, set[str]] = {}
    for e in entries:
        if e.kind == "dicom" and e.series_uid and not getattr(e, "damage", ""):
            intact.setdefault(os.path.dirname(os.path.abspath(e.path)), set()).add(e.series_uid)
    out: dict[int, str] = {}
    for e in entries:
        if e.kind != "dicom" or not getattr(e, "damage", "") or not e.series_uid:
            continue
        here = intact.get(os.path.dirname(os.path.abspath(e.path)), set())
        if e.series_uid in here:
            continue
        matches = [uid for uid in here if uid.startswith(e.series_uid)]
        if len(matches) == 1:
            out[id(e)] = matches[0]
    return out


def _absolute(path: str | Path) -> Path:
    # realpath, as the DICOM reader reports its source files, so the two can be matched.
    return Path(os.path.realpath(path))
