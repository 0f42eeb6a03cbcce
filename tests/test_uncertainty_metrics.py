"""Uncertainty-map checks on cases with a known answer (``medgen.metrics.uncertainty``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medgen.metrics.uncertainty import calibration_table, format_calibration, uncertainty_spearman


@pytest.fixture()
def std() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.1, 3.0, (24, 24, 24))


def test_std_exactly_proportional_to_the_error_gives_spearman_one(std):
    assert uncertainty_spearman(std, 2.5 * std) == pytest.approx(1.0, abs=1e-12)
    assert uncertainty_spearman(std, -0.5 * std) == pytest.approx(1.0, abs=1e-12)  # |error| is used
    # Any increasing function of the std ranks the same way.
    assert uncertainty_spearman(std, np.exp(std)) == pytest.approx(1.0, abs=1e-12)
    # An inversely ordered map is the worst possible.
    assert uncertainty_spearman(std, 1.0 / std) == pytest.approx(-1.0, abs=1e-12)


def test_an_independent_error_gives_spearman_near_zero(std):
    error = np.random.default_rng(1).normal(size=std.shape)
    # 13824 voxels: the null distribution's standard deviation is 1/sqrt(n - 1) = 0.0085.
    assert abs(uncertainty_spearman(std, error)) < 4 / math.sqrt(std.size - 1)


def test_errors_drawn_with_the_std_as_scale_correlate_and_calibrate(std):
    error = np.random.default_rng(2).normal(size=std.shape) * std
    rho = uncertainty_spearman(std, error)
    assert 0.3 < rho < 0.8  # |N(0, s^2)| is ordered by s only in distribution
    table = calibration_table(std, error, n_bins=5, quantiles=(0.5, 0.9))
    assert len(table) == 5 and sum(b.count for b in table) == std.size
    for q in range(2):
        values = [b.error_quantiles[q] for b in table]
        assert all(a < b for a, b in zip(values, values[1:])), values  # monotone in the std
    # Calibrated: error quantile / mean std near the Gaussian 0.674 (median) and 1.645 (q90).
    for b in table[1:]:
        assert b.error_quantiles[0] / b.std_mean == pytest.approx(0.674, rel=0.1)
        assert b.error_quantiles[1] / b.std_mean == pytest.approx(1.645, rel=0.1)
    assert [b.std_low for b in table] == sorted(b.std_low for b in table)


def test_a_map_that_does_not_track_error_has_flat_calibration(std):
    error = np.random.default_rng(3).normal(size=std.shape)
    medians = [b.error_quantiles[0] for b in calibration_table(std, error, n_bins=4)]
    assert max(medians) - min(medians) < 0.1  # all bins about 0.674


def test_mask_selects_voxels_and_constant_maps_give_nan(std):
    mask = np.zeros(std.shape, bool)
    mask[:12] = True
    error = np.where(mask, std, -std[::-1])  # proportional inside the mask only
    assert uncertainty_spearman(std, error, mask) == pytest.approx(1.0)
    assert sum(b.count for b in calibration_table(std, error, mask)) == int(mask.sum())
    assert math.isnan(uncertainty_spearman(np.ones(std.shape), std))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"`std` and `error` must have the same shape, got \(2,\) and \(3,\)"):
        uncertainty_spearman(np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match=r"`n_bins` must be an integer >= 1, got 0"):
        calibration_table(np.ones(4), np.ones(4), n_bins=0)
    with pytest.raises(ValueError, match=r"`quantiles` must be values in \[0, 1\], got \[1.5\]"):
        calibration_table(np.ones(4), np.ones(4), quantiles=(1.5,))
    with pytest.raises(ValueError, match="no finite voxels"):
        calibration_table(np.ones(4), np.ones(4), np.zeros(4, bool))


def test_format_calibration_has_one_row_per_bin(std):
    text = format_calibration(calibration_table(std, std, n_bins=3))
    assert text.count("\n") == 1 + 3 and text.startswith("| std bin | mean std | voxels |")
