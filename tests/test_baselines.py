"""Classical baselines: denoising and through-plane super-resolution."""

from __future__ import annotations

import numpy as np
import pytest

from medgen.baselines.denoise import estimate_noise_sigma, gaussian_denoise, nlm_denoise, tune_nlm
from medgen.baselines.super_resolution import (
    interpolation_matrix,
    iterative_back_projection,
    naive_zoom,
    sitk_upsample_slices,
    thick_to_thin_coordinates,
    upsample_slices,
)
from medgen.data.degrade import (
    GaussianNoise,
    RicianNoise,
    ThickSlices,
    thick_slice_affine,
    thin_slice_affine,
)
from medgen.metrics.quality import psnr
from medgen.validate import ParameterError


def mr_phantom(n=32) -> np.ndarray:
    """Piecewise-constant head: 100 in an ellipsoid, 60 inside, a 150 blob; 0 background."""
    i, j, k = np.mgrid[:n, :n, :n].astype(np.float64)
    c = (n - 1) / 2
    r2 = ((i - c) / (0.38 * n)) ** 2 + ((j - c) / (0.32 * n)) ** 2 + ((k - c) / (0.34 * n)) ** 2
    vol = np.where(r2 < 1, 100.0, 0.0)
    vol[r2 < 0.4] = 60.0
    vol[(i - 0.62 * n) ** 2 + (j - 0.42 * n) ** 2 + (k - c) ** 2 < (0.1 * n) ** 2] = 150.0
    return vol.astype(np.float32)


# -- denoising -----------------------------------------------------------------------------------


def test_gaussian_denoise_reduces_white_noise_by_the_filter_gain():
    noise = GaussianNoise(sigma=1.0, seed=0)(np.zeros((32, 32, 32), np.float32))
    out = gaussian_denoise(noise, 1.0)
    # white noise through a unit-area Gaussian of sigma s in 3D: std * (4 pi s^2)^(-3/4)
    assert out.std() == pytest.approx((4 * np.pi) ** -0.75, rel=0.1)
    assert np.array_equal(gaussian_denoise(noise, (0, 0, 0)), noise)
    with pytest.raises(ParameterError, match=r"`sigma_vox` must be one number or three"):
        gaussian_denoise(noise, (1.0, 1.0))
    with pytest.raises(ParameterError, match=r"`sigma_vox` must be >= 0, got -1.0"):
        gaussian_denoise(noise, -1)


def test_nlm_beats_the_noisy_input_and_gaussian_smoothing():
    clean = mr_phantom()
    noisy = GaussianNoise(sigma=10.0, seed=0)(clean)
    noisy_psnr = psnr(noisy, clean, 150.0)
    nlm_psnr = psnr(nlm_denoise(noisy, 10.0), clean, 150.0)
    gauss_psnr = psnr(gaussian_denoise(noisy, 0.7), clean, 150.0)
    assert nlm_psnr > noisy_psnr + 8.0
    assert nlm_psnr > gauss_psnr


def test_nlm_rician_correction_removes_the_noise_floor():
    clean = mr_phantom()
    sigma = 10.0
    noisy = RicianNoise(sigma=sigma, seed=0)(clean)
    background = clean == 0
    plain = nlm_denoise(noisy, sigma)
    corrected = nlm_denoise(noisy, sigma, rician=True)
    # the Rayleigh floor: E[M] = sigma sqrt(pi/2) ~ 12.5 survives plain filtering
    assert plain[background].mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.1)
    assert corrected[background].mean() < 0.1 * sigma
    assert psnr(corrected, clean, 150.0) > psnr(plain, clean, 150.0) + 5.0
    assert corrected.min() >= 0


