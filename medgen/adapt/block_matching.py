"""Block matching and collaborative 4D shrinkage: a BM4D-style estimate for SURE-LET.

The recipe follows BM4D (Maggioni et al. 2013): around reference cubes on a grid, find the
cubes most similar to each within a search window (:func:`match_blocks`), stack each group
into a 4D array, shrink its separable 4D DCT (hard threshold, or empirical Wiener with a
pilot estimate) and add the cubes back, weighted by the inverse of their noise energy
(:func:`collaborative_shrink`). What differs, for SURE's sake or for speed:

* the matching runs on a *guide* volume (a first estimate) and the groups are an input to
  the shrinkage, so that the Monte-Carlo probe of SURE can re-run the shrinkage with the
  groups kept or matched again (:class:`CollaborativeTerm` says which, and why);
* the hard threshold is the smooth one of :mod:`medgen.adapt.transform_shrinkage`;
* one set of groups (4^3 cubes, 16 per group, search radius 4, DCT along every axis) serves
  both stages; BM4D searches radius 7, matches again for its Wiener stage and uses 5^3
  cubes, 32 per group, a biorthogonal cube transform and Haar across the group there.

Groups have a fixed size (no distance threshold): SURE-LET weights the estimate per band, so
the edges where a forced group blurs get less of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medgen.adapt.transform_shrinkage import HARD_THRESHOLD, cube_dct_matrix, dct_matrix, shrinkage_gains
from medgen.validate import ParameterError, check_int, check_positive

__all__ = [
    "COLLABORATIVE_REACH_VOX",
    "BlockGroups",
    "CollaborativeTerm",
    "collaborative_estimate",
    "collaborative_shrink",
    "match_blocks",
]

_VOXELS_PER_CHUNK = 1 << 21  # group voxels shrunk at once (memory: about 8 x 4 bytes each)
_MATCH_ELEMENTS = 1 << 24  # squared differences held at once while matching (64 MB)


@dataclass(frozen=True)
class BlockGroups:
    """Matched cubes: ``starts[r]`` are the flat indices of the first voxel of group ``r``'s cubes.

    The reference cube comes first in its group, then the others by distance to it.
    """

    shape: tuple[int, int, int]
    block: int
    starts: np.ndarray  # (R, group) int64

    def voxel_indices(self, rows: slice) -> np.ndarray:
        """Flat voxel indices ``(r, group, block^3)`` of the groups in ``rows``."""
        b = self.block
        _, n1, n2 = self.shape
        a, c, d = np.meshgrid(np.arange(b), np.arange(b), np.arange(b), indexing="ij")
        inside = (a * n1 * n2 + c * n2 + d).ravel()
        return self.starts[rows][..., None] + inside


def _reference_starts(n: int, block: int, step: int) -> np.ndarray:
    """Grid of cube starts along one axis, with the last cube flush with the end."""
    last = n - block
    starts = np.arange(0, last + 1, step)
    return starts if starts[-1] == last else np.append(starts, last)


def _sums_at(values: np.ndarray, refs: np.ndarray, block: int, axis: int) -> np.ndarray:
    """Sums of ``block`` consecutive entries of ``values`` along ``axis``, starting at ``refs``."""
    out = np.take(values, refs, axis=axis)
    for k in range(1, block):
        out += np.take(values, refs + k, axis=axis)
    return out


def match_blocks(guide: np.ndarray, *, block: int = 4, step: int = 3, radius: int = 4, group: int = 16) -> BlockGroups:
    """Group each reference cube with its ``group - 1`` nearest cubes in a search window.

    Parameters
    ----------
    guide : ndarray (I, J, K)
        The volume the distances are measured on (a first estimate: less noise, better groups).
    block, step : int
        Cube side and the grid step between reference cubes (``step <= block``).
    radius : int
        Search window half-width: offsets in ``[-radius, radius]^3``.
    group : int
        Cubes per group (at most the window's ``(2 radius + 1)^3``).

    Examples
    --------
    >>> g = np.zeros((8, 8, 8), np.float32); g[:, :, 4:] = 1.0
    >>> groups = match_blocks(g, block=2, step=2, radius=2, group=4)
    >>> groups.starts.shape, int(groups.starts[0, 0])
    ((64, 4), 0)
    """
    guide = np.asarray(guide, dtype=np.float32)
    block = check_int("block", block, minimum=1)
    step = check_int("step", step, minimum=1)
    radius = check_int("radius", radius, minimum=0)
    group = check_int("group", group, minimum=1)
    if guide.ndim != 3 or min(guide.shape) < block:
        raise ParameterError(f"`guide` must be a 3D volume at least {block} voxels per axis, got shape {guide.shape}")
    if step > block:
        raise ParameterError(f"`step` ({step}) must not exceed `block` ({block}): voxels would be skipped")
    if group > (2 * radius + 1) ** 3:
        raise ParameterError(f"`group` ({group}) exceeds the {(2 * radius + 1) ** 3} cubes of the search window")
    shape = guide.shape
    refs = [_reference_starts(n, block, step) for n in shape]
    padded = np.pad(guide, radius, mode="edge")
    # Slabs of reference rows bound the memory: the squared differences of every offset
    # along the last axis are held at once.
    per_row = max(1, _MATCH_ELEMENTS // (shape[1] * shape[2] * (2 * radius + 1) * step))
    slabs = [refs[0][i : i + per_row] for i in range(0, len(refs[0]), per_row)]
    best = np.concatenate([_match_slab(guide, padded, [r0, *refs[1:]], block, radius, group) for r0 in slabs])
    span = np.arange(-radius, radius + 1)
    offsets = np.stack(np.meshgrid(span, span, span, indexing="ij"), axis=-1).reshape(-1, 3)
    grid = np.stack(np.meshgrid(*refs, indexing="ij"), axis=-1).reshape(-1, 3)  # (R, 3)
    where = grid[:, None, :] + offsets[best]  # (R, group, 3)
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    return BlockGroups(shape, block, (where * strides).sum(axis=-1).astype(np.int64))


def _match_slab(
    guide: np.ndarray, padded: np.ndarray, refs: list[np.ndarray], block: int, radius: int, group: int
) -> np.ndarray:
    """Offset codes ``(R, group)`` of the best matches of the references ``refs`` (a slab of rows)."""
    shape = guide.shape
    lo, hi = int(refs[0][0]), int(refs[0][-1]) + block
    rows = [refs[0] - lo, *refs[1:]]  # reference starts within the slab's rows
    n_refs = int(np.prod([len(r) for r in refs]))
    width = 2 * radius + 1
    span = np.arange(-radius, radius + 1)
    # A candidate cube must lie inside the volume: per axis, which refs may move by each offset.
    allowed = [(r + span[:, None] >= 0) & (r + span[:, None] <= n - block) for r, n in zip(refs, shape)]
    best_d = np.full((group, n_refs), np.inf, dtype=np.float32)
    best_o = np.zeros((group, n_refs), dtype=np.int64)
    here = guide[lo:hi, :, :, None]
    for i0, d0 in enumerate(span):
        dist = np.empty((width, width, *(len(r) for r in refs)), dtype=np.float32)
        for i1, d1 in enumerate(span):
            moved = padded[radius + d0 + lo : radius + d0 + hi, radius + d1 : radius + d1 + shape[1]]
            # All offsets along the last axis at once: window k is the offset k - radius.
            windows = np.lib.stride_tricks.sliding_window_view(moved, width, axis=2)
            sq = (here - windows) ** 2  # (rows, J, K, width)
            for axis, r in enumerate(rows):
                sq = _sums_at(sq, r, block, axis)
            dist[i1] = np.moveaxis(sq, -1, 0)
        # dist is (d1, d2, ref0, ref1, ref2): broadcast each axis's allowed offsets there.
        ok = allowed[0][i0][:, None, None] & allowed[1][:, None, None, :, None] & allowed[2][:, None, None, :]
        dist = np.where(ok, dist, np.inf).reshape(width * width, n_refs)
        if d0 == 0:
            dist[radius * width + radius] = -1.0  # the reference itself leads its group, whatever ties say
        codes = i0 * width * width + np.arange(width * width)
        all_d = np.concatenate([best_d, dist])
        all_o = np.concatenate([best_o, np.broadcast_to(codes[:, None], dist.shape)])
        keep = np.argpartition(all_d, group - 1, axis=0)[:group]
        best_d = np.take_along_axis(all_d, keep, axis=0)
        best_o = np.take_along_axis(all_o, keep, axis=0)
    order = np.argsort(best_d, axis=0, kind="stable")
    return np.take_along_axis(best_o, order, axis=0).T


def _group_dct(x: np.ndarray, cube: np.ndarray, across: np.ndarray) -> np.ndarray:
    """Separable 4D transform of groups ``(r, group, b^3)``: ``cube`` on each cube, ``across`` the group."""
    r, n, m = x.shape
    x = (x.reshape(-1, m) @ cube.T).reshape(r, n, m)
    # The group axis in front makes the second transform one matrix product too.
    x = across @ x.transpose(1, 0, 2).reshape(n, -1)
    return x.reshape(n, r, m).transpose(1, 0, 2)


def collaborative_shrink(
    y: np.ndarray,
    sigma: float,
    groups: BlockGroups,
    *,
    threshold: float = HARD_THRESHOLD,
    pilot: np.ndarray | None = None,
) -> np.ndarray:
    """Shrink the 4D DCT of each group of ``y``'s cubes and aggregate (see the module notes).

    Parameters
    ----------
    y : ndarray (I, J, K)
        The noisy volume (the shape ``groups`` were matched on).
    sigma : float > 0
        Noise standard deviation in the units of ``y``.
    groups : BlockGroups
        From :func:`match_blocks`, beforehand: SURE's probe may keep them or match again.
    threshold : float >= 0
        Hard threshold in sigmas (ignored with ``pilot``).
    pilot : ndarray (I, J, K), optional
        A first estimate: switches to empirical Wiener shrinkage.

    Returns
    -------
    ndarray, float64, the shape of ``y``.
    """
    y = np.asarray(y, dtype=np.float64)
    if y.shape != groups.shape:
        raise ParameterError(f"`y` {y.shape} does not have the shape the groups were matched on {groups.shape}")
    sigma = check_positive("sigma", sigma)
    flat_y = y.ravel()
    flat_pilot = None if pilot is None else np.asarray(pilot, dtype=np.float64).ravel()
    b = groups.block
    n_refs, group = groups.starts.shape
    total = np.zeros(y.size)
    weight = np.zeros(y.size)
    rows = max(1, _VOXELS_PER_CHUNK // (group * b**3))
    cube, across = cube_dct_matrix(b), dct_matrix(group)
    for r0 in range(0, n_refs, rows):
        idx = groups.voxel_indices(slice(r0, min(r0 + rows, n_refs)))  # (r, group, b^3)
        coeffs = _group_dct(flat_y[idx], cube, across)
        pc = None if flat_pilot is None else _group_dct(flat_pilot[idx], cube, across)
        g = shrinkage_gains(coeffs, sigma, threshold, pc, keep=(0, 0))
        w = 1.0 / (1.0 + np.sum(g * g, axis=(1, 2)))  # (r,) group weights
        est = _group_dct(coeffs * g, cube.T, across.T) * w[:, None, None]
        total += np.bincount(idx.ravel(), weights=est.ravel(), minlength=y.size)
        spread = np.broadcast_to(w[:, None, None], idx.shape).ravel()
        weight += np.bincount(idx.ravel(), weights=spread, minlength=y.size)
    # Every voxel lies in some reference cube (step <= block), so no weight is 0.
    return (total / weight).reshape(y.shape)


#: How far from a voxel :func:`collaborative_estimate` reads, with the default cubes: a cube
#: through the voxel (block - 1), the other cubes of its group up to two search radii and a
#: cube away; twice, for the hard-threshold pilot that the Wiener stage reads there.
COLLABORATIVE_REACH_VOX = 2 * (2 * (4 - 1) + 2 * 4)


def collaborative_estimate(y: np.ndarray, sigma: float, groups: BlockGroups) -> np.ndarray:
    """BM4D's two stages on fixed groups: hard threshold, then empirical Wiener with it as pilot.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> clean = np.zeros((16, 16, 16)); clean[:, :, 8:] = 4.0
    >>> noisy = clean + rng.standard_normal(clean.shape)
    >>> out = collaborative_estimate(noisy, 1.0, match_blocks(noisy))
    >>> float(np.mean((out - clean) ** 2)) < 0.1
    True
    """
    return collaborative_shrink(y, sigma, groups, pilot=collaborative_shrink(y, sigma, groups))


class CollaborativeTerm:
    """SURE-LET's collaborative feature: the estimate of a region of a scan, its groups matched
    on a first estimate there (the anchor), and matched again or kept for the probe.

    The groups are piecewise constant in the data: their derivative is zero almost
    everywhere, but their jumps add to the divergence. Kept fixed for the probe, the jumps are
    left out and SURE trusts the term too much (by about 10 % of its error on a phantom);
    matched again on the probed anchor (``rematch``), the jumps are counted, unbiased but
    noisy. The noise averages out over many voxels: matching again was up to 0.25 dB better on
    128^3 crops of a T1 and a CT scan, and up to 0.3 dB worse on 48^3 crops.
    """

    def __init__(self, s: float, rematch: bool) -> None:
        self.s, self.rematch = s, rematch
        self.groups: dict[Any, BlockGroups] = {}
        self.memo: tuple[Any, np.ndarray, np.ndarray] | None = None  # first call: (region, input, output)

    def estimate(self, v: np.ndarray, region: tuple[slice, ...], anchor: np.ndarray) -> np.ndarray:
        key = tuple((r.start, r.stop) for r in region)
        # SURE asks again for the unprobed scan when its margin box is the whole scan.
        if self.memo is not None and self.memo[0] == key and np.array_equal(v, self.memo[1]):
            return self.memo[2]
        if key not in self.groups or self.rematch:
            self.groups[key] = match_blocks(anchor)
        out = collaborative_estimate(v, self.s, self.groups[key])
        if self.memo is None:
            self.memo = (key, np.array(v, dtype=np.float64), out)
        return out
