"""Generative metrics: how close a set of synthetic volumes is to a set of real ones.

Feature-space metrics take feature vectors ``(N, F)`` (see :mod:`medgen.metrics.features` for
the feature space medgen trains; the numbers mean nothing across feature spaces):

* :func:`frechet_distance` - Fréchet distance between Gaussians fitted to the two sets
  (MONAI ``FIDMetric``; "FID" when the features are Inception's, here ``fid_medgen3d``).
* :func:`mmd` - unbiased squared maximum mean discrepancy, RBF kernel (median-heuristic
  bandwidth) or linear kernel (MONAI ``MMDMetric``).
* :func:`two_sample_auc` - a classifier-based two-sample test: cross-validated ROC AUC of a
  logistic regression telling the sets apart (0.5: indistinguishable).
* :func:`memorisation` - is a synthetic sample a copy of a training volume?

Image-space metrics take volumes ``(N, D, H, W)`` normalised to a known range:

* :func:`diversity` - mean pairwise MS-SSIM within a set (lower: more diverse); compare the
  synthetic set's value with the real set's.

Every function checks its inputs (shapes, at least 2 samples, finite values) and names the
parameter in its one-line error. Only numpy/SciPy are imported at module level; MONAI and
torch are imported by the functions that use them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from medgen.validate import (
    ParameterError,
    check_int,
    check_positive,
    check_seed,
    literal_options,
    look_up_option,
)

__all__ = [
    "MmdKernel",
    "MemorisationReport",
    "check_features",
    "diversity",
    "frechet_distance",
    "median_bandwidth",
    "memorisation",
    "mmd",
    "ncc_matrix",
    "roc_auc",
    "two_sample_auc",
]

MmdKernel = Literal["rbf", "linear"]


# -- input checks ----------------------------------------------------------------------------


def check_features(name: str, features: Any, *, min_count: int = 2) -> np.ndarray:
    """``features`` as a finite float64 array ``(N, F)`` with ``N >= min_count``.

    Examples
    --------
    >>> check_features("real_features", np.zeros((1, 4)))
    Traceback (most recent call last):
    ...
    medgen.validate.ParameterError: `real_features` must hold at least 2 samples (N, F), got shape (1, 4)
    """
    try:
        out = np.asarray(features, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ParameterError(
            f"`{name}` must be a numeric array (N, F), got {type(features).__name__}"
        ) from exc
    if out.ndim != 2:
        raise ParameterError(f"`{name}` must be 2D (N samples, F features), got shape {out.shape}")
    if out.shape[0] < min_count:
        noun = "sample" if min_count == 1 else "samples"
        raise ParameterError(f"`{name}` must hold at least {min_count} {noun} (N, F), got shape {out.shape}")
    if out.shape[1] < 1:
        raise ParameterError(f"`{name}` must have at least 1 feature, got shape {out.shape}")
    if not np.all(np.isfinite(out)):
        raise ParameterError(f"`{name}` must be finite, got NaN or infinite values")
    return out


def _same_dim(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ParameterError(
            f"`{name_a}` and `{name_b}` must have the same number of features, "
            f"got {a.shape[1]} and {b.shape[1]}"
        )


def _volumes(name: str, volumes: Any, min_count: int) -> np.ndarray:
    from medgen.metrics.features import check_volume_stack

    return check_volume_stack(name, volumes, min_count=min_count)


# -- distribution distances -----------------------------------------------------------------


def frechet_distance(features_a: Any, features_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with unbiased covariances
    (computed by MONAI ``FIDMetric``, matrix square root by SciPy). Symmetric; 0 for a set
    with itself. With fewer samples than features the covariances are rank-deficient and the
    value is biased upwards; compare values from sets of equal sizes.

    Parameters
    ----------
    features_a, features_b : array_like, shape (N, F) and (M, F)
        N, M >= 2, F >= 2.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = rng.normal(size=(20000, 2))
    >>> round(frechet_distance(a, a + [3.0, 4.0]), 6)  # shifted copy: |shift|^2
    25.0
    """
    import torch
    from monai.metrics import FIDMetric

    a = check_features("features_a", features_a)
    b = check_features("features_b", features_b)
    _same_dim("features_a", a, "features_b", b)
    if a.shape[1] < 2:
        # MONAI's covariance squeezes a 1x1 matrix to a scalar, which its matrix product refuses.
        raise ParameterError(f"`features_a` must have at least 2 features, got shape {a.shape}")
    with warnings.catch_warnings():
        # MONAI 1.6 passes SciPy's deprecated ``disp`` to sqrtm: its warning says nothing to users.
        warnings.filterwarnings(
            "ignore", message=".*`disp` argument is deprecated", category=DeprecationWarning
        )
        value = FIDMetric()(torch.from_numpy(b), torch.from_numpy(a))
    return float(max(float(value), 0.0))


