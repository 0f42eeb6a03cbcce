"""Classical through-plane super-resolution baselines for thick-slice volumes.

The low-resolution input is what :class:`medgen.data.degrade.ThickSlices` makes: thick slice
``m`` is centred at thin index ``m*f + (f - 1)/2``. Upsampling must put the thick slices back
at those positions: thin index ``t`` sits at thick coordinate ``(t - (f - 1)/2) / f``
(:func:`thick_to_thin_coordinates`). A corner-aligned zoom (``scipy.ndimage.zoom``, kept here
as :func:`naive_zoom` for comparison) shifts the volume by up to half a thick slice.

Arrays are ``(I, J, K)`` float32; ``axis`` is the slice axis; the thin grid's affine is
:func:`medgen.data.degrade.thin_slice_affine` of the thick one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medgen.data.degrade_resolution import (
    SliceProfile,
    apply_along_axis_matrix,
    slice_profile_matrix,
    thin_slice_affine,
)
from medgen.validate import (
    ParameterError,
    check_axis,
    check_int,
    check_positive,
    check_volume_array,
)

__all__ = [
    "interpolation_matrix",
    "iterative_back_projection",
    "naive_zoom",
    "sitk_upsample_slices",
    "thick_to_thin_coordinates",
    "thin_slice_affine",
    "upsample_slices",
]


def thick_to_thin_coordinates(n_thin: int, factor: int) -> np.ndarray:
    """Thick-grid coordinate of each thin slice index: ``(t - (f - 1)/2) / f``.

    Examples
    --------
    >>> thick_to_thin_coordinates(4, 2)
    array([-0.25,  0.25,  0.75,  1.25])
    """
    n_thin = check_int("n_thin", n_thin, minimum=1)
    factor = check_int("factor", factor, minimum=1)
    return (np.arange(n_thin) - (factor - 1) / 2.0) / factor


def _check_order(order: Any) -> int:
    order = check_int("order", order)
    if order not in (1, 3):
        raise ParameterError(f"`order` must be 1 (trilinear) or 3 (cubic B-spline), got {order}")
    return order


def interpolation_matrix(
    n_thick: int, factor: int, *, order: int = 3, n_thin: int | None = None
) -> np.ndarray:
    """The linear map from thick to thin slices, shape ``(n_thin, n_thick)``.

    Column ``m`` is :func:`scipy.ndimage.map_coordinates` (``order`` 1 or 3, spline prefilter
    for 3, ``mode="nearest"``) of the unit vector ``e_m`` at :func:`thick_to_thin_coordinates`.
    Interpolating along one axis is separable and linear, so this matrix applied along the axis
    equals ``map_coordinates`` on the whole volume, without its ``(3, I, J, K)`` coordinate array.

    Examples
    --------
    >>> interpolation_matrix(2, 2, order=1)
    array([[1.  , 0.  ],
           [0.75, 0.25],
           [0.25, 0.75],
           [0.  , 1.  ]])
    """
    from scipy import ndimage

    n_thick = check_int("n_thick", n_thick, minimum=1)
    factor = check_int("factor", factor, minimum=1)
    order = _check_order(order)
    n_thin = n_thick * factor if n_thin is None else check_int("n_thin", n_thin, minimum=1)
    coords = thick_to_thin_coordinates(n_thin, factor)[None, :]
    eye = np.eye(n_thick)
    columns = [
        ndimage.map_coordinates(eye[m], coords, order=order, mode="nearest", prefilter=order > 1)
        for m in range(n_thick)
    ]
    return np.stack(columns, axis=1)


def upsample_slices(
    lowres: Any, factor: int, *, axis: int = 2, order: int = 3, n_thin: int | None = None
) -> np.ndarray:
    """Interpolate a thick-slice volume back onto the thin grid, slices at their true positions.

    Parameters
    ----------
    lowres : array_like, shape (I, J, K)
    factor : int
        Thin slices per thick slice.
    axis : int
        Slice axis.
    order : {1, 3}
        1: linear (trilinear on the grid), 3: cubic B-spline with prefilter.
    n_thin : int, optional
        Number of thin slices (default ``factor * n_thick``; more restores slices that
        :class:`ThickSlices` dropped at the end, extrapolated as the nearest).

    Returns
    -------
    ndarray, float32, ``lowres.shape`` with ``n_thin`` along ``axis``.

    Examples
    --------
    >>> upsample_slices(np.array([[[0.0, 2.0]]]), 2, order=1)
    array([[[0. , 0.5, 1.5, 2. ]]], dtype=float32)
    """
    lowres = check_volume_array("lowres", lowres)
    axis = check_axis("axis", axis)
    matrix = interpolation_matrix(lowres.shape[axis], factor, order=order, n_thin=n_thin)
    return apply_along_axis_matrix(matrix, lowres, axis)


def naive_zoom(lowres: Any, factor: int, *, axis: int = 2, order: int = 3) -> np.ndarray:
    """``scipy.ndimage.zoom`` along ``axis``: corner-aligned, so slices land misplaced.

    Kept as a negative control for benchmarks and tests: it maps the first and last thick
    slices onto the first and last thin slices, which is not where they were acquired.
    """
    from scipy import ndimage

    lowres = check_volume_array("lowres", lowres)
    axis = check_axis("axis", axis)
    factor = check_int("factor", factor, minimum=1)
    zoom = [1.0, 1.0, 1.0]
    zoom[axis] = float(factor)
    return ndimage.zoom(lowres, zoom, order=_check_order(order), mode="nearest").astype(np.float32)


def iterative_back_projection(
    lowres: Any,
    factor: int,
    axis: int = 2,
    n_iter: int = 10,
    step: float = 1.0,
    *,
    profile: SliceProfile = "box",
    order: int = 3,
    n_thin: int | None = None,
) -> np.ndarray:
    """Iterative back-projection (Irani & Peleg 1991) along the slice axis.

    Starting from the cubic B-spline upsampling ``x0 = U y``, repeat
    ``x <- x + step * U (y - A x)``, where ``A`` is the thick-slice degradation
    (:func:`medgen.data.degrade.slice_profile_matrix`, ``profile``) and ``U`` the grid-aligned
    interpolation (:func:`interpolation_matrix`, ``order``), so that re-degrading the estimate
    reproduces the input. Every step is linear along one axis, so the iterations are composed
    on the small ``(n_thin, n_thick)`` matrix and applied to the volume once.

    Parameters
    ----------
    lowres : array_like, shape (I, J, K)
    factor : int
    axis : int
    n_iter : int >= 0
        Number of back-projection steps (0: plain interpolation).
    step : float > 0
        Step size; 1 converges for the box and Gaussian profiles with ``order`` 3.
    profile : {"box", "gaussian"}
        The slice profile assumed for the degradation.
    order : {1, 3}
    n_thin : int, optional
        Must satisfy ``n_thin // factor == n_thick``.

    Returns
    -------
    ndarray, float32, ``lowres.shape`` with ``n_thin`` along ``axis``.

    Examples
    --------
    >>> from medgen.data.degrade import ThickSlices
    >>> low = np.random.default_rng(0).normal(size=(2, 2, 6)).astype(np.float32)
    >>> high = iterative_back_projection(low, 2, n_iter=50)
    >>> float(np.abs(ThickSlices(factor=2)(high) - low).max()) < 1e-3
    True
    """
    lowres = check_volume_array("lowres", lowres)
    axis = check_axis("axis", axis)
    factor = check_int("factor", factor, minimum=1)
    n_iter = check_int("n_iter", n_iter, minimum=0)
    step = check_positive("step", step)
    n_thick = lowres.shape[axis]
    n_thin = n_thick * factor if n_thin is None else check_int("n_thin", n_thin, minimum=1)
    if n_thin // factor != n_thick:
        raise ParameterError(
            f"`n_thin` ({n_thin}) does not fit {n_thick} thick slices of {factor} (need n_thin // factor == {n_thick})"
        )
    degrade = slice_profile_matrix(n_thin, factor, profile)  # (n_thick, n_thin)
    upsample = interpolation_matrix(
        n_thick, factor, order=order, n_thin=n_thin
    )  # (n_thin, n_thick)
    estimate = upsample.copy()
    identity = np.eye(n_thick)
    for _ in range(n_iter):
        estimate = estimate + step * upsample @ (identity - degrade @ estimate)
    return apply_along_axis_matrix(estimate, lowres, axis)


def sitk_upsample_slices(
    lowres: Any, factor: int, *, axis: int = 2, n_thin: int | None = None
) -> np.ndarray:
    """Cubic B-spline upsampling with SimpleITK's ``Resample``, origin placed correctly.

    The thick volume is given spacing ``factor`` and origin ``(factor - 1)/2`` along ``axis``
    (in thin-slice units), and resampled onto the thin grid (spacing 1, origin 0) with
    ``sitkBSpline``; points past the last thick slice take the nearest value. This is the
    ITK route to the same result as :func:`upsample_slices` with ``order=3`` (ITK's boundary
    handling differs in the outermost slices).

    Returns
    -------
    ndarray, float32, ``lowres.shape`` with ``n_thin`` along ``axis``.
    """
    import SimpleITK as sitk

    lowres = check_volume_array("lowres", lowres)
    axis = check_axis("axis", axis)
    factor = check_int("factor", factor, minimum=1)
    n_thin = (
        lowres.shape[axis] * factor if n_thin is None else check_int("n_thin", n_thin, minimum=1)
    )
    dim = 2 - axis  # GetImageFromArray reads numpy axes (0, 1, 2) as ITK (z, y, x)
    image = sitk.GetImageFromArray(lowres)
    spacing, origin = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]
    spacing[dim], origin[dim] = float(factor), (factor - 1) / 2.0
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    size = list(image.GetSize())
    size[dim] = n_thin
    out = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkBSpline,
        [0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0],
        image.GetDirection(),
        0.0,
        sitk.sitkFloat32,
        True,  # useNearestNeighborExtrapolator: beyond the last slice, repeat it
    )
    return sitk.GetArrayFromImage(out).astype(np.float32, copy=False)