def test_tune_nlm_returns_the_best_of_its_grid():
    clean = mr_phantom(24)
    noisy = GaussianNoise(sigma=10.0, seed=1)(clean)
    result = tune_nlm(noisy, clean, 10.0, grid=(0.5, 1.0, 1.5))
    assert set(result.mse) == {0.5, 1.0, 1.5}
    assert result.mse[result.h_factor] == min(result.mse.values())
    assert np.array_equal(result.denoised, nlm_denoise(noisy, 10.0, h_factor=result.h_factor))
    expected_mse = float(np.mean((result.denoised.astype(np.float64) - clean) ** 2))
    assert result.mse[result.h_factor] == pytest.approx(expected_mse)
    with pytest.raises(ParameterError, match=r"`h_factor` is what it tunes"):
        tune_nlm(noisy, clean, 10.0, h_factor=1.0)


def test_nlm_parameter_errors():
    x = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ParameterError, match=r"`noise_sigma` must be > 0, got 0.0"):
        nlm_denoise(x, 0.0)
    with pytest.raises(ParameterError, match=r"`patch_size` must be an integer >= 1, got 0"):
        nlm_denoise(x, 1.0, patch_size=0)


def test_estimate_noise_sigma_gaussian_and_rician():
    noise = GaussianNoise(sigma=4.0, seed=2)(np.zeros((40, 40, 40), np.float32))
    assert estimate_noise_sigma(noise) == pytest.approx(4.0, rel=0.05)
    # smooth anatomy hardly reaches the finest Haar detail
    i = np.arange(40, dtype=np.float32)
    smooth = (
        100
        + 30 * np.sin(i / 6)[:, None, None] * np.cos(i / 7)[None, :, None]
        + 0 * i[None, None, :]
    )
    assert estimate_noise_sigma(smooth + noise) == pytest.approx(4.0, rel=0.05)
    # Sharp anatomy (folds, skull) leaks into the detail: only the flattest cells are used.
    from medgen.samples import mr_brain_phantom

    head, _ = mr_brain_phantom((96, 96, 96), 1.5, seed=1)
    sigma = 0.03 * float(np.percentile(head, 99.5))
    noisy_head = GaussianNoise(sigma=sigma, seed=4)(head)
    assert estimate_noise_sigma(noisy_head) == pytest.approx(sigma, rel=0.03)
    clean = mr_phantom(40)
    rician = RicianNoise(sigma=6.0, seed=3)(clean)
    assert estimate_noise_sigma(rician, rician=True) == pytest.approx(6.0, rel=0.05)
    assert estimate_noise_sigma(rician, rician=True, background=clean == 0) == pytest.approx(
        6.0, rel=0.05
    )
    with pytest.raises(ParameterError, match=r"the background mask is empty"):
        estimate_noise_sigma(rician, rician=True, background=np.zeros(clean.shape, bool))


# -- super-resolution -------------------------------------------------------------------------------


def smooth_along_k(shape=(16, 16, 48)) -> np.ndarray:
    """Sum of low-frequency sinusoids, varying mostly along k."""
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    vol = (
        np.sin(2 * np.pi * k / 11.0 + 0.3)
        + 0.5 * np.cos(2 * np.pi * k / 7.3 + i / 9.0)
        + 0.3 * np.sin(2 * np.pi * j / 13)
    )
    return vol.astype(np.float32)


@pytest.mark.parametrize("factor", [2, 3])
def test_upsampling_ranking_on_a_smooth_volume(factor):
    vol = smooth_along_k()
    data_range = float(vol.max() - vol.min())
    low = ThickSlices(factor=factor)(vol)
    score = {
        "linear": psnr(upsample_slices(low, factor, order=1), vol, data_range),
        "cubic": psnr(upsample_slices(low, factor, order=3), vol, data_range),
        "ibp": psnr(iterative_back_projection(low, factor, n_iter=10), vol, data_range),
        "naive": psnr(naive_zoom(low, factor, order=3), vol, data_range),
    }
    assert score["cubic"] > score["linear"] + 3.0
    assert score["ibp"] > score["cubic"] + 3.0
    assert score["cubic"] > score["naive"] + 3.0  # same interpolator, misplaced slices