def median_bandwidth(features_a: Any, features_b: Any) -> float:
    """RBF bandwidth by the median heuristic: the median Euclidean distance between distinct
    samples of the pooled set (falls back to 1.0 when that median is 0).

    Examples
    --------
    >>> median_bandwidth([[0.0], [1.0]], [[3.0], [4.0]])  # distances 1, 3, 4, 2, 3, 1
    2.5
    """
    from scipy.spatial.distance import pdist

    a = check_features("features_a", features_a)
    b = check_features("features_b", features_b)
    _same_dim("features_a", a, "features_b", b)
    median = float(np.median(pdist(np.concatenate([a, b]))))
    return median if median > 0 else 1.0


def mmd(
    features_a: Any,
    features_b: Any,
    *,
    kernel: MmdKernel = "rbf",
    bandwidth: float | None = None,
) -> float:
    """Unbiased squared maximum mean discrepancy (Gretton et al. 2012, Eq. 3).

    ``MMD^2_u = mean_{i!=j} k(a_i, a_j) + mean_{i!=j} k(b_i, b_j) - 2 mean_{i,j} k(a_i, b_j)``.
    Its expectation is 0 when both sets come from one distribution, so values slightly below
    0 happen; with a set and itself it is ``-2/N`` times a spread term, not exactly 0.

    Parameters
    ----------
    features_a, features_b : array_like, shape (N, F) and (M, F)
    kernel : {"rbf", "linear"}
        ``"rbf"``: ``exp(-|x - y|^2 / (2 bandwidth^2))``, sensitive to any difference of the
        distributions. ``"linear"``: ``x . y``, whose MMD^2 estimates ``|mu_a - mu_b|^2`` (only
        the means); computed by MONAI ``MMDMetric`` (linear kernel only, and it needs N == M;
        for N != M the same U-statistic is computed here).
    bandwidth : float > 0, optional
        RBF bandwidth in feature units; default :func:`median_bandwidth`.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(4000, 2)), rng.normal(size=(4000, 2))
    >>> round(mmd(a, b + [3.0, 0.0], kernel="linear"))  # estimates |mu_a - mu_b|^2 = 9
    9
    """
    kernel = look_up_option("kernel", kernel, literal_options(MmdKernel))
    a = check_features("features_a", features_a)
    b = check_features("features_b", features_b)
    _same_dim("features_a", a, "features_b", b)
    if kernel == "linear":
        if a.shape[0] == b.shape[0]:
            import torch
            from monai.metrics import MMDMetric

            return float(MMDMetric()(torch.from_numpy(a), torch.from_numpy(b)))
        k_aa, k_bb, k_ab = a @ a.T, b @ b.T, a @ b.T
    else:
        from scipy.spatial.distance import cdist

        sigma = median_bandwidth(a, b) if bandwidth is None else check_positive("bandwidth", bandwidth)
        scale = -0.5 / (sigma * sigma)
        k_aa = np.exp(scale * cdist(a, a, "sqeuclidean"))
        k_bb = np.exp(scale * cdist(b, b, "sqeuclidean"))
        k_ab = np.exp(scale * cdist(a, b, "sqeuclidean"))
    m, n = a.shape[0], b.shape[0]
    term_a = (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
    term_b = (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
    return float(term_a + term_b - 2.0 * k_ab.mean())


# -- diversity ------------------------------------------------------------------------------


def diversity(volumes: Any, *, data_range: float = 1.0, max_pairs: int = 45, seed: int = 0) -> float:
    """Mean pairwise MS-SSIM within a set of volumes: 1 when all are identical, near 0 for
    unrelated noise. Lower means more diverse; read it next to the real set's value (a
    generator collapsing onto a few modes scores above the real set).

    Parameters
    ----------
    volumes : array_like, shape (N, D, H, W)
        N >= 2, on one grid, in units where ``data_range`` is the span (1.0 for [0, 1]).
    data_range : float > 0
    max_pairs : int >= 1
        Use all ``N (N - 1) / 2`` pairs if that is at most ``max_pairs``, else a random subset
        of ``max_pairs`` distinct pairs drawn with ``seed``.
    seed : int

    Returns
    -------
    float, the mean of :func:`medgen.metrics.quality.ms_ssim` over the pairs.
    """
    from medgen.metrics.quality import ms_ssim

    vols = _volumes("volumes", volumes, min_count=2)
    data_range = check_positive("data_range", data_range)
    max_pairs = check_int("max_pairs", max_pairs, minimum=1)
    seed = check_seed("seed", seed)
    pairs = [(i, j) for i in range(vols.shape[0]) for j in range(i + 1, vols.shape[0])]
    if len(pairs) > max_pairs:
        chosen = np.random.default_rng(seed).choice(len(pairs), size=max_pairs, replace=False)
        pairs = [pairs[int(k)] for k in sorted(chosen)]
    return float(np.mean([ms_ssim(vols[i], vols[j], data_range) for i, j in pairs]))


# -- two-sample classifier test --------------------------------------------------------------


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve by the Mann-Whitney rank statistic (ties count 1/2).

    ``AUC = (R_1 - n_1 (n_1 + 1) / 2) / (n_1 n_0)`` where ``R_1`` is the sum of the average
    ranks of the positives' scores: the probability that a random positive scores above a
    random negative.

    Parameters
    ----------
    scores : array_like, shape (N,)
        Higher means "more likely positive".
    labels : array_like of {0, 1} or bool, shape (N,)
        Both classes present.

    Examples
    --------
    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])  # 3 of 4 (pos, neg) pairs ordered
    0.75
    >>> roc_auc([1, 1, 1, 1], [0, 1, 0, 1])
    0.5
    """
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1 or s.shape != y.shape:
        raise ParameterError(
            f"`scores` and `labels` must be 1D of one length, got shapes {s.shape} and {y.shape}"
        )
    if not np.all(np.isfinite(s)):
        raise ParameterError("`scores` must be finite, got NaN or infinite values")
    if y.dtype != bool and not np.all(np.isin(y, (0, 1))):
        raise ParameterError(f"`labels` must be 0/1 or bool, got values {np.unique(y)[:5].tolist()}")
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ParameterError(f"`labels` must hold both classes, got {n_pos} positives and {n_neg} negatives")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 50) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression by Newton's method; the intercept is not penalised."""
    from scipy.special import expit

    design = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    penalty = np.full(design.shape[1], l2)
    penalty[-1] = 0.0
    w = np.zeros(design.shape[1])
    for _ in range(iterations):
        p = expit(design @ w)
        grad = design.T @ (p - y) + penalty * w
        hess = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w[:-1], float(w[-1])


