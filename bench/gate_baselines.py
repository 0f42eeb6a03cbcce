"""Plain out-of-distribution scorers to compare the flow gate with, and the rates to report.

Both scorers follow one protocol: ``fit(train_volumes)`` (returns ``self``, and leaves the
training scans' own scores in ``train_scores`` to set a threshold from, the way the gate sets
its own), then ``score(volume) -> float``, higher meaning further from the training scans.
Neither raises on a bad input: a volume with any NaN/inf voxel, or no voxels at all, scores
``inf`` (as far out as it gets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from medgen.errors import MedgenError
from medgen.volume import Volume

__all__ = ["HistogramDistance", "ReconstructionError", "auroc", "rates_at"]


def _unusable(values: np.ndarray) -> bool:
    return values.size == 0 or not bool(np.all(np.isfinite(values)))


class HistogramDistance:
    """How far a scan's raw intensity distribution is from the training scans' (no model).

    Parameters
    ----------
    metric : {"js", "wasserstein"}
        ``"js"``: Jensen-Shannon divergence (base 2, in [0, 1]) between the scan's histogram
        and the mean training histogram, on shared bins: ``bins`` equal bins over the training
        range padded by 10% on each side, plus one overflow bin below and one above, so values
        outside the training range still count. ``"wasserstein"``: earth mover's distance in
        physical units between the scan's values and the training values, from their quantile
        functions (the training one is the mean of the scans' quantile functions).
    bins : int
    """

    def __init__(self, metric: str = "js", bins: int = 64) -> None:
        if metric not in ("js", "wasserstein"):
            raise ValueError(f"`metric` must be 'js' or 'wasserstein', got {metric!r}")
        self.metric, self.bins = metric, int(bins)
        self._levels = np.linspace(0.0, 1.0, 201)

    def _features(self, values: np.ndarray) -> np.ndarray:
        if self.metric == "wasserstein":
            return np.quantile(values, self._levels)
        counts = np.histogram(values, self.edges)[0].astype(np.float64)
        return counts / counts.sum()

    def _distance(self, feature: np.ndarray, reference: np.ndarray) -> float:
        if self.metric == "wasserstein":  # 1D W1 = integral of |F^-1 - G^-1| over levels
            gap = np.abs(feature - reference)  # trapezoid rule on the uniform levels
            return float(np.mean(gap[:-1] + gap[1:]) / 2)
        middle = 0.5 * (feature + reference)

        def kl(p: np.ndarray) -> float:
            seen = p > 0
            return float(np.sum(p[seen] * np.log2(p[seen] / middle[seen])))

        return 0.5 * kl(feature) + 0.5 * kl(reference)

    def fit(self, train_volumes: Sequence[Volume]) -> HistogramDistance:
        values = [v.values(np.float32) for v in train_volumes]
        if len(values) < 2 or any(_unusable(x) for x in values):
            raise ValueError("fit needs at least two training volumes, all finite and non-empty")
        low = min(float(x.min()) for x in values)
        high = max(float(x.max()) for x in values)
        pad = 0.1 * max(high - low, 1e-6)
        inner = np.linspace(low - pad, high + pad, self.bins + 1)
        self.edges = np.concatenate([[-np.inf], inner, [np.inf]])
        features = np.stack([self._features(x) for x in values])
        self.reference = features.mean(axis=0)
        # Training scores leave each scan out of the reference, so that a threshold set from
        # them is not fitted to the very scans it is measured on.
        n = len(features)
        self.train_scores = np.array([
            self._distance(f, (n * self.reference - f) / (n - 1)) for f in features
        ])  # fmt: skip
        return self

    def score(self, volume: Volume) -> float:
        values = volume.values(np.float32)
        if _unusable(values):
            return float("inf")
        return self._distance(self._features(values), self.reference)


class ReconstructionError:
    """Mean absolute error between the scan and the gate's autoencoder reconstruction of it.

    The scan is prepared exactly as the gate prepares it (its grid, its normalisation), so the
    only difference from the flow gate is the score: pixel error instead of latent density.

    Parameters
    ----------
    prepare : callable
        ``prepare(volume) -> (image, descriptors)``, ``image`` a float32 ``(D, H, W)`` array
        on the autoencoder's grid (the gate's ``gate.prepare``).
    autoencoder : torch.nn.Module
        MONAI ``AutoencoderKL`` (``encode(x) -> (mean, std)``, ``decode(z)``); the posterior
        mean is decoded, so the score is deterministic.
    """

    def __init__(self, prepare: Callable, autoencoder) -> None:
        self.prepare, self.autoencoder = prepare, autoencoder
        #: ``(volume repr, message)`` for each volume that ``prepare`` refused (scored inf).
        self.failures: list[tuple[str, str]] = []

    @classmethod
    def from_gate(cls, gate) -> ReconstructionError:
        return cls(gate.prepare, gate.model.autoencoder)

    def fit(self, train_volumes: Sequence[Volume]) -> ReconstructionError:
        """Nothing to learn (the autoencoder is the gate's); records ``train_scores``."""
        self.train_scores = np.array([self.score(v) for v in train_volumes])
        return self

    def score(self, volume: Volume) -> float:
        import torch

        if _unusable(volume.values(np.float32)):
            return float("inf")
        try:
            image = np.asarray(self.prepare(volume)[0], np.float32)
        except (MedgenError, ValueError) as exc:  # the gate refuses it: as far out as it gets
            self.failures.append((repr(volume), str(exc)))
            return float("inf")
        if _unusable(image):
            return float("inf")
        ae = self.autoencoder.eval()
        device = next(ae.parameters()).device
        x = torch.from_numpy(image).to(device)[None, None]
        with torch.no_grad():
            reconstruction = ae.decode(ae.encode(x)[0])
        error = float(torch.mean(torch.abs(reconstruction - x)))
        return error if np.isfinite(error) else float("inf")


def _nan_as_inf(scores: Sequence[float]) -> np.ndarray:
    scores = np.asarray(scores, np.float64).ravel()
    return np.where(np.isnan(scores), np.inf, scores)


def auroc(id_scores: Sequence[float], ood_scores: Sequence[float]) -> float:
    """Probability that an OOD input scores above an ID one (ties count half).

    Rank-based (Mann-Whitney U), exact with ``inf`` scores; NaN counts as ``+inf``.

    Examples
    --------
    >>> auroc([0.1, 0.2], [0.3, float("inf")]), auroc([1.0, 1.0], [1.0])
    (1.0, 0.5)
    """
    from scipy.stats import rankdata

    id_scores, ood_scores = _nan_as_inf(id_scores), _nan_as_inf(ood_scores)
    n_id, n_ood = id_scores.size, ood_scores.size
    if n_id == 0 or n_ood == 0:
        raise ValueError("auroc needs at least one ID and one OOD score")
    ranks = rankdata(np.concatenate([id_scores, ood_scores]))  # average ranks for ties
    u = ranks[n_id:].sum() - n_ood * (n_ood + 1) / 2
    return float(u / (n_id * n_ood))


def rates_at(threshold: float, scores: Sequence[float]) -> float:
    """Fraction of ``scores`` flagged as out (``score > threshold``; NaN counts as out).

    On ID scores this is the false-positive rate, on OOD scores the true-positive rate.
    """
    scores = _nan_as_inf(scores)
    return float(np.mean(scores > threshold)) if scores.size else float("nan")
