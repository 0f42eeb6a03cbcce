"""Self-supervised denoising adapted to one scan: SURE-fitted expansion of non-local features.

The recipe (``bench/README.md`` records what it measures):

1. **Features.** Classical estimates of the scan ``y`` — non-local means at three filter
   strengths and two patch sizes (:func:`skimage.restoration.denoise_nl_means`), Gaussian
   smoothings, ``y`` itself and a constant — each multiplied by soft *band* weights that
   select voxels by intensity (6 bands) and by edge strength (3 bands, gradient magnitude of
   the non-local-means estimate in units of the noise sigma). That gives
   ``8 x 18 = 144`` basis volumes ``phi_k(y)``.
2. **Adaptation to the scan with SURE.** The output is ``f(y) = sum_k a_k phi_k(y)``. For
   Gaussian noise of known sigma, Stein's unbiased risk estimate
   ``|y - f(y)|^2 - sum_i v_i + 2 sum_i v_i d f_i / d y_i`` (``v_i = sigma^2``) estimates the
   squared error against the unknown clean scan without clean data; it is quadratic in the
   weights ``a``, so the SURE-optimal weights solve one linear system (SURE-LET, Blu &
   Luisier 2007). The divergence of each basis volume — through non-local means and the band
   weights — is estimated with one random probe ``b`` and a finite difference,
   ``b . (phi_k(y + eps b) - phi_k(y)) / eps`` (Monte-Carlo SURE, Ramani et al. 2008); with a
   few hundred weights and millions of voxels the single probe cannot be over-fitted.
   When adapting, one more feature joins: a BM4D-style collaborative estimate (cubes grouped
   by block matching on the anchor, hard threshold then empirical Wiener shrinkage of each
   group's 4D DCT, :mod:`medgen.adapt.block_matching`); its groups stay fixed for the probe.
3. **Pre-trained weights** (:func:`pretrain_denoiser`): the same expansion fitted with the
   clean reference on *other* scans with synthetic noise; used as is ("no adaptation") or as
   the prior that adaptation shrinks towards (``prior_weight``).

Rician (MR magnitude) noise: the expansion estimates the magnitude's mean ``E[M | A]``, with
the per-voxel variance ``v_i = E[M^2] - E[M]^2`` of the Rician distribution taken from a first
estimate of ``A`` (heteroscedastic SURE); the Rician noise floor is then removed by inverting
that mean (exactly well above the floor, with ``sqrt(max(f^2 - 2 sigma^2, 0))`` near it: see
:func:`~medgen.adapt.rician.remove_rician_floor`).

All volumes are ``(I, J, K)`` float32 in the image's own units; ``noise_sigma`` is in those
units (per quadrature channel for Rician noise).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from medgen.adapt.block_matching import COLLABORATIVE_REACH_VOX, CollaborativeTerm
from medgen.adapt.common import AdaptRecord, IntensityScale, budget_is_empty, check_budget
from medgen.adapt.rician import above_floor, remove_rician_floor, rician_mean, rician_mean_inverse
from medgen.adapt.sure_regions import FitRegion, fit_regions
from medgen.validate import (
    ParameterError,
    check_non_negative,
    check_positive,
    check_seed,
    check_volume_array,
    literal_options,
    look_up_option,
)

__all__ = [
    "LETDenoiser",
    "NoiseKind",
    "adapt_denoise",
    "denoise_features",
    "pretrain_denoiser",
    "rician_mean",
    "rician_mean_inverse",
]

NoiseKind = Literal["gaussian", "rician"]

#: Non-local means feature channels: (patch side, search radius, h / sigma).
NLM_SETTINGS = ((5, 3, 0.4), (5, 3, 0.6), (5, 3, 0.9), (3, 3, 0.6))
ANCHOR_CHANNEL = 2  # non-local means (5, 3, 0.6): the estimate the band weights look at
GAUSS_SIGMAS_VOX = (0.8, 1.5)
N_FEATURES = 1 + len(NLM_SETTINGS) + len(GAUSS_SIGMAS_VOX) + 1  # y, NLM, Gaussian, constant
#: Intensity band centres (normalised units) and edge band centres (gradient / sigma).
INTENSITY_BANDS = tuple(np.linspace(0.0, 1.0, 6))
EDGE_BANDS = (0.0, 1.0, 2.0)
_PROBE_STREAM = 0x5C0BE  # spawn key that separates the SURE probe from other uses of `seed`
_SLAB_VOXELS = 1 << 16  # voxels per slab when accumulating the normal equations
N_BANDS = len(INTENSITY_BANDS) * len(EDGE_BANDS)
N_BASIS = N_FEATURES * N_BANDS
#: Side (voxels) of the largest box on which SURE is fitted (4 M voxels: plenty for 144 weights);
#: 128 with the collaborative term, whose wider margin it makes room for.
FIT_BOX_VOX = 160
#: How far a voxel's features reach: NLM search 3 + patch radius 2, then the edge strength's
#: 1-voxel Gaussian (radius 4) and gradient (1); Gaussian features reach 6.
_FEATURE_REACH_VOX = 12
#: Scans thinner than this (a few slices) leave the collaborative term out: too few cubes to match.
_COLLABORATIVE_MIN_SIDE_VOX = 8
#: Fit boxes of at least this many voxels (128^3, the largest with the collaborative term)
#: match its groups again for the probe; smaller ones keep them (measured on 48^3 and 128^3
#: crops: see :class:`~medgen.adapt.block_matching.CollaborativeTerm`).
_REMATCH_MIN_VOXELS = 1 << 21


def _check_noise(noise: Any) -> str:
    return look_up_option("noise", noise, literal_options(NoiseKind))


def denoise_features(y: np.ndarray, noise_level: float, dtype: type = np.float64) -> np.ndarray:
    """Feature channels of a normalised volume, ``(8, I, J, K)`` of ``dtype``.

    Channels: ``y``; non-local means for each of :data:`NLM_SETTINGS` (skimage's fast mode,
    computed in float64 so that the finite differences of MC-SURE stay exact); Gaussian
    smoothing for each of :data:`GAUSS_SIGMAS_VOX`; a constant 1. The non-local means run in
    threads (scikit-image releases the GIL in its loops), one per CPU core at most.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    from scipy import ndimage
    from skimage.restoration import denoise_nl_means

    y64 = np.asarray(y, dtype=np.float64)
    out = np.empty((N_FEATURES, *y64.shape), dtype=dtype)
    out[0] = y64

    def nlm(i: int) -> None:
        patch, search, h = NLM_SETTINGS[i]
        out[1 + i] = denoise_nl_means(
            y64, patch_size=patch, patch_distance=search, h=h * noise_level, sigma=noise_level,
            fast_mode=True, preserve_range=True,
        )

    workers = max(1, min(len(NLM_SETTINGS), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(nlm, range(len(NLM_SETTINGS))))
    for i, sigma_vox in enumerate(GAUSS_SIGMAS_VOX):
        out[1 + len(NLM_SETTINGS) + i] = ndimage.gaussian_filter(y64, sigma_vox, mode="nearest")
    out[-1] = 1.0
    return out


def _edge_strength(anchor: np.ndarray, noise_level: float) -> np.ndarray:
    """Gradient magnitude of the (1-voxel smoothed) anchor, in units of the noise sigma."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(np.asarray(anchor, dtype=np.float64), 1.0, mode="nearest")
    return np.sqrt(sum(g * g for g in np.gradient(smooth))) / noise_level


def _soft_bands(values: np.ndarray, centres: Sequence[float]) -> np.ndarray:
    """Gaussian band memberships of ``values`` (width = centre spacing), summing to 1.

    Examples
    --------
    >>> w = _soft_bands(np.array([0.0, 0.5, 1.0]), (0.0, 1.0))
    >>> np.round(w, 3).tolist(), np.allclose(w.sum(axis=0), 1.0)
    ([[0.622, 0.5, 0.378], [0.378, 0.5, 0.622]], True)
    """
    centres = np.asarray(centres, dtype=np.float64)
    width = float(centres[1] - centres[0]) if len(centres) > 1 else 1.0
    d = (np.asarray(values, dtype=np.float64)[None] - centres.reshape(-1, *([1] * np.ndim(values)))) / width
    logits = -0.5 * d * d
    logits -= logits.max(axis=0, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=0, keepdims=True)


def _basis(features: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Basis values ``(C * B, n)`` for flattened ``features`` ``(C, n)`` and ``edges`` ``(n,)``."""
    wi = _soft_bands(features[ANCHOR_CHANNEL], INTENSITY_BANDS)
    we = _soft_bands(edges, EDGE_BANDS)
    bands = (wi[:, None] * we[None]).reshape(-1, features.shape[1])  # (B, n)
    return (features[:, None] * bands[None]).reshape(-1, features.shape[1])


@dataclass
class LETDenoiser:
    """A fitted linear expansion of band-weighted non-local features (see module notes).

    Attributes
    ----------
    weights : ndarray (K,)
        Expansion weights, in the normalised intensity units of the scan they were fitted on.
    noise : {"gaussian", "rician"}
    fitted_on : str
        ``"sure"`` (fitted on a noisy scan itself) or ``"clean"`` (supervised pre-training).
    """

    weights: np.ndarray
    noise: str
    fitted_on: str = "sure"
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"weights": [float(w) for w in self.weights], "noise": self.noise, "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LETDenoiser:
        return cls(np.asarray(data["weights"], dtype=np.float64), str(data["noise"]), str(data.get("fitted_on", "sure")))


def _normalise(y_phys: np.ndarray, noise: str) -> IntensityScale:
    if noise == "rician":
        # Magnitudes keep 0 as 0 (the Rician model is not shift-invariant): scale only.
        return IntensityScale(0.0, float(np.percentile(y_phys, 99.5)) or 1.0)
    return IntensityScale.fit(y_phys)


class _Accumulator:
    """Normal equations of the expansion, summed slab by slab (the basis never fits in memory)."""

    def __init__(self, n_basis: int) -> None:
        self.gram = np.zeros((n_basis, n_basis))
        self.rhs = np.zeros(n_basis)
        self.div = np.zeros(n_basis)
        self.count = 0

    def add(self, phi: np.ndarray, target: np.ndarray, dphi_probe: np.ndarray | None = None, weight: float = 1.0) -> None:
        """Voxels that each stand for ``weight`` voxels of the scan."""
        self.gram += weight * (phi @ phi.T)
        self.rhs += weight * (phi @ target)
        if dphi_probe is not None:
            self.div += weight * dphi_probe.sum(axis=1)
        self.count += target.size


def _slabs(n0: int, per_slab: int) -> list[slice]:
    step = max(1, per_slab)
    return [slice(i, min(i + step, n0)) for i in range(0, n0, step)]


def _fit_box_side(reach: int) -> int:
    """A wider reach shrinks the fit box, so that box and margin cost what they did without it."""
    return FIT_BOX_VOX - 2 * (reach - _FEATURE_REACH_VOX)


def _sure_system(
    y: np.ndarray,
    f0: np.ndarray,
    s: float,
    noise: str,
    seed: int,
    record: AdaptRecord,
    extras: Sequence[_RegionEstimate] = (),
    reach: int = _FEATURE_REACH_VOX,
) -> tuple[np.ndarray, np.ndarray]:
    """Normal equations ``(gram, rhs)`` of SURE on the fit regions of the normalised scan ``y``
    (:func:`~medgen.adapt.sure_regions.fit_regions`: a box around the anatomy, and on a large
    scan a few boxes standing for the rest).

    ``f0`` are the features of the whole scan (the last ``len(extras)`` of them made by
    ``extras``, each called with a region of ``y``, its slices and its anchor). The classical
    features at ``y + eps b`` are computed on each box plus a margin wider than their reach,
    so that inside the box they match ``f0`` exactly but for the probe. An extra estimate (a
    network, whose reach is unknown) is run on that margin box twice, with and without the
    probe, and only its change is used. ``reach`` is the margin (voxels): at least how far the
    features read. The SURE-optimal weights solve ``gram a = rhs``.
    """
    t0 = time.perf_counter()
    regions = fit_regions(y, _fit_box_side(reach), seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PROBE_STREAM]))
    acc = _Accumulator(f0.shape[0] * N_BANDS)
    for region in regions:
        _add_region(acc, region, y, f0, s, noise, rng, extras, reach)
    main = regions[0].box
    record.params["fit_box_vox"] = [b.stop - b.start for b in main]
    record.params["fit_outside_boxes"] = len(regions) - 1
    record.params["seconds_fit"] = round(time.perf_counter() - t0, 2)
    # SURE(a) = |y - Phi a|^2 - sum v + 2 sum_k a_k div_k  ->  (Phi^T Phi) a = Phi^T y - div
    return acc.gram, acc.rhs - acc.div


