"""Ingest, step 1: scan SRC and turn its files into conversion tasks.

DICOM files are grouped by SeriesInstanceUID (wherever they lie under SRC); every NIfTI or
ITK file is a task of its own; everything else is recorded as skipped, with what it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from medgen.archive.manifest import FileRecord, fingerprint
from medgen.io.dicom_limits import DEFAULT_MAX_IMAGE_MB
from medgen.stages.ingest_names import SourceNames

# Bump when the conversion changes in a way that should redo every series.
CONVERTER_VERSION = "3"
IMAGE_KINDS = ("dicom", "nifti", "itk")


@dataclass(frozen=True)
class SeriesTask:
    """Everything a worker process needs to convert one series (picklable).

    ``files`` are absolute paths, ``rel_files`` the same files as they are named in
    messages and the manifest: relative to SRC (POSIX, printable: bytes that are not UTF-8
    appear as ``\\xNN``) with ``keep_phi``, else pseudonymous (see ``names``). ``damaged``
    pairs files of the series whose header is cut short with why (the reader refuses what
    they belong to); ``max_image_mb`` is the largest decoded image the reader may allocate.
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
    names: SourceNames | None = None  # None: real paths (tests building tasks by hand)
    real_name: str = ""  # the first file's real name, for a one-file image with keep_phi

    def name_of(self, path: str | Path) -> str:
        """How a file of this task (absolute path, maybe not one of ``files``) is named."""
        by_path, by_real = self._names_by_path
        name = by_path.get(str(path)) or by_real.get(os.path.realpath(path))
        if name is not None:
            return name
        rel = relative_posix(path, Path(self.src))
        return self.names.path(rel) if self.names is not None else rel

    @cached_property
    def _names_by_path(self) -> tuple[dict[str, str], dict[str, str]]:
        by_path = dict(zip(self.files, self.rel_files, strict=True))
        return by_path, {os.path.realpath(p): r for p, r in by_path.items()}

    def text(self, text: str) -> str:
        """A reason or warning as it may be shown and stored (scrubbed unless keep_phi)."""
        return self.names.text(text) if self.names is not None else text

    @property
    def label(self) -> str:
        """Where the series lives (its named folder), for progress and messages."""
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
    src: Path,
    dst: Path,
    *,
    keep_phi: bool = False,
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB,
    names: SourceNames | None = None,
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
    names : SourceNames, optional
        How files and series are named; by default those of ``dst`` (its key is made if
        missing).
    """
    from medgen.io.discover import scan_tree

    entries = [
        e for e in scan_tree(src, max_image_mb=max_image_mb)
        if not is_within(_absolute(e.path), dst)
    ]
    if names is None:
        names = SourceNames.for_output(dst, keep_phi=keep_phi)
    return plan_from_entries(
        entries, src, dst, keep_phi=keep_phi, max_image_mb=max_image_mb, names=names
    )


def plan_from_entries(
    entries: Iterable,
    src: Path,
    dst: Path,
    *,
    keep_phi: bool = False,
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB,
    names: SourceNames | None = None,
) -> Plan:
    """Build the :class:`Plan` from ``scan_tree`` entries (see :func:`plan_ingest`)."""
    if names is None:
        names = SourceNames.for_output(dst, keep_phi=keep_phi)
    entries = list(entries)
    series_of = _series_of_damaged(entries)
    records: list[FileRecord] = []
    groups: dict[str, list[tuple[str, str, int, int, str]]] = {}
    kinds: dict[str, str] = {}
    damaged: dict[str, list[tuple[str, str]]] = {}
    warned: list[tuple[str, str]] = []
    for entry in entries:
        # Links are read where they point, but named where they are (under SRC).
        link_path = os.path.abspath(entry.path)
        real_rel = relative_posix(link_path, src)
        rel = names.path(real_rel)  # how the file is named from here on
        warned.extend((rel, names.text(text)) for text in getattr(entry, "warnings", ()))
        if entry.kind == "dicom" and entry.series_uid:
            key = names.series_key(series_of.get(id(entry), entry.series_uid))
            if getattr(entry, "damage", ""):
                damaged.setdefault(key, []).append((link_path, names.text(entry.damage)))
        elif entry.kind in IMAGE_KINDS:
            # One task per file; the key hashes its place under SRC, not its name alone.
            key = names.file_key(real_rel)
        elif entry.kind == "broken":
            records.append(
                FileRecord(rel, entry.size, entry.mtime_ns, entry.kind, None, "quarantined",
                           names.text(entry.note or "unusable DICOM file"))
            )
            continue
        else:
            note = entry.note or ("DICOMDIR index" if entry.kind == "dicomdir" else "not an image")
            records.append(
                FileRecord(rel, entry.size, entry.mtime_ns, entry.kind, None, "skipped",
                           names.text(note))
            )
            continue
        records.append(FileRecord(rel, entry.size, entry.mtime_ns, entry.kind, key))
        groups.setdefault(key, []).append(
            (link_path, rel, entry.size, entry.mtime_ns, real_rel)
        )
        kinds[key] = entry.kind
    salt = f"medgen-ingest/{CONVERTER_VERSION}|keep_phi={int(bool(keep_phi))}|max_mb={max_image_mb:g}"
    tasks = []
    # In the order of the real paths, whatever the names shown.
    for key in sorted(groups, key=lambda k: min(f[4] for f in groups[k])):
        files = sorted(groups[key], key=lambda f: f[4])
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
                names=names,
                real_name=Path(files[0][4]).name if keep_phi else "",
            )
        )
    return Plan(tuple(records), tuple(tasks), tuple(warned))


def _series_of_damaged(entries: list) -> dict[int, str]:
    """Series UID for each damaged image whose own UID was cut short.

    A copy cut inside SeriesInstanceUID leaves a prefix of the real UID: such a file
    belongs to the one intact series in its folder whose UID starts with that prefix and
    whose StudyInstanceUID (stored before the cut) is the file's own.
    """
    intact: dict[str, dict[str, str | None]] = {}
    for e in entries:
        if e.kind == "dicom" and e.series_uid and not getattr(e, "damage", ""):
            folder = intact.setdefault(os.path.dirname(os.path.abspath(e.path)), {})
            folder[e.series_uid] = getattr(e, "study_uid", None)
    out: dict[int, str] = {}
    for e in entries:
        if e.kind != "dicom" or not getattr(e, "damage", "") or not e.series_uid:
            continue
        here = intact.get(os.path.dirname(os.path.abspath(e.path)), {})
        if e.series_uid in here:
            continue
        study = getattr(e, "study_uid", None)
        matches = [
            uid for uid, uid_study in here.items()
            if uid.startswith(e.series_uid) and (study is None or uid_study in (None, study))
        ]
        if len(matches) == 1:
            out[id(e)] = matches[0]
    return out


def _absolute(path: str | Path) -> Path:
    # realpath, as the DICOM reader reports its source files, so the two can be matched.
    return Path(os.path.realpath(path))
