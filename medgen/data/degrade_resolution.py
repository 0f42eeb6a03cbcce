"""Resolution degradations: thick slices, isotropic downsampling, k-space truncation.

These change what a voxel means, and some change the grid: each reports the exact geometry of
its output (:meth:`output_geometry`), and a :class:`~medgen.volume.Volume` comes back with the
matching affine. Index conventions: arrays are ``(I, J, K)``; "thin" is the input grid along
the degraded axis and "thick" the output grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from medgen.data.degrade_base import Degradation, RandomDegradation
from medgen.validate import (
    ParameterError,
    check_axis,
    check_bool,
    check_fraction,
    check_in_interval,
    check_int,
    check_volume_array,
    literal_options,
    look_up_option,
)

__all__ = [
    "IsotropicDownsample",
    "KSpaceOutput",
    "KSpaceTruncation",
    "RandomIsotropicDownsample",
    "RandomKSpaceTruncation",
    "RandomThickSlices",
    "SliceProfile",
    "ThickSlices",
    "apply_along_axis_matrix",
    "slice_profile_matrix",
    "thick_slice_affine",
    "thick_slices",
    "thin_slice_affine",
]

SliceProfile = Literal["box", "gaussian"]
KSpaceOutput = Literal["zero_fill", "crop"]

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _index_map(factor: float, shift: float, axis: int) -> np.ndarray:
    """4x4 voxel map that scales index ``axis`` by ``factor`` and shifts it by ``shift``."""
    m = np.eye(4)
    m[axis, axis] = factor
    m[axis, 3] = shift
    return m


def thick_slice_affine(affine: Any, factor: int, axis: int = 2) -> np.ndarray:
    """Affine of the grid made by averaging groups of ``factor`` consecutive slices.

    Thick slice ``m`` is centred at the mean position of thin slices ``m*f .. m*f + f - 1``,
    i.e. at thin index ``m*f + (f - 1)/2``; so ``new = affine @ S`` where ``S`` scales index
    ``axis`` by ``f`` and shifts it by ``(f - 1)/2``.

    Parameters
    ----------
    affine : array_like, shape (4, 4)
        Voxel-to-world (mm) affine of the thin grid.
    factor : int
        Slices per thick slice.
    axis : int
        Index axis (0, 1 or 2) across which slices are merged.

    Returns
    -------
    ndarray, shape (4, 4), float64

    Examples
    --------
    >>> thick_slice_affine(np.eye(4), 3, axis=2)[:3, 2:]
    array([[0., 0.],
           [0., 0.],
           [3., 1.]])
    """
    factor = check_int("factor", factor, minimum=1)
    axis = check_axis("axis", axis)
    return np.asarray(affine, dtype=np.float64) @ _index_map(
        float(factor), (factor - 1) / 2.0, axis
    )


def thin_slice_affine(affine: Any, factor: int, axis: int = 2) -> np.ndarray:
    """Inverse of :func:`thick_slice_affine`: the thin grid a thick-slice grid came from.

    Examples
    --------
    >>> thick = thick_slice_affine(np.diag([1.0, 1.0, 2.0, 1.0]), 2)
    >>> bool(np.allclose(thin_slice_affine(thick, 2), np.diag([1.0, 1.0, 2.0, 1.0])))
    True
    """
    factor = check_int("factor", factor, minimum=1)
    axis = check_axis("axis", axis)
    return np.asarray(affine, dtype=np.float64) @ np.linalg.inv(
        _index_map(float(factor), (factor - 1) / 2.0, axis)
    )


def slice_profile_matrix(n_thin: int, factor: int, profile: SliceProfile = "box") -> np.ndarray:
    """The linear map from thin slices to thick slices, shape ``(n_thin // factor, n_thin)``.

    Row ``m`` holds the weights of thick slice ``m``, centred at thin index ``m*f + (f-1)/2``:

    * ``"box"``: ``1/f`` on thin slices ``m*f .. m*f + f - 1`` (the mean; trailing
      ``n_thin % f`` slices are dropped);
    * ``"gaussian"``: a Gaussian of full width at half maximum ``f`` thin slices around the same
      centre, cut to the volume and renormalised to sum to 1.

    Examples
    --------
    >>> slice_profile_matrix(5, 2)
    array([[0.5, 0.5, 0. , 0. , 0. ],
           [0. , 0. , 0.5, 0.5, 0. ]])
    """
    n_thin = check_int("n_thin", n_thin, minimum=1)
    factor = check_int("factor", factor, minimum=1)
    profile = look_up_option("profile", profile, literal_options(SliceProfile))
    n_thick = n_thin // factor
    if n_thick < 1:
        raise ParameterError(f"`factor` ({factor}) must not exceed the number of slices ({n_thin})")
    centres = np.arange(n_thick) * factor + (factor - 1) / 2.0
    thin = np.arange(n_thin)
    if profile == "box":
        weights = (np.abs(thin[None, :] - centres[:, None]) <= (factor - 1) / 2.0 + 1e-9).astype(
            np.float64
        )
    else:
        sigma = factor / _FWHM_PER_SIGMA
        weights = np.exp(-0.5 * ((thin[None, :] - centres[:, None]) / sigma) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


def apply_along_axis_matrix(matrix: np.ndarray, values: np.ndarray, axis: int) -> np.ndarray:
    """Apply a ``(n_out, n_in)`` matrix along ``axis`` of ``values`` (float32 result).

    Examples
    --------
    >>> apply_along_axis_matrix(np.array([[0.5, 0.5]]), np.ones((2, 3, 2)), axis=2).shape
    (2, 3, 1)
    """
    out = np.tensordot(
        np.asarray(matrix, dtype=np.float32),
        np.asarray(values, dtype=np.float32),
        axes=([1], [axis]),
    )
    return np.moveaxis(out, 0, axis)


@dataclass(frozen=True)
class ThickSlices(Degradation):
    """Thick slices: merge ``factor`` thin slices into one along ``axis`` (slice profile + decimation).

    Parameters
    ----------
    factor : int >= 1
        Thin slices per thick slice (new slice spacing = ``factor`` x old).
    axis : int
        Index axis across which slices are merged (2 = ``K``, the usual slice axis).
    profile : {"box", "gaussian"}
        Slice sensitivity profile (see :func:`slice_profile_matrix`).

    Notes
    -----
    Output shape along ``axis`` is ``n // factor`` (trailing slices dropped); the affine is
    :func:`thick_slice_affine`.

    Examples
    --------
    >>> x = np.arange(4, dtype=np.float32).reshape(1, 1, 4)
    >>> ThickSlices(factor=2)(x)
    array([[[0.5, 2.5]]], dtype=float32)
    """

    name: ClassVar[str] = "thick_slices"
    factor: int = 2
    axis: int = 2
    profile: SliceProfile = "box"

    def __post_init__(self) -> None:
        object.__setattr__(self, "factor", check_int("factor", self.factor, minimum=1))
        object.__setattr__(self, "axis", check_axis("axis", self.axis))
        object.__setattr__(
            self, "profile", look_up_option("profile", self.profile, literal_options(SliceProfile))
        )

    def apply(self, values: np.ndarray, spacing_mm: Any, rng: Any) -> np.ndarray:
        weights = slice_profile_matrix(values.shape[self.axis], self.factor, self.profile)
        return apply_along_axis_matrix(weights, values, self.axis)

    def output_geometry(self, shape: Any, affine: Any) -> tuple[tuple[int, int, int], np.ndarray]:
        new_shape = list(shape)
        new_shape[self.axis] = shape[self.axis] // self.factor
        return tuple(new_shape), thick_slice_affine(affine, self.factor, self.axis)


def thick_slices(
    values: Any,
    factor: int,
    *,
    axis: int = 2,
    profile: SliceProfile = "box",
    affine: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Low-resolution thick-slice volume and its affine (see :class:`ThickSlices`).

    Parameters
    ----------
    values : array_like, shape (I, J, K)
    factor, axis, profile
        As for :class:`ThickSlices`.
    affine : array_like (4, 4), optional
        Affine of ``values``; identity (index space) when omitted.

    Returns
    -------
    lowres : ndarray, float32, ``values.shape`` with ``n // factor`` along ``axis``
    affine : ndarray (4, 4) float64; the new spacing is ``spacing_from_affine(affine)``.

    Examples
    --------
    >>> low, aff = thick_slices(np.zeros((4, 4, 6)), 3, affine=np.diag([1.0, 1.0, 0.5, 1.0]))
    >>> low.shape, float(aff[2, 2]), float(aff[2, 3])
    ((4, 4, 2), 1.5, 0.5)
    """
    degradation = ThickSlices(factor=factor, axis=axis, profile=profile)
    values = check_volume_array("values", values)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    _, new_affine = degradation.output_geometry(values.shape, affine)
    return degradation(values), new_affine


@dataclass(frozen=True)
class IsotropicDownsample(Degradation):
    """Antialiased downsampling by the same ``factor`` along every axis.

    Uses :func:`skimage.transform.resize` (``anti_aliasing=True``: a Gaussian of
    ``sigma = (scale - 1)/2`` voxels first, then linear interpolation). The output has
    ``round(n / factor)`` voxels per axis (at least 1); voxel ``o`` samples input index
    ``(o + 0.5) * n / n_out - 0.5`` (voxel edges aligned), which is what the new affine encodes.

    Parameters
    ----------
    factor : float >= 1
        Downsampling factor (new spacing is about ``factor`` x old).
    """

    name: ClassVar[str] = "downsample"
    factor: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "factor",
            check_in_interval("factor", self.factor, 1.0, math.inf, high_inclusive=False),
        )

    def _out_shape(self, shape: Any) -> tuple[int, int, int]:
        return tuple(max(1, int(round(n / self.factor))) for n in shape)

    def apply(self, values: np.ndarray, spacing_mm: Any, rng: Any) -> np.ndarray:
        from skimage.transform import resize

        return resize(
            values,
            self._out_shape(values.shape),
            order=1,
            mode="edge",
            anti_aliasing=True,
            preserve_range=True,
        )

    def output_geometry(self, shape: Any, affine: Any) -> tuple[tuple[int, int, int], np.ndarray]:
        out_shape = self._out_shape(shape)
        index_map = np.eye(4)
        for a, (n_in, n_out) in enumerate(zip(shape, out_shape)):
            scale = n_in / n_out
            index_map[a, a] = scale
            index_map[a, 3] = (scale - 1.0) / 2.0
        return out_shape, np.asarray(affine, dtype=np.float64) @ index_map


