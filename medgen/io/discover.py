"""Find image files anywhere under a folder tree and say what each one is.

Real archives mix DICOM files with no extension, DICOMDIR indexes, reports and junk in
nested folders, so classification looks at file contents, never at names alone.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medgen.io.dicom_limits import DEFAULT_MAX_IMAGE_MB, check_deflated_size
from medgen.io.suffixes import ITK_SUFFIXES
from medgen.io.suffixes import NIFTI_SUFFIXES as _NIFTI_NAMES

#: "broken": looks like DICOM but cannot be used (unreadable header, no series UID ...).
FileKind = Literal["dicom", "dicomdir", "nifti", "itk", "broken", "other"]

NIFTI_SUFFIXES = (*_NIFTI_NAMES, ".hdr")  # .hdr: NIfTI-1 pairs, told apart by content
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Header-only read: enough to group files into series without touching pixel data.
_NIFTI_HEADER_SIZES = {struct.pack(o + "i", n) for o in "<>" for n in (348, 540)}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SCAN_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows",
    "NumberOfFrames",
)


@dataclass(frozen=True)
class FileEntry:
    """One file under the scanned root and what it is.

    ``note`` says, for a file that is not an image, what it is instead (for people), or
    for a ``"broken"`` file what is wrong with it. ``damage`` says why an image file of a
    known series is corrupt (its series cannot be whole); ``warnings`` holds the reader's
    warnings about the header, one line each.
    """

    path: Path
    kind: FileKind
    size: int
    mtime_ns: int
    series_uid: str | None = None
    study_uid: str | None = None
    note: str = ""
    damage: str = ""
    warnings: tuple[str, ...] = ()


def scan_tree(
    root: str | Path, *, max_image_mb: float | None = DEFAULT_MAX_IMAGE_MB
) -> Iterator[FileEntry]:
    """Classify every regular file under ``root`` (or ``root`` itself), in a stable order.

    Hidden files and folders (names starting with ".") are passed over: they hold
    tool state such as medgen's own temporary files, never scans. Symbolic links are
    followed (archives kept by git-annex or DataLad are trees of links), each real folder
    is entered once, so a link back up the tree cannot loop, and a link to nothing is
    reported as such. A deflated file that inflates past ``max_image_mb`` (plus room for
    its header) is ``"broken"``: reading its header would inflate all of it.
    """
    max_bytes = None if max_image_mb is None else float(max_image_mb) * 2**20
    for path in walk_files(root):
        if path.is_file():
            yield _classify_or_note(path, max_bytes)
        else:
            yield FileEntry(path=path, kind="other", size=0, mtime_ns=0,
                            note="broken symbolic link")


def walk_files(root: str | Path) -> Iterator[Path]:
    """Every file (and link to nothing) under ``root`` as :func:`scan_tree` sees them,
    in the same order, without opening any: hidden names skipped, links followed once."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    seen_dirs: set[tuple[int, int]] = set()
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        here = _dir_id(folder)
        if here is None or here in seen_dirs:
            dirnames[:] = []  # a loop, or a folder already walked through another link
            continue
        seen_dirs.add(here)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if path.is_file() or path.is_symlink():
                yield path


def _dir_id(folder: str) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _classify_or_note(path: Path, max_bytes: float | None = None) -> FileEntry:
    """One unreadable file (permissions, vanished mid-scan) must not end the whole scan."""
    try:
        return classify_file(path, max_bytes)
    except OSError as exc:
        return FileEntry(path=path, kind="other", size=0, mtime_ns=0,
                         note=f"unreadable file ({exc.strerror or type(exc).__name__})")
    except Exception as exc:  # noqa: BLE001 - e.g. RecursionError in a damaged header
        return FileEntry(path=path, kind="broken", size=0, mtime_ns=0,
                         note=f"cannot classify file ({_short(exc)})")


