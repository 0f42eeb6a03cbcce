"""Noise sigma estimation (medgen.baselines.denoise.estimate_noise_sigma) with and without air.

Issue 10: on a crop of the ICBM152 T1 without air, Rician noise of sigma 11.4 was estimated
at 70.6, because the Rician estimate took the voxels outside Otsu's foreground as Rayleigh
background, and in such a crop that "background" is dark tissue.

Tolerances, from noise seeds 0-7: on the small crops without air (44^3 phantom, 40x40x16 CT)
the estimate spreads by about 3.5 % (sd; worst 10 %, the flat cells are few), hence 15 %; on
whole volumes with air the worst error was 1.3 %, hence 5 %.
"""

from __future__ import annotations

import numpy as np
import pytest

from medgen.baselines.denoise import estimate_noise_sigma
from medgen.data.degrade_noise import GaussianNoise, RicianNoise
from medgen.samples import ct_head_phantom, mr_brain_phantom

REL = 0.15  # crops without air, real data
REL_WHOLE = 0.05  # whole volumes with air around the head
ICBM = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def central_crop(x: np.ndarray, side: int) -> np.ndarray:
    start = [(n - side) // 2 for n in x.shape]
    return np.ascontiguousarray(x[tuple(slice(s, s + side) for s in start)])


@pytest.fixture(scope="module")
def mr_head() -> np.ndarray:
    """T1 phantom head (air around it) in a 96x112x96 grid of 1.5 mm voxels."""
    return mr_brain_phantom((96, 112, 96), 1.5, seed=0)[0]


@pytest.fixture(scope="module")
def mr_inside(mr_head) -> np.ndarray:
    """A central 44^3 crop of the phantom: brain only, no air at all."""
    crop = central_crop(mr_head, 44)
    assert crop.min() > 30.0  # air is 3 in this phantom
    return crop


def noisy(clean: np.ndarray, kind: str, sigma: float, seed: int = 1) -> np.ndarray:
    cls = GaussianNoise if kind == "gaussian" else RicianNoise
    return cls(sigma=sigma, seed=seed)(clean)


@pytest.mark.parametrize("kind", ["gaussian", "rician"])
@pytest.mark.parametrize("fraction", [0.02, 0.05])
def test_phantom_with_air(mr_head, kind, fraction):
    sigma = fraction * float(np.percentile(mr_head, 99.5))
    estimate = estimate_noise_sigma(noisy(mr_head, kind, sigma), rician=kind == "rician")
    assert estimate == pytest.approx(sigma, rel=REL_WHOLE)


@pytest.mark.parametrize("kind", ["gaussian", "rician"])
@pytest.mark.parametrize("fraction", [0.02, 0.05])
def test_crop_without_air(mr_head, mr_inside, kind, fraction):
    sigma = fraction * float(np.percentile(mr_head, 99.5))
    estimate = estimate_noise_sigma(noisy(mr_inside, kind, sigma), rician=kind == "rician")
    assert estimate == pytest.approx(sigma, rel=REL)


def test_crop_without_air_fools_the_automatic_background(mr_head, mr_inside):
    """What failed before: Otsu's threshold still finds a "background" in the crop, and it is tissue."""
    from medgen.metrics.masks import foreground_mask

    sigma = 0.05 * float(np.percentile(mr_head, 99.5))
    y = noisy(mr_inside, "rician", sigma)
    outside = ~foreground_mask(y, dilate_vox=3)
    assert outside.mean() > 0.05
    assert np.median(y[outside]) / np.sqrt(2 * np.log(2)) > 2 * sigma  # as a Rayleigh: far too high
    assert estimate_noise_sigma(y, rician=True) == pytest.approx(sigma, rel=REL)


def test_zero_filled_air_is_not_taken_for_noise(mr_head):
    """Air set to 0 after reconstruction (masked scans) has no Rayleigh noise to measure."""
    sigma = 0.03 * float(np.percentile(mr_head, 99.5))
    y = noisy(mr_head, "rician", sigma)
    y[mr_head < 10] = 0.0
    assert estimate_noise_sigma(y, rician=True) == pytest.approx(sigma, rel=REL)


@pytest.mark.parametrize("sigma_hu", [10.0, 25.0])
def test_ct_with_and_without_air(sigma_hu):
    hu = ct_head_phantom((96, 96, 40), (1.2, 1.2, 3.0), seed=0)[0].astype(np.float32)
    inside = np.ascontiguousarray(hu[28:68, 28:68, 12:28])
    assert inside.min() > -200  # no air in the crop
    for volume in (hu, inside):
        assert estimate_noise_sigma(noisy(volume, "gaussian", sigma_hu)) == pytest.approx(sigma_hu, rel=REL)


def test_clean_volumes_give_a_small_sigma(mr_inside):
    i = np.arange(48, dtype=np.float32)
    smooth = 500 + 200 * np.sin(i / 5)[:, None, None] * np.cos(i / 7)[None, :, None] + 3 * i[None, None, :]
    assert estimate_noise_sigma(smooth) < 1e-3 * 200
    assert estimate_noise_sigma(smooth + 300, rician=True) < 1e-3 * 200
    # the phantom's texture and sharp folds: well under 1 % of white matter (700)
    assert estimate_noise_sigma(mr_inside) < 2.0
    assert estimate_noise_sigma(mr_inside, rician=True) < 2.0


def test_pure_noise_volumes():
    rng = np.random.default_rng(5)
    assert estimate_noise_sigma(rng.normal(0.0, 3.0, (40, 40, 40))) == pytest.approx(3.0, rel=0.05)
    rayleigh = np.hypot(rng.normal(0.0, 3.0, (40, 40, 40)), rng.normal(0.0, 3.0, (40, 40, 40)))
    assert estimate_noise_sigma(rayleigh, rician=True) == pytest.approx(3.0, rel=REL)


@pytest.mark.parametrize("side", [64, 128])
@pytest.mark.parametrize("fraction", [0.02, 0.05])
def test_icbm152_crops(shared_data, side, fraction):
    """The real T1 template (8-bit): a 64^3 crop has no air, a 128^3 crop has about a quarter."""
    from medgen.io.nifti import read_nifti

    full = read_nifti(shared_data / "nifti" / ICBM).values(np.float32)
    crop = central_crop(full, side)
    sigma = fraction * float(np.percentile(full, 99.5))  # 11.4 at 5 %, as in issue 10
    # The clean template is stored in 8-bit steps: only the cells a step crosses vary.
    assert estimate_noise_sigma(crop) < 1.0
    for kind in ("gaussian", "rician"):
        estimate = estimate_noise_sigma(noisy(crop, kind, sigma), rician=kind == "rician")
        assert estimate == pytest.approx(sigma, rel=REL), kind


def test_padding_outside_the_field_of_view_is_ignored():
    """CT padding (-3024 HU, no noise) outside the circular field of view must not count as flat."""
    hu = ct_head_phantom((96, 96, 40), (1.2, 1.2, 3.0), seed=0)[0].astype(np.float32)
    y = noisy(hu, "gaussian", 10.0)
    ii, jj = np.mgrid[:96, :96]
    y[(ii - 47.5) ** 2 + (jj - 47.5) ** 2 > 46**2] = -3024.0  # a fifth of every slice
    assert estimate_noise_sigma(y) == pytest.approx(10.0, rel=REL)
