"""The file-name endings of the image formats medgen reads and writes, in one place.

It imports nothing of its own (no readers, no torch): naming code in any layer can use it.
"""

from __future__ import annotations

__all__ = ["IMAGE_SUFFIXES", "ITK_SUFFIXES", "NIFTI_SUFFIXES", "image_suffix"]

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
