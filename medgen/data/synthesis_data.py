"""Data for synthesis models: a labelled cohort on one common grid, and latent batches.

* :func:`read_labels_csv` reads a cohort's labels CSV (``file`` relative to the CSV, a class
  ``label``, scalar covariates) with one-line errors naming the file, row and column.
* :func:`onto_grid` reorients a scan to RAS and resamples it (anti-aliased, linear) onto the
  common synthesis grid centred on the scan; :class:`SynthesisSpec` records that grid, the
  intensity scale back to physical units and the conditions a model was trained on, so a
  generated volume lands on the training data's grid, in its units.
* :class:`LatentBatches` serves scaled latent posteriors by step (resumable, like
  :class:`~medgen.training.patches.PatchPairs`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgen.errors import InputError
from medgen.volume import Volume

LABEL_COLUMN = "label"
FILE_COLUMN = "file"


@dataclass(frozen=True)
class CohortRecord:
    """One row of a labels CSV: the scan, its class (or None) and its covariates."""

    path: Path
    label: int | None = None
    covariates: dict[str, float] = field(default_factory=dict)


def read_labels_csv(path: str | Path, covariates: Sequence[str] = (), need_label: bool = False) -> list[CohortRecord]:
    """Rows of a cohort's labels CSV.

    Parameters
    ----------
    path : path
        CSV with a header; column ``file`` (relative to the CSV's folder, or absolute).
    covariates : sequence of str
        Columns read as floats.
    need_label : bool
        Require an integer ``label`` column.

    Raises
    ------
    InputError
        Missing file or column, a value that is not a number, a scan that does not exist.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise InputError(path, "labels CSV not found") from None
    if not rows:
        raise InputError(path, "labels CSV has no rows")
    wanted = [FILE_COLUMN, *([LABEL_COLUMN] if need_label else []), *covariates]
    missing = [c for c in wanted if c not in rows[0]]
    if missing:
        raise InputError(path, f"labels CSV has no column {missing[0]!r} (columns: {', '.join(rows[0])})")
    records = []
    for n, row in enumerate(rows, start=2):  # line 1 is the header
        scan = Path(row[FILE_COLUMN])
        scan = scan if scan.is_absolute() else path.parent / scan
        if not scan.exists():
            raise InputError(path, f"line {n}: scan {row[FILE_COLUMN]!r} does not exist")
        label = None
        if LABEL_COLUMN in row and row[LABEL_COLUMN] not in ("", None):
            try:
                label = int(row[LABEL_COLUMN])
            except ValueError:
                raise InputError(path, f"line {n}: label must be an integer, got {row[LABEL_COLUMN]!r}") from None
        values = {}
        for name in covariates:
            try:
                values[name] = float(row[name])
            except (TypeError, ValueError):
                raise InputError(path, f"line {n}: {name} must be a number, got {row[name]!r}") from None
            if not math.isfinite(values[name]):
                raise InputError(path, f"line {n}: {name} must be finite, got {row[name]!r}")
        records.append(CohortRecord(scan, label, values))
    return records


def split_records(records: Sequence[CohortRecord], val_fraction: float, seed: int = 0):
    """Deterministic train/validation split, stratified by label; at least one of each
    label in validation when ``val_fraction`` > 0 and a label has two or more rows."""
    if val_fraction <= 0:
        return list(records), []
    rng = np.random.default_rng([seed, 7])
    train, val = [], []
    for label in sorted({r.label for r in records}, key=lambda v: (v is None, v)):
        group = [r for r in records if r.label == label]
        order = rng.permutation(len(group))
        n_val = min(len(group) - 1, max(1, int(round(val_fraction * len(group)))))
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return train, val


def grid_affine(shape_vox: Sequence[int], spacing_mm: Sequence[float], centre_mm: Sequence[float]) -> np.ndarray:
    """RAS affine of an axis-aligned grid whose central point is ``centre_mm``.

    Examples
    --------
    >>> grid_affine((4, 4, 4), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))[:3, 3].tolist()
    [-3.0, -3.0, -3.0]
    """
    spacing = np.asarray(spacing_mm, np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.asarray(centre_mm, np.float64) - spacing * (np.asarray(shape_vox) - 1) / 2.0
    return affine


def onto_grid(volume: Volume, shape_vox: Sequence[int], spacing_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """A scan's physical values on the synthesis grid centred on the scan.

    Returns
    -------
    values : np.ndarray, float32, shape ``shape_vox`` (R, A, S order), physical units
    affine : np.ndarray, (4, 4) RAS of that grid
    """
    from scipy import ndimage  # lazy: SciPy import is not free

    values = volume.values(np.float32)
    if values.ndim == 4:
        values = values[..., 0]
    centre_vox = (np.asarray(values.shape, np.float64) - 1) / 2.0
    centre_mm = volume.affine[:3, :3] @ centre_vox + volume.affine[:3, 3]
    target = grid_affine(shape_vox, spacing_mm, centre_mm)
    # Anti-alias before decimating: a Gaussian of ~half the new voxel per source axis.
    source_spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    ratio = min(float(s) for s in spacing_mm) / source_spacing
    sigma = np.sqrt(np.maximum(ratio**2 - 1.0, 0.0)) / 2.0
    if np.any(sigma > 0.1):
        values = ndimage.gaussian_filter(values, sigma)
    to_source = np.linalg.inv(volume.affine) @ target
    out = ndimage.affine_transform(
        values, to_source[:3, :3], offset=to_source[:3, 3], output_shape=tuple(int(s) for s in shape_vox),
        order=1, mode="nearest",
    )  # fmt: skip
    return out.astype(np.float32, copy=False), target


@dataclass
class SynthesisSpec:
    """What a synthesis model makes: its grid, units and conditions (stored with the model).

    ``intensity_offset``/``intensity_scale`` map the network's [0, 1]-ish range back to the
    training scans' units (their median percentile window); ``covariate_ranges`` are the
    training ranges ``[min, max]`` each covariate is scaled from; ``covariate_defaults`` the
    values used when a request leaves one out (the middle of its range otherwise).
    """

    shape_vox: list[int]
    spacing_mm: list[float]
    intensity_offset: float = 0.0
    intensity_scale: float = 1.0
    units: str = "arbitrary"
    modality: str = "OT"
    num_classes: int = 0
    covariates: list[str] = field(default_factory=list)
    covariate_ranges: dict[str, list[float]] = field(default_factory=dict)
    covariate_defaults: dict[str, float] = field(default_factory=dict)
    latent_shape: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SynthesisSpec:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def scale_covariates(self, values: Mapping[str, float]) -> np.ndarray:
        """Covariate values (physical) -> the [0, 1] scale the model saw, in stored order."""
        out = []
        for name in self.covariates:
            lo, hi = self.covariate_ranges.get(name, [0.0, 1.0])
            out.append((float(values[name]) - lo) / (hi - lo) if hi > lo else 0.0)
        return np.asarray(out, np.float32)


class LatentBatches:
    """Step-indexed batches of scaled latent posteriors (with labels and covariates).

    ``batch(step)`` draws ``batch_size`` scans with ``numpy.random.default_rng([seed, rank,
    step])`` and returns ``"latent_mean"``/``"latent_std"`` ``(B, C, d, h, w)``, and when
    given ``"class_label"`` ``(B,)`` long, ``"covariates"`` ``(B, n)`` and ``"descriptors"``
    ``(B, K)`` (a flow's intensity descriptors).
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor,
        labels: np.ndarray | None = None,
        covariates: np.ndarray | None = None,
        batch_size: int = 2,
        seed: int = 0,
        rank: int = 0,
        descriptors: np.ndarray | None = None,
    ) -> None:
        if means.shape != stds.shape or means.ndim != 5:
            raise ValueError(f"`means` and `stds` must both be (N, C, d, h, w), got {tuple(means.shape)}, {tuple(stds.shape)}")
        self.means, self.stds = means, stds
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.covariates = None if covariates is None else torch.as_tensor(np.asarray(covariates), dtype=torch.float32)
        self.descriptors = None if descriptors is None else torch.as_tensor(np.asarray(descriptors), dtype=torch.float32)
        self.batch_size, self.seed, self.rank = int(batch_size), int(seed), int(rank)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, int(step)])
        index = torch.as_tensor(rng.integers(len(self.means), size=self.batch_size))
        out = {"latent_mean": self.means[index], "latent_std": self.stds[index]}
        if self.labels is not None:
            out["class_label"] = self.labels[index]
        if self.covariates is not None:
            out["covariates"] = self.covariates[index]
        if self.descriptors is not None:
            out["descriptors"] = self.descriptors[index]
        return out
