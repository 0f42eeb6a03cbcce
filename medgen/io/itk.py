"""NRRD and MetaImage (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) through SimpleITK.

Two conventions differ from medgen's and are converted here:

* ITK's physical space is LPS (x to the patient's left, y posterior); medgen's is RAS, so
  the first two rows of the affine change sign.
* ``sitk.GetArrayFromImage`` returns axes in (K, J, I) order (z, y, x); medgen keeps
  (I, J, K), so the axes are reversed.

These formats have no rescale slope/intercept: a scaled volume is written as its physical
values (integers when they are whole numbers that fit, float32 otherwise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgen.errors import InputError
from medgen.io.atomic import replace_into, staging_dir
from medgen.io.suffixes import ITK_SUFFIXES
from medgen.volume import Volume, VolumeMeta

__all__ = ["ITK_SUFFIXES", "is_itk_path", "read_itk", "write_itk"]

_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)
_META_MODALITY = "medgen_modality"
_META_UNITS = "medgen_units"


def is_itk_path(path: str | Path) -> bool:
    """True for the file suffixes handled here.

    Examples
    --------
    >>> is_itk_path("a.NRRD"), is_itk_path("a.nii")
    (True, False)
    """
    return Path(path).suffix.lower() in ITK_SUFFIXES


def _affine_from_itk(image) -> np.ndarray:
    """4x4 voxel(i, j, k) -> RAS mm affine from an ITK image's LPS geometry."""
    dim = image.GetDimension()
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    n = min(dim, 3)
    lps = np.eye(4)
    lps[:n, :n] = direction[:n, :n] * spacing[:n]
    lps[:n, 3] = origin[:n]
    affine = np.eye(4)
    affine[:3, :] = _LPS @ lps[:3, :]
    return affine


def read_itk(path: str | Path) -> Volume:
    """Read an NRRD or MetaImage file into a :class:`~medgen.volume.Volume`.

    Returns
    -------
    Volume
        ``array`` shape (I, J, K) (2D images get K = 1), or (I, J, K, C) for multi-component
        pixels and (I, J, K, T) for 4D images; ``affine`` voxel -> RAS mm; slope 1.

    Raises
    ------
    InputError
        Missing or unreadable file, or more than 4 dimensions.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:  # SimpleITK raises RuntimeError for every I/O failure
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise InputError(path, f"cannot read with SimpleITK ({first})") from exc
    dim = image.GetDimension()
    if dim > 4 or (dim == 4 and image.GetNumberOfComponentsPerPixel() > 1):
        raise InputError(path, f"has {dim} dimensions with vector pixels; medgen takes 3D or 4D")
    array = sitk.GetArrayFromImage(image)  # (K, J, I) [+ (C,)] for 3D, (T, K, J, I) for 4D
    if image.GetNumberOfComponentsPerPixel() > 1:
        spatial = np.moveaxis(array, -1, 0)  # components first, then reverse everything
        array = np.transpose(spatial, tuple(range(spatial.ndim - 1, 0, -1)) + (0,))
    else:
        array = np.transpose(array)
    if dim == 2:
        array = array[:, :, np.newaxis, ...] if array.ndim == 3 else array[:, :, np.newaxis]
    affine = _affine_from_itk(image)
    keys = set(image.GetMetaDataKeys())
    meta = VolumeMeta(
        modality=image.GetMetaData(_META_MODALITY) if _META_MODALITY in keys else None,
        units=image.GetMetaData(_META_UNITS) if _META_UNITS in keys else "arbitrary",
        source_files=(str(path),),
    )
    return Volume(np.ascontiguousarray(array), affine, meta)


def _output_array(volume: Volume) -> np.ndarray:
    """Physical values in the narrowest faithful dtype (the formats carry no rescale)."""
    if not volume.is_scaled:
        array = volume.array
        return array.astype(np.uint8) if array.dtype == np.bool_ else array
    values = volume.values(np.float64)
    if np.all(np.isfinite(values)) and np.array_equal(values, np.round(values)):
        lo, hi = (values.min(), values.max()) if values.size else (0, 0)
        for dtype in (np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return values.astype(dtype)
    return values.astype(np.float32)


def write_itk(volume: Volume, path: str | Path, *, compress: bool = True) -> Path:
    """Write ``volume`` as ``.nrrd``/``.nhdr``/``.mha``/``.mhd``, atomically.

    Parameters
    ----------
    volume : Volume
        3D, or 4D written as a 3D image with T components per voxel.
    path : str or Path
        The suffix picks the format; detached headers (``.nhdr``, ``.mhd``) also write
        their data file beside it.
    compress : bool
        gzip the voxel data (ITK's choice of codec).

    Returns
    -------
    Path
        ``path``.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not is_itk_path(path):
        raise ValueError(f"`path` must end in one of {', '.join(ITK_SUFFIXES)}, got {path.name!r}")
    array = _output_array(volume)
    is_vector = array.ndim == 4
    # ITK wants (K, J, I) order; components stay last.
    itk_array = np.transpose(array, (2, 1, 0, 3) if is_vector else (2, 1, 0))
    image = sitk.GetImageFromArray(np.ascontiguousarray(itk_array), isVector=is_vector)
    lps = _LPS @ volume.affine[:3, :]
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing == 0):
        raise ValueError("`volume.affine` has a zero-length voxel axis")
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    if volume.meta.modality:
        image.SetMetaData(_META_MODALITY, str(volume.meta.modality))
    image.SetMetaData(_META_UNITS, str(volume.meta.units))
    # Detached formats name their data file after the header, so write under the final
    # names in a staging folder and move the files in (header last).
    with staging_dir(path.parent, path.name) as stage:
        sitk.WriteImage(image, str(stage / path.name), useCompression=compress)
        header = stage / path.name
        others = sorted(p for p in stage.iterdir() if p != header)
        replace_into(others + [header], path.parent)
    return path
