"""Does an uncertainty map track the real error? Rank correlation and a calibration table.

A diffusion model's per-voxel standard deviation over samples (``medgen enhance`` writes it
as ``*_uncertainty.nii.gz``) is only a safeguard if voxels with a higher std have larger
errors. Two checks against a clean reference, which only a benchmark has:

* :func:`uncertainty_spearman` -- Spearman's rank correlation between the std and the
  absolute error ``|output - clean|`` (1: same ordering; about 0: the map says nothing);
* :func:`calibration_table` -- voxels binned by std (equal-count bins), and in each bin the
  mean std beside quantiles of the absolute error. For a calibrated Gaussian map the median
  absolute error is about ``0.674 std`` and the 90th percentile about ``1.645 std``, and the
  error quantiles grow from bin to bin.

Arrays are any shape (typically ``(I, J, K)``), in the image's units; an optional boolean
mask of the same shape selects the voxels (e.g. the foreground).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medgen.validate import ParameterError, check_int

__all__ = ["CalibrationBin", "calibration_table", "format_calibration", "uncertainty_spearman"]


def _pair(std: np.ndarray, error: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    std = np.asarray(std, dtype=np.float64)
    error = np.abs(np.asarray(error, dtype=np.float64))
    if std.shape != error.shape:
        raise ParameterError(f"`std` and `error` must have the same shape, got {std.shape} and {error.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != std.shape:
            raise ParameterError(f"`mask` must have the shape of `std` {std.shape}, got {mask.shape}")
        std, error = std[mask], error[mask]
    std, error = std.ravel(), error.ravel()
    keep = np.isfinite(std) & np.isfinite(error)
    return std[keep], error[keep]


def uncertainty_spearman(std: np.ndarray, error: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Spearman rank correlation between a per-voxel std and the absolute error.

    Parameters
    ----------
    std : ndarray
        Per-voxel standard deviation (the uncertainty map), image units.
    error : ndarray, same shape
        ``output - clean`` (its absolute value is taken), image units.
    mask : ndarray of bool, optional
        Voxels to use (all finite voxels by default).

    Returns
    -------
    float
        In ``[-1, 1]``; NaN when either input is constant over the voxels used (no ranking).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> s = rng.uniform(0.1, 2.0, 10_000)
    >>> uncertainty_spearman(s, -3.0 * s)          # error exactly proportional to the std
    1.0
    >>> abs(uncertainty_spearman(s, rng.normal(size=s.shape))) < 0.05   # independent
    True
    """
    from scipy.stats import spearmanr

    s, e = _pair(std, error, mask)
    if s.size < 2 or np.ptp(s) == 0 or np.ptp(e) == 0:
        return float("nan")
    return float(spearmanr(s, e).statistic)


@dataclass(frozen=True)
class CalibrationBin:
    """One std bin: its std range and mean, the voxel count and the error quantiles."""

    std_low: float
    std_high: float
    std_mean: float
    count: int
    error_quantiles: tuple[float, ...]


def calibration_table(
    std: np.ndarray,
    error: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    n_bins: int = 5,
    quantiles: Sequence[float] = (0.5, 0.9),
) -> list[CalibrationBin]:
    """Absolute-error quantiles per std bin (equal-count bins, lowest std first).

    Parameters
    ----------
    std, error, mask
        As for :func:`uncertainty_spearman`.
    n_bins : int >= 1
        Number of bins; their edges are std quantiles, so each holds about the same number
        of voxels (voxels with equal std stay in one bin, so a bin can be empty and is then
        left out).
    quantiles : sequence of float in [0, 1]
        Which quantiles of ``|error|`` to report in each bin.

    Returns
    -------
    list of CalibrationBin

    Examples
    --------
    Errors drawn with the std as their scale: the error quantiles rise with the std and sit
    near the Gaussian values (median ``|e|`` = 0.674 std).

    >>> rng = np.random.default_rng(1)
    >>> s = rng.uniform(1.0, 2.0, 200_000)
    >>> table = calibration_table(s, rng.normal(size=s.shape) * s, n_bins=4)
    >>> medians = [b.error_quantiles[0] for b in table]
    >>> all(a < b for a, b in zip(medians, medians[1:]))
    True
    >>> [round(b.error_quantiles[0] / b.std_mean, 1) for b in table]
    [0.7, 0.7, 0.7, 0.7]
    """
    n_bins = check_int("n_bins", n_bins, minimum=1)
    qs = [float(q) for q in quantiles]
    if not qs or any(not 0.0 <= q <= 1.0 for q in qs):
        raise ParameterError(f"`quantiles` must be values in [0, 1], got {list(quantiles)}")
    s, e = _pair(std, error, mask)
    if s.size == 0:
        raise ParameterError("no finite voxels to calibrate (empty mask?)")
    edges = np.quantile(s, np.linspace(0.0, 1.0, n_bins + 1))
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
    table = []
    for b in range(n_bins):
        sel = which == b
        if not sel.any():
            continue
        table.append(
            CalibrationBin(
                float(edges[b]), float(edges[b + 1]), float(s[sel].mean()), int(sel.sum()),
                tuple(float(v) for v in np.quantile(e[sel], qs)),
            )
        )
    return table


def format_calibration(table: Sequence[CalibrationBin], quantiles: Sequence[float] = (0.5, 0.9)) -> str:
    """The table as Markdown: std range, mean std, voxels, and each ``|error|`` quantile / mean std.

    Examples
    --------
    >>> print(format_calibration([CalibrationBin(0.0, 1.0, 0.5, 10, (0.3, 0.9))]))
    | std bin | mean std | voxels | q50 abs error | q90 abs error | q50 / std | q90 / std |
    |---|---:|---:|---:|---:|---:|---:|
    | 0 - 1 | 0.5 | 10 | 0.3 | 0.9 | 0.6 | 1.8 |
    """
    names = [f"q{round(q * 100):d}" for q in quantiles]
    head = "| std bin | mean std | voxels | " + " | ".join(f"{n} abs error" for n in names)
    head += " | " + " | ".join(f"{n} / std" for n in names) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * (2 * len(names))]
    for b in table:
        ratios = [q / b.std_mean if b.std_mean > 0 else float("nan") for q in b.error_quantiles]
        lines.append(
            f"| {b.std_low:.3g} - {b.std_high:.3g} | {b.std_mean:.3g} | {b.count} | "
            + " | ".join(f"{q:.3g}" for q in b.error_quantiles)
            + " | "
            + " | ".join(f"{r:.3g}" for r in ratios)
            + " |"
        )
    return "\n".join(lines)