@dataclass(frozen=True)
class KSpaceTruncation(Degradation):
    """Keep only the centre of k-space along ``axes``: MR's low acquisition matrix.

    The centred FFT of the volume keeps ``round(keep_fraction * n)`` frequencies around DC
    (DC at index ``n // 2`` after ``fftshift``) along each of ``axes``; then

    * ``"zero_fill"``: the rest is zeroed and the inverse FFT returns a blurred, ringing image on
      the input grid (what a scanner's zero-filled reconstruction does);
    * ``"crop"``: the inverse FFT of the cropped block returns the smaller matrix, scaled by
      ``m/n`` per axis to keep intensities; output voxel ``j`` lies at input index
      ``j * n / m`` (the DFT keeps index 0 fixed), which the new affine encodes.

    Parameters
    ----------
    keep_fraction : float in (0, 1]
    axes : tuple of int
        Axes of the volume to truncate.
    output : {"zero_fill", "crop"}
    magnitude : bool
        Return the magnitude (MR magnitude images); ``False`` returns the real part, which
        keeps the sign of e.g. CT values.
    """

    name: ClassVar[str] = "kspace"
    keep_fraction: float = 0.5
    axes: tuple[int, ...] = (0, 1, 2)
    output: KSpaceOutput = "zero_fill"
    magnitude: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "keep_fraction", check_fraction("keep_fraction", self.keep_fraction)
        )
        if isinstance(self.axes, (int, np.integer)):
            axes: tuple[int, ...] = (check_axis("axes", self.axes),)
        else:
            axes = tuple(sorted({check_axis("axes", a) for a in self.axes}))
        if not axes:
            raise ParameterError("`axes` must name at least one axis, got ()")
        object.__setattr__(self, "axes", axes)
        object.__setattr__(
            self, "output", look_up_option("output", self.output, literal_options(KSpaceOutput))
        )
        object.__setattr__(self, "magnitude", check_bool("magnitude", self.magnitude))

    def _kept(self, n: int) -> tuple[int, int]:
        m = max(1, int(round(self.keep_fraction * n)))
        start = n // 2 - m // 2
        return start, m

    def apply(self, values: np.ndarray, spacing_mm: Any, rng: Any) -> np.ndarray:
        spectrum = np.fft.fftshift(np.fft.fftn(values, axes=self.axes), axes=self.axes)
        index: list[slice] = [slice(None)] * 3
        for a in self.axes:
            start, m = self._kept(values.shape[a])
            index[a] = slice(start, start + m)
        if self.output == "zero_fill":
            kept = np.zeros_like(spectrum)
            kept[tuple(index)] = spectrum[tuple(index)]
            scale = 1.0
        else:
            kept = spectrum[tuple(index)]
            scale = float(np.prod([kept.shape[a] / values.shape[a] for a in self.axes]))
        image = np.fft.ifftn(np.fft.ifftshift(kept, axes=self.axes), axes=self.axes) * scale
        return np.abs(image) if self.magnitude else image.real

    def output_geometry(self, shape: Any, affine: Any) -> tuple[tuple[int, int, int], np.ndarray]:
        if self.output == "zero_fill":
            return tuple(shape), np.array(affine, dtype=np.float64)
        out_shape = list(shape)
        index_map = np.eye(4)
        for a in self.axes:
            _, m = self._kept(shape[a])
            out_shape[a] = m
            index_map[a, a] = shape[a] / m
        return tuple(out_shape), np.asarray(affine, dtype=np.float64) @ index_map


