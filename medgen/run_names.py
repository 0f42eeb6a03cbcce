"""Names for MLflow runs that say what a run did and identify nobody.

:func:`run_name` joins a stage and its pieces; :func:`input_key` names a stage's input by its
pseudonymous series key or a file stem, hashing anything that looks like a person's name, a
date or an ID. Pure Python: usable where MLflow is not imported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medgen.io.suffixes import image_suffix

__all__ = ["input_key", "run_name"]

# What ingest names its outputs: "<12 hex key>[_s<SeriesNumber>][_<part>]" (no description).
_PSEUDONYM_STEM = re.compile(r"^[0-9a-f]{12}(_s\d+)?(_\d+)?$")
# A DICOM person-name separator, or six digits and more (dates, record numbers).
_PHI_LOOKING = re.compile(r"\^|\d{6,}")


def run_name(stage: str, *pieces: Any) -> str:
    """An MLflow run name saying what the run did: ``stage:piece:piece``.

    Each piece is reduced to file-name-safe characters (:func:`medgen.io.deid.safe_name`);
    empty pieces are dropped.

    Examples
    --------
    >>> run_name("enhance", "demo-denoise-mr", "adapt-500steps", "mr_t2_noisy")
    'enhance:demo-denoise-mr:adapt-500steps:mr_t2_noisy'
    >>> run_name("baseline", "nlm", None, "noisy scan")
    'baseline:nlm:noisy_scan'
    """
    from medgen.io.deid import safe_name

    names = [safe_name(p, max_len=64) for p in pieces if p is not None]
    return ":".join([stage, *(n for n in names if n)])


def input_key(path: str | Path | None, volume: Any = None) -> str:
    """A short name for a stage's input that identifies nobody, for run names.

    In order: the volume's pseudonymous ``meta.series_key`` (set by ingest); the stem of
    an image file (``mr_t2_noisy`` for ``/data/mr_t2_noisy.nii.gz``) unless it looks like
    it holds a person's name or a date/ID (a ``^``, six digits or more), when it becomes
    ``file-<hash>``; ``dicom-<hash>`` for a DICOM file or folder, whose names often carry
    patient names and IDs. Never a folder or an absolute path.

    Examples
    --------
    >>> input_key("/data/mr_t2_noisy.nii.gz")
    'mr_t2_noisy'
    >>> input_key("/data/419dd42e3c5e_s2.nii.gz")
    '419dd42e3c5e_s2'
    >>> input_key("/pacs/Doe^Jane_19700101.nii.gz").startswith("file-")
    True
    >>> input_key("/pacs/Doe^Jane/series3").startswith("dicom-")
    True
    """
    from medgen.io.deid import pseudonym, safe_name

    meta = getattr(volume, "meta", None)
    key = getattr(meta, "series_key", None)
    if key:
        return safe_name(key, max_len=64, empty="volume")
    if path is None:
        return "volume"
    path = Path(path)
    name = path.name
    suffix = image_suffix(name)
    if suffix is None or path.is_dir():
        return "dicom-" + pseudonym("input", str(path.expanduser().absolute()))
    stem = name[: -len(suffix)]
    if _PHI_LOOKING.search(stem) and not _PSEUDONYM_STEM.match(stem):
        return "file-" + pseudonym("input", stem)
    return safe_name(stem, max_len=64, empty="volume")
