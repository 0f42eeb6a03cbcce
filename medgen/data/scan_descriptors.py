"""A few statistics of a scan's raw values that per-scan normalisation hides.

The autoencoder sees every scan normalised to its own percentile window, so a scan whose
rescale slope is 100 times too large, whose values are inverted, or which is a CT instead of
an MR can look ordinary to it. These descriptors keep that information for the input gate
(:mod:`medgen.inference.gate`); they are computed on the scan on the model's common grid,
in the scan's physical units.
"""

from __future__ import annotations

import numpy as np

from medgen.baselines.denoise import estimate_noise_sigma

DESCRIPTOR_NAMES = (
    "log10_range",  # scale: p99.5 - p0.5 in physical units (slope errors, modality)
    "zero_point",  # where 0 lies in the window: ~0 for MR, negative for CT in HU
    "border_level",  # mean of the outer shell in window units: air is dark unless inverted
    "log10_saturation",  # share of bright voxels sitting at the maximum (clipping)
    "log10_noise",  # noise SD (robust, from the flattest cells) relative to the window
    "foreground_fraction",  # share of the grid above 10 % of the window (empty, body size)
)


# The smallest difference in each descriptor that means something (a floor for the spread
# the flow standardises by): 5 % in range, 1 % of the window, 0.1 decade of saturation ...
DESCRIPTOR_RESOLUTION = (0.02, 0.01, 0.01, 0.1, 0.05, 0.01)


def saturation_fraction(values: np.ndarray) -> float:
    """Share of the bright voxels (above 10 % of the 0.5-99.5 percentile window) that sit at
    the maximum: a clipped scan has a plateau there, an unclipped one a handful of voxels.
    Measured on the scan's own voxels: resampling onto a grid blurs a plateau's edges away."""
    v = np.asarray(values)
    lo, hi = (float(p) for p in np.percentile(v, [0.5, 99.5]))
    window = max(hi - lo, 1e-12 * max(abs(hi), 1.0), np.finfo(np.float64).tiny)
    vmax = float(v.max())
    at_max = np.count_nonzero(v >= vmax - 1e-4 * window)
    return at_max / max(int(np.count_nonzero(v > lo + 0.1 * window)), 1)


def intensity_descriptors(values: np.ndarray, source_values: np.ndarray | None = None) -> np.ndarray:
    """:data:`DESCRIPTOR_NAMES` of one finite, non-constant 3D array (float64 vector):
    ``values`` on the model's grid; ``source_values`` (the scan's own voxels, when given)
    for the saturation.

    Examples
    --------
    >>> x = np.zeros((16, 16, 16), np.float32); x[4:12, 4:12, 4:12] = 100.0
    >>> d = dict(zip(DESCRIPTOR_NAMES, intensity_descriptors(x)))
    >>> [round(float(d[k]), 3) for k in ("log10_range", "zero_point", "border_level")]
    [2.0, 0.0, 0.0]
    """
    v = np.asarray(values, np.float64)
    lo, hi = np.percentile(v, [0.5, 99.5])
    window = max(hi - lo, 1e-12 * max(abs(hi), 1.0), np.finfo(np.float64).tiny)
    shell = np.concatenate([v[[0, -1]].ravel(), v[:, [0, -1]].ravel(), v[:, :, [0, -1]].ravel()])
    bright = v > lo + 0.1 * window
    at_max = saturation_fraction(v if source_values is None else source_values)
    # Noise from the flattest cells only: anatomy edges dominate plain differences on a coarse grid.
    noise = estimate_noise_sigma(v) / window
    return np.array(
        [
            np.log10(window),
            (0.0 - lo) / window,
            (float(shell.mean()) - lo) / window,
            np.log10(at_max + 1e-3),  # + 1e-3: a single brightest voxel is no plateau
            np.log10(noise + 0.01),  # + 1 %: below that a scan is as good as clean
            float(bright.mean()),
        ]
    )