class RandomThickSlices(RandomDegradation):
    """:class:`ThickSlices` with ``factor`` drawn uniformly from the integers in ``factor_range``."""

    def __init__(
        self,
        factor_range: tuple[int, int] = (2, 4),
        *,
        axis: int = 2,
        profile: SliceProfile = "box",
        seed: int | None = None,
    ) -> None:
        factor_range = (
            tuple(factor_range)
            if not isinstance(factor_range, (int, np.integer))
            else (factor_range,) * 2
        )
        super().__init__(ThickSlices, seed=seed, factor=factor_range, axis=axis, profile=profile)


class RandomIsotropicDownsample(RandomDegradation):
    """:class:`IsotropicDownsample` with ``factor`` drawn uniformly from ``factor_range``."""

    def __init__(
        self, factor_range: tuple[float, float] = (1.5, 3.0), *, seed: int | None = None
    ) -> None:
        factor_range = (
            (factor_range, factor_range)
            if isinstance(factor_range, (int, float))
            else tuple(factor_range)
        )
        super().__init__(IsotropicDownsample, seed=seed, factor=factor_range)


class RandomKSpaceTruncation(RandomDegradation):
    """:class:`KSpaceTruncation` with ``keep_fraction`` drawn uniformly from ``keep_range``."""

    def __init__(
        self,
        keep_range: tuple[float, float] = (0.3, 0.7),
        *,
        axes: tuple[int, ...] = (0, 1, 2),
        output: KSpaceOutput = "zero_fill",
        magnitude: bool = True,
        seed: int | None = None,
    ) -> None:
        keep_range = (
            (keep_range, keep_range) if isinstance(keep_range, (int, float)) else tuple(keep_range)
        )
        super().__init__(
            KSpaceTruncation,
            seed=seed,
            keep_fraction=keep_range,
            axes=tuple(axes),
            output=output,
            magnitude=magnitude,
        )
