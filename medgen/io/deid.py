"""Pseudonymous, file-system-safe output names and the list of patient-identifying fields.

Output volumes are named from a short hash of the DICOM UIDs instead of anything a person
could be recognised by::

    <key>_s<SeriesNumber>_<SeriesDescription>[_<part>].nii.gz

The key is stable (same UIDs -> same key), so reruns overwrite rather than duplicate; the
description is left out unless patient data is kept on request (free text often names
people). Which metadata fields count as patient-identifying is decided in one place,
:data:`medgen.io.sidecar.PHI_KEYS`.

Folder and file names in an archive often carry patient names, IDs and dates, so messages,
logs and manifests name a source file by :func:`pseudonymous_path` (a keyed hash per path
component) and pass reasons through :func:`scrub_text`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

KEY_LENGTH = 12
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")


def pseudonym(*parts: str, salt: str = "", length: int = KEY_LENGTH) -> str:
    """A short, stable hexadecimal key derived from ``parts`` (e.g. Study/Series UIDs).

    Parameters
    ----------
    *parts : str
        Identifiers to hash, in order. At least one is required.
    salt : str
        Mixed into the hash; a site-specific salt stops anyone from re-deriving the key
        from a known UID.
    length : int
        Number of hex characters, 4 to 64.

    Returns
    -------
    str
        ``length`` lowercase hex characters of the SHA-256 of the parts.

    Examples
    --------
    >>> pseudonym("1.2.840.1", "1.2.840.1.2")
    '361c36472b11'
    >>> pseudonym("1.2.840.1", "1.2.840.1.2") == pseudonym("1.2.840.1", "1.2.840.1.2", salt="x")
    False
    """
    if not parts:
        raise ValueError("`parts` must hold at least one identifier, got none")
    if not 4 <= length <= 64:
        raise ValueError(f"`length` must be between 4 and 64, got {length}")
    digest = hashlib.sha256()
    digest.update(salt.encode("utf-8"))
    for part in parts:
        # A separator that cannot occur in UIDs keeps ("1.2", "3") apart from ("1.", "23").
        # surrogateescape: a file name that is not valid UTF-8 hashes as its raw bytes.
        digest.update(b"\x1f" + str(part).encode("utf-8", errors="surrogateescape"))
    return digest.hexdigest()[:length]


#: Name endings kept by :func:`pseudonymous_path` (they say what a file is, never who).
SAFE_SUFFIXES: tuple[str, ...] = (
    ".nii.gz", ".dcm", ".dicom", ".ima", ".nii", ".hdr", ".img", ".nrrd", ".nhdr", ".mha",
    ".mhd", ".raw", ".txt", ".json", ".xml", ".pdf", ".png", ".jpg", ".jpeg", ".zip", ".gz",
)
_SAFE_NAMES = ("DICOMDIR",)


def pseudonymous_path(rel: str, secret: str, length: int = KEY_LENGTH) -> str:
    """A relative path with every component replaced by a keyed hash of the path up to it.

    Files in one folder keep a common prefix and a known suffix (``.dcm``, ``.nii.gz``
    ...) is kept, so the shape of the tree stays readable; the names do not. Without
    ``secret`` nobody can test a guess (``Doe^Jane/...``) against a pseudonym; with it
    and the source folder, :func:`medgen.stages.ingest_names.locate` finds the file.

    Examples
    --------
    >>> pseudonymous_path("Doe^Jane/PHI12345_19700101/IM1.dcm", secret="k")
    '685078f39738/d2631f6509d2/0f4dab676e29.dcm'
    >>> pseudonymous_path("Doe^Jane/IM2.dcm", secret="k").split("/")[0]
    '685078f39738'
    >>> pseudonymous_path("Doe^Jane/IM2.dcm", secret="other").split("/")[0] != '685078f39738'
    True
    """
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    out = []
    for i, part in enumerate(parts):
        if part in _SAFE_NAMES:
            out.append(part)
            continue
        lower = part.lower()
        suffix = next((x for x in SAFE_SUFFIXES if lower.endswith(x) and lower != x), "")
        out.append(pseudonym("path", *parts[: i + 1], salt=secret, length=length) + suffix)
    return "/".join(out)


_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])/[^\s'\"),;]+")
_QUOTED = re.compile(r"'[^'\n]{3,}'|\"[^\"\n]{3,}\"")


def scrub_text(text: str) -> str:
    """A reason or warning with absolute paths and quoted values (3+ characters) hidden.

    Library messages quote the offending value (a UID, a date, a name) or the file's path;
    neither may reach a log in the de-identified mode. Short codes such as a VR stay.

    Examples
    --------
    >>> scrub_text("Invalid value for VR PN: 'DOE^JANE' in /pacs/Doe^Jane/IM1.dcm")
    "Invalid value for VR PN: '…' in <path>"
    >>> scrub_text("Unknown Value Representation 'ZZ' in tag (0008,0060)")
    "Unknown Value Representation 'ZZ' in tag (0008,0060)"
    """
    return _QUOTED.sub(lambda m: m.group(0)[0] + "…" + m.group(0)[0], _ABSOLUTE_PATH.sub("<path>", text))


def safe_name(text: Any, max_len: int = 48, empty: str = "") -> str:
    """``text`` reduced to ``[A-Za-z0-9.+-_]`` for use inside a file name.

    Accents are folded to ASCII, every other run of characters becomes one ``_``, leading
    and trailing ``_``/``.`` are dropped and the result is cut to ``max_len`` characters.

    Examples
    --------
    >>> safe_name("T1 MPRAGE / sag (3D)")
    'T1_MPRAGE_sag_3D'
    >>> safe_name("Tête-à-tête")
    'Tete-a-tete'
    >>> safe_name("../../etc", empty="unnamed")
    'etc'
    >>> safe_name("***", empty="unnamed")
    'unnamed'
    """
    if max_len < 1:
        raise ValueError(f"`max_len` must be >= 1, got {max_len}")
    folded = unicodedata.normalize("NFKD", "" if text is None else str(text))
    folded = folded.encode("ascii", "ignore").decode("ascii")
    cleaned = _UNSAFE.sub("_", folded).strip("_.")
    cleaned = cleaned[:max_len].rstrip("_.")
    return cleaned or empty


def output_stem(
    key: str,
    series_number: Any = None,
    description: Any = None,
    part: str | int | None = None,
) -> str:
    """The file name (without suffix) of one output volume.

    Pass ``description`` only when patient data may be kept: it is free text.

    Examples
    --------
    >>> output_stem("8ba8d6d7ba1b", 3, "T2 FLAIR ax")
    '8ba8d6d7ba1b_s3_T2_FLAIR_ax'
    >>> output_stem("8ba8d6d7ba1b", None, "", part=2)
    '8ba8d6d7ba1b_s0_2'
    """
    pieces = [safe_name(key, max_len=64, empty="series")]
    number = _series_number(series_number)
    pieces.append(f"s{number}")
    desc = safe_name(description)
    if desc:
        pieces.append(desc)
    if part is not None and str(part) != "":
        pieces.append(safe_name(part, max_len=16, empty="part"))
    return "_".join(pieces)


def _series_number(value: Any) -> int:
    """SeriesNumber as a non-negative int; 0 when absent or not a number."""
    try:
        number = int(float(str(value).strip()))
    except (TypeError, ValueError):
        return 0
    return max(number, 0)
