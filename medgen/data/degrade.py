"""Degradation registry: build any degradation from its name and parameters (a config entry).

Names, deterministic classes (their physical parameters) and random variants:

* ``gaussian``: :class:`GaussianNoise` (``sigma`` or ``sigma_fraction``),
  :class:`RandomGaussianNoise`
* ``rician``: :class:`RicianNoise` (``sigma`` or ``sigma_fraction``), :class:`RandomRicianNoise`
* ``lowdose_ct``: :class:`LowDoseCT` (``dose_fraction``, ``photons_per_ray``, ``mode``),
  :class:`RandomLowDoseCT`
* ``thick_slices``: :class:`ThickSlices` (``factor``, ``axis``, ``profile``),
  :class:`RandomThickSlices`
* ``downsample``: :class:`IsotropicDownsample` (``factor``), :class:`RandomIsotropicDownsample`
* ``kspace``: :class:`KSpaceTruncation` (``keep_fraction``, ``axes``, ``output``),
  :class:`RandomKSpaceTruncation`

:func:`build_degradation` reads a ``[low, high]`` pair given for a numeric parameter as a range
and returns the random variant that draws from it (this is what a pipeline YAML's
``degradations: [{name: rician, params: {sigma_fraction: [0.01, 0.05]}}]`` becomes).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from medgen.data.degrade_base import (
    Degradation,
    RandomDegradation,
    check_param_names,
    degradation_fields,
    spacing_from_affine,
)
from medgen.data.degrade_noise import (
    MU_WATER_PER_MM,
    GaussianNoise,
    LowDoseCT,
    RandomGaussianNoise,
    RandomLowDoseCT,
    RandomRicianNoise,
    RicianNoise,
    robust_intensity_scale,
)
from medgen.data.degrade_resolution import (
    IsotropicDownsample,
    KSpaceTruncation,
    RandomIsotropicDownsample,
    RandomKSpaceTruncation,
    RandomThickSlices,
    ThickSlices,
    slice_profile_matrix,
    thick_slice_affine,
    thick_slices,
    thin_slice_affine,
)
from medgen.validate import look_up_option
from medgen.volume import Volume

__all__ = [
    "DEGRADATIONS",
    "MU_WATER_PER_MM",
    "DegradationChain",
    "Degradation",
    "DegradationName",
    "GaussianNoise",
    "IsotropicDownsample",
    "KSpaceTruncation",
    "LowDoseCT",
    "RandomDegradation",
    "RandomGaussianNoise",
    "RandomIsotropicDownsample",
    "RandomKSpaceTruncation",
    "RandomLowDoseCT",
    "RandomRicianNoise",
    "RandomThickSlices",
    "RicianNoise",
    "ThickSlices",
    "build_degradation",
    "robust_intensity_scale",
    "slice_profile_matrix",
    "spacing_from_affine",
    "thick_slice_affine",
    "thick_slices",
    "thin_slice_affine",
]

DegradationName = Literal[
    "gaussian", "rician", "lowdose_ct", "thick_slices", "downsample", "kspace"
]

DEGRADATIONS: dict[str, type[Degradation]] = {
    cls.name: cls
    for cls in (
        GaussianNoise,
        RicianNoise,
        LowDoseCT,
        ThickSlices,
        IsotropicDownsample,
        KSpaceTruncation,
    )
}


def _is_range(kind: str, value: Any) -> bool:
    return kind in ("float", "int") and isinstance(value, (list, tuple, np.ndarray))


def build_degradation(
    name: str, *, seed: int | None = None, **params: Any
) -> Degradation | RandomDegradation:
    """Build a degradation from its registry name and parameters.

    Parameters
    ----------
    name : str
        One of :data:`DEGRADATIONS` (a typo gets a "did you mean ...?").
    seed : int, optional
        For a deterministic degradation that draws noise: its noise seed. For a random one
        (some parameter given as a range): the seed of the parameter sampler.
    **params
        The class's parameters. A ``[low, high]`` pair for a numeric parameter makes the result
        a :class:`RandomDegradation` drawing that parameter from the range.

    Examples
    --------
    >>> build_degradation("thick_slices", factor=3)
    ThickSlices(factor=3, axis=2, profile='box')
    >>> build_degradation("rician", sigma=[1.0, 5.0], seed=0).ranges
    {'sigma': (1.0, 5.0)}
    >>> build_degradation("gausian", sigma=1.0)
    Traceback (most recent call last):
    ...
    medgen.validate.ParameterError: `degradation` must be one of 'gaussian', 'rician', 'lowdose_ct', 'thick_slices', 'downsample', 'kspace'; got 'gausian' (did you mean 'gaussian'?)
    """
    cls = look_up_option("degradation", name, DEGRADATIONS)
    check_param_names(cls, params)
    fields = degradation_fields(cls)
    if any(_is_range(fields[k], v) for k, v in params.items()):
        return RandomDegradation(cls, seed=seed, **params)
    if seed is not None and "seed" in fields:
        params["seed"] = seed
    return cls(**params)


class DegradationChain:
    """Apply degradations in order (e.g. thick slices, then noise), recording each one's parameters.

    Unlike MONAI's ``Compose`` it carries the voxel size of plain arrays from step to step (a
    thick-slice step changes it before a low-dose step needs it) and records what each step used.

    Parameters
    ----------
    degradations : sequence of Degradation or RandomDegradation

    Attributes
    ----------
    last_params : list of (name, dict)
        What each step used on the last call (drawn values for random steps).

    Examples
    --------
    >>> chain = DegradationChain([ThickSlices(factor=2), build_degradation("gaussian", sigma=[1.0, 2.0], seed=0)])
    >>> chain(np.zeros((4, 4, 8), np.float32), spacing_mm=(1, 1, 1)).shape
    (4, 4, 4)
    >>> [name for name, _ in chain.last_params]
    ['thick_slices', 'gaussian']
    """

    def __init__(self, degradations: Any) -> None:
        self.degradations = list(degradations)
        self.last_params: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, data: Any, spacing_mm: Any = None) -> Any:
        self.last_params = []
        for step in self.degradations:
            in_shape = None if isinstance(data, Volume) else tuple(data.shape[-3:])
            out = step(data, spacing_mm=spacing_mm)
            if isinstance(step, RandomDegradation):
                used = step.last_transform
                self.last_params.append((step.name, dict(step.last_params)))
            else:
                used = step
                self.last_params.append((step.name, step.params()))
            if spacing_mm is not None and in_shape is not None:
                _, affine = used.output_geometry(in_shape, np.diag([*spacing_mm, 1.0]))
                spacing_mm = spacing_from_affine(affine)
            data = out
        return data
