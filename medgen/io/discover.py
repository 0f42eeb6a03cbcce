"""Find image files anywhere under a folder tree and say what each one is.

Real archives mix DICOM files with no extension, DICOMDIR indexes, reports and junk in
nested folders, so classification looks at file contents, never at names alone.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

FileKind = Literal["dicom", "dicomdir", "nifti", "itk", "other"]

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Header-only read: enough to group files into series without touching pixel data.
_NIFTI_HEADER_SIZES = {struct.pack(o + "i", n) for o in "<>" for n in (348, 540)}
_SCAN_TAGS = ("SOPClassUID", "SeriesInstanceUID", "Modality", "Rows", "NumberOfFrames")


@dataclass(frozen=True)
class FileEntry:
    """One file under the scanned root and what it is.

    ``note`` says, for a file that is not an image, what it is instead (for people).
    """

    path: Path
    kind: FileKind
    size: int
    mtime_ns: int
    series_uid: str | None = None
    note: str = ""


def scan_tree(root: str | Path) -> Iterator[FileEntry]:
    """Classify every regular file under ``root`` (or ``root`` itself), in a stable order.

    Hidden files and folders (names starting with ".") are passed over: they hold
    tool state such as medgen's own temporary files, never scans.
    """
    root = Path(root)
    if root.is_file():
        yield classify_file(root)
        return
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                yield _classify_or_note(path)


def _classify_or_note(path: Path) -> FileEntry:
    """One unreadable file (permissions, vanished mid-scan) must not end the whole scan."""
    try:
        return classify_file(path)
    except OSError as exc:
        return FileEntry(path=path, kind="other", size=0, mtime_ns=0,
                         note=f"unreadable file ({exc.strerror or type(exc).__name__})")


def classify_file(path: Path) -> FileEntry:
    """Say what one file is, reading at most its DICOM header (never pixel data)."""
    stat = path.stat()
    entry = dict(path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    lower = path.name.lower()
    if lower.endswith(NIFTI_SUFFIXES) and _looks_like_nifti(path):
        return FileEntry(kind="nifti", **entry)
    if lower.endswith(ITK_SUFFIXES):
        return FileEntry(kind="itk", **entry)
    return _classify_dicom(path, entry)


def _classify_dicom(path: Path, entry: dict) -> FileEntry:
    import pydicom
    from pydicom.errors import InvalidDicomError

    with open(path, "rb") as fh:
        head = fh.read(132)
    has_preamble = len(head) == 132 and head[128:132] == b"DICM"
    if not has_preamble and not _looks_like_bare_dicom(head):
        return FileEntry(kind="other", note=_describe_non_dicom(head), **entry)
    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, force=not has_preamble, specific_tags=list(_SCAN_TAGS)
        )
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        return FileEntry(kind="other", note=f"unreadable DICOM header ({_short(exc)})", **entry)
    meta_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    sop_class = str(ds.get("SOPClassUID", meta_class))
    if sop_class == DICOMDIR_SOP_CLASS or meta_class == DICOMDIR_SOP_CLASS:
        return FileEntry(kind="dicomdir", note="DICOMDIR index", **entry)
    if "Rows" not in ds:
        return FileEntry(kind="other", note=f"DICOM without an image ({_sop_name(sop_class)})", **entry)
    series_uid = str(ds.get("SeriesInstanceUID", "")) or None
    if series_uid is None:
        return FileEntry(kind="other", note="DICOM image without SeriesInstanceUID", **entry)
    return FileEntry(kind="dicom", series_uid=series_uid, **entry)


def _looks_like_nifti(path: Path) -> bool:
    """NIfTI-1 and -2 headers start with their own size, 348 or 540, in either byte order."""
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in _NIFTI_HEADER_SIZES


def _looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM file written without the 128-byte preamble starts with a group 0x0008/0x0002 tag."""
    return len(head) >= 4 and head[:2] in (b"\x08\x00", b"\x02\x00", b"\x00\x08")


def _describe_non_dicom(head: bytes) -> str:
    if not head:
        return "empty file"
    if head[:2] == b"\x1f\x8b":
        return "not DICOM (gzip data)"
    if head[:4] == b"%PDF":
        return "not DICOM (PDF)"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "not DICOM (PNG image)"
    if head[:2] == b"\xff\xd8":
        return "not DICOM (JPEG image)"
    try:
        head.decode("utf-8")
        return "not DICOM (text)"
    except UnicodeDecodeError:
        return "not DICOM (unknown binary)"


def _sop_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    return name or uid or "unknown SOP class"


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__