def two_sample_auc(
    real_features: Any, synth_features: Any, *, folds: int = 5, seed: int = 0, l2: float = 1.0
) -> float:
    """Classifier two-sample test: held-out ROC AUC of telling synthetic from real.

    A logistic regression (L2 penalty ``l2`` on standardised features, like scikit-learn's
    default ``C=1``) is fitted on ``folds - 1`` folds of a stratified k-fold split (both sets
    shuffled with ``seed`` and dealt into folds) and scores the held-out fold; the result is
    the mean of the per-fold :func:`roc_auc` values. 0.5: the sets cannot be told apart by a
    linear classifier in this feature space; 1.0: perfectly separable. With few samples per
    fold the value is noisy (for 10 vs 10 samples a spread of +-0.2 around 0.5 is normal).

    Parameters
    ----------
    real_features, synth_features : array_like, shape (N, F) and (M, F)
        N, M >= 2; the number of folds used is ``min(folds, N, M)``.
    folds : int >= 2
    seed : int
    l2 : float > 0
    """
    real = check_features("real_features", real_features)
    synth = check_features("synth_features", synth_features)
    _same_dim("real_features", real, "synth_features", synth)
    folds = check_int("folds", folds, minimum=2)
    seed = check_seed("seed", seed)
    l2 = check_positive("l2", l2)
    k = min(folds, real.shape[0], synth.shape[0])
    x = np.concatenate([real, synth])
    y = np.concatenate([np.zeros(real.shape[0]), np.ones(synth.shape[0])])
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=int)
    for cls in (0.0, 1.0):
        members = rng.permutation(np.flatnonzero(y == cls))
        fold_of[members] = np.arange(len(members)) % k
    aucs = []
    for f in range(k):
        train, test = fold_of != f, fold_of == f
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        std[std == 0] = 1.0
        w, b = _fit_logistic((x[train] - mean) / std, y[train], l2)
        aucs.append(roc_auc((x[test] - mean) / std @ w + b, y[test]))
    return float(np.mean(aucs))


