"""PNG previews: axial, coronal and sagittal mid-slices of a volume's physical values.

Views follow the radiological convention after reorienting to RAS (what
``nibabel.as_closest_canonical`` does): the patient's right is on the viewer's left in
axial and coronal views, anterior is up in the axial view, superior is up in coronal and
sagittal views, and anterior is on the left in the sagittal view. Slices are resampled to
square pixels of one common size in mm, so anisotropic voxels keep their true aspect.
Pillow encodes the PNG (no matplotlib).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medgen.io.atomic import atomic_write_bytes
from medgen.volume import Volume

__all__ = ["GAP_PX", "canonical_values", "montage_grid", "render_montage", "save_montage"]

GAP_PX = 4  # black gap between panels
_MAX_PANEL_PX = 1024
Window = tuple[float, float]


def canonical_values(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Physical values reoriented to the closest RAS axes, and their voxel size.

    Returns
    -------
    values : ndarray, float32, shape (X, Y, Z)
        The first frame of a 4D volume. X grows to the patient's right, Y anterior,
        Z superior.
    spacing_mm : tuple of 3 floats
    """
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    values = volume.values(np.float32)
    if values.ndim == 4:
        values = values[..., 0]
    ornt = io_orientation(volume.affine)
    values = apply_orientation(values, ornt_transform(ornt, axcodes2ornt("RAS")))
    spacing = [0.0, 0.0, 0.0]
    for axis_in, (axis_out, _) in enumerate(ornt):
        spacing[int(axis_out)] = volume.spacing_mm[axis_in]
    return np.ascontiguousarray(values), (spacing[0], spacing[1], spacing[2])


