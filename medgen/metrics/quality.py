"""Full-reference image quality: PSNR, SSIM, MS-SSIM and NRMSE for 3D volumes.

All functions take a test volume ``x`` and a reference ``ref`` of the same shape ``(I, J, K)``
in the same physical units (HU, or arbitrary MR units). ``data_range`` (the span of values the
metric is relative to, in those units: e.g. 2000 for CT windowed to [-1000, 1000] HU, or
``ref.max() - ref.min()``) must always be given: a default guessed from the data would make
numbers from different volumes incomparable. An optional boolean ``mask`` of the same shape
restricts PSNR/NRMSE to its voxels and SSIM to the mean of the SSIM map inside it.

Only numpy and scikit-image are imported, except by :func:`ms_ssim` (MONAI, lazily).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from medgen.validate import (
    ParameterError,
    check_positive,
    check_same_shape,
    check_volume_array,
    literal_options,
    look_up_option,
)

__all__ = [
    "MS_SSIM_WEIGHTS",
    "NrmseNormalization",
    "ms_ssim",
    "ms_ssim_scales",
    "nrmse",
    "psnr",
    "quality_report",
    "ssim",
]

NrmseNormalization = Literal["euclidean", "min-max", "mean"]

#: Scale weights of MS-SSIM, finest first (Wang, Simoncelli & Bovik 2003, Table/Eq. 7).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

_SSIM_SIGMA = 1.5
_MS_SSIM_KERNEL = 7  # Gaussian window of sigma 1.5 cut at +-2 sigma: small enough for 32^3


def _pair(x: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
    x = check_volume_array("x", x, dtype=np.float64)
    ref = check_volume_array("ref", ref, dtype=np.float64)
    check_same_shape("x", x, "ref", ref)
    return x, ref


def _mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ParameterError(f"`mask` must have the volume's shape {shape}, got {mask.shape}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ParameterError("`mask` must select at least one voxel, got an empty mask")
    return mask


def psnr(x: Any, ref: Any, data_range: float, mask: Any = None) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / MSE)``.

    Parameters
    ----------
    x, ref : array_like, shape (I, J, K)
        Test and reference volumes, same units.
    data_range : float > 0
        Peak-to-peak range in those units.
    mask : array_like of bool, shape (I, J, K), optional
        Voxels over which the MSE is taken.

    Returns
    -------
    float
        ``inf`` when ``x`` equals ``ref`` (on the mask).

    Examples
    --------
    >>> ref = np.zeros((4, 4, 4))
    >>> psnr(ref + 1.0, ref, data_range=10.0)  # MSE 1 on a range of 10 -> 20 dB
    20.0
    >>> psnr(ref, ref, data_range=10.0)
    inf
    """
    # Written out rather than skimage's peak_signal_noise_ratio: that has no mask and warns on 0.
    x, ref = _pair(x, ref)
    data_range = check_positive("data_range", data_range)
    mask = _mask(mask, x.shape)
    diff = x - ref if mask is None else (x - ref)[mask]
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        return math.inf
    return float(10.0 * math.log10(data_range * data_range / mse))


def ssim(x: Any, ref: Any, data_range: float, mask: Any = None) -> float:
    """Structural similarity in 3D with a Gaussian window (sigma 1.5 voxels).

    Computed by :func:`skimage.metrics.structural_similarity` (``gaussian_weights=True``,
    ``sigma=1.5``, population covariances, ``K1=0.01``, ``K2=0.03``), which averages the SSIM
    map away from a border of 5 voxels (half its 11-voxel window). With ``mask`` the map is
    averaged over the mask inside the same border, so an all-true mask gives the unmasked value.

    Parameters
    ----------
    x, ref : array_like, shape (I, J, K)
        Each side at least 11 voxels.
    data_range : float > 0
    mask : array_like of bool, shape (I, J, K), optional

    Returns
    -------
    float in [-1, 1]; 1 for identical volumes.

    Examples
    --------
    >>> ref = np.random.default_rng(0).normal(size=(16, 16, 16))
    >>> ssim(ref, ref, data_range=8.0)
    1.0
    >>> bool(ssim(ref + 0.5 * np.random.default_rng(1).normal(size=ref.shape), ref, 8.0) < 0.9)
    True
    """
    from skimage.metrics import structural_similarity

    x, ref = _pair(x, ref)
    data_range = check_positive("data_range", data_range)
    mask = _mask(mask, x.shape)
    truncate = 3.5  # skimage's window: 2 * int(3.5 * 1.5 + 0.5) + 1 = 11 voxels
    win = 2 * int(truncate * _SSIM_SIGMA + 0.5) + 1
    if min(x.shape) < win:
        raise ParameterError(
            f"ssim needs at least {win} voxels along every axis, got shape {x.shape}"
        )
    mean, smap = structural_similarity(
        ref,
        x,
        data_range=data_range,
        gaussian_weights=True,
        sigma=_SSIM_SIGMA,
        use_sample_covariance=False,
        full=True,
    )
    if mask is None:
        return float(mean)
    pad = (win - 1) // 2
    interior = np.zeros(x.shape, dtype=bool)
    interior[pad:-pad, pad:-pad, pad:-pad] = True
    selected = mask & interior
    if not selected.any():
        raise ParameterError(f"`mask` has no voxel more than {pad} voxels away from the border")
    return float(smap[selected].mean())