def _add_region(
    acc: _Accumulator,
    region: FitRegion,
    y: np.ndarray,
    f0: np.ndarray,
    s: float,
    noise: str,
    rng: np.random.Generator,
    extras: Sequence[_RegionEstimate],
    reach: int,
) -> None:
    """Add one fit region's voxels (those it keeps, each ``region.weight`` times) to ``acc``."""
    box = region.box
    outer = tuple(slice(max(b.start - reach, 0), min(b.stop + reach, n)) for b, n in zip(box, y.shape))
    inner = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer))
    probe_outer = rng.standard_normal(tuple(o.stop - o.start for o in outer))
    eps = 0.02 * s
    y_outer = y[outer].astype(np.float64)
    f1 = denoise_features(y_outer + eps * probe_outer, s)
    anchor_outer = f0[(ANCHOR_CHANNEL, *outer)]
    anchor0, anchor1 = anchor_outer.astype(np.float64), f1[ANCHOR_CHANNEL]
    e1 = _edge_strength(anchor1, s)[inner]
    if extras:
        unprobed = [fn(y_outer, outer, anchor0)[inner] for fn in extras]
        changes = [fn(y_outer + eps * probe_outer, outer, anchor1)[inner] - u for fn, u in zip(extras, unprobed)]
    f1 = f1[(slice(None), *inner)]
    probe = probe_outer[inner]
    e0 = _edge_strength(anchor_outer, s)[inner]
    fb = f0[(slice(None), *box)]
    if extras:
        f1 = np.concatenate([f1, fb[N_FEATURES:] + np.stack(changes)])
    n_features = fb.shape[0]
    yb = y[box]
    if noise == "rician":
        # Per-voxel variance of the magnitude, E[M^2] - E[M]^2 = 2 s^2 + A^2 - E[M]^2, from the
        # amplitude of the anchor estimate (floored: the estimate is rough near 0).
        amp = rician_mean_inverse(fb[ANCHOR_CHANNEL], s).astype(np.float64)
        var = np.maximum(2 * s * s + amp * amp - np.asarray(rician_mean(amp, s), np.float64) ** 2, 0.2 * s * s)
    else:
        var = None
    plane = int(np.prod(yb.shape[1:]))
    for sl in _slabs(yb.shape[0], _SLAB_VOXELS // plane):
        keep = slice(None) if region.keep is None else region.keep[sl].ravel()
        phi0 = _basis(fb[:, sl].reshape(n_features, -1)[:, keep].astype(np.float64), e0[sl].ravel()[keep])
        phi1 = _basis(f1[:, sl].reshape(n_features, -1)[:, keep], e1[sl].ravel()[keep])
        v = (s * s) if var is None else var[sl].ravel()[keep]
        acc.add(phi0, yb[sl].astype(np.float64).ravel()[keep], (phi1 - phi0) * (probe[sl].ravel()[keep] * v / eps),
                weight=region.weight)


#: An added feature: ``(voxels, their region in the scan, the anchor feature there) -> estimate``.
_RegionEstimate = Callable[[np.ndarray, tuple[slice, ...], np.ndarray], np.ndarray]


def _whole(shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def _solve(gram: np.ndarray, rhs: np.ndarray, prior: np.ndarray | None = None, prior_weight: float = 0.0) -> np.ndarray:
    """Ridge-stabilised solve of ``gram a = rhs`` (optionally shrunk towards ``prior``)."""
    k = gram.shape[0]
    ridge = 1e-7 * np.trace(gram) / k
    lhs = gram + ridge * np.eye(k)
    right = rhs.copy()
    if prior is not None and prior_weight > 0:
        lam = prior_weight * np.trace(gram) / k
        lhs += lam * np.eye(k)
        right += lam * prior
    return np.linalg.solve(lhs, right)


def _apply(weights: np.ndarray, f0: np.ndarray, s: float) -> np.ndarray:
    """``sum_k a_k phi_k(y)`` from the features ``f0`` of a normalised volume."""
    e0 = _edge_strength(f0[ANCHOR_CHANNEL], s)
    out = np.empty(f0.shape[1:], dtype=np.float64)
    plane = int(np.prod(out.shape[1:]))
    for sl in _slabs(out.shape[0], _SLAB_VOXELS // plane):
        phi = _basis(f0[:, sl].reshape(f0.shape[0], -1).astype(np.float64), e0[sl].ravel())
        out[sl] = (weights @ phi).reshape(out[sl].shape)
    return out


def anchor_weights(n_features: int = N_FEATURES) -> np.ndarray:
    """Weights that reproduce the anchor feature (non-local means, h = 0.6 sigma) exactly.

    The band weights sum to 1 at every voxel, so weight 1 on the anchor in every band gives
    the anchor itself.
    """
    w = np.zeros((n_features, N_BANDS))
    w[ANCHOR_CHANNEL] = 1.0
    return w.ravel()


def _finish(out: np.ndarray, s: float, noise: str, scale: IntensityScale) -> np.ndarray:
    if noise == "rician":
        out = remove_rician_floor(out, s)
    return scale.inverse(out.astype(np.float32))


def adapt_denoise(
    volume_values: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    noise_sigma: float | None,
    noise: NoiseKind = "gaussian",
    seconds: float | None = 0.0,
    seed: int = 0,
    init_model: LETDenoiser | None = None,
    log: Callable[[str], None] | None = None,
    max_steps: int | None = None,
    record: dict[str, Any] | None = None,
    prior_weight: float = 0.0,
    extra_estimates: Sequence[Callable[[np.ndarray], np.ndarray]] = (),
    extra_outputs: Sequence[np.ndarray] = (),
    collaborative: bool = True,
) -> np.ndarray:
    """Denoise one scan with an expansion fitted on the scan itself by SURE (no clean data).

    Parameters
    ----------
    volume_values : ndarray, shape (I, J, K)
        The noisy scan in physical units (never modified).
    spacing_mm : 3 floats
        Voxel size; recorded (the features work on the voxel grid).
    noise_sigma : float or None
        Noise standard deviation in image units (per quadrature channel for Rician noise).
        ``None`` estimates it with :func:`medgen.baselines.denoise.estimate_noise_sigma`.
    noise : {"gaussian", "rician"}
    seconds : float >= 0 or None
        0 (or ``max_steps=0``) switches adaptation off: the output is then ``init_model`` applied as it is, or
        without one the anchor (non-local means, h = 0.6 sigma) that an unfitted expansion
        reduces to. Any positive value fits the expansion to the scan; the fit is a fixed
        amount of work (features on the whole scan, features at ``y + eps b`` on a box of at
        most 160^3 voxels, one linear solve), reported in ``record``, not an iterative loop
        that a budget could stop early. ``None`` with a ``max_steps`` budget also adapts.
    seed : int
        Seeds the SURE probe: the same seed and data give the same output.
    init_model : LETDenoiser, optional
        Pre-trained weights (:func:`pretrain_denoiser`), applied as they are when
        ``seconds == 0``; when adapting, the fit is shrunk towards them by ``prior_weight``.
    log : callable, optional
        Receives progress lines.
    max_steps : int, optional
        Accepted for symmetry with :func:`~medgen.adapt.super_resolution.adapt_super_resolution`;
        the closed-form fit has no steps (it counts as one), so any budget > 0 gives the same output.
    record : dict, optional
        Filled in with what was done (:meth:`AdaptRecord.to_dict`), for MLflow.
    prior_weight : float >= 0
        Strength of the shrinkage towards ``init_model`` (relative to the data term; 0: none).
    extra_estimates : sequence of callables
        Other denoisers, each mapping a volume in physical units to its estimate of the clean
        volume (same shape and units), e.g. a trained network. Each becomes one more feature
        whose weights SURE fits per band; it is evaluated on the whole scan and, with and
        without the probe, on the fit box. For Rician noise it enters as the magnitude mean
        E[M] that its amplitude implies (the quantity the fit estimates), and only above the
        noise floor (:func:`~medgen.adapt.rician.above_floor` of the anchor: below ``2 sigma``
        the feature is the anchor, blended up to ``4 sigma``), where the magnitude is far
        from Gaussian and SURE misjudged a diffusion model's output (whole-volume MR: 3.3 dB
        lost in the air). Needs ``seconds > 0``.
    extra_outputs : sequence of ndarray, optional
        The ``extra_estimates`` already applied to ``volume_values`` (physical units, same
        order), when the caller has them: spares one pass of each over the whole scan.
    collaborative : bool
        When adapting, add the BM4D-style collaborative estimate as one more feature (module
        notes; left out for scans under 8 voxels along some axis); at 128^3 it adds about a
        third to the time of the fit.

    Returns
    -------
    ndarray, float32, shape (I, J, K), in the units of ``volume_values``.
    """
    started = time.perf_counter()
    y_phys = check_volume_array("volume_values", volume_values)
    noise = _check_noise(noise)
    seconds, max_steps = check_budget(seconds, max_steps)
    seed = check_seed("seed", seed) or 0
    prior_weight = check_non_negative("prior_weight", prior_weight)
    adapt = not budget_is_empty(seconds, max_steps)
    collaborative = adapt and bool(collaborative) and min(y_phys.shape) >= _COLLABORATIVE_MIN_SIDE_VOX
    if init_model is not None and init_model.noise != noise:
        raise ParameterError(f"`init_model` was fitted for {init_model.noise!r} noise, got noise={noise!r}")
    extra_estimates, extra_outputs = list(extra_estimates), list(extra_outputs)
    if extra_estimates and not adapt:
        raise ParameterError("`extra_estimates` are weighted by the SURE fit: they need `seconds` > 0")
    if extra_outputs and len(extra_outputs) != len(extra_estimates):
        raise ParameterError(
            f"`extra_outputs` must hold one volume per extra estimate ({len(extra_estimates)}), got {len(extra_outputs)}"
        )
    if noise_sigma is None:
        from medgen.baselines.denoise import estimate_noise_sigma

        noise_sigma = estimate_noise_sigma(y_phys, rician=noise == "rician")
    noise_sigma = check_positive("noise_sigma", noise_sigma)
    scale = _normalise(y_phys, noise)
    y = scale.forward(y_phys)
    s = float(noise_sigma / scale.scale)
    rec = AdaptRecord(
        method=f"sure-let-{noise}" if adapt else ("pretrained-let" if init_model is not None else "anchor-nlm") + f"-{noise}",
        params={
            "noise": noise,
            "noise_sigma": float(noise_sigma),
            "noise_level_normalised": s,
            "spacing_mm": [float(v) for v in spacing_mm],
            "seed": seed,
            "pretrained": init_model is not None,
            "n_basis": N_BASIS + N_BANDS * (len(extra_estimates) + int(collaborative)),
            "n_extra_estimates": len(extra_estimates),
            "collaborative": collaborative,
        },
    )

    def as_feature(estimate: np.ndarray) -> np.ndarray:
        # The fit estimates the magnitude's mean E[M]; a network estimates the amplitude A,
        # which near the noise floor no per-band linear weight can map to E[M] (flat there).
        if noise == "rician":
            return np.asarray(rician_mean(np.maximum(estimate, 0.0).astype(np.float64), s), np.float64)
        return estimate

    def normalised(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        return lambda v: as_feature(scale.forward(fn(scale.inverse(v))).astype(np.float64))

    def gated(estimate: np.ndarray, anchor: np.ndarray) -> np.ndarray:
        # Near the Rician floor the magnitude is far from Gaussian and SURE misjudges a
        # network's (non-linear) estimate there: it is offered only above the floor, and
        # below it the feature falls back to the anchor.
        if noise != "rician":
            return estimate
        trust = above_floor(anchor, s)
        return anchor + trust * (estimate - anchor)

    def extra_feature(fn: Callable[[np.ndarray], np.ndarray]) -> _RegionEstimate:
        estimate = normalised(fn)
        return lambda v, region, anchor: gated(estimate(v), anchor)

    network_terms = [extra_feature(fn) for fn in extra_estimates]
    extras = list(network_terms)
    t0 = time.perf_counter()
    f0 = denoise_features(y, s, np.float32)
    added = []
    reach = max(_FEATURE_REACH_VOX, COLLABORATIVE_REACH_VOX if collaborative else 0)
    if collaborative:
        box_voxels = int(np.prod([min(n, _fit_box_side(reach)) for n in y.shape]))
        term = CollaborativeTerm(s, rematch=box_voxels >= _REMATCH_MIN_VOXELS)
        rec.params["collaborative_rematch"] = term.rematch
        added.append(term.estimate(y.astype(np.float64), _whole(y.shape), f0[ANCHOR_CHANNEL].astype(np.float64)))
        extras.insert(0, term.estimate)
    if extra_estimates:
        anchor = f0[ANCHOR_CHANNEL].astype(np.float64)
        if extra_outputs:
            added += [gated(as_feature(scale.forward(v)), anchor) for v in extra_outputs]
        else:
            added += [term(y, _whole(y.shape), anchor) for term in network_terms]
    if added:
        f0 = np.concatenate([f0, np.stack(added).astype(np.float32)])
    rec.params["seconds_features"] = round(time.perf_counter() - t0, 2)
    if log is not None:
        log(f"denoise features in {rec.params['seconds_features']:.0f} s")
    if adapt:
        gram, rhs = _sure_system(y, f0, s, noise, seed, rec, extras, reach)
        prior = None
        if init_model is not None:  # added features have no prior weight: 0
            prior = np.concatenate([init_model.weights, np.zeros(N_BANDS * len(extras))])
        weights = _solve(gram, rhs, prior, prior_weight)
        rec.steps = 1
    elif init_model is not None:
        weights = init_model.weights
    else:
        weights = anchor_weights()
    out = _finish(_apply(weights, f0, s), s, noise, scale)
    rec.seconds_total = time.perf_counter() - started
    rec.seconds_train = rec.seconds_total
    rec.params["weights_norm"] = float(np.linalg.norm(weights))
    if log is not None:
        log(f"{rec.method}: done in {rec.seconds_total:.0f} s")
    if record is not None:
        record.update(rec.to_dict())
    return out


def pretrain_denoiser(
    clean_volumes: Sequence[np.ndarray],
    *,
    noise: NoiseKind,
    sigma_fraction: float | Sequence[float] = (0.03, 0.05),
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> LETDenoiser:
    """Fit the expansion with the clean reference on other volumes (supervised least squares).

    Each clean volume is normalised like :func:`adapt_denoise` does, noise of each
    ``sigma_fraction`` (of the normalised range) is added with a seeded generator, and the
    normal equations of all of them are summed; the target is the clean volume (for Rician
    noise its Rician mean, which the expansion estimates before the floor correction).

    Returns
    -------
    LETDenoiser
        ``fitted_on="clean"``.
    """
    noise = _check_noise(noise)
    seed = check_seed("seed", seed) or 0
    fractions = [sigma_fraction] if np.isscalar(sigma_fraction) else list(sigma_fraction)  # type: ignore[arg-type]
    fractions = [check_positive("sigma_fraction", f) for f in fractions]
    if not clean_volumes:
        raise ParameterError("`clean_volumes` must hold at least one volume, got none")
    acc = _Accumulator(N_BASIS)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PROBE_STREAM + 1]))
    for i, v in enumerate(clean_volumes):
        clean = check_volume_array(f"clean_volumes[{i}]", v)
        for frac in fractions:
            t0 = time.perf_counter()
            if noise == "rician":
                c = clean / (float(np.percentile(clean, 99.5)) or 1.0)
                s = frac
                noisy = np.sqrt((c + rng.standard_normal(c.shape) * s) ** 2 + (rng.standard_normal(c.shape) * s) ** 2)
                # Normalise by the noisy scan's own percentile, as adapt_denoise will.
                k = float(np.percentile(noisy, 99.5)) or 1.0
                noisy, c, s = noisy / k, c / k, s / k
                target = np.asarray(rician_mean(c, s), np.float64)
            else:
                c = IntensityScale.fit(clean).forward(clean).astype(np.float64)
                s = frac
                noisy = c + rng.standard_normal(c.shape) * s
                scale = IntensityScale.fit(noisy.astype(np.float32))
                noisy, target, s = (noisy - scale.offset) / scale.scale, (c - scale.offset) / scale.scale, s / scale.scale
            f0 = denoise_features(noisy, s)
            e0 = _edge_strength(f0[ANCHOR_CHANNEL], s)  # (features stay float64 here)
            plane = int(np.prod(noisy.shape[1:]))
            for sl in _slabs(noisy.shape[0], _SLAB_VOXELS // plane):
                acc.add(_basis(f0[:, sl].reshape(N_FEATURES, -1), e0[sl].ravel()), target[sl].ravel())
            if log is not None:
                log(f"pretrain LET: volume {i} at sigma fraction {frac:g} in {time.perf_counter() - t0:.0f} s")
    return LETDenoiser(_solve(acc.gram, acc.rhs), noise, fitted_on="clean")