# -- memorisation --------------------------------------------------------------------------


def ncc_matrix(volumes_a: Any, volumes_b: Any) -> np.ndarray:
    """Normalised cross-correlation of every volume of ``a`` with every volume of ``b``.

    ``NCC(x, y) = mean((x - mean x)(y - mean y)) / (std x std y)`` over all voxels: 1 for
    ``y = s x + t`` with ``s > 0``; a constant volume has NCC 0 with everything.

    Parameters
    ----------
    volumes_a, volumes_b : array_like, shape (N, D, H, W) and (M, D, H, W)

    Returns
    -------
    np.ndarray, shape (N, M), float64

    Examples
    --------
    >>> v = np.random.default_rng(0).normal(size=(2, 4, 4, 4))
    >>> ncc_matrix(v, 3 * v + 1).diagonal().round(6).tolist()
    [1.0, 1.0]
    """
    a = _volumes("volumes_a", volumes_a, min_count=1)
    b = _volumes("volumes_b", volumes_b, min_count=1)
    if a.shape[1:] != b.shape[1:]:
        raise ParameterError(
            f"`volumes_a` and `volumes_b` must share one grid, got {a.shape[1:]} and {b.shape[1:]}"
        )

    def unit(v: np.ndarray) -> np.ndarray:
        flat = v.reshape(v.shape[0], -1).astype(np.float64)
        flat -= flat.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(flat, axis=1, keepdims=True)
        return np.divide(flat, norm, out=np.zeros_like(flat), where=norm > 0)

    return np.clip(unit(a) @ unit(b).T, -1.0, 1.0)


