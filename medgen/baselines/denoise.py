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


# -- noise estimation ---------------------------------------------------------------------------

_FLAT_PERCENT = 10.0  # share of the flattest 2x2x2 cells whose finest detail gives sigma
_STRUCTURE_CELLS = 3  # structure is judged over this many cells per axis around each cell
#: Rician: only cells whose mean is this many sigmas above zero count as tissue; there the
#: magnitude noise is close to Gaussian with the channel sigma (its std is ~2 % lower at 4).
_RICIAN_MIN_SNR = 4.0
_RICIAN_MIN_CELLS = 64  # fewer bright cells than this: no tissue estimate
#: Std of a Rayleigh variable of scale sigma, divided by sigma: sqrt(2 - pi/2).
_RAYLEIGH_STD = math.sqrt(2.0 - math.pi / 2.0)
#: Upper over lower quartile of a Rayleigh distribution, sqrt(ln 4 / ln(4/3)) = 2.20, and the
#: range accepted for a background found automatically.
_RAYLEIGH_QUARTILE_RATIO = math.sqrt(math.log(4.0) / math.log(4.0 / 3.0))
_BACKGROUND_QUARTILE_RATIO = (0.8 * _RAYLEIGH_QUARTILE_RATIO, 1.25 * _RAYLEIGH_QUARTILE_RATIO)
#: A background estimate is used only within this factor of the tissue estimate.
_BACKGROUND_AGREEMENT = 1.3
_MIN_BACKGROUND_VOXELS = 1000


