"""Pseudonymous, file-system-safe output names and the list of patient-identifying fields.

Output volumes are named from a short hash of the DICOM UIDs instead of anything a person
could be recognised by::

    <key>_s<SeriesNumber>_<SeriesDescription>[_<part>].nii.gz

The key is stable (same UIDs -> same key), so reruns overwrite rather than duplicate.
Which metadata fields count as patient-identifying is decided in one place,
:data:`medgen.io.sidecar.PHI_KEYS`.
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
        digest.update(b"\x1f" + str(part).encode("utf-8"))
    return digest.hexdigest()[:length]


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
