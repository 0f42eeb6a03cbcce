"""Foreground (body or head) masks, for metrics restricted to anatomy."""

from __future__ import annotations

from typing import Any

import numpy as np

from medgen.validate import (
    ParameterError,
    check_axis,
    check_in_interval,
    check_int,
    check_non_negative,
    check_volume_array,
)

__all__ = ["CT_OTSU_WINDOW_HU", "foreground_mask"]


#: Window for Otsu's histogram on CT (HU): air (-1000) against soft tissue, bone clipped so
#: that it does not pull the threshold up; padding outside the field of view (-3024, -2048)
#: is clipped to air.
CT_OTSU_WINDOW_HU = (-1000.0, 1000.0)


def foreground_mask(
    values: Any,
    *,
    units: str | None = None,
    smooth_sigma_vox: float = 1.0,
    threshold: float | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    fill_axis: int | None = 2,
    dilate_vox: int = 1,
) -> np.ndarray:
    """Boolean mask of the body (or head) in a CT or MR volume.

    Steps: Gaussian smoothing (``smooth_sigma_vox``); a threshold (Otsu's, from
    :func:`skimage.filters.threshold_otsu`, on the smoothed values clipped to
    :data:`CT_OTSU_WINDOW_HU` for CT in HU, otherwise to the ``percentiles``, so that
    padding far below air or bright metal does not pull it);
    the largest 6-connected component; holes filled in 3D, then slice by slice across
    ``fill_axis`` (closes cavities such as sinuses that open to the outside only through
    other slices); finally a dilation by ``dilate_vox`` voxels (6-connected steps).

    Parameters
    ----------
    values : array_like, shape (I, J, K), or Volume
        Physical values: HU for CT (air -1000), magnitude for MR. A
        :class:`~medgen.volume.Volume` gives its ``values()`` and its ``meta.units``.
    units : str, optional
        ``"HU"`` selects the CT window for Otsu's histogram (needed when the volume holds
        padding far below -1000 HU). Default: the Volume's units, else none.
    smooth_sigma_vox : float >= 0
        Gaussian sigma in voxels before thresholding (0: none).
    threshold : float, optional
        Use this threshold (in the units of ``values``) instead of Otsu's.
    percentiles : (low, high)
        Clip range for Otsu's histogram, in percent.
    fill_axis : int or None
        Axis across which holes are also filled slice by slice (``None``: 3D filling only).
    dilate_vox : int >= 0
        Dilation steps at the end.

    Returns
    -------
    ndarray of bool, shape (I, J, K)

    Examples
    --------
    >>> ii, jj, kk = np.mgrid[:24, :24, :24]
    >>> ball = (ii - 12) ** 2 + (jj - 12) ** 2 + (kk - 12) ** 2 < 8 ** 2
    >>> ct = np.where(ball, 40.0, -1000.0)
    >>> ct[(ii - 12) ** 2 + (jj - 12) ** 2 + (kk - 12) ** 2 < 3 ** 2] = -1000.0  # air inside
    >>> mask = foreground_mask(ct, dilate_vox=0)
    >>> bool(np.array_equal(mask, ball))  # the air pocket inside is filled
    True
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    from medgen.volume import Volume

    if isinstance(values, Volume):
        units = values.meta.units if units is None else units
        values = values.values(np.float32)
    values = check_volume_array("values", values)
    smooth_sigma_vox = check_non_negative("smooth_sigma_vox", smooth_sigma_vox)
    dilate_vox = check_int("dilate_vox", dilate_vox, minimum=0)
    low_pct, high_pct = (check_in_interval("percentiles", p, 0, 100) for p in percentiles)
    if not high_pct > low_pct:
        raise ParameterError(
            f"`percentiles` must be (low, high) with low < high, got {tuple(percentiles)}"
        )
    if fill_axis is not None:
        fill_axis = check_axis("fill_axis", fill_axis)

    smooth = (
        ndimage.gaussian_filter(values, smooth_sigma_vox, mode="nearest")
        if smooth_sigma_vox > 0
        else values
    )
    if threshold is None:
        if units is not None and units.upper() == "HU":
            low, high = CT_OTSU_WINDOW_HU
        else:
            low, high = np.percentile(smooth, [low_pct, high_pct])
        if not high > low:
            raise ParameterError(
                "foreground_mask: the volume is (nearly) constant; there is no foreground to find"
            )
        threshold = float(threshold_otsu(np.clip(smooth, low, high)))
    mask = smooth > threshold

    labels, n_labels = ndimage.label(mask)
    if n_labels == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))

    mask = ndimage.binary_fill_holes(mask)
    if fill_axis is not None:
        moved = np.moveaxis(mask, fill_axis, 0)  # a view: filling it fills ``mask``
        for s in range(moved.shape[0]):
            if moved[s].any():
                moved[s] = ndimage.binary_fill_holes(moved[s])
    if dilate_vox:
        mask = ndimage.binary_dilation(
            mask, ndimage.generate_binary_structure(3, 1), iterations=dilate_vox
        )
    return mask
