"""The file-name endings of the image formats medgen reads and writes, in one place.

Pure Python (no NumPy, no readers): naming code anywhere in the project can use it.
"""

from __future__ import annotations

__all__ = ["IMAGE_SUFFIXES", "ITK_SUFFIXES", "NIFTI_SUFFIXES", "image_suffix"]

#: Longest first, so that ``x.nii.gz`` ends in ``.nii.gz``, not ``.gz``-less ``.nii``.
NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


def image_suffix(name: str, also: tuple[str, ...] = ()) -> str | None:
    """The image suffix ``name`` ends with (any case), or None; ``also`` adds endings.

    Examples
    --------
    >>> image_suffix("Scan.NII.GZ"), image_suffix("x.mha"), image_suffix("x.hdr"), image_suffix("x.hdr", (".hdr",))
    ('.nii.gz', '.mha', None, '.hdr')
    """
    lower = name.lower()
    return next((s for s in (*IMAGE_SUFFIXES, *also) if lower.endswith(s)), None)