def ms_ssim_scales(shape: tuple[int, ...], max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """How many MS-SSIM scales a volume of ``shape`` supports.

    The largest ``n <= max_scales`` for which the coarsest scale (the volume halved ``n - 1``
    times) still has at least 7 voxels per side, the size of the window. MONAI's size check
    divides by ``(n - 1)**2`` rather than ``2**(n - 1)`` (stricter for ``n = 4``), so ``n`` is
    lowered until that check passes too.

    Examples
    --------
    >>> [ms_ssim_scales((s, s, s)) for s in (7, 16, 32, 48, 64, 96, 112)]
    [1, 2, 3, 3, 4, 4, 5]
    """
    side = min(shape)
    if side < _MS_SSIM_KERNEL:
        raise ParameterError(
            f"ms_ssim needs at least {_MS_SSIM_KERNEL} voxels along every axis, got shape {tuple(shape)}"
        )
    n = 1
    for candidate in range(1, max_scales + 1):
        fits = side // 2 ** (candidate - 1) >= _MS_SSIM_KERNEL
        monai_fits = side // max(1, candidate - 1) ** 2 > _MS_SSIM_KERNEL - 1
        if fits and monai_fits:
            n = candidate
    return n


def ms_ssim(
    x: Any, ref: Any, data_range: float, *, max_scales: int = len(MS_SSIM_WEIGHTS)
) -> float:
    """Multi-scale SSIM in 3D, for volumes down to 7 voxels per side.

    A thin wrapper of MONAI's ``compute_ms_ssim`` (Gaussian window of 7 voxels, sigma 1.5;
    average pooling by 2 between scales), whose defaults (window 11, five scales) need at
    least 161 voxels per side. Here the number of scales is :func:`ms_ssim_scales` and the
    weights are the first ``n`` of :data:`MS_SSIM_WEIGHTS`, renormalised to sum to 1 (so one
    scale is plain SSIM with that window). Values from volumes with different numbers of
    scales are therefore not comparable; compare volumes of one size.

    Parameters
    ----------
    x, ref : array_like, shape (I, J, K)
    data_range : float > 0
    max_scales : int in [1, 5]

    Returns
    -------
    float in [0, 1]; 1 for identical volumes.

    Examples
    --------
    >>> ref = np.random.default_rng(0).normal(size=(32, 32, 32))
    >>> round(ms_ssim(ref, ref, data_range=8.0), 6)
    1.0
    """
    import torch
    from monai.metrics.regression import compute_ms_ssim

    x, ref = _pair(x, ref)
    data_range = check_positive("data_range", data_range)
    if isinstance(max_scales, bool) or not 1 <= int(max_scales) <= len(MS_SSIM_WEIGHTS):
        raise ParameterError(
            f"`max_scales` must be an integer in [1, {len(MS_SSIM_WEIGHTS)}], got {max_scales!r}"
        )
    n = ms_ssim_scales(x.shape, int(max_scales))
    weights = np.asarray(MS_SSIM_WEIGHTS[:n]) / sum(MS_SSIM_WEIGHTS[:n])
    value = compute_ms_ssim(
        torch.as_tensor(x, dtype=torch.float64)[None, None],
        torch.as_tensor(ref, dtype=torch.float64)[None, None],
        spatial_dims=3,
        data_range=data_range,
        kernel_type="gaussian",
        kernel_size=_MS_SSIM_KERNEL,
        kernel_sigma=_SSIM_SIGMA,
        weights=tuple(float(w) for w in weights),
    )
    return float(value.reshape(-1)[0])


def nrmse(
    x: Any, ref: Any, mask: Any = None, normalization: NrmseNormalization = "euclidean"
) -> float:
    """Normalised root-mean-square error, ``RMSE / norm(ref)`` (scikit-image's definition).

    Parameters
    ----------
    x, ref : array_like, shape (I, J, K)
    mask : array_like of bool, optional
        Voxels over which both the error and the normalisation are taken.
    normalization : {"euclidean", "min-max", "mean"}
        ``sqrt(mean(ref^2))``, ``ref.max() - ref.min()`` or ``ref.mean()``. For CT in HU prefer
        ``"min-max"``: the mean of a HU volume can be near 0.

    Examples
    --------
    >>> ref = np.full((4, 4, 4), 2.0)
    >>> round(nrmse(ref + 0.2, ref), 12)
    0.1
    """
    from skimage.metrics import normalized_root_mse

    x, ref = _pair(x, ref)
    normalization = look_up_option(
        "normalization", normalization, literal_options(NrmseNormalization)
    )
    mask = _mask(mask, x.shape)
    if mask is not None:
        x, ref = x[mask], ref[mask]
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(normalized_root_mse(ref, x, normalization=normalization))


def quality_report(x: Any, ref: Any, data_range: float, mask: Any = None) -> dict[str, float]:
    """All four metrics, on the whole volume and (with ``mask``) on the foreground.

    Returns
    -------
    dict
        ``psnr``, ``ssim``, ``ms_ssim``, ``nrmse`` (whole volume) and, when ``mask`` is given,
        ``psnr_fg``, ``ssim_fg``, ``nrmse_fg`` (MS-SSIM has no masked form). Keys are valid
        MLflow metric names.

    Examples
    --------
    >>> ref = np.random.default_rng(0).normal(size=(32, 32, 32))
    >>> sorted(quality_report(ref, ref, data_range=8.0, mask=ref > 0))
    ['ms_ssim', 'nrmse', 'nrmse_fg', 'psnr', 'psnr_fg', 'ssim', 'ssim_fg']
    """
    x, ref = _pair(x, ref)
    data_range = check_positive("data_range", data_range)
    report = {
        "psnr": psnr(x, ref, data_range),
        "ssim": ssim(x, ref, data_range),
        "ms_ssim": ms_ssim(x, ref, data_range),
        "nrmse": nrmse(x, ref),
    }
    if mask is not None:
        report["psnr_fg"] = psnr(x, ref, data_range, mask=mask)
        report["ssim_fg"] = ssim(x, ref, data_range, mask=mask)
        report["nrmse_fg"] = nrmse(x, ref, mask=mask)
    return report
