"""Montages big enough to judge a result by: input | output | difference, three views each.

One PNG per volume: columns input, output and difference (output - input), rows axial,
coronal and sagittal mid-slices in the radiological convention (as
:mod:`medgen.io.montage`, whose RAS reorientation it reuses). Every view is at least
:data:`MIN_VIEW_PX` pixels on its shorter side, at one common pixel size in mm so shapes
keep their true proportions; a header over each column names it and states its intensity
window in the volume's units (input and output share one window, the difference has one
symmetric about zero).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from medgen.io.atomic import atomic_write_bytes
from medgen.io.montage import canonical_values
from medgen.volume import Volume

MIN_VIEW_PX = 256
MAX_VIEW_PX = 1024
HEADER_PX = 36
GAP_PX = 6


def _views(values: np.ndarray, spacing: tuple[float, float, float]):
    """``(name, image[row, col], row mm, col mm)`` for axial, coronal, sagittal (RAS input)."""
    x, y, z = (n // 2 for n in values.shape)
    sx, sy, sz = spacing
    return [
        ("axial", values[::-1, ::-1, z].T, sy, sx),
        ("coronal", values[::-1, y, ::-1].T, sz, sx),
        ("sagittal", values[x, ::-1, ::-1].T, sz, sy),
    ]


def _window(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [1.0, 99.5]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _panel(image: np.ndarray, height: int, width: int, window: tuple[float, float]) -> np.ndarray:
    from PIL import Image

    lo, hi = window
    scaled = np.clip((np.nan_to_num(image, nan=lo) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    pil = Image.fromarray(np.ascontiguousarray(scaled, dtype=np.float32))
    pil = pil.resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.rint(np.asarray(pil)), 0, 255).astype(np.uint8)


def render_comparison(before: Volume, after: Volume, *, units: str | None = None) -> np.ndarray:
    """The montage as an RGB uint8 image, shape (H, W, 3).

    Parameters
    ----------
    before, after : Volume
        Input and output; when their grids differ (super-resolution) the difference column
        is left out.
    units : str, optional
        Named in the window text; default ``before.meta.units``.
    """
    from PIL import Image, ImageDraw

    units = units if units is not None else (before.meta.units or "")
    b_vals, b_sp = canonical_values(before)
    a_vals, a_sp = canonical_values(after)
    columns = [("input", b_vals, b_sp), ("output", a_vals, a_sp)]
    shared = _window(b_vals)
    windows = [shared, shared]
    if b_vals.shape == a_vals.shape:
        diff = a_vals - b_vals
        half = float(np.percentile(np.abs(diff), 99.5)) or 1.0
        columns.append(("difference (output - input)", diff, a_sp))
        windows.append((-half, half))
    views = [_views(v, sp) for _, v, sp in columns]
    extents = [(img.shape[0] * r, img.shape[1] * c) for col in views for _, img, r, c in col]
    px_per_mm = MIN_VIEW_PX / min(min(h, w) for h, w in extents)
    px_per_mm = min(px_per_mm, MAX_VIEW_PX / max(max(h, w) for h, w in extents))
    sizes = [[(max(1, round(img.shape[0] * r * px_per_mm)), max(1, round(img.shape[1] * c * px_per_mm)))
              for _, img, r, c in col] for col in views]
    col_w = [max(w for _, w in col) for col in sizes]
    row_h = [max(sizes[c][r][0] for c in range(len(columns))) for r in range(3)]
    height = HEADER_PX + sum(row_h) + GAP_PX * 3
    width = sum(col_w) + GAP_PX * (len(columns) + 1) + 70
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    x = 70 + GAP_PX
    for c, ((title, _, _), col, window) in enumerate(zip(columns, views, windows, strict=True)):
        draw.text((x, 4), title, fill=(255, 255, 255))
        draw.text((x, 18), f"window [{window[0]:.4g}, {window[1]:.4g}] {units}".rstrip(), fill=(200, 200, 120))
        y = HEADER_PX
        for r, (name, img, _, _) in enumerate(col):
            h, w = sizes[c][r]
            tile = Image.fromarray(_panel(img, h, w, window)).convert("RGB")
            canvas.paste(tile, (x + (col_w[c] - w) // 2, y + (row_h[r] - h) // 2))
            if c == 0:
                draw.text((6, y + row_h[r] // 2), name, fill=(255, 255, 255))
            y += row_h[r] + GAP_PX
        x += col_w[c] + GAP_PX
    return np.asarray(canvas)


def comparison_montage(before: Volume, after: Volume, path: str | Path) -> Path:
    """Write :func:`render_comparison` as a PNG, atomically; returns ``path``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(render_comparison(before, after)).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
