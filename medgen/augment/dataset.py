"""Datasets that mix generated volumes into real ones, deterministically.

* :class:`SyntheticDataset` - ``n`` volumes from a synthesis model under one condition.
  Item ``i`` is :class:`~medgen.inference.synthesis.SynthesisRequest` ``(n=1, seed=seed,
  first_index=i)``: it depends on ``(model, condition, seed, sampler, steps, i)`` only, never on
  ``n``, the batch or the worker that makes it. With ``cache_dir`` every generated volume is
  written once (NIfTI + JSON sidecar, atomically, marked synthetic) and read back afterwards.
* :class:`CohortDataset` - real labelled scans (a labels CSV) resampled onto the same grid, with
  the same item keys, so ``torch.utils.data.ConcatDataset([real, synthetic])`` goes through a
  default ``DataLoader``.

Items are MONAI-style dicts::

    {"image": float32 tensor (1, D, H, W), "label": int, "synthetic": bool,
     "seed": int (-1 for a real scan), "index": int}

``"label"`` is left out when the dataset has no class (an unconditional model, a CSV without a
``label`` column). ``normalise="percentile"`` (the default) maps each volume's 0.5-99.5
percentile window to [0, 1], as medgen's trainers do; ``"none"`` keeps the model's training
units (``spec.units``). Percentile is the default because a classifier trained on a mix must
see real and generated volumes through the same per-volume normalisation: generated volumes
come out in the *median* intensity window of the generator's training scans, real ones in
their own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from medgen.errors import InputError
from medgen.validate import ParameterError, check_int, literal_options, look_up_option
from medgen.volume import Volume

__all__ = ["CohortDataset", "Normalise", "SyntheticDataset", "model_sha256", "normalise_values"]

Normalise = Literal["percentile", "none"]
PERCENTILE_WINDOW = (0.5, 99.5)
REAL_SEED = -1  # the "seed" of a real scan's item: it was not generated
KEY_FILE = "key.json"


def normalise_values(values: np.ndarray, normalise: str = "percentile") -> np.ndarray:
    """One volume's values as the classifier sees them (float32, same shape).

    ``"percentile"``: ``(v - p0.5) / (p99.5 - p0.5)`` (not clipped), what medgen's trainers use
    (:meth:`medgen.inference.normalise.IntensityNorm.fit`); ``"none"``: unchanged.

    Examples
    --------
    >>> out = normalise_values(np.linspace(0.0, 200.0, 201), "percentile")
    >>> out.dtype.name, out[[0, 100, 200]].astype(float).round(3).tolist()
    ('float32', [-0.005, 0.5, 1.005])
    """
    from medgen.inference.normalise import IntensityNorm

    normalise = look_up_option("normalise", normalise, literal_options(Normalise))
    values = np.asarray(values, np.float32)
    if normalise == "none":
        return values
    return IntensityNorm.fit(values, "percentile", *PERCENTILE_WINDOW).forward(values)


def model_sha256(path: str | Path) -> str:
    """SHA-256 of a model file, or of every file (names and bytes) in a bundle folder."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# One download per model URI, one load per (model file, device) and one hash per model file,
# per process: several datasets over one model (one per class and seed) share them, and each
# DataLoader worker loads its own copy (keyed by pid; the network is never pickled).
_LOCAL: dict[tuple[str, str | None], Path] = {}
_MODELS: dict[tuple[int, str, float, str], Any] = {}
_MAX_MODELS = 4
_HASHES: dict[tuple[str, float, int], str] = {}


def _local_model(model: str | Path, tracking_uri: str | None) -> Path:
    from medgen.inference.loading import is_bundle_folder

    if is_bundle_folder(model):
        return Path(model)
    key = (str(model), tracking_uri)
    if key not in _LOCAL or not _LOCAL[key].exists():
        from medgen.tracking import resolve_model_uri  # a URI is downloaded here, once

        _LOCAL[key] = resolve_model_uri(model, tracking_uri=tracking_uri)
    return _LOCAL[key]


def _loaded_model(local: Path, device: str):
    stat = local.stat()
    key = (os.getpid(), str(local.resolve()), stat.st_mtime, device)
    if key not in _MODELS:
        from medgen.inference.loading import load_synthesis_model

        while len(_MODELS) >= _MAX_MODELS:
            _MODELS.pop(next(iter(_MODELS)))  # the oldest
        _MODELS[key] = load_synthesis_model(local, device=device)
    return _MODELS[key]


def _model_sha256_cached(local: Path) -> str:
    stat = local.stat()
    key = (str(local.resolve()), stat.st_mtime, stat.st_size)
    if key not in _HASHES:
        _HASHES[key] = model_sha256(local)
    return _HASHES[key]


def _item(image: np.ndarray, label: int | None, synthetic: bool, seed: int, index: int) -> dict[str, Any]:
    item: dict[str, Any] = {"image": torch.from_numpy(np.ascontiguousarray(image, np.float32))[None]}
    if label is not None:
        item["label"] = int(label)
    item.update(synthetic=bool(synthetic), seed=int(seed), index=int(index))
    return item


