"""Per-scan adaptation: SURE-fitted denoising and SMORE super-resolution on small phantoms."""

from __future__ import annotations

import numpy as np
import pytest

from medgen.adapt.denoise import (
    LETDenoiser,
    adapt_denoise,
    anchor_weights,
    pretrain_denoiser,
    rician_mean,
    rician_mean_inverse,
)
from medgen.data.degrade import GaussianNoise, RicianNoise, ThickSlices
from medgen.metrics.quality import psnr
from medgen.samples import mr_brain_phantom

SIDE = 40


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    """A 40^3 T1 head phantom (4.5 mm voxels: folds, ventricles and skull on a small grid)."""
    image, _ = mr_brain_phantom((SIDE, SIDE, SIDE), 4.5, seed=3)
    return image


@pytest.fixture(scope="module")
def data_range(phantom: np.ndarray) -> float:
    return float(np.percentile(phantom, 99.5))


@pytest.fixture(scope="module")
def gaussian_case(phantom: np.ndarray, data_range: float) -> tuple[np.ndarray, float]:
    sigma = 0.05 * data_range
    return GaussianNoise(sigma=sigma, seed=1)(phantom), sigma


@pytest.fixture(scope="module")
def gaussian_result(gaussian_case) -> tuple[np.ndarray, dict]:
    noisy, sigma = gaussian_case
    record: dict = {}
    out = adapt_denoise(noisy, (4.5, 4.5, 4.5), noise_sigma=sigma, noise="gaussian", seconds=5, seed=0, record=record)
    return out, record


def test_sure_denoising_beats_the_noisy_input_and_its_starting_point(phantom, data_range, gaussian_case, gaussian_result):
    noisy, sigma = gaussian_case
    out, record = gaussian_result
    assert out.shape == noisy.shape and out.dtype == np.float32
    gain = psnr(out, phantom, data_range) - psnr(noisy, phantom, data_range)
    assert gain > 6.0
    # Adapting must beat the unfitted expansion, which is the non-local-means anchor.
    anchor = adapt_denoise(noisy, (4.5,) * 3, noise_sigma=sigma, noise="gaussian", seconds=0)
    assert psnr(out, phantom, data_range) > psnr(anchor, phantom, data_range) + 0.3
    assert record["method"] == "sure-let-gaussian" and record["steps"] == 1
    assert record["params"]["noise_sigma"] == pytest.approx(sigma)


def test_sure_denoising_is_deterministic_for_a_seed(gaussian_case, gaussian_result):
    noisy, sigma = gaussian_case
    again = adapt_denoise(noisy, (4.5,) * 3, noise_sigma=sigma, noise="gaussian", seconds=5, seed=0)
    np.testing.assert_array_equal(again, gaussian_result[0])


def test_input_is_not_modified(gaussian_case):
    noisy, sigma = gaussian_case
    before = noisy.copy()
    adapt_denoise(noisy, (4.5,) * 3, noise_sigma=sigma, noise="gaussian", seconds=0)
    np.testing.assert_array_equal(noisy, before)


def test_rician_denoising_removes_the_noise_floor(phantom, data_range):
    sigma = 0.05 * data_range
    noisy = RicianNoise(sigma=sigma, seed=2)(phantom)
    out = adapt_denoise(noisy, (4.5,) * 3, noise_sigma=sigma, noise="rician", seconds=5, seed=0)
    assert psnr(out, phantom, data_range) > psnr(noisy, phantom, data_range) + 6.0
    air = phantom < 0.02 * data_range  # the phantom's air is ~3, the noise floor 1.25 sigma
    assert float(noisy[air].mean()) > 1.1 * sigma
    assert float(out[air].mean()) < 0.2 * sigma


