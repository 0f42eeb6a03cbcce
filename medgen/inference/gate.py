"""The input gate: is this scan like the ones a model was trained on?

A :class:`FlowGate` scores a scan with a trained flow (:class:`medgen.models.flow.LatentFlow`):
the scan is put on the flow's common grid exactly as its training scans were, normalised,
encoded by the frozen autoencoder; the flow gives the log-likelihood of its features. The
verdict is a typicality test, not a raw likelihood threshold: the score (negative
log-likelihood per feature) is compared with the scores of training scans that were held
back from the flow, in their standard deviations, at the threshold stored with the model
for its stated false-positive rate. Scores far *below* the held-back likelihoods and far
*above* them are both atypical (flows are known to give some out-of-distribution inputs,
such as blank images, higher likelihoods than real ones).

Inputs no model can score (NaN, empty, constant, not 3D) are "out" with their reason,
never a traceback.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgen.config import NormalisationConfig
from medgen.errors import InputError
from medgen.volume import Volume

SCORE_NAME = "nll_per_dim"
MIN_SPREAD = 1e-3  # floor of the calibration SD: a handful of held-back scans can agree too well


@dataclass
class GateVerdict:
    """One scan's verdict: ``inside`` (True = like the training scans), the score (negative
    log-likelihood per feature, None when the scan could not be scored), its distance from
    the held-back scans in their SDs (signed: positive = less likely) and why, in words."""

    name: str
    inside: bool
    score: float | None
    z: float | None
    reason: str

    @property
    def verdict(self) -> str:
        return "in" if self.inside else "out"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


@dataclass
class Calibration:
    """Held-back scores and the two-sided threshold they give (stored with the model)."""

    centre: float
    spread: float
    z_threshold: float
    false_positive_rate: float
    held_back_scores: list[float]
    train_scores: list[float]

    @classmethod
    def fit(cls, held_back: list[float], train: list[float], false_positive_rate: float) -> Calibration:
        """Centre and spread of the held-back scores (the spread no smaller than the training
        scores', which a flow fits more tightly); threshold ``z`` for a two-sided test at
        ``false_positive_rate``: the normal prediction interval for one more scan, which
        widens with few held-back scans (Student's t with n - 1 degrees of freedom, times
        sqrt(1 + 1/n)): their mean and SD are estimates too."""
        from scipy.stats import t as student_t

        held = np.asarray(held_back, np.float64)
        if held.size < 2:
            raise ValueError(f"calibration needs at least 2 held-back scans, got {held.size}")
        spread = max(float(held.std(ddof=1)), float(np.std(train, ddof=1)) if len(train) > 1 else 0.0, MIN_SPREAD)
        n = held.size
        z = float(student_t.ppf(1.0 - false_positive_rate / 2.0, n - 1)) * float(np.sqrt(1.0 + 1.0 / n))
        return cls(float(held.mean()), spread, z, float(false_positive_rate), [float(s) for s in held_back],
                   [float(s) for s in train])  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def judge(self, name: str, score: float) -> GateVerdict:
        z = (score - self.centre) / self.spread
        if not np.isfinite(z):
            return GateVerdict(name, False, float(score), None, "the flow gives it no finite likelihood")
        if z > self.z_threshold:
            reason = f"likelihood far below the held-back training scans: {z:.1f} SD (threshold {self.z_threshold:.1f})"
        elif z < -self.z_threshold:
            reason = f"atypically high likelihood: {-z:.1f} SD above the held-back training scans (threshold {self.z_threshold:.1f})"
        else:
            return GateVerdict(name, True, float(score), float(z), f"typical: {z:+.1f} SD from the held-back training scans")
        return GateVerdict(name, False, float(score), float(z), reason)


def unscorable_reason(values: np.ndarray) -> str | None:
    """Why a scan cannot be scored at all (None when it can)."""
    if values.ndim != 3:
        return f"not a 3D volume (shape {list(values.shape)})"
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        return f"{bad} voxel(s) are NaN or infinite"
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return "empty volume (every voxel is 0)" if lo == 0 else f"constant volume (every voxel is {lo:g})"
    return None


def prepare_scan(
    volume: Volume, shape_vox, spacing_mm, normalisation: NormalisationConfig, descriptors: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """A scan as a flow sees it: normalised on the common grid (as training scans were put on
    it, any input shape or orientation) and its intensity descriptors (physical units)."""
    from medgen.data.scan_descriptors import intensity_descriptors
    from medgen.data.synthesis_data import onto_grid
    from medgen.inference.normalise import IntensityNorm

    values, _ = onto_grid(volume, shape_vox, spacing_mm)
    n = normalisation
    image = IntensityNorm.fit(values, n.mode, n.lower, n.upper).forward(values)
    return image, (intensity_descriptors(values, volume.values(np.float32)) if descriptors else None)


class FlowGate:
    """A trained flow with its calibration, ready to judge scans (see the module doc)."""

    def __init__(self, loaded, device: str | torch.device = "cpu") -> None:
        gate = loaded.metadata.get("gate")
        if loaded.kind != "flow" or not gate:
            from medgen.inference.loading import article

            what = "a flow model without calibration" if loaded.kind == "flow" else f"{article(loaded.kind)} model"
            raise InputError(loaded.path or loaded.source, f"is {what}; the gate needs a trained flow (medgen train configs/flow-mr.yaml)")
        self.model = loaded.model
        self.config = loaded.config
        self.source = loaded.source
        self.device = torch.device(device)
        self.calibration = Calibration.from_dict(gate)
        self.model.to(self.device).eval()

    def prepare(self, volume: Volume) -> tuple[np.ndarray, np.ndarray | None]:
        """``(image, descriptors)``: see :func:`prepare_scan`."""
        grid = self.config.data.grid
        return prepare_scan(volume, grid.shape_vox, grid.spacing_mm, self.config.data.normalisation,
                            self.model.num_descriptors > 0)  # fmt: skip

    @torch.no_grad()
    def score_prepared(self, image: np.ndarray, descriptors: np.ndarray | None) -> float:
        """Negative log-likelihood per feature of one prepared scan (posterior-mean latents)."""
        x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None].to(self.device)
        mean, _ = self.model.encode(x)
        d = None if descriptors is None else torch.as_tensor(descriptors, dtype=torch.float32, device=self.device)[None]
        return float(self.model.nll_per_feature(mean, d)[0])

    def score(self, volume: Volume) -> float:
        """Negative log-likelihood per feature of ``volume`` (lower = more like training)."""
        return self.score_prepared(*self.prepare(volume))

    def check(self, volume: Volume, name: str = "") -> GateVerdict:
        """The verdict for one scan; unscorable inputs are "out" with their reason."""
        values = volume.values(np.float32)
        if values.ndim == 4 and values.shape[3] == 1:
            values = values[..., 0]
        reason = unscorable_reason(values)
        if reason is not None:
            return GateVerdict(name, False, None, None, reason)
        return self.calibration.judge(name, self.score(volume))


def load_gate(model: str | Path, *, device: str | torch.device = "cpu", tracking_uri: str | None = None) -> FlowGate:
    """A :class:`FlowGate` from a flow model file, run folder or MLflow URI.

    Raises
    ------
    InputError
        Not a calibrated flow model.
    """
    from medgen.inference.loading import load_model

    return FlowGate(load_model(model, device=device, tracking_uri=tracking_uri), device=device)
