"""The contract every degradation follows, and the random wrapper that makes any of them random.

A degradation is a small dataclass whose fields are its configuration (physical parameters with
their units in their names, plus a ``seed`` where it draws noise). Calling it on

* a ``numpy`` array of shape ``(I, J, K)`` returns the degraded float32 array;
* a ``numpy`` array or ``torch`` tensor of shape ``(C, I, J, K)`` (MONAI's channel-first layout)
  degrades each channel and returns the same kind of object (a MONAI ``MetaTensor`` keeps its
  metadata and gets its affine updated when the grid changes);
* a :class:`medgen.volume.Volume` returns a new ``Volume`` of physical values on the degraded
  grid (new affine where the grid changes), with a provenance line naming the degradation and
  its parameters.

Following TorchIO's ``RandomNoise -> Noise`` split, :class:`RandomDegradation` *samples* the
parameters of a deterministic degradation (including its noise seed), builds it, applies it and
records both (``last_params``, ``last_transform``): ``type(t.last_transform)(**t.last_params)``
replays the exact same degradation.

This module needs only numpy; torch and MONAI are touched only when the input already is a
tensor (so they are already imported).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, ClassVar

import numpy as np

from medgen.validate import ParameterError, check_range, check_seed, look_up_option
from medgen.volume import Volume

__all__ = [
    "Degradation",
    "RandomDegradation",
    "check_param_names",
    "degradation_fields",
    "spacing_from_affine",
]

_SEED_LIMIT = 2**31 - 1


def spacing_from_affine(affine: Any) -> tuple[float, float, float]:
    """Voxel size (mm) along i, j, k: the column norms of the affine's 3x3 block.

    Examples
    --------
    >>> spacing_from_affine(np.diag([0.5, 0.5, 2.0, 1.0]))
    (0.5, 0.5, 2.0)
    """
    block = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(s) for s in np.linalg.norm(block, axis=0))


def degradation_fields(cls: type) -> dict[str, str]:
    """Constructor parameters of a degradation class and their declared types (as text).

    An optional scalar (``float | None``) reads as its scalar type (``"float"``).
    """
    out = {}
    for f in dataclasses.fields(cls):
        if f.init:
            text = str(f.type).replace(" ", "")
            out[f.name] = text.removesuffix("|None").removeprefix("None|")
    return out


def _torch_tensor_type() -> Any:
    # Only a tensor the caller already built can reach us, so torch is then already imported.
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class Degradation:
    """Base class of the deterministic degradations; subclasses are dataclasses.

    Subclasses set ``name`` (the registry key), implement :meth:`apply` and, when they change
    the grid, :meth:`output_geometry`. A subclass that draws random numbers has a ``seed`` field:
    a fixed seed makes every call produce the same noise, ``None`` draws fresh noise each call.
    """

    name: ClassVar[str] = ""
    #: ``True`` when :meth:`apply` needs the voxel size (then plain arrays need ``spacing_mm``).
    needs_spacing: ClassVar[bool] = False

    # -- what subclasses implement -------------------------------------------------------------
    def apply(
        self,
        values: np.ndarray,
        spacing_mm: tuple[float, float, float] | None,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Degrade one volume.

        Parameters
        ----------
        values : ndarray, shape (I, J, K), float32
            Physical values (e.g. HU). Must not be modified.
        spacing_mm : tuple of 3 floats or None
            Voxel size along i, j, k in mm (``None`` when unknown).
        rng : numpy.random.Generator
            Source of randomness for this call (seeded from ``seed``).

        Returns
        -------
        ndarray, float32, shape ``output_geometry(values.shape, ...)[0]``
        """
        raise NotImplementedError

    def output_geometry(
        self, shape: tuple[int, int, int], affine: np.ndarray
    ) -> tuple[tuple[int, int, int], np.ndarray]:
        """Shape and voxel-to-world affine (4x4) of the degraded grid; default: unchanged."""
        return tuple(shape), np.array(affine, dtype=np.float64)

    # -- shared machinery ----------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """The constructor arguments: ``type(d)(**d.params())`` rebuilds ``d``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def describe(self) -> str:
        """One provenance line, e.g. ``degrade:gaussian {"seed": 0, "sigma": 10.0, ...}``."""
        params = {k: _jsonable(v) for k, v in self.params().items()}
        return f"degrade:{self.name} {json.dumps(params, sort_keys=True)}"

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng(getattr(self, "seed", None))

    def _apply_checked(
        self,
        values: np.ndarray,
        spacing_mm: tuple[float, float, float] | None,
        rng: np.random.Generator,
    ) -> np.ndarray:
        if values.ndim != 3:
            raise ParameterError(
                f"{self.name}: expected a 3D volume (I, J, K), got shape {values.shape}"
            )
        if self.needs_spacing and spacing_mm is None:
            raise ParameterError(
                f"{self.name}: `spacing_mm` is required for a plain array; pass spacing_mm=(si, sj, sk) "
                "or call it on a Volume"
            )
        return np.asarray(self.apply(values, spacing_mm, rng), dtype=np.float32)

    def __call__(self, data: Any, spacing_mm: Any = None) -> Any:
        """Degrade ``data`` (see the module docstring for the accepted kinds).

        Parameters
        ----------
        data : ndarray (I, J, K) or (C, I, J, K), torch.Tensor (C, I, J, K), or Volume
        spacing_mm : sequence of 3 floats, optional
            Voxel size in mm for plain arrays and tensors without an affine; a Volume or
            MetaTensor supplies its own.
        """
        if spacing_mm is not None:
            spacing_mm = tuple(float(s) for s in spacing_mm)
            if len(spacing_mm) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing_mm):
                raise ParameterError(f"`spacing_mm` must be 3 positive numbers, got {spacing_mm}")
        rng = self._rng()
        if isinstance(data, Volume):
            return self._call_volume(data, rng)
        tensor_type = _torch_tensor_type()
        if tensor_type is not None and isinstance(data, tensor_type):
            return self._call_tensor(data, spacing_mm, rng)
        array = np.asarray(data)
        if array.ndim == 3:
            return self._apply_checked(array.astype(np.float32, copy=False), spacing_mm, rng)
        if array.ndim == 4:
            return np.stack(
                [
                    self._apply_checked(c.astype(np.float32, copy=False), spacing_mm, rng)
                    for c in array
                ]
            )
        raise ParameterError(
            f"{self.name}: expected an array of shape (I, J, K) or (C, I, J, K), got shape {array.shape}"
        )

    def _call_volume(self, volume: Volume, rng: np.random.Generator) -> Volume:
        values = volume.values(np.float32)
        spacing = volume.spacing_mm
        if values.ndim == 3:
            out = self._apply_checked(values, spacing, rng)
        else:  # (I, J, K, T): nibabel keeps time last
            out = np.stack(
                [self._apply_checked(values[..., t], spacing, rng) for t in range(values.shape[3])],
                axis=-1,
            )
        _, affine = self.output_geometry(values.shape[:3], volume.affine)
        meta = volume.meta.copy()
        meta.provenance.append(self.describe())
        return Volume(out, affine, meta)

    def _call_tensor(self, tensor: Any, spacing_mm: Any, rng: np.random.Generator) -> Any:
        import torch

        affine = getattr(tensor, "affine", None)  # a MONAI MetaTensor carries its affine
        if spacing_mm is None and affine is not None:
            spacing_mm = spacing_from_affine(affine.detach().cpu().numpy())
        array = tensor.detach().cpu().numpy()
        if array.ndim == 3:
            out = self._apply_checked(array.astype(np.float32, copy=False), spacing_mm, rng)
        elif array.ndim == 4:
            out = np.stack(
                [
                    self._apply_checked(c.astype(np.float32, copy=False), spacing_mm, rng)
                    for c in array
                ]
            )
        else:
            raise ParameterError(
                f"{self.name}: expected a tensor of shape (C, I, J, K) or (I, J, K), got shape {tuple(array.shape)}"
            )
        dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
        result = torch.as_tensor(out).to(device=tensor.device, dtype=dtype)
        if affine is None:
            return result
        from monai.data import MetaTensor

        spatial = array.shape[-3:]
        _, new_affine = self.output_geometry(spatial, affine.detach().cpu().numpy())
        meta = dict(tensor.meta)
        meta.pop("affine", None)
        return MetaTensor(result, affine=torch.as_tensor(new_affine, dtype=affine.dtype), meta=meta)


