"""Noise degradations: additive Gaussian, Rician (MR magnitude) and low-dose CT.

All take and return float32 arrays of physical values, shape ``(I, J, K)`` (see
:mod:`medgen.data.degrade_base` for tensors, channels and :class:`~medgen.volume.Volume`).
Each has a ``seed``: a fixed seed gives the same noise on every call. The ``Random*`` classes
draw the parameters (and the seed) from ranges and record them for replay.
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
    check_fraction,
    check_in_interval,
    check_int,
    check_positive,
    check_seed,
    literal_options,
    look_up_option,
)

__all__ = [
    "MU_WATER_PER_MM",
    "GaussianNoise",
    "LowDoseCT",
    "LowDoseMode",
    "RandomGaussianNoise",
    "RandomLowDoseCT",
    "RandomRicianNoise",
    "RicianNoise",
    "robust_intensity_scale",
]

#: Linear attenuation coefficient of water at about 70 keV (effective energy of a 120 kVp
#: beam), per mm: 0.192 /cm (NIST XCOM, water, 70 keV: mu/rho = 0.1929 cm^2/g).
MU_WATER_PER_MM = 0.0192

LowDoseMode = Literal["resimulate", "insert"]


def robust_intensity_scale(
    values: np.ndarray, low_percentile: float = 0.5, high_percentile: float = 99.5
) -> float:
    """Intensity span of a volume that ignores outliers: ``p_high - p_low``.

    Used to turn a relative noise level (``sigma_fraction``) into an absolute one. Compute it on
    a whole volume: on a small patch (e.g. all background) the span, and hence the noise, would
    be much smaller.

    Examples
    --------
    >>> robust_intensity_scale(np.arange(1001, dtype=np.float32), 0, 100)
    1000.0
    """
    check_in_interval("low_percentile", low_percentile, 0, 100)
    check_in_interval("high_percentile", high_percentile, 0, 100)
    if not high_percentile > low_percentile:
        raise ParameterError(
            f"`high_percentile` must be > `low_percentile` ({low_percentile}), got {high_percentile}"
        )
    low, high = np.percentile(
        np.asarray(values, dtype=np.float64), [low_percentile, high_percentile]
    )
    return float(high - low)


class _SigmaNoise(Degradation):
    """Shared checks for noise given either as ``sigma`` or as ``sigma_fraction``."""

    sigma: float | None
    sigma_fraction: float | None
    seed: int | None

    def _check_sigma(self) -> None:
        if (self.sigma is None) == (self.sigma_fraction is None):
            raise ParameterError(
                f"{self.name}: give exactly one of `sigma` (in the image's units) or "
                f"`sigma_fraction` (of the robust intensity span), got sigma={self.sigma}, "
                f"sigma_fraction={self.sigma_fraction}"
            )
        if self.sigma is not None:
            object.__setattr__(self, "sigma", check_positive("sigma", self.sigma))
        else:
            object.__setattr__(
                self, "sigma_fraction", check_positive("sigma_fraction", self.sigma_fraction)
            )
        object.__setattr__(self, "seed", check_seed("seed", self.seed))

    def sigma_for(self, values: np.ndarray) -> float:
        """The absolute noise standard deviation used on ``values`` (image units)."""
        if self.sigma is not None:
            return self.sigma
        return self.sigma_fraction * robust_intensity_scale(values)


@dataclass(frozen=True)
class GaussianNoise(_SigmaNoise):
    """Additive white Gaussian noise: ``x + N(0, sigma^2)``.

    Parameters
    ----------
    sigma : float, optional
        Standard deviation in the units of the values (HU for CT, so this is ``sigma_hu``).
    sigma_fraction : float, optional
        Standard deviation as a fraction of :func:`robust_intensity_scale` of the input.
        Give exactly one of ``sigma`` and ``sigma_fraction``.
    seed : int, optional
        Noise seed; ``None`` draws fresh noise on every call.

    Examples
    --------
    >>> x = np.zeros((8, 8, 8), np.float32)
    >>> y = GaussianNoise(sigma=10.0, seed=0)(x)
    >>> bool(np.array_equal(y, GaussianNoise(sigma=10.0, seed=0)(x))), round(float(y.std()), 0)
    (True, 10.0)
    """

    name: ClassVar[str] = "gaussian"
    sigma: float | None = None
    sigma_fraction: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        self._check_sigma()

    def apply(self, values: np.ndarray, spacing_mm: Any, rng: np.random.Generator) -> np.ndarray:
        sigma = self.sigma_for(values)
        return values + rng.standard_normal(values.shape, dtype=np.float32) * np.float32(sigma)


@dataclass(frozen=True)
class RicianNoise(_SigmaNoise):
    """Rician noise of MR magnitude images: ``sqrt((x + n1)^2 + n2^2)``, ``n1, n2 ~ N(0, sigma^2)``.

    ``sigma`` is the standard deviation of each quadrature channel (real and imaginary), in the
    units of the values. The result is non-negative; a zero background becomes Rayleigh noise of
    mean ``sigma * sqrt(pi / 2)``.

    Parameters
    ----------
    sigma, sigma_fraction, seed
        As for :class:`GaussianNoise`.

    Examples
    --------
    >>> y = RicianNoise(sigma=2.0, seed=0)(np.zeros((16, 16, 16), np.float32))
    >>> round(float(y.mean() / (2.0 * np.sqrt(np.pi / 2))), 1)
    1.0
    """

    name: ClassVar[str] = "rician"
    sigma: float | None = None
    sigma_fraction: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        self._check_sigma()

    def apply(self, values: np.ndarray, spacing_mm: Any, rng: np.random.Generator) -> np.ndarray:
        sigma = np.float32(self.sigma_for(values))
        real = values + rng.standard_normal(values.shape, dtype=np.float32) * sigma
        imag = rng.standard_normal(values.shape, dtype=np.float32) * sigma
        return np.sqrt(real * real + imag * imag)


@dataclass(frozen=True)
class LowDoseCT(Degradation):
    """Low-dose CT: photon-counting noise on a simulated parallel-beam sinogram, then FBP.

    Each slice across ``slice_axis`` (axial for the usual ``K`` axis) goes through:

    1. HU to linear attenuation, ``mu = mu_water * (1 + HU / 1000)`` per mm, clipped at 0
       (values below -1000 HU, such as outside-the-field padding, become air);
    2. line integrals ``p`` by :func:`skimage.transform.radon` over ``n_angles`` views in
       [0, 180) degrees, the slice zero-padded (air) to a square so nothing is cut off, times
       the pixel size in mm;
    3. noise, by ``mode``:

       * ``"resimulate"``: Poisson counts ``N ~ Poisson(I0 * dose_fraction * exp(-p))``
         (counts below 1 set to 1), ``p' = -log(N / (I0 * dose_fraction))``, and the slice
         is rebuilt from ``p'`` by filtered back-projection (:func:`skimage.transform.iradon`,
         ramp filter). The result carries the blur and streaks of FBP as well as the noise.
       * ``"insert"``: the input is taken as a scan already acquired at ``I0`` photons; the
         sinogram noise still missing for a scan at ``dose_fraction * I0`` (Gaussian, variance
         ``(1 - dose_fraction) / dose_fraction * exp(p) / I0``, the standard noise-insertion
         model without electronic noise) is reconstructed by FBP and added to the input. The
         anatomy is untouched and ``dose_fraction=1`` returns the input.
    4. back to HU: ``HU = 1000 * (mu / mu_water - 1)``.

    Parameters
    ----------
    dose_fraction : float in (0, 1]
        Dose relative to the full-dose scan.
    photons_per_ray : float
        ``I0``, incident photons per detector ray at full dose (1e5 is typical of a clinical
        body scan; larger means less noise).
    mode : {"resimulate", "insert"}
    n_angles : int, optional
        Number of views over 180 degrees; default: the side of the padded square slice.
    slice_axis : int
        Array axis across which slices are taken (0, 1 or 2).
    mu_water_per_mm : float
        Attenuation of water at the beam's effective energy (see :data:`MU_WATER_PER_MM`).
    seed : int, optional
        Noise seed; ``None`` draws fresh noise on every call.

    Notes
    -----
    Needs the voxel size (``spacing_mm``), with square pixels in the slice plane. Costs about
    one radon transform and one FBP per slice (less than a second for a 256 x 256 slice).

    Examples
    --------
    >>> hu = np.full((32, 32, 2), -1000.0, np.float32)
    >>> ii, jj = np.mgrid[:32, :32]
    >>> hu[(ii - 15.5) ** 2 + (jj - 15.5) ** 2 < 12 ** 2] = 0.0
    >>> same = LowDoseCT(dose_fraction=1.0, mode="insert", seed=0)(hu, spacing_mm=(1, 1, 1))
    >>> bool(np.allclose(same, hu))
    True
    """

    name: ClassVar[str] = "lowdose_ct"
    needs_spacing: ClassVar[bool] = True
    dose_fraction: float = 0.25
    photons_per_ray: float = 1e5
    mode: LowDoseMode = "resimulate"
    n_angles: int | None = None
    slice_axis: int = 2
    mu_water_per_mm: float = MU_WATER_PER_MM
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "dose_fraction", check_fraction("dose_fraction", self.dose_fraction)
        )
        object.__setattr__(
            self, "photons_per_ray", check_positive("photons_per_ray", self.photons_per_ray)
        )
        object.__setattr__(
            self, "mode", look_up_option("mode", self.mode, literal_options(LowDoseMode))
        )
        if self.n_angles is not None:
            object.__setattr__(self, "n_angles", check_int("n_angles", self.n_angles, minimum=2))
        object.__setattr__(self, "slice_axis", check_axis("slice_axis", self.slice_axis))
        object.__setattr__(
            self, "mu_water_per_mm", check_positive("mu_water_per_mm", self.mu_water_per_mm)
        )
        object.__setattr__(self, "seed", check_seed("seed", self.seed))

    def apply(self, values: np.ndarray, spacing_mm: Any, rng: np.random.Generator) -> np.ndarray:
        from skimage.transform import iradon, radon

        in_plane = [a for a in range(3) if a != self.slice_axis]
        pixel_a, pixel_b = (spacing_mm[a] for a in in_plane)
        if abs(pixel_a - pixel_b) > 0.01 * max(pixel_a, pixel_b):
            raise ParameterError(
                f"{self.name}: needs square pixels in the slice plane, got {pixel_a:g} x {pixel_b:g} mm; "
                "resample the volume first"
            )
        pixel_mm = 0.5 * (pixel_a + pixel_b)
        slices = np.moveaxis(values, self.slice_axis, -1)  # (A, B, S), a view
        size_a, size_b = slices.shape[:2]
        side = max(size_a, size_b)
        off_a, off_b = (side - size_a) // 2, (side - size_b) // 2
        n_angles = self.n_angles if self.n_angles is not None else side
        theta = np.linspace(0.0, 180.0, n_angles, endpoint=False)
        mu_w = self.mu_water_per_mm
        full_photons = self.photons_per_ray
        out = np.empty(slices.shape, dtype=np.float32)
        square = np.zeros((side, side), dtype=np.float64)
        for s in range(slices.shape[2]):
            hu = slices[:, :, s].astype(np.float64)
            square[off_a : off_a + size_a, off_b : off_b + size_b] = np.maximum(
                mu_w * (1.0 + hu / 1000.0), 0.0
            )
            line = radon(square, theta, circle=False) * pixel_mm  # dimensionless line integrals
            if self.mode == "resimulate":
                photons = full_photons * self.dose_fraction
                counts = np.maximum(rng.poisson(photons * np.exp(-line)), 1.0)
                sino = -np.log(counts / photons)
            else:
                variance = (
                    (1.0 - self.dose_fraction) / self.dose_fraction * np.exp(line) / full_photons
                )
                sino = rng.standard_normal(line.shape) * np.sqrt(variance)
            mu = iradon(sino / pixel_mm, theta, output_size=side, filter_name="ramp", circle=False)
            mu = mu[off_a : off_a + size_a, off_b : off_b + size_b]
            if self.mode == "resimulate":
                out[:, :, s] = 1000.0 * (mu / mu_w - 1.0)
            else:
                out[:, :, s] = hu + 1000.0 * mu / mu_w
        return np.moveaxis(out, -1, self.slice_axis)


class RandomGaussianNoise(RandomDegradation):
    """:class:`GaussianNoise` with ``sigma`` (or ``sigma_fraction``) drawn uniformly from a range.

    Examples
    --------
    >>> t = RandomGaussianNoise(sigma_range=(5.0, 20.0), seed=0)
    >>> y = t(np.zeros((8, 8, 8), np.float32))
    >>> replay = GaussianNoise(**t.last_params)(np.zeros((8, 8, 8), np.float32))
    >>> bool(np.array_equal(y, replay)), 5.0 <= t.last_params["sigma"] <= 20.0
    (True, True)
    """

    def __init__(
        self,
        sigma_range: tuple[float, float] | None = None,
        *,
        sigma_fraction_range: tuple[float, float] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(GaussianNoise, seed=seed, **_sigma_ranges(sigma_range, sigma_fraction_range))


def _sigma_ranges(sigma_range, sigma_fraction_range) -> dict:
    """The noise-level ranges given (absolute, or as a fraction of the intensity span)."""
    params = {"sigma": sigma_range} if sigma_range is not None else {}
    if sigma_fraction_range is not None:
        params["sigma_fraction"] = sigma_fraction_range
    return _as_ranges(params)


class RandomRicianNoise(RandomDegradation):
    """:class:`RicianNoise` with ``sigma`` (or ``sigma_fraction``) drawn uniformly from a range."""

    def __init__(
        self,
        sigma_range: tuple[float, float] | None = None,
        *,
        sigma_fraction_range: tuple[float, float] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(RicianNoise, seed=seed, **_sigma_ranges(sigma_range, sigma_fraction_range))


class RandomLowDoseCT(RandomDegradation):
    """:class:`LowDoseCT` with ``dose_fraction`` drawn uniformly from ``dose_range``."""

    def __init__(
        self,
        dose_range: tuple[float, float] = (0.1, 0.5),
        *,
        photons_per_ray: float = 1e5,
        mode: LowDoseMode = "resimulate",
        n_angles: int | None = None,
        slice_axis: int = 2,
        mu_water_per_mm: float = MU_WATER_PER_MM,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            LowDoseCT,
            seed=seed,
            dose_fraction=_as_range(dose_range),
            photons_per_ray=photons_per_ray,
            mode=mode,
            n_angles=n_angles,
            slice_axis=slice_axis,
            mu_water_per_mm=mu_water_per_mm,
        )


def _as_range(value: Any) -> Any:
    # A scalar means a fixed value; the generic wrapper reads only pairs as ranges.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return (value, value)
    return value


def _as_ranges(params: dict[str, Any]) -> dict[str, Any]:
    return {k: _as_range(v) for k, v in params.items()}
