"""medgen: medical image enhancement and synthesis.

The top level stays light (no torch, no MONAI) so that ``medgen ingest`` starts fast.
"""

from medgen.volume import Volume, VolumeMeta

__version__ = "0.1.0"
__all__ = ["Volume", "VolumeMeta", "load", "__version__"]


def load(path, **kwargs):
    """Read a NIfTI/NRRD/MHA file or a DICOM file/folder: see :func:`medgen.io.load`."""
    from medgen.io import load as _load

    return _load(path, **kwargs)