@dataclass
class MemorisationReport:
    """Nearest training volume of every synthetic sample, and which samples look like copies.

    Arrays have one entry per synthetic sample. A sample is flagged when it is closer to some
    training volume than any two training volumes are to each other: its feature distance is
    below ``distance_threshold`` (the smallest distance between two training volumes) or its
    largest NCC is above ``ncc_threshold`` (the largest NCC between two training volumes).

    ``chance_fraction`` is what an ideal generator scores: for a sample drawn independently
    from the training distribution, the chance of being closer to a training volume than any
    two training volumes are is ``2 / (n_train + 1)`` per criterion (by exchangeability the
    closest pair of ``n_train + 1`` points holds the new one with that probability). Flagged
    fractions well above it mean copying.
    """

    nearest_train: np.ndarray  # (N,) int, nearest training volume in feature space
    feature_distance: np.ndarray  # (N,) Euclidean distance to it, feature units
    ncc_to_nearest: np.ndarray  # (N,) NCC with that volume
    max_ncc_train: np.ndarray  # (N,) int, training volume of the largest NCC
    max_ncc: np.ndarray  # (N,) that NCC
    distance_threshold: float
    ncc_threshold: float
    n_train: int

    @property
    def flagged_by_distance(self) -> np.ndarray:
        return self.feature_distance < self.distance_threshold

    @property
    def flagged_by_ncc(self) -> np.ndarray:
        return self.max_ncc > self.ncc_threshold

    @property
    def flagged(self) -> np.ndarray:
        return self.flagged_by_distance | self.flagged_by_ncc

    @property
    def fraction_flagged(self) -> float:
        return float(self.flagged.mean())

    @property
    def chance_fraction(self) -> float:
        return 2.0 / (self.n_train + 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: thresholds, fractions and one record per synthetic sample."""
        by_distance, by_ncc = self.flagged_by_distance, self.flagged_by_ncc
        samples = [
            {
                "sample": i,
                "nearest_train": int(self.nearest_train[i]),
                "feature_distance": float(self.feature_distance[i]),
                "ncc_to_nearest": float(self.ncc_to_nearest[i]),
                "max_ncc_train": int(self.max_ncc_train[i]),
                "max_ncc": float(self.max_ncc[i]),
                "flagged": bool(self.flagged[i]),
                "flagged_by": [
                    name
                    for name, hit in (("feature_distance", by_distance[i]), ("ncc", by_ncc[i]))
                    if hit
                ],
            }
            for i in range(len(self.nearest_train))
        ]
        return {
            "distance_threshold": self.distance_threshold,
            "ncc_threshold": self.ncc_threshold,
            "n_train": self.n_train,
            "fraction_flagged": self.fraction_flagged,
            "fraction_flagged_by_distance": float(self.flagged_by_distance.mean()),
            "fraction_flagged_by_ncc": float(self.flagged_by_ncc.mean()),
            "chance_fraction_per_criterion": self.chance_fraction,
            "samples": samples,
        }


def memorisation(
    synth_features: Any, train_features: Any, synth_volumes: Any, train_volumes: Any
) -> MemorisationReport:
    """Nearest training volume of each synthetic sample, in feature space and by NCC.

    Parameters
    ----------
    synth_features : array_like, shape (N, F)
    train_features : array_like, shape (M, F), M >= 2
    synth_volumes : array_like, shape (N, D, H, W)
    train_volumes : array_like, shape (M, D, H, W)
        The volumes the generator was trained on, on the synthetic volumes' grid.

    Returns
    -------
    MemorisationReport

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> train = rng.random((6, 8, 8, 8))
    >>> feats = train.reshape(6, -1)[:, ::8]
    >>> report = memorisation(feats[:2], feats, train[:2], train)  # two exact copies
    >>> report.flagged.tolist(), report.nearest_train.tolist()
    ([True, True], [0, 1])
    """
    from scipy.spatial.distance import cdist, pdist

    s_feat = check_features("synth_features", synth_features, min_count=1)
    t_feat = check_features("train_features", train_features, min_count=2)
    _same_dim("synth_features", s_feat, "train_features", t_feat)
    s_vol = _volumes("synth_volumes", synth_volumes, min_count=1)
    t_vol = _volumes("train_volumes", train_volumes, min_count=2)
    if s_vol.shape[0] != s_feat.shape[0]:
        raise ParameterError(
            "`synth_volumes` must hold one volume per row of `synth_features`, "
            f"got {s_vol.shape[0]} and {s_feat.shape[0]}"
        )
    if t_vol.shape[0] != t_feat.shape[0]:
        raise ParameterError(
            "`train_volumes` must hold one volume per row of `train_features`, "
            f"got {t_vol.shape[0]} and {t_feat.shape[0]}"
        )
    distance = cdist(s_feat, t_feat)
    nearest = distance.argmin(axis=1)
    rows = np.arange(len(nearest))
    ncc = ncc_matrix(s_vol, t_vol)
    train_ncc = ncc_matrix(t_vol, t_vol)
    upper = np.triu_indices(t_vol.shape[0], k=1)
    return MemorisationReport(
        nearest_train=nearest,
        feature_distance=distance[rows, nearest],
        ncc_to_nearest=ncc[rows, nearest],
        max_ncc_train=ncc.argmax(axis=1),
        max_ncc=ncc.max(axis=1),
        distance_threshold=float(pdist(t_feat).min()),
        ncc_threshold=float(train_ncc[upper].max()),
        n_train=int(t_feat.shape[0]),
    )