def _haar_cells(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One level of the orthonormal 3D Haar transform, per 2x2x2 cell (odd last planes dropped).

    Returns the cell means, the finest diagonal detail ``HHH``, a structure energy (the
    mean square of the six other detail bands, averaged over ``_STRUCTURE_CELLS``^3 cells)
    and which cells vary at all. For white noise of std sigma every band has std sigma and
    all are independent, so choosing cells by their means or structure energy does not bias
    the ``HHH`` statistics.
    """
    from scipy import ndimage

    even = x[tuple(slice(0, n - n % 2) for n in x.shape)]
    bands = {"": even}
    for axis in range(3):  # split every band into low (sum) and high (difference) along axis
        split = {}
        first = tuple(slice(0, None, 2) if a == axis else slice(None) for a in range(3))
        second = tuple(slice(1, None, 2) if a == axis else slice(None) for a in range(3))
        for name, band in bands.items():
            a, b = band[first], band[second]
            split[name + "L"] = (a + b) / np.float32(math.sqrt(2.0))
            split[name + "H"] = (a - b) / np.float32(math.sqrt(2.0))
        bands = split
    means = bands.pop("LLL") / np.float32(math.sqrt(8.0))
    hhh = bands.pop("HHH")
    # Edges and texture show most in the first- and second-order bands (a plane edge along
    # an axis leaves HHH untouched but not these), so they flag the cells to avoid.
    energy = sum(band * band for band in bands.values()) / np.float32(len(bands))
    # Cells of 8 equal voxels carry no noise: padding outside a CT's field of view, air
    # zeroed by masking. Counted as flat they would pull the estimate to 0.
    live = (energy > 0) | (hhh != 0)
    energy = ndimage.uniform_filter(energy, _STRUCTURE_CELLS, mode="nearest")
    return means, hhh, energy, live


def _flat_detail_sigma(hhh: np.ndarray, energy: np.ndarray, keep: np.ndarray) -> float:
    """``MAD / 0.6745`` of ``HHH`` over the flat cells among those in ``keep`` (0 if none).

    First the flattest ``_FLAT_PERCENT``: a share ranked by structure keeps anatomy out
    wherever at least that much of the scan is flat (a tenth suits folded cortex and thin
    scalp layers). Then, for precision, every cell whose structure energy is at most the mean
    that noise of that sigma alone gives: about half of the cells that hold only noise pass,
    cells with visible structure do not.
    """
    hhh, energy = hhh[keep], energy[keep]
    if hhh.size == 0:
        return 0.0
    flat = energy <= np.percentile(energy, _FLAT_PERCENT)
    sigma = float(np.median(np.abs(hhh[flat])) / _NORMAL_MAD)
    quiet = energy <= sigma * sigma
    if np.count_nonzero(quiet) > np.count_nonzero(flat):
        sigma = float(np.median(np.abs(hhh[quiet])) / _NORMAL_MAD)
    return sigma


def _rician_tissue_sigma(
    means: np.ndarray, hhh: np.ndarray, energy: np.ndarray, live: np.ndarray, start: float
) -> float | None:
    """Sigma from bright tissue only, where Rician noise is nearly Gaussian; None if too little.

    ``start`` may be low (about 0.65 sigma when the flattest cells are background, whose
    Rayleigh values vary less); a few rounds of "cells brighter than 4 sigma" settle it.
    """
    sigma = None
    threshold = start
    for _ in range(5):
        keep = live & (means >= _RICIAN_MIN_SNR * threshold)
        if np.count_nonzero(keep) < _RICIAN_MIN_CELLS:
            return sigma
        new = _flat_detail_sigma(hhh, energy, keep)
        if sigma is not None and abs(new - sigma) <= 0.01 * sigma:
            return new
        sigma = threshold = new
    return sigma


def _rayleigh_sigma(values: np.ndarray) -> tuple[float, float]:
    """Sigma of Rayleigh-distributed ``values`` from their median, and their quartile ratio."""
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    ratio = float(q3 / q1) if q1 > 0 else math.inf
    return float(median / _RAYLEIGH_MEDIAN), ratio


def estimate_noise_sigma(x: Any, *, rician: bool = False, background: Any = None) -> float:
    """Estimate the noise standard deviation of a volume, in image units.

    Works with or without air in the field of view (a crop inside the head has none).

    * Gaussian noise (``rician=False``): Donoho & Johnstone's robust estimator, the median
      absolute deviation of the finest diagonal Haar detail ``HHH`` of the 2x2x2 cells,
      ``sigma = MAD / 0.6745`` (what :func:`skimage.restoration.estimate_sigma` does with
      PyWavelets, not a medgen dependency), taken only over the flattest tenth of the cells
      (least energy in the other six Haar detail bands around them), so that edges, folds
      and texture do not inflate it.
    * Rician noise (``rician=True``), magnitude MR:

      - with ``background`` (a boolean mask of voxels without signal): they are Rayleigh
        distributed, ``sigma = median(background) / sqrt(2 ln 2)``;
      - otherwise the same Haar estimate over bright tissue only (cell mean above 4 sigma,
        where Rician noise is close to Gaussian). The background outside
        :func:`medgen.metrics.masks.foreground_mask` (dilated by 3 voxels) replaces it only
        when it looks like air: enough voxels, quartiles in a Rayleigh's ratio (2.2, which
        zeroed air fails) and an estimate within a factor 1.3 of the tissue one. In a crop
        without air the "background" that Otsu's threshold finds is dark tissue, which would
        give several times sigma.
      - with neither bright tissue nor air, the Haar estimate over the flattest cells divided
        by a Rayleigh's std (0.655 sigma): those cells are then mostly background.

    Examples
    --------
    >>> noisy = np.random.default_rng(0).normal(0.0, 3.0, size=(32, 32, 32))
    >>> bool(abs(estimate_noise_sigma(noisy) - 3.0) < 0.15)
    True
    """
    x = check_volume_array("x", x, dtype=np.float32)
    rician = check_bool("rician", rician)
    if rician and background is not None:
        background = np.asarray(background, dtype=bool)
        check_same_shape("background", background, "x", x)
        if not background.any():
            raise ParameterError(
                "estimate_noise_sigma: the background mask is empty; pass `background`"
            )
        return _rayleigh_sigma(x[background])[0]
    if min(x.shape) < 2:
        raise ParameterError(
            f"estimate_noise_sigma needs at least 2 voxels per axis, got shape {x.shape}"
        )
    means, hhh, energy, live = _haar_cells(x)
    flat = _flat_detail_sigma(hhh, energy, live)
    if not rician:
        return flat
    tissue = _rician_tissue_sigma(means, hhh, energy, live, flat)
    air = _automatic_background_sigma(x)
    if air is not None:
        sigma_air, ratio = air
        looks_rayleigh = _BACKGROUND_QUARTILE_RATIO[0] <= ratio <= _BACKGROUND_QUARTILE_RATIO[1]
        # Anatomy taken for air only raises the median; noise-free (zeroed) air fails the
        # quartile test, and a field of view that holds no air gives a "background" of dark
        # tissue, far above the tissue estimate.
        agrees = tissue is None or (
            tissue / _BACKGROUND_AGREEMENT <= sigma_air <= tissue * _BACKGROUND_AGREEMENT
        )
        if looks_rayleigh and agrees:
            return sigma_air
    if tissue is not None:
        return tissue
    # Nothing bright enough and no air: the flattest cells are then mostly background, whose
    # Rayleigh values have a std of 0.655 sigma.
    return flat / _RAYLEIGH_STD


def _automatic_background_sigma(x: np.ndarray) -> tuple[float, float] | None:
    """Rayleigh sigma and quartile ratio of the voxels outside the dilated foreground, or None."""
    from medgen.metrics.masks import foreground_mask

    try:
        outside = ~foreground_mask(x, dilate_vox=3)
    except ParameterError:  # a (nearly) constant volume has no foreground to find
        return None
    if np.count_nonzero(outside) < _MIN_BACKGROUND_VOXELS:
        return None
    return _rayleigh_sigma(x[outside])