def classify_file(path: Path, max_bytes: float | None = None) -> FileEntry:
    """Say what one file is, reading at most its DICOM header (never pixel data).

    ``max_bytes`` caps what a deflated file may inflate to (None: no cap).
    """
    stat = path.stat()
    entry = dict(path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    lower = path.name.lower()
    if lower.endswith(NIFTI_SUFFIXES) and _looks_like_nifti(path):
        return FileEntry(kind="nifti", **entry)
    if lower.endswith(ITK_SUFFIXES):
        return FileEntry(kind="itk", **entry)
    return _classify_dicom(path, entry, max_bytes)


def _classify_dicom(path: Path, entry: dict, max_bytes: float | None = None) -> FileEntry:
    """Header-only look at a possible DICOM file; any failure becomes the file's note.

    A file that looks like DICOM but cannot be used is ``"broken"``; an image header cut
    short (no Rows, or a SeriesInstanceUID that is not a valid UID: a truncated copy)
    stays ``"dicom"`` with a ``damage`` note, so that its series can be refused rather
    than converted one slice short.
    """
    from medgen.io.dicom_warnings import file_warnings

    with open(path, "rb") as fh:
        head = fh.read(132)
    has_preamble = len(head) == 132 and head[128:132] == b"DICM"
    if not has_preamble and not _looks_like_bare_dicom(head):
        return FileEntry(kind="other", note=_describe_non_dicom(head), **entry)
    bomb = check_deflated_size(path, max_bytes)
    if bomb:
        return _refused_bomb(path, bomb, entry)
    with file_warnings() as caught:
        try:
            ds = _read_scan_tags(path, force=not has_preamble)
            # pydicom converts values (and warns about bad ones) when they are first read.
            return _entry_from_header(ds, has_preamble, entry, caught)
        except Exception as exc:  # noqa: BLE001 - any reader failure is this file's problem
            return FileEntry(kind="broken", note=f"unreadable DICOM header ({_short(exc)})",
                             warnings=tuple(caught), **entry)


def _refused_bomb(path: Path, reason: str, entry: dict) -> FileEntry:
    """A deflate bomb is a corrupt image of its series when its first bytes name one."""
    from medgen.io.dicom_limits import deflated_header

    try:
        ds = deflated_header(path)
        series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip() if ds is not None else ""
    except Exception:  # noqa: BLE001 - a damaged head: the file is still refused
        series_uid = ""
    if series_uid and _UID.match(series_uid) and "Rows" in ds:
        return FileEntry(kind="dicom", series_uid=series_uid, damage=reason, **entry)
    return FileEntry(kind="broken", note=reason, **entry)


def _entry_from_header(ds, has_preamble: bool, entry: dict, caught: list[str]) -> FileEntry:
    meta_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    sop_class = str(ds.get("SOPClassUID", meta_class))
    series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip() or None
    has_rows = "Rows" in ds
    study_uid = str(ds.get("StudyInstanceUID", "") or "").strip() or None
    entry = dict(entry, warnings=tuple(caught), study_uid=study_uid)
    if sop_class == DICOMDIR_SOP_CLASS or meta_class == DICOMDIR_SOP_CLASS:
        return FileEntry(kind="dicomdir", note="DICOMDIR index", **entry)
    if sop_class and not _UID.match(sop_class.strip()):
        return FileEntry(kind="broken", note=f"invalid SOP Class UID {sop_class[:64]!r} "
                         "(file cut short or damaged?)", **entry)
    # The file meta, written before the dataset, still says "image" when the dataset's own
    # SOP Class UID was cut or damaged.
    is_image_class = any("Image Storage" in _sop_name(uid) for uid in (sop_class, meta_class))
    if not has_rows:
        if is_image_class:
            damage = "corrupt image: the header ends before the image description (file cut short?)"
            if series_uid:
                return FileEntry(kind="dicom", series_uid=series_uid, damage=damage, **entry)
            return FileEntry(kind="broken", note=damage, **entry)
        if not sop_class:
            if has_preamble or len(ds):
                return FileEntry(kind="broken", note="DICOM file without SOP class or image",
                                 **entry)
            return FileEntry(kind="other", note="not DICOM (unknown binary)", **entry)
        if "SOPInstanceUID" not in ds:  # required in every object: the header was cut
            return FileEntry(kind="broken", note="DICOM header ends before its SOP Instance UID "
                             "(file cut short or damaged?)", **entry)
        return FileEntry(kind="other", note=f"DICOM without an image ({_sop_name(sop_class)})", **entry)
    if series_uid is None:
        return FileEntry(kind="broken", note="DICOM image without SeriesInstanceUID", **entry)
    if not _UID.match(series_uid):
        damage = f"corrupt image: invalid SeriesInstanceUID {series_uid[:64]!r} (file cut short?)"
        return FileEntry(kind="dicom", series_uid=series_uid, damage=damage, **entry)
    return FileEntry(kind="dicom", series_uid=series_uid, **entry)


def _read_scan_tags(path: Path, *, force: bool):
    import pydicom

    return pydicom.dcmread(
        path, stop_before_pixels=True, force=force, specific_tags=list(_SCAN_TAGS)
    )


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


def _short(exc: BaseException) -> str:
    """``"ExceptionType: first line"`` (the type tells a zlib error from a bad VR)."""
    text = str(exc).strip().splitlines()
    first = text[0][:120] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
