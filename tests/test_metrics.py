"""Image-quality metrics against analytic values, and the foreground mask on phantoms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medgen.data.degrade import GaussianNoise, RicianNoise
from medgen.metrics.masks import foreground_mask
from medgen.metrics.quality import ms_ssim, ms_ssim_scales, nrmse, psnr, quality_report, ssim
from medgen.validate import ParameterError
from medgen.volume import Volume, VolumeMeta


def smooth_volume(shape=(32, 32, 32), seed=0) -> np.ndarray:
    """Structured test volume in [0, 1]-ish: low-frequency waves plus a bright ball."""
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    vol = 0.5 + 0.2 * np.sin(i / 3.0) * np.cos(j / 4.0) + 0.1 * np.sin(k / 2.5)
    vol[(i - 12) ** 2 + (j - 18) ** 2 + (k - 16) ** 2 < 36] += 0.3
    return vol.astype(np.float32)


# -- PSNR ------------------------------------------------------------------------------------


def test_psnr_identical_is_inf():
    ref = smooth_volume()
    assert psnr(ref, ref, data_range=1.0) == math.inf


def test_psnr_equals_the_analytic_value():
    ref = smooth_volume()
    # +-c on alternate voxels: MSE is exactly c^2, so PSNR = 10 log10(R^2 / c^2)
    signs = np.where(np.indices(ref.shape).sum(axis=0) % 2 == 0, 1.0, -1.0)
    c, data_range = 0.05, 1.0
    assert psnr(ref + c * signs, ref, data_range) == pytest.approx(
        10 * np.log10(data_range**2 / c**2), abs=1e-4
    )
    noise = np.random.default_rng(0).normal(0.0, 0.1, ref.shape)
    mse = np.mean(noise**2)
    assert psnr(ref + noise, ref, 2.0) == pytest.approx(10 * np.log10(4.0 / mse), rel=1e-6)


def test_psnr_mask_restricts_the_error():
    ref = smooth_volume()
    x = ref.copy()
    x[:4] += 1.0  # error only in the first 4 slabs
    mask = np.zeros(ref.shape, bool)
    mask[8:] = True
    assert psnr(x, ref, 1.0, mask=mask) == math.inf
    assert psnr(x, ref, 1.0, mask=~mask) == pytest.approx(10 * np.log10(1.0 / (4 / 8)), abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data_range": 0}, r"`data_range` must be > 0, got 0.0"),
        ({"data_range": -1.0}, r"`data_range` must be > 0, got -1.0"),
        (
            {"data_range": 1.0, "mask": np.zeros((32, 32, 32), bool)},
            r"`mask` must select at least one voxel",
        ),
        (
            {"data_range": 1.0, "mask": np.ones((4, 4, 4), bool)},
            r"`mask` must have the volume's shape \(32, 32, 32\)",
        ),
    ],
)
def test_psnr_parameter_errors(kwargs, message):
    ref = smooth_volume()
    with pytest.raises(ParameterError, match=message):
        psnr(ref, ref, **kwargs)


def test_shape_mismatch_names_both():
    with pytest.raises(
        ParameterError,
        match=r"`x` and `ref` must have the same shape, got \(32, 32, 32\) and \(32, 32, 31\)",
    ):
        psnr(smooth_volume(), smooth_volume()[:, :, :31], 1.0)


# -- SSIM, MS-SSIM -----------------------------------------------------------------------------


def test_ssim_identical_is_one_and_falls_with_noise():
    ref = smooth_volume()
    assert ssim(ref, ref, 1.0) == pytest.approx(1.0, abs=1e-12)
    values = [ssim(GaussianNoise(sigma=s, seed=0)(ref), ref, 1.0) for s in (0.01, 0.03, 0.1, 0.3)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[0] > 0.9 and values[-1] < 0.3


def test_ssim_mask_all_true_equals_unmasked_and_ignores_outside():
    ref = smooth_volume()
    x = GaussianNoise(sigma=0.05, seed=1)(ref)
    assert ssim(x, ref, 1.0, mask=np.ones(ref.shape, bool)) == pytest.approx(
        ssim(x, ref, 1.0), abs=1e-12
    )
    clean_half = x.copy()
    clean_half[:, :, 16:] = ref[:, :, 16:]  # errors only where k < 16
    mask = np.zeros(ref.shape, bool)
    mask[:, :, 22:] = True  # 6 voxels (> half the 11-voxel window) from the noisy part
    assert ssim(clean_half, ref, 1.0, mask=mask) == pytest.approx(1.0, abs=1e-9)
    assert ssim(clean_half, ref, 1.0, mask=~mask) < 0.95


def test_ssim_is_symmetric_and_data_range_matters():
    ref = smooth_volume()
    x = GaussianNoise(sigma=0.05, seed=2)(ref)
    assert ssim(x, ref, 1.0) == pytest.approx(ssim(ref, x, 1.0), abs=1e-12)
    assert ssim(x, ref, 10.0) > ssim(x, ref, 1.0)  # larger range, larger constants, kinder score


def test_ssim_needs_the_window():
    small = np.zeros((10, 12, 12))
    with pytest.raises(
        ParameterError,
        match=r"ssim needs at least 11 voxels along every axis, got shape \(10, 12, 12\)",
    ):
        ssim(small, small, 1.0)


def test_ms_ssim_scales_follow_the_smallest_side():
    assert ms_ssim_scales((32, 32, 32)) == 3  # 32 -> 16 -> 8 >= 7
    assert ms_ssim_scales((160, 160, 40)) == 3  # the smallest side decides
    assert ms_ssim_scales((224, 224, 224)) == 5
    assert ms_ssim_scales((64, 64, 64), max_scales=2) == 2
    with pytest.raises(
        ParameterError,
        match=r"ms_ssim needs at least 7 voxels along every axis, got shape \(6, 32, 32\)",
    ):
        ms_ssim_scales((6, 32, 32))


def test_ms_ssim_identical_is_one_and_falls_with_noise():
    ref = smooth_volume()
    assert ms_ssim(ref, ref, 1.0) == pytest.approx(1.0, abs=1e-6)
    values = [ms_ssim(GaussianNoise(sigma=s, seed=0)(ref), ref, 1.0) for s in (0.01, 0.05, 0.2)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert 0.0 <= values[-1] < values[0] <= 1.0
    tiny = smooth_volume((8, 8, 8))
    assert ms_ssim(tiny, tiny, 1.0) == pytest.approx(1.0, abs=1e-6)  # one scale still works
    with pytest.raises(ParameterError, match=r"`max_scales` must be an integer in \[1, 5\], got 0"):
        ms_ssim(ref, ref, 1.0, max_scales=0)


# -- NRMSE and the report ------------------------------------------------------------------------


def test_nrmse_normalisations():
    ref = np.full((6, 6, 6), 2.0)
    ref[0] = 4.0  # min-max span 2
    x = ref + 0.2
    assert nrmse(x, ref) == pytest.approx(0.2 / np.sqrt(np.mean(ref**2)))
    assert nrmse(x, ref, normalization="min-max") == pytest.approx(0.1)
    assert nrmse(x, ref, normalization="mean") == pytest.approx(0.2 / ref.mean())
    mask = np.zeros(ref.shape, bool)
    mask[1:] = True
    assert nrmse(x, ref, mask=mask) == pytest.approx(0.1)  # inside the mask ref is 2 everywhere
    assert nrmse(ref, ref) == 0.0
    with pytest.raises(ParameterError, match=r"did you mean 'min-max'"):
        nrmse(x, ref, normalization="minmax")


def test_quality_report_collects_the_four_metrics():
    ref = smooth_volume()
    x = GaussianNoise(sigma=0.05, seed=3)(ref)
    mask = ref > 0.6
    report = quality_report(x, ref, 1.0, mask=mask)
    assert report == pytest.approx(
        {
            "psnr": psnr(x, ref, 1.0),
            "ssim": ssim(x, ref, 1.0),
            "ms_ssim": ms_ssim(x, ref, 1.0),
            "nrmse": nrmse(x, ref),
            "psnr_fg": psnr(x, ref, 1.0, mask=mask),
            "ssim_fg": ssim(x, ref, 1.0, mask=mask),
            "nrmse_fg": nrmse(x, ref, mask=mask),
        }
    )
    assert set(quality_report(x, ref, 1.0)) == {"psnr", "ssim", "ms_ssim", "nrmse"}
    assert report["psnr"] == pytest.approx(10 * np.log10(1 / 0.05**2), abs=0.1)


# -- foreground mask -----------------------------------------------------------------------------


def ellipsoid(shape=(48, 48, 40), radii=(18, 14, 15), centre=None) -> np.ndarray:
    centre = [(n - 1) / 2 for n in shape] if centre is None else centre
    grid = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) < 1


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_mask_of_a_ct_phantom():
    body = ellipsoid(radii=(16, 14, 15))  # i from 7.5 to 39.5
    rng = np.random.default_rng(0)
    hu = np.full(body.shape, -1000.0, np.float32)
    hu[body] = 40.0
    hu[body & ~ellipsoid(radii=(14, 12, 13))] = 900.0  # a bone shell
    hu[ellipsoid(radii=(4, 3, 3), centre=(20, 20, 19))] = -1000.0  # air pocket inside (a sinus)
    hu[44:47, 4:44, 4:36] = 200.0  # a table below the body, 4 voxels of air away
    hu += rng.normal(0, 20, hu.shape).astype(np.float32)
    mask = foreground_mask(hu, dilate_vox=0)
    assert iou(mask, body) > 0.9
    assert not mask[44:47].any()  # the table is a separate, smaller component
    assert mask[20, 20, 19]  # the inside air pocket is filled
    dilated = foreground_mask(hu)  # default: one voxel of margin
    assert dilated[body].mean() > 0.99 and iou(dilated, body) > 0.75
    # Padding outside the field of view, far below air: Otsu's histogram must not see it
    padded = hu.copy()
    padded[:, :, :3] = -3024.0
    padded[:, :, -3:] = -3024.0
    assert iou(foreground_mask(padded, units="HU", dilate_vox=0), body) > 0.9
    volume = Volume(padded, np.eye(4), VolumeMeta(units="HU"))
    assert np.array_equal(
        foreground_mask(volume, dilate_vox=0), foreground_mask(padded, units="HU", dilate_vox=0)
    )


def test_mask_of_an_mr_phantom_with_rician_background():
    head = ellipsoid()
    mr = np.zeros(head.shape, np.float32)
    mr[head] = 200.0
    mr[ellipsoid(radii=(6, 4, 5))] = 30.0  # dark ventricles inside
    noisy = RicianNoise(sigma=12.0, seed=1)(mr)
    mask = foreground_mask(noisy, dilate_vox=0)
    assert iou(mask, head) > 0.9
    assert mask[ellipsoid(radii=(6, 4, 5))].all()


def test_mask_parameters_and_fixed_threshold():
    head = ellipsoid()
    values = np.where(head, 100.0, 0.0)
    exact = foreground_mask(values, smooth_sigma_vox=0, dilate_vox=0, threshold=50.0)
    assert np.array_equal(exact, head)
    dilated = foreground_mask(values, smooth_sigma_vox=0, dilate_vox=2, threshold=50.0)
    assert dilated.sum() > head.sum() and dilated[head].all()
    with pytest.raises(ParameterError, match=r"the volume is \(nearly\) constant"):
        foreground_mask(np.zeros((8, 8, 8)))
    with pytest.raises(ParameterError, match=r"`dilate_vox` must be an integer >= 0, got -1"):
        foreground_mask(values, dilate_vox=-1)


def test_mask_of_the_mni_template(shared_data):
    nib = pytest.importorskip("nibabel")
    path = shared_data / "nifti" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    values = nib.load(path).get_fdata(dtype=np.float32)[::2, ::2, ::2]  # 99 x 117 x 95
    mask = foreground_mask(values)
    assert mask[tuple(n // 2 for n in mask.shape)]
    corners = [(i, j, k) for i in (0, -1) for j in (0, -1) for k in (0, -1)]
    assert not any(mask[c] for c in corners)
    bright = values > 0.5 * values.max()  # tissue
    assert mask[bright].mean() > 0.99
    assert (
        values[mask].min() >= 0 and (values[mask] == 0).mean() < 0.05
    )  # little empty background inside
