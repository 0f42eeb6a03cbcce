"""PNG montages: size, radiological orientation, aspect ratio, and the comparison grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medgen.io.montage import GAP_PX, montage_grid, render_montage, save_montage
from medgen.volume import Volume

SHAPE = (40, 30, 12)  # i: 1 mm to the patient's left, j: 1 mm posterior, k: 3 mm superior


def lps_volume() -> Volume:
    """A DICOM-like grid with three bright bars, one visible in each mid-slice view.

    All bars sit on the patient's right/anterior/superior side (small i, small j, large k).
    """
    affine = np.diag([-1.0, -1.0, 3.0, 1.0])
    affine[:3, 3] = [20.0, 15.0, -18.0]
    a = np.zeros(SHAPE, np.float32)
    a[2:8, 2:8, :] = 100.0  # in the axial mid-slice (k = 6)
    a[2:8, :, 8:11] = 100.0  # in the coronal mid-slice (j = 15)
    a[:, 2:8, 8:11] = 100.0  # in the sagittal mid-slice (i = 20)
    return Volume(a, affine)


def panels(image: np.ndarray, widths: list[int]) -> list[np.ndarray]:
    out, x = [], 0
    for w in widths:
        out.append(image[:, x : x + w])
        x += w + GAP_PX
    return out


def bright_centre(panel: np.ndarray, height: int) -> tuple[float, float]:
    rows, cols = np.nonzero(panel[:height] > 200)
    return rows.mean() / height, cols.mean() / panel.shape[1]


def test_png_size_and_content(tmp_path):
    vol = lps_volume()
    path = save_montage(vol, tmp_path / "m.png", window=(0.0, 100.0))
    with Image.open(path) as png:
        assert png.mode == "L"
        pixels = np.asarray(png)
    # Square 1 mm pixels: axial 40x30, coronal 40x36 (12 slices of 3 mm), sagittal 30x36.
    assert pixels.shape == (36, 40 + 40 + 30 + 2 * GAP_PX)
    np.testing.assert_array_equal(pixels, render_montage(vol, window=(0.0, 100.0)))
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_radiological_orientation():
    image = render_montage(lps_volume(), window=(0.0, 100.0))
    axial, coronal, sagittal = panels(image, [40, 40, 30])
    # Axial: anterior up, patient's right on the viewer's left -> top-left quadrant.
    r, c = bright_centre(axial, 30)
    assert r < 0.5 and c < 0.5
    # Coronal: superior up, right on the left -> top-left.
    r, c = bright_centre(coronal, 36)
    assert r < 0.5 and c < 0.5
    # Sagittal: superior up, anterior on the left -> top-left.
    r, c = bright_centre(sagittal, 36)
    assert r < 0.5 and c < 0.5
    # Nothing bright in the opposite quadrants.
    assert axial[15:30, 20:40].max() == 0 and coronal[18:36, 20:40].max() == 0


def test_axis_order_of_the_array_does_not_change_the_picture():
    vol = lps_volume()
    order = (2, 0, 1)
    permuted = Volume(np.transpose(vol.array, order), vol.affine[:, [*order, 3]])
    np.testing.assert_array_equal(
        render_montage(permuted, window=(0, 100)), render_montage(vol, window=(0, 100))
    )


def test_default_window_uses_percentiles_and_bad_window_is_rejected():
    vol = lps_volume()
    image = render_montage(vol)
    assert image.max() == 255 and image.min() == 0
    with pytest.raises(
        ValueError, match=r"`window` must be \(low, high\) with high > low, got \(5, 5\)"
    ):
        render_montage(vol, window=(5, 5))


def test_montage_grid_rows_share_the_mm_scale(tmp_path):
    ref = lps_volume()
    coarse = Volume(ref.array[::2, ::2, :], ref.affine @ np.diag([2.0, 2.0, 1.0, 1.0]))
    diff = ref.with_array(np.zeros(SHAPE, np.float32))
    path = montage_grid(
        {"degraded": coarse, "reference": ref, "difference": diff}, tmp_path / "g.png"
    )
    with Image.open(path) as png:
        pixels = np.asarray(png)
    # Every row is 36 mm tall at 1 mm pixels and the columns are 40, 40 and 30 mm wide.
    assert pixels.shape == (3 * 36 + 2 * GAP_PX, 40 + 40 + 30 + 2 * GAP_PX)
    # The difference row is all zeros: a window symmetric about 0 shows mid-grey.
    assert pixels[2 * (36 + GAP_PX) + 20, 60] == 128
    # Labels are drawn in the top-left corner of each row ("difference" on mid-grey here).
    corner = (slice(2 * (36 + GAP_PX), 2 * (36 + GAP_PX) + 12), slice(0, 40))
    assert pixels[corner].max() > 200
    path = montage_grid(
        {"degraded": coarse, "reference": ref, "difference": diff}, path, labels=False
    )
    with Image.open(path) as png:
        assert np.asarray(png)[corner].max() == 128


def test_montage_grid_needs_images(tmp_path):
    with pytest.raises(ValueError, match="`images` must hold at least one volume"):
        montage_grid({}, tmp_path / "x.png")
