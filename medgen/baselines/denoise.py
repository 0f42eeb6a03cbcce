"""Classical denoising baselines: Gaussian smoothing and 3D non-local means.

Benchmarks compare learned models with these, so :func:`tune_nlm` gives non-local means its
best case by choosing its filter strength against the clean reference.
All arrays are float32 volumes ``(I, J, K)`` in the image's own units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medgen.validate import (
    ParameterError,
    check_bool,
    check_int,
    check_non_negative,
    check_positive,
    check_same_shape,
    check_volume_array,
)

__all__ = ["NLMTuning", "estimate_noise_sigma", "gaussian_denoise", "nlm_denoise", "tune_nlm"]

#: Median of a Rayleigh distribution of scale sigma, divided by sigma: sqrt(2 ln 2).
_RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))
#: Median absolute deviation of a standard normal: Phi^-1(3/4).
_NORMAL_MAD = 0.6744897501960817


def gaussian_denoise(x: Any, sigma_vox: float | tuple[float, float, float]) -> np.ndarray:
    """Gaussian smoothing, ``sigma_vox`` in voxels (one value or one per axis; 0 leaves an axis alone).

    Examples
    --------
    >>> x = np.zeros((9, 9, 9), np.float32); x[4, 4, 4] = 1.0
    >>> y = gaussian_denoise(x, 1.0)
    >>> round(float(y.sum()), 4), bool(y[4, 4, 4] < 1)
    (1.0, True)
    """
    from scipy import ndimage

    x = check_volume_array("x", x)
    sigmas = (sigma_vox,) * 3 if np.isscalar(sigma_vox) else tuple(sigma_vox)
    if len(sigmas) != 3:
        raise ParameterError(f"`sigma_vox` must be one number or three, got {sigma_vox!r}")
    sigmas = tuple(check_non_negative("sigma_vox", s) for s in sigmas)
    return ndimage.gaussian_filter(x, sigmas, mode="nearest").astype(np.float32, copy=False)


def nlm_denoise(
    x: Any,
    noise_sigma: float,
    *,
    rician: bool = False,
    h_factor: float = 0.8,
    patch_size: int = 3,
    patch_distance: int = 3,
    rician_k: float = 2.0,
) -> np.ndarray:
    """3D non-local means (:func:`skimage.restoration.denoise_nl_means`, ``fast_mode=True``).

    Parameters
    ----------
    x : array_like, shape (I, J, K)
        Noisy volume.
    noise_sigma : float > 0
        Noise standard deviation in image units (per quadrature channel for Rician noise).
        Passed to skimage as ``sigma``, whose patch distances then discount the noise.
    rician : bool
        Magnitude MR data: after filtering, remove the Rician noise floor with
        ``sqrt(max(y^2 - rician_k * noise_sigma^2, 0))``.
    h_factor : float > 0
        Filter strength ``h = h_factor * noise_sigma`` (skimage suggests slightly below 1
        with ``sigma`` given and ``fast_mode``).
    patch_size, patch_distance : int
        Patch side and search radius, in voxels.
    rician_k : float >= 0
        Bias-correction factor. ``2`` is the standard correction (for a Rician magnitude
        ``M`` of true signal ``A``, ``E[M^2] = A^2 + 2 sigma^2``); it takes the background
        noise floor (``E[M]^2 = pi/2 sigma^2`` there) to 0 and slightly under-estimates
        low-SNR tissue, where averaging magnitudes leaves a smaller bias (``~sigma^2`` at
        high SNR).

    Returns
    -------
    ndarray, float32, shape (I, J, K)
    """
    from skimage.restoration import denoise_nl_means

    x = check_volume_array("x", x)
    noise_sigma = check_positive("noise_sigma", noise_sigma)
    rician = check_bool("rician", rician)
    h_factor = check_positive("h_factor", h_factor)
    patch_size = check_int("patch_size", patch_size, minimum=1)
    patch_distance = check_int("patch_distance", patch_distance, minimum=1)
    rician_k = check_non_negative("rician_k", rician_k)
    out = denoise_nl_means(
        x,
        patch_size=patch_size,
        patch_distance=patch_distance,
        h=h_factor * noise_sigma,
        sigma=noise_sigma,
        fast_mode=True,
        channel_axis=None,
        preserve_range=True,
    ).astype(np.float32)
    if rician:
        out = np.sqrt(np.maximum(out * out - np.float32(rician_k * noise_sigma**2), 0.0))
    return out


@dataclass
class NLMTuning:
    """Result of :func:`tune_nlm`.

    Attributes
    ----------
    h_factor : float
        The best filter strength (``h = h_factor * noise_sigma``).
    denoised : ndarray (I, J, K) float32
        The volume denoised with it.
    mse : dict of float to float
        Mean squared error against the clean reference for each tried ``h_factor``
        (inside ``mask`` when one was given).
    """

    h_factor: float
    denoised: np.ndarray
    mse: dict[float, float] = field(default_factory=dict)


def tune_nlm(
    noisy: Any,
    clean: Any,
    noise_sigma: float,
    grid: tuple[float, ...] = (0.4, 0.6, 0.8, 1.0, 1.2),
    *,
    mask: Any = None,
    **nlm_kwargs: Any,
) -> NLMTuning:
    """Non-local means with the ``h_factor`` from ``grid`` that best matches ``clean``.

    For benchmarks only (it needs the clean reference): it gives the baseline its best case.
    The choice minimises the mean squared error, hence maximises PSNR for any data range.

    Parameters
    ----------
    noisy, clean : array_like, shape (I, J, K)
    noise_sigma : float > 0
    grid : sequence of float > 0
        Candidate ``h_factor`` values.
    mask : array_like of bool, optional
        Score only these voxels.
    **nlm_kwargs
        Passed on to :func:`nlm_denoise` (``rician``, ``patch_size``, ...).
    """
    noisy = check_volume_array("noisy", noisy)
    clean = check_volume_array("clean", clean)
    check_same_shape("noisy", noisy, "clean", clean)
    if "h_factor" in nlm_kwargs:
        raise ParameterError(
            "tune_nlm: `h_factor` is what it tunes; give candidates in `grid` instead"
        )
    grid = tuple(check_positive("grid", h) for h in grid)
    if not grid:
        raise ParameterError("`grid` must hold at least one h_factor, got ()")
    select = np.ones(noisy.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    check_same_shape("mask", select, "noisy", noisy)
    best: NLMTuning | None = None
    scores: dict[float, float] = {}
    for h in grid:
        out = nlm_denoise(noisy, noise_sigma, h_factor=h, **nlm_kwargs)
        diff = (out - clean)[select].astype(np.float64)
        scores[h] = float(np.mean(diff * diff))
        if best is None or scores[h] < scores[best.h_factor]:
            best = NLMTuning(h, out)
    best.mse = scores
    return best


_FLAT_PERCENT = 25.0  # share of the flattest Haar cells used for the Gaussian estimate


def estimate_noise_sigma(x: Any, *, rician: bool = False, background: Any = None) -> float:
    """Estimate the noise standard deviation of a volume, in image units.

    * Gaussian noise (``rician=False``): the median absolute deviation of the finest-scale
      detail (the residual of a 2x2x2 Haar-like difference), ``sigma = MAD / 0.6745``, the
      robust estimator of Donoho & Johnstone that :func:`skimage.restoration.estimate_sigma`
      implements with wavelets (which would need PyWavelets, not a medgen dependency),
      taken over the flattest quarter of the 2x2x2 cells so that edges do not inflate it.
    * Rician noise (``rician=True``): background voxels (no signal) are Rayleigh distributed,
      ``sigma = median(background) / sqrt(2 ln 2)``. ``background`` is a boolean mask; by
      default the voxels outside :func:`medgen.metrics.masks.foreground_mask` dilated by
      3 voxels.

    Examples
    --------
    >>> noisy = np.random.default_rng(0).normal(0.0, 3.0, size=(32, 32, 32))
    >>> bool(abs(estimate_noise_sigma(noisy) - 3.0) < 0.15)
    True
    """
    x = check_volume_array("x", x, dtype=np.float64)
    rician = check_bool("rician", rician)
    if rician:
        if background is None:
            from medgen.metrics.masks import foreground_mask

            background = ~foreground_mask(x, dilate_vox=3)
        background = np.asarray(background, dtype=bool)
        check_same_shape("background", background, "x", x)
        if not background.any():
            raise ParameterError(
                "estimate_noise_sigma: the background mask is empty; pass `background`"
            )
        return float(np.median(x[background]) / _RAYLEIGH_MEDIAN)
    # Finest Haar detail along all three axes (a signed sum of the 8 corners of each 2x2x2
    # cell, scaled so that white noise of std sigma keeps std sigma) and the cell means.
    cells = [s // 2 * 2 for s in x.shape]
    if min(cells) < 2:
        raise ParameterError(
            f"estimate_noise_sigma needs at least 2 voxels per axis, got shape {x.shape}"
        )
    v = x[: cells[0], : cells[1], : cells[2]]
    detail = np.zeros([c // 2 for c in cells])
    means = np.zeros_like(detail)
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                corner = v[di::2, dj::2, dk::2]
                detail += (-1) ** (di + dj + dk) * corner
                means += corner
    detail /= math.sqrt(8.0)
    # Edges leak into the detail and inflate the MAD (by 4-14 % on head CT and MR). Keep the
    # flattest quarter of the cells, judged on their means: for white noise the Haar detail is
    # independent of the means, so the choice does not bias the estimate.
    if min(means.shape) >= 3:
        from scipy import ndimage

        smooth = ndimage.gaussian_filter(means, 1.0, mode="nearest")
        slope = sum(g * g for g in np.gradient(smooth))
        detail = detail[slope <= np.percentile(slope, _FLAT_PERCENT)]
    return float(np.median(np.abs(detail)) / _NORMAL_MAD)