class SyntheticDataset(torch.utils.data.Dataset):
    """``n`` generated volumes under one condition, made on first access (or read from a cache).

    Parameters
    ----------
    model : str or Path
        A latent diffusion or decodable flow model file, a folder holding ``model.pt``, or an
        MLflow URI (``runs:/<id>/model``, ``models:/<name>/<version>``); a URI is downloaded
        once, here. A flow samples at temperature 1.
    n : int
        Length, >= 0.
    condition : mapping, optional
        E.g. ``{"label": 1}`` (and covariates the model knows). Checked here, at construction.
    seed : int
        >= 0. Item ``i`` draws all its randomness from ``(seed, i)``.
    sampler, steps, guidance_scale
        As :class:`~medgen.inference.synthesis.SynthesisRequest`; None: the model's defaults.
    normalise : {"percentile", "none"}
        See the module docstring.
    cache_dir : path, optional
        Generated volumes go to ``<cache_dir>/<key>/synth-<i>.nii.gz`` (+ ``.json`` sidecar);
        ``<key>`` is derived from the model file's SHA-256, the condition, seed, sampler, steps
        and guidance, and ``<key>/key.json`` spells them out.
    transform : callable, optional
        Applied to each item dict (e.g. MONAI dictionary transforms).
    device : str or torch.device
        Where to generate.
    tracking_uri : str, optional
        MLflow store for model URIs.

    Notes
    -----
    The model is loaded at construction (to check ``condition`` and learn the grid, so a bad
    condition fails here with one line) and again, lazily, once per DataLoader worker: the
    network is never pickled. Datasets over the same model in one process share one copy.
    Generation is deterministic for a given device and torch build; a cache filled on one
    machine gives the same bytes wherever it is read.

    Examples
    --------
    >>> synth = SyntheticDataset("models:/ldm-mr/1", n=200, condition={"label": 1}, seed=0,
    ...                          cache_dir="synth_cache")  # doctest: +SKIP
    >>> train = torch.utils.data.ConcatDataset([real, synth])  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | Path,
        n: int,
        condition: Mapping[str, Any] | None = None,
        seed: int = 0,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        normalise: Normalise = "percentile",
        cache_dir: str | Path | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        device: str | torch.device = "cpu",
        tracking_uri: str | None = None,
    ) -> None:
        from medgen.inference.synthesis import SynthesisRequest, resolve_condition

        self.n = check_int("n", n, minimum=0)
        self.seed = check_int("seed", seed, minimum=0)
        self.normalise = look_up_option("normalise", normalise, literal_options(Normalise))
        if transform is not None and not callable(transform):
            raise ParameterError(f"`transform` must be callable, got {type(transform).__name__}")
        self.transform = transform
        self.device = str(device)
        self.source = str(model)
        self._local = _local_model(model, tracking_uri)
        synth = self._synthesis_model()
        self.spec = synth.spec
        self.label, covariates = resolve_condition(self.spec, dict(condition or {}))
        self.condition: dict[str, Any] = {**({"label": self.label} if self.label is not None else {}), **covariates}
        settings = synth.settings
        self.sampler = sampler or settings.sampler
        self.steps = (1000 if self.sampler == "ddpm" else settings.steps) if steps is None else steps
        self.guidance_scale = settings.guidance_scale if guidance_scale is None else float(guidance_scale)
        synth.check(SynthesisRequest(condition=self.condition, sampler=self.sampler, steps=self.steps,
                                     guidance_scale=self.guidance_scale))  # a bad sampler/steps fails here too
        self.steps = int(self.steps)
        if self.guidance_scale < 0:
            raise ParameterError(f"`guidance_scale` must be >= 0, got {self.guidance_scale}")
        self.model_sha256 = _model_sha256_cached(self._local)
        self.cache_dir = None if cache_dir is None else Path(cache_dir) / self.cache_key

    # -- identity -----------------------------------------------------------------------
    @property
    def key_record(self) -> dict[str, Any]:
        """What determines every item (the cache key is a hash of it)."""
        return {"model_sha256": self.model_sha256, "condition": self.condition, "seed": self.seed,
                "sampler": self.sampler, "steps": self.steps, "guidance_scale": self.guidance_scale}  # fmt: skip

    @property
    def cache_key(self) -> str:
        """``label<k>-s<seed>-<16 hex>`` (``s<seed>-...`` without a label)."""
        digest = hashlib.sha256(json.dumps(self.key_record, sort_keys=True).encode()).hexdigest()[:16]
        prefix = f"label{self.label}-" if self.label is not None else ""
        return f"{prefix}s{self.seed}-{digest}"

    @property
    def shape_vox(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.spec.shape_vox)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.spec.spacing_mm)  # type: ignore[return-value]

    # -- the model, once per process -----------------------------------------------------
    def _synthesis_model(self):
        """The loaded model (shared by every dataset of this process), its provenance naming
        the model as the user did."""
        return dataclasses.replace(_loaded_model(self._local, self.device), source=self.source)

    # -- items ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def _path(self, index: int) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"synth-{index:05d}.nii.gz"

    def volume(self, index: int) -> Volume:
        """Item ``index`` as a Volume in the model's units on its grid, marked synthetic
        (read from the cache when it is there)."""
        index = self._check_index(index)
        path = self._path(index)
        if path is not None and path.is_file():
            from medgen.io.nifti import read_nifti

            return read_nifti(path)
        from medgen.inference.synthesis import SynthesisRequest

        request = SynthesisRequest(n=1, condition=self.condition, seed=self.seed, sampler=self.sampler,
                                   steps=self.steps, guidance_scale=self.guidance_scale, first_index=index)  # fmt: skip
        volume = self._synthesis_model().generate(request, device=self.device)[0]
        if path is not None:
            self._write(volume, path)
        return volume

    def _write(self, volume: Volume, path: Path) -> None:
        from medgen.io.atomic import atomic_write_bytes
        from medgen.io.nifti import write_nifti
        from medgen.io.sidecar import sidecar_path, write_sidecar

        key_file = path.parent / KEY_FILE
        if not key_file.is_file():
            text = json.dumps({"synthetic": True, "model": self.source, **self.key_record}, indent=2, sort_keys=True)
            atomic_write_bytes(key_file, (text + "\n").encode())
        write_sidecar(volume, sidecar_path(path))
        write_nifti(volume, path)  # last: its presence means the item is complete

    def is_cached(self, index: int) -> bool:
        """Whether item ``index`` is already in ``cache_dir`` (False without a cache)."""
        path = self._path(self._check_index(index))
        return path is not None and path.is_file()

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for a SyntheticDataset of length {self.n}")
        return index

    def __getitem__(self, index: int) -> Any:
        index = self._check_index(index)
        image = normalise_values(self.volume(index).values(np.float32), self.normalise)
        item = _item(image, self.label, True, self.seed, index)
        return self.transform(item) if self.transform is not None else item

    def __repr__(self) -> str:
        return (f"SyntheticDataset(model={self.source!r}, n={self.n}, condition={self.condition}, "
                f"seed={self.seed}, sampler={self.sampler!r}, steps={self.steps})")  # fmt: skip


class CohortDataset(torch.utils.data.Dataset):
    """Real labelled scans on a synthesis grid, with :class:`SyntheticDataset`'s item keys.

    Parameters
    ----------
    records : path or sequence of CohortRecord
        A labels CSV (:func:`medgen.data.synthesis_data.read_labels_csv`) or its rows.
    shape_vox, spacing_mm : 3 ints, 3 floats
        The grid (e.g. ``synth.shape_vox``, ``synth.spacing_mm``): each scan is reoriented to
        RAS and resampled onto it, centred on the scan (:func:`onto_grid`).
    normalise : {"percentile", "none"}
    transform : callable, optional
    cache : bool
        Keep resampled volumes in memory after their first access.

    Items carry ``"synthetic": False`` and ``"seed": -1``.
    """

    def __init__(
        self,
        records: str | Path | Sequence[Any],
        shape_vox: Sequence[int],
        spacing_mm: Sequence[float],
        *,
        normalise: Normalise = "percentile",
        transform: Callable[[dict[str, Any]], Any] | None = None,
        cache: bool = True,
    ) -> None:
        from medgen.data.synthesis_data import read_labels_csv

        self.records = read_labels_csv(records) if isinstance(records, (str, Path)) else list(records)
        self.shape_vox = tuple(check_int("shape_vox", s, minimum=1) for s in shape_vox)
        self.spacing_mm = tuple(float(s) for s in spacing_mm)
        if len(self.shape_vox) != 3 or len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ParameterError(f"`shape_vox` and `spacing_mm` must be 3 values each (> 0), got {shape_vox}, {spacing_mm}")
        self.normalise = look_up_option("normalise", normalise, literal_options(Normalise))
        labelled = [r.label is not None for r in self.records]
        if any(labelled) and not all(labelled):
            missing = self.records[labelled.index(False)].path.name
            raise InputError(missing, "has no label while other scans of the cohort have one")
        self.transform = transform
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def values(self, index: int) -> np.ndarray:
        """Scan ``index`` on the grid, normalised, float32 ``shape_vox``."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        from medgen.data.synthesis_data import onto_grid
        from medgen.io import load

        path = self.records[index].path
        volume = load(path)
        if isinstance(volume, list):
            if len(volume) != 1:
                raise InputError(path, f"holds {len(volume)} volumes; point at one series")
            volume = volume[0]
        values = normalise_values(onto_grid(volume, self.shape_vox, self.spacing_mm)[0], self.normalise)
        if self._cache is not None:
            self._cache[index] = values
        return values

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a CohortDataset of length {len(self)}")
        item = _item(self.values(index), self.records[index].label, False, REAL_SEED, index)
        return self.transform(item) if self.transform is not None else item