def test_sure_trusts_a_good_extra_estimate_and_not_a_useless_one(phantom, data_range, gaussian_case, gaussian_result):
    noisy, sigma = gaussian_case
    without = psnr(gaussian_result[0], phantom, data_range)
    # An oracle (the clean volume, whose divergence is 0) must take over the output ...
    oracle = adapt_denoise(
        noisy, (4.5,) * 3, noise_sigma=sigma, noise="gaussian", seconds=5, seed=0, extra_estimates=[lambda v: phantom]
    )
    assert psnr(oracle, phantom, data_range) > without + 5.0
    # Handing over the estimate's whole-scan output spares that pass and changes nothing.
    handed = adapt_denoise(
        noisy, (4.5,) * 3, noise_sigma=sigma, noise="gaussian", seconds=5, seed=0,
        extra_estimates=[lambda v: phantom], extra_outputs=[phantom],
    )
    np.testing.assert_allclose(handed, oracle, atol=1e-4 * data_range)
    with pytest.raises(ValueError, match=r"`extra_outputs` must hold one volume per extra estimate \(1\), got 2"):
        adapt_denoise(noisy, (4.5,) * 3, noise_sigma=sigma, seconds=5, extra_estimates=[lambda v: v],
                      extra_outputs=[phantom, phantom])
    # ... while the noisy input itself (divergence 1 per voxel) must not be over-fitted.
    record: dict = {}
    identity = adapt_denoise(
        noisy, (4.5,) * 3, noise_sigma=sigma, noise="gaussian", seconds=5, seed=0,
        extra_estimates=[lambda v: v.copy()], record=record,
    )
    assert abs(psnr(identity, phantom, data_range) - without) < 0.3
    # 8 classical features, the collaborative estimate and the extra one, 18 bands each.
    assert record["params"]["n_extra_estimates"] == 1 and record["params"]["n_basis"] == 10 * 18
    with pytest.raises(ValueError, match="`extra_estimates` are weighted by the SURE fit: they need `seconds` > 0"):
        adapt_denoise(noisy, (4.5,) * 3, noise_sigma=sigma, seconds=0, extra_estimates=[lambda v: v])


def test_unfitted_expansion_is_the_anchor():
    w = anchor_weights().reshape(8, -1)
    assert w[2].tolist() == [1.0] * w.shape[1] and float(np.abs(w).sum()) == w.shape[1]


def test_pretrained_weights_apply_without_adaptation(phantom, data_range, gaussian_case):
    noisy, sigma = gaussian_case
    other, _ = mr_brain_phantom((SIDE, SIDE, SIDE), 4.5, seed=7, contrast="T2")
    model = pretrain_denoiser([other], noise="gaussian", sigma_fraction=0.05, seed=0)
    assert model.fitted_on == "clean" and model.weights.shape == anchor_weights().shape
    out = adapt_denoise(noisy, (4.5,) * 3, noise_sigma=sigma, noise="gaussian", seconds=0, init_model=model)
    assert psnr(out, phantom, data_range) > psnr(noisy, phantom, data_range) + 4.0
    restored = LETDenoiser.from_dict(model.to_dict())
    np.testing.assert_array_equal(restored.weights, model.weights)
    with pytest.raises(ValueError, match="fitted for 'gaussian' noise, got noise='rician'"):
        adapt_denoise(noisy, (4.5,) * 3, noise_sigma=sigma, noise="rician", seconds=0, init_model=model)