class RandomDegradation:
    """Draw the parameters of a deterministic degradation, then apply it, recording what was drawn.

    Parameters
    ----------
    degradation : str or Degradation subclass
        A registry name (see :data:`medgen.data.degrade.DEGRADATIONS`) or the class itself.
    seed : int, optional
        Seeds the parameter sampler; the noise seed of each call is drawn from it, so a seeded
        random degradation gives the same sequence of outputs on every run.
    **params
        The degradation's parameters. A ``(low, high)`` pair for a numeric (``float``/``int``)
        parameter is a range to draw from: uniformly for floats, uniformly among the integers
        ``low..high`` (both included) for ints. Anything else is passed through unchanged.
        The degradation's own noise ``seed`` is drawn for every call.

    Attributes
    ----------
    last_params : dict or None
        The parameters of the last call, including the drawn noise seed.
    last_transform : Degradation or None
        The deterministic degradation of the last call; calling it again replays it.
    """

    def __init__(
        self, degradation: str | type[Degradation], *, seed: int | None = None, **params: Any
    ) -> None:
        if isinstance(degradation, str):
            from medgen.data.degrade import DEGRADATIONS

            degradation = look_up_option("degradation", degradation, DEGRADATIONS)
        self.degradation = degradation
        fields = degradation_fields(degradation)
        check_param_names(degradation, params)
        self.fixed: dict[str, Any] = {}
        self.ranges: dict[str, tuple[float, float]] = {}
        for key, value in params.items():
            if fields[key] in ("float", "int") and isinstance(value, (list, tuple, np.ndarray)):
                low, high = check_range(key, value)
                self.ranges[key] = (low, high)
            else:
                self.fixed[key] = value
        self._fields = fields
        # Validate the fixed part and both ends of every range now, not at the first call.
        for end in (0, 1):
            probe = {**self.fixed, **{k: self._coerce(k, r[end]) for k, r in self.ranges.items()}}
            degradation(**probe)
        self.seed = check_seed("seed", seed)
        self.rng = np.random.default_rng(self.seed)
        self.last_params: dict[str, Any] | None = None
        self.last_transform: Degradation | None = None

    @property
    def name(self) -> str:
        return self.degradation.name

    def _coerce(self, key: str, value: float) -> Any:
        return int(round(value)) if self._fields[key] == "int" else float(value)

    def set_random_state(self, seed: int | None = None, state: Any = None) -> RandomDegradation:
        """Reseed the sampler (same name and meaning as MONAI's ``Randomizable``).

        ``state`` may be a ``numpy.random.Generator`` or a legacy ``RandomState``.
        """
        if state is not None:
            if isinstance(state, np.random.Generator):
                self.rng = state
            else:
                self.rng = np.random.default_rng(int(state.randint(0, _SEED_LIMIT)))
        else:
            self.rng = np.random.default_rng(check_seed("seed", seed))
        return self

    def sample_params(self) -> dict[str, Any]:
        """Draw one set of parameters (advances the sampler)."""
        drawn: dict[str, Any] = dict(self.fixed)
        for key in sorted(self.ranges):
            low, high = self.ranges[key]
            if self._fields[key] == "int":
                drawn[key] = int(self.rng.integers(int(round(low)), int(round(high)) + 1))
            else:
                drawn[key] = float(self.rng.uniform(low, high))
        if "seed" in self._fields:
            drawn["seed"] = int(self.rng.integers(0, _SEED_LIMIT))
        return drawn

    def randomize(self, data: Any = None) -> None:
        """Draw the next parameters into ``last_params`` (MONAI's ``Randomizable`` hook)."""
        self.last_params = self.sample_params()
        self.last_transform = self.degradation(**self.last_params)

    def __call__(self, data: Any, spacing_mm: Any = None) -> Any:
        """Draw parameters, then apply the deterministic degradation they define."""
        self.randomize(data)
        return self.last_transform(data, spacing_mm=spacing_mm)

    def __repr__(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.fixed.items()]
        parts += [f"{k}={v!r}" for k, v in self.ranges.items()]
        return f"Random({self.degradation.__name__}, {', '.join(parts)}, seed={self.seed})"


def check_param_names(cls: type, params: dict[str, Any]) -> None:
    """Refuse parameters that ``cls`` does not take, suggesting the closest name."""
    import difflib

    known = list(degradation_fields(cls))
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParameterError(
                f"{cls.name}: unknown parameter {key!r}{hint}; it takes {', '.join(known)}"
            )