def test_ibp_reproduces_the_low_resolution_input():
    vol = smooth_along_k()
    for profile in ("box", "gaussian"):
        low = ThickSlices(factor=3, profile=profile)(vol)
        high = iterative_back_projection(low, 3, n_iter=30, profile=profile)
        np.testing.assert_allclose(ThickSlices(factor=3, profile=profile)(high), low, atol=1e-4)
    assert np.array_equal(iterative_back_projection(low, 3, n_iter=0), upsample_slices(low, 3))


def test_grid_aligned_linear_upsampling_is_exact_for_a_ramp():
    # box averaging a linear ramp gives its value at the thick-slice centre; putting the thick
    # slices back at their true positions and interpolating linearly restores the ramp exactly
    # (except the outermost half thick slice on each side, held at the nearest value).
    ramp = np.broadcast_to(np.arange(12, dtype=np.float32), (2, 2, 12))
    low = ThickSlices(factor=3)(ramp)
    up = upsample_slices(low, 3, order=1)
    np.testing.assert_allclose(up[..., 1:-1], ramp[..., 1:-1], atol=1e-5)
    assert np.abs(naive_zoom(low, 3, order=1)[..., 1:-1] - ramp[..., 1:-1]).max() > 0.3


def test_upsampling_along_other_axes_and_n_thin():
    vol = np.moveaxis(smooth_along_k(), 2, 0)
    low = ThickSlices(factor=2, axis=0)(vol)
    np.testing.assert_allclose(
        np.moveaxis(upsample_slices(low, 2, axis=0), 0, 2),
        upsample_slices(np.moveaxis(low, 0, 2), 2),
        atol=1e-6,
    )
    assert upsample_slices(low, 2, axis=0, n_thin=49).shape == (49, 16, 16)
    with pytest.raises(ParameterError, match=r"`n_thin` \(50\) does not fit 24 thick slices of 2"):
        iterative_back_projection(low, 2, axis=0, n_thin=50)


def test_interpolation_matrix_matches_map_coordinates_on_the_volume():
    from scipy import ndimage

    low = ThickSlices(factor=2)(smooth_along_k((6, 5, 20)))
    coords = np.meshgrid(
        np.arange(6), np.arange(5), thick_to_thin_coordinates(20, 2), indexing="ij"
    )
    direct = ndimage.map_coordinates(low, coords, order=3, mode="nearest")
    np.testing.assert_allclose(upsample_slices(low, 2, order=3), direct, atol=1e-5)
    np.testing.assert_allclose(interpolation_matrix(10, 2).sum(axis=1), 1.0, atol=1e-9)


def test_sitk_resampling_agrees_with_the_grid_aligned_spline():
    vol = smooth_along_k()
    low = ThickSlices(factor=2)(vol)
    via_itk = sitk_upsample_slices(low, 2)
    cubic = upsample_slices(low, 2, order=3)
    assert via_itk.shape == cubic.shape == vol.shape
    # same B-spline away from the ends (boundary handling differs in the outermost slices)
    np.testing.assert_allclose(via_itk[:, :, 4:-4], cubic[:, :, 4:-4], atol=0.02)
    data_range = float(vol.max() - vol.min())
    assert psnr(via_itk, vol, data_range) > psnr(naive_zoom(low, 2), vol, data_range) + 3.0


def test_thin_affine_undoes_thick_affine():
    affine = np.array([[0.7, 0.1, 0, -90], [0, 0.7, 0.2, 30], [0, 0, 2.5, -12], [0, 0, 0, 1]])
    for axis in range(3):
        np.testing.assert_allclose(
            thin_slice_affine(thick_slice_affine(affine, 4, axis), 4, axis), affine, atol=1e-12
        )


def test_order_must_be_linear_or_cubic():
    with pytest.raises(
        ParameterError, match=r"`order` must be 1 \(trilinear\) or 3 \(cubic B-spline\), got 2"
    ):
        upsample_slices(np.zeros((2, 2, 2)), 2, order=2)