def test_rician_mean_round_trip_and_limits():
    a = np.array([0.0, 0.3, 2.0, 10.0, 80.0], dtype=np.float32)
    np.testing.assert_allclose(rician_mean_inverse(rician_mean(a, 2.0), 2.0), a, atol=2e-3)
    assert float(rician_mean(np.float32(0.0), 1.0)) == pytest.approx(np.sqrt(np.pi / 2), rel=1e-6)
    assert float(rician_mean(np.float32(30.0), 1.0)) == pytest.approx(np.sqrt(30.0**2 + 1.0), rel=1e-4)
    assert rician_mean_inverse(np.array([0.5], np.float32), 1.0)[0] == 0.0  # below the floor


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise": "rican"}, r"`noise` must be one of 'gaussian', 'rician'; got 'rican' \(did you mean 'rician'\?\)"),
        ({"noise_sigma": -1.0}, r"`noise_sigma` must be > 0, got -1"),
        ({"seconds": -2.0}, r"`seconds` must be >= 0, got -2"),
    ],
)
def test_denoise_parameter_errors(kwargs, message):
    args = {"noise_sigma": 1.0, "noise": "gaussian", "seconds": 0.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        adapt_denoise(np.zeros((8, 8, 8), np.float32), (1.0,) * 3, **args)


# ---------------------------------------------------------------------------------------
# Super-resolution


@pytest.fixture(scope="module")
def sr_case(phantom: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return phantom, ThickSlices(factor=2, axis=2)(phantom)


@pytest.fixture(scope="module")
def sr_result(sr_case) -> tuple[np.ndarray, dict]:
    from medgen.adapt.super_resolution import adapt_super_resolution

    _, low = sr_case
    record: dict = {}
    # The step cap, not the clock, ends the run: repeatable even on a loaded machine.
    out = adapt_super_resolution(low, (4.5, 4.5, 9.0), factor=2, axis=2, seconds=3600, max_steps=60, seed=0, record=record)
    return out, record


def test_smore_output_is_on_the_thin_grid_and_consistent(sr_case, sr_result):
    thin, low = sr_case
    out, record = sr_result
    assert out.shape == thin.shape and out.dtype == np.float32
    # Averaging the thin slices of each thick slice gives it back (exact data consistency).
    np.testing.assert_allclose(ThickSlices(factor=2, axis=2)(out), low, rtol=0, atol=1e-3 * float(low.max()))
    assert record["steps"] == 60 and len(record["losses"]) == 60


def test_smore_beats_grid_aligned_trilinear(sr_case, sr_result, data_range):
    from medgen.baselines.super_resolution import upsample_slices

    from medgen.baselines.super_resolution import iterative_back_projection

    thin, low = sr_case
    trilinear = upsample_slices(low, 2, axis=2, order=1)
    ibp = iterative_back_projection(low, 2, axis=2, n_iter=10)
    ours = psnr(sr_result[0], thin, data_range)
    assert ours > psnr(trilinear, thin, data_range) + 0.3
    assert ours > psnr(ibp, thin, data_range) - 0.05  # it starts there; 60 steps must not spoil it


def test_smore_learns_through_plane_detail_from_a_real_scan(shared_data):
    """On a 64x64x48 crop of the ICBM152 T1, 200 steps of in-plane training beat its starting point."""
    from medgen.adapt.super_resolution import adapt_super_resolution
    from medgen.baselines.super_resolution import iterative_back_projection
    from medgen.io.nifti import read_nifti

    full = read_nifti(shared_data / "nifti" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").values(np.float32)
    i, j, k = (n // 2 for n in full.shape)
    thin = np.ascontiguousarray(full[i - 32 : i + 32, j - 32 : j + 32, k - 24 : k + 24])
    r = float(np.percentile(full, 99.5))
    low = ThickSlices(factor=2, axis=2)(thin)
    record: dict = {}
    out = adapt_super_resolution(low, (1.0, 1.0, 2.0), factor=2, axis=2, seconds=3600, max_steps=200, seed=0, record=record)
    start = iterative_back_projection(low, 2, axis=2, n_iter=10)
    assert psnr(out, thin, r) > psnr(start, thin, r) + 0.1
    losses = record["losses"]
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20])


def test_smore_is_deterministic_for_a_seed(sr_case, sr_result):
    from medgen.adapt.super_resolution import adapt_super_resolution

    _, low = sr_case
    again = adapt_super_resolution(low, (4.5, 4.5, 9.0), factor=2, axis=2, seconds=3600, max_steps=60, seed=0)
    np.testing.assert_array_equal(again, sr_result[0])


def test_smore_without_training_is_cubic_back_projection(sr_case):
    from medgen.adapt.super_resolution import adapt_super_resolution
    from medgen.baselines.super_resolution import iterative_back_projection

    _, low = sr_case
    out = adapt_super_resolution(low, (4.5, 4.5, 9.0), factor=2, axis=2, seconds=0)
    ibp = iterative_back_projection(low, 2, axis=2, n_iter=10)
    np.testing.assert_allclose(out, ibp, atol=1e-3 * float(low.max()))


def test_residual_split_round_trips_on_any_axis():
    from medgen.adapt.super_resolution import residuals_to_thin, thin_to_residuals

    x = np.random.default_rng(0).normal(size=(6, 4, 8)).astype(np.float32)
    for axis in range(3):
        low, d = thin_to_residuals(x, 2, axis)
        assert d.shape == (2, *low.shape)
        np.testing.assert_allclose(residuals_to_thin(low, d, axis), x, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factor": 1}, r"`factor` must be an integer >= 2, got 1"),
        ({"axis": 3}, r"`axis` must be in \[-3, 2\] for a 3D array, got 3"),
        ({"seconds": -1}, r"`seconds` must be >= 0, got -1"),
    ],
)
def test_smore_parameter_errors(kwargs, message):
    from medgen.adapt.super_resolution import adapt_super_resolution

    args = {"factor": 2, "axis": 2, "seconds": 0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        adapt_super_resolution(np.zeros((16, 16, 8), np.float32), (1.0, 1.0, 2.0), **args)


def test_smore_refuses_a_volume_too_small_in_plane():
    from medgen.adapt.super_resolution import adapt_super_resolution

    with pytest.raises(ValueError, match="too small in-plane for factor 2"):
        adapt_super_resolution(np.zeros((3, 16, 8), np.float32), (1.0, 1.0, 2.0), factor=2, axis=2, seconds=0)