def _views(values: np.ndarray, spacing: tuple[float, float, float]):
    """(image[row, col], row pixel mm, column pixel mm) for axial, coronal, sagittal."""
    x, y, z = (n // 2 for n in values.shape)
    sx, sy, sz = spacing
    axial = values[::-1, ::-1, z].T  # rows: anterior -> posterior; cols: right -> left
    coronal = values[::-1, y, ::-1].T  # rows: superior -> inferior; cols: right -> left
    sagittal = values[x, ::-1, ::-1].T  # rows: superior -> inferior; cols: anterior -> posterior
    return [(axial, sy, sx), (coronal, sz, sx), (sagittal, sz, sy)]


def _default_window(values: np.ndarray) -> Window:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(finite, [1.0, 99.5])
    return (float(lo), float(hi) if hi > lo else float(lo) + 1.0)


def _check_window(window: Window) -> Window:
    lo, hi = (float(w) for w in window)
    if not hi > lo:
        raise ValueError(f"`window` must be (low, high) with high > low, got {window}")
    return lo, hi


def _panel(image: np.ndarray, row_mm: float, col_mm: float, pixel_mm: float, window: Window):
    from PIL import Image

    height = max(1, round(image.shape[0] * row_mm / pixel_mm))
    width = max(1, round(image.shape[1] * col_mm / pixel_mm))
    lo, hi = window
    scaled = np.clip((np.nan_to_num(image, nan=lo) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    pil = Image.fromarray(np.ascontiguousarray(scaled, dtype=np.float32))
    pil = pil.resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.rint(np.asarray(pil)), 0, 255).astype(np.uint8)


def _pixel_mm(spacings: list[tuple[float, float, float]], shapes: list[tuple[int, ...]]) -> float:
    """The finest voxel size, coarsened if a panel would exceed the size cap."""
    pixel = min(min(s) for s in spacings)
    extent = max(
        max(n * s for n, s in zip(shape[:3], sp, strict=True))
        for shape, sp in zip(shapes, spacings, strict=True)
    )
    return max(pixel, extent / _MAX_PANEL_PX)


def _volume_panels(volume: Volume, pixel_mm: float | None, window: Window | None, symmetric: bool):
    values, spacing = canonical_values(volume)
    if pixel_mm is None:
        pixel_mm = _pixel_mm([spacing], [values.shape])
    if window is None:
        window = _default_window(values)
        if symmetric:
            half = max(abs(window[0]), abs(window[1])) or 1.0
            window = (-half, half)
    window = _check_window(window)
    return [_panel(img, r, c, pixel_mm, window) for img, r, c in _views(values, spacing)]


def render_montage(volume: Volume, *, window: Window | None = None) -> np.ndarray:
    """The montage image: axial | coronal | sagittal, separated by :data:`GAP_PX` columns.

    Parameters
    ----------
    volume : Volume
        3D (the first frame of a 4D volume is shown).
    window : (low, high), optional
        Physical values mapped to black and white; default the 1st and 99.5th percentiles.

    Returns
    -------
    ndarray, uint8, shape (H, W)
        Panels are top-aligned; square pixels of the finest voxel size in mm (coarser only
        when a panel would exceed 1024 pixels). H is the tallest panel, W the sum of the
        panel widths plus two gaps.
    """
    panels = _volume_panels(volume, None, window, symmetric=False)
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + GAP_PX * (len(panels) - 1)
    canvas = np.zeros((height, width), np.uint8)
    x = 0
    for p in panels:
        canvas[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + GAP_PX
    return canvas


def _write_png(image: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_montage(volume: Volume, path: str | Path, *, window: Window | None = None) -> Path:
    """Write :func:`render_montage` as a grey-scale PNG (atomically); returns ``path``."""
    return _write_png(render_montage(volume, window=window), path)


def montage_grid(
    images: Mapping[str, Volume],
    path: str | Path,
    *,
    window: Window | Mapping[str, Window] | None = None,
    labels: bool = True,
) -> Path:
    """A PNG with one row per volume (e.g. degraded/output/reference/difference).

    Parameters
    ----------
    images : mapping of name -> Volume
        Rows, in order. All rows use one pixel size in mm (the finest voxel size of all),
        so a low-resolution input appears at the same physical scale as the reference.
    path : str or Path
        Output ``.png``.
    window : (low, high) or mapping of name -> (low, high), optional
        One window for every row, or one per row. Rows without one get the 1st-99.5th
        percentile window; a row whose name contains "diff" gets a window symmetric
        about zero.
    labels : bool
        Write each row's name in its top-left corner.

    Returns
    -------
    Path
        ``path``. Columns are axial, coronal, sagittal; each cell is as wide as the widest
        panel of its column and as tall as the tallest panel of its row, panels centred.
    """
    if not images:
        raise ValueError("`images` must hold at least one volume")
    canon = {name: canonical_values(v) for name, v in images.items()}
    pixel_mm = _pixel_mm(
        [sp for _, sp in canon.values()], [vals.shape for vals, _ in canon.values()]
    )
    rows: dict[str, list[np.ndarray]] = {}
    for name, volume in images.items():
        row_window = window.get(name) if isinstance(window, Mapping) else window
        rows[name] = _volume_panels(volume, pixel_mm, row_window, symmetric="diff" in name.lower())
    col_widths = [max(r[c].shape[1] for r in rows.values()) for c in range(3)]
    row_heights = [max(p.shape[0] for p in r) for r in rows.values()]
    canvas = np.zeros(
        (sum(row_heights) + GAP_PX * (len(rows) - 1), sum(col_widths) + GAP_PX * 2), np.uint8
    )
    y = 0
    for panels, height in zip(rows.values(), row_heights, strict=True):
        x = 0
        for p, width in zip(panels, col_widths, strict=True):
            top, left = y + (height - p.shape[0]) // 2, x + (width - p.shape[1]) // 2
            canvas[top : top + p.shape[0], left : left + p.shape[1]] = p
            x += width + GAP_PX
        y += height + GAP_PX
    if labels:
        canvas = _draw_labels(canvas, list(rows), row_heights)
    return _write_png(canvas, path)


def _draw_labels(canvas: np.ndarray, names: list[str], row_heights: list[int]) -> np.ndarray:
    from PIL import Image, ImageDraw

    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    y = 0
    for name, height in zip(names, row_heights, strict=True):
        draw.text((3, y + 2), name, fill=255, stroke_width=1, stroke_fill=0)
        y += height + GAP_PX
    return np.asarray(pil)
