"""Where the SURE fit of :mod:`medgen.adapt.denoise` looks on a scan larger than its fit box.

The fit is one linear system whose cost grows with the voxels it sees, so it runs on a box of
at most ``side`` voxels per axis around the bright part of the scan (the anatomy). On a whole
head scan that box holds the head's centre and almost none of the air around it, yet the
weights are applied everywhere: an estimate that behaves well inside the head and badly in
the background (a network trained on other data, say) would get a weight that suits only
the inside. So when much of the scan lies outside the main box, a few small boxes drawn
(seeded) from the rest of the scan join the fit, their voxels that lie outside the main box
weighted to stand for all of the scan outside it: a stratified estimate of the whole scan's
risk instead of the centre's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Side (voxels) of each box drawn from outside the main box, and how many are drawn.
OUTSIDE_BOX_VOX = 48
OUTSIDE_BOXES = 3
#: Below this share of the scan outside the main box, the main box stands for the scan.
MIN_OUTSIDE_SHARE = 0.1
_REGION_STREAM = 0xB0E5  # spawn key: box draws apart from the probe and other uses of `seed`


@dataclass(frozen=True)
class FitRegion:
    """A box of the scan whose voxels join the SURE fit.

    ``keep`` marks the box's voxels that count (None: all of them); each counts ``weight``
    times, the number of scan voxels it stands for.
    """

    box: tuple[slice, slice, slice]
    keep: np.ndarray | None = None
    weight: float = 1.0


def main_box(y: np.ndarray, side: int) -> tuple[slice, slice, slice]:
    """A box of at most ``side`` voxels per axis around the bright part of ``y``."""
    bright = y > 0.1 * float(np.percentile(y, 99.5))
    box = []
    for axis, n in enumerate(y.shape):
        w = min(side, n)
        hits = np.nonzero(bright.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        centre = int(hits.mean()) if hits.size else n // 2
        start = min(max(centre - w // 2, 0), n - w)
        box.append(slice(start, start + w))
    return tuple(box)  # type: ignore[return-value]


def fit_regions(y: np.ndarray, side: int, seed: int) -> list[FitRegion]:
    """The main box, then (when over :data:`MIN_OUTSIDE_SHARE` of ``y`` lies outside it)
    :data:`OUTSIDE_BOXES` boxes drawn among those at least half outside it.

    Examples
    --------
    >>> y = np.zeros((100, 100, 100)); y[40:60, 40:60, 40:60] = 1.0
    >>> [len(fit_regions(y, 100, 0)), len(fit_regions(y, 40, 0))]
    [1, 4]
    >>> r = fit_regions(y, 40, 0)
    >>> round(sum(float(x.keep.sum()) * x.weight for x in r[1:])) == 100**3 - 40**3
    True
    """
    main = main_box(y, side)
    inside = np.zeros(y.shape, dtype=bool)
    inside[main] = True
    outside = y.size - int(inside.sum())
    if outside < MIN_OUTSIDE_SHARE * y.size:
        return [FitRegion(main)]
    sides = [min(OUTSIDE_BOX_VOX, n) for n in y.shape]
    starts = [sorted({*range(0, n - w + 1, max(w // 2, 1)), n - w}) for n, w in zip(y.shape, sides)]
    candidates = []
    for a in starts[0]:
        for b in starts[1]:
            for c in starts[2]:
                box = (slice(a, a + sides[0]), slice(b, b + sides[1]), slice(c, c + sides[2]))
                if inside[box].mean() <= 0.5:
                    candidates.append(box)
    if not candidates:
        return [FitRegion(main)]
    rng = np.random.default_rng(np.random.SeedSequence([seed, _REGION_STREAM]))
    picked = [candidates[i] for i in sorted(rng.choice(len(candidates), min(OUTSIDE_BOXES, len(candidates)), replace=False))]
    keeps = [~inside[box] for box in picked]
    weight = outside / sum(int(k.sum()) for k in keeps)
    return [FitRegion(main), *(FitRegion(box, keep, weight) for box, keep in zip(picked, keeps))]


__all__ = ["FitRegion", "fit_regions", "main_box"]
