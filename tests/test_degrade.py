"""Degradation models: a contract every registered degradation passes, then each one's physics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medgen.data.degrade import (
    DEGRADATIONS,
    DegradationChain,
    GaussianNoise,
    IsotropicDownsample,
    KSpaceTruncation,
    LowDoseCT,
    RandomDegradation,
    RandomGaussianNoise,
    RandomIsotropicDownsample,
    RandomKSpaceTruncation,
    RandomLowDoseCT,
    RandomRicianNoise,
    RandomThickSlices,
    RicianNoise,
    ThickSlices,
    build_degradation,
    robust_intensity_scale,
    slice_profile_matrix,
    thick_slice_affine,
    thick_slices,
    thin_slice_affine,
)
from medgen.validate import ParameterError
from medgen.volume import Volume, VolumeMeta

# An oblique grid: rotation about z plus anisotropic voxels, so axis mix-ups show.
_C, _S = np.cos(0.3), np.sin(0.3)
OBLIQUE = np.array(
    [
        [0.8 * _C, -0.8 * _S, 0.0, -40.0],
        [0.8 * _S, 0.8 * _C, 0.0, 12.0],
        [0.0, 0.0, 1.5, 7.0],
        [0, 0, 0, 1],
    ]
)


def ct_phantom(shape=(32, 32, 8)) -> np.ndarray:
    """Water cylinder (0 HU) in air (-1000 HU) with a 400 HU rod; float32 (I, J, K)."""
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    ci, cj = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    plane = np.full(shape[:2], -1000.0, np.float32)
    plane[(ii - ci) ** 2 + (jj - cj) ** 2 < (0.42 * shape[0]) ** 2] = 0.0
    plane[(ii - ci + 5) ** 2 + (jj - cj) ** 2 < 9] = 400.0
    return np.repeat(plane[:, :, None], shape[2], axis=2)


class DegradationContract:
    """What every degradation must do; a new one gets these checks by subclassing.

    Subclasses define ``make()`` (a deterministic instance) and ``make_random()``.
    """

    shape = (24, 24, 12)
    spacing_mm = (1.0, 1.0, 2.0)

    def make(self):
        raise NotImplementedError

    def make_random(self):
        raise NotImplementedError

    def data(self) -> np.ndarray:
        rng = np.random.default_rng(7)
        i, j, k = np.meshgrid(*(np.arange(n) for n in self.shape), indexing="ij")
        smooth = 100.0 + 50.0 * np.sin(i / 4.0) * np.cos(j / 5.0) + 20.0 * np.sin(k / 3.0)
        return (smooth + rng.normal(0, 1, self.shape)).astype(np.float32)

    def test_registered_under_its_name(self):
        d = self.make()
        assert DEGRADATIONS[d.name] is type(d)

    def test_params_rebuild_the_same_degradation(self):
        d = self.make()
        assert type(d)(**d.params()) == d
        assert build_degradation(d.name, **d.params()) == d
        line = d.describe()
        assert line.startswith(f"degrade:{d.name} ")
        assert json.loads(line.split(" ", 1)[1]) == json.loads(json.dumps(d.params(), default=list))

    def test_output_matches_declared_geometry(self):
        d = self.make()
        out = d(self.data(), spacing_mm=self.spacing_mm)
        shape, affine = d.output_geometry(self.shape, np.eye(4))
        assert out.shape == shape
        assert out.dtype == np.float32
        assert np.all(np.isfinite(out))
        assert affine.shape == (4, 4)

    def test_input_is_not_modified(self):
        data = self.data()
        before = data.copy()
        self.make()(data, spacing_mm=self.spacing_mm)
        assert np.array_equal(data, before)

    def test_repeatable(self):
        d = self.make()
        data = self.data()
        assert np.array_equal(
            d(data, spacing_mm=self.spacing_mm), d(data, spacing_mm=self.spacing_mm)
        )

    def test_channel_first_array(self):
        d = self.make()
        data = self.data()
        out = d(np.stack([data, data + 1.0]), spacing_mm=self.spacing_mm)
        single = d(data, spacing_mm=self.spacing_mm)
        assert out.shape == (2, *single.shape)
        assert np.array_equal(out[0], single)  # the first channel sees the same random stream

    def test_volume_in_volume_out(self):
        d = self.make()
        affine = OBLIQUE.copy()
        affine[:3, 2] *= self.spacing_mm[2] / 1.5
        affine[:3, :2] *= 1.0 / 0.8
        meta = VolumeMeta(modality="CT", units="HU", provenance=["ingest"])
        volume = Volume(np.round(self.data() * 10).astype(np.int16), affine, meta, slope=0.1)
        out = d(volume)
        shape, new_affine = d.output_geometry(volume.shape, affine)
        assert isinstance(out, Volume)
        assert out.shape == shape
        np.testing.assert_allclose(out.affine, new_affine)
        assert out.meta.units == "HU" and out.meta.modality == "CT"
        assert out.meta.provenance == ["ingest", d.describe()]
        assert volume.meta.provenance == ["ingest"]  # the input's record is untouched
        np.testing.assert_allclose(
            out.array, d(volume.values(), spacing_mm=volume.spacing_mm), rtol=1e-6
        )

    def test_torch_tensor_in_tensor_out(self):
        torch = pytest.importorskip("torch")
        d = self.make()
        data = self.data()
        out = d(torch.from_numpy(data[None]).double(), spacing_mm=self.spacing_mm)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
        np.testing.assert_allclose(out[0].numpy(), d(data, spacing_mm=self.spacing_mm), rtol=1e-6)

    def test_random_variant_replays(self):
        data = self.data()
        random_d = self.make_random()
        first = random_d(data, spacing_mm=self.spacing_mm)
        replay = type(random_d.last_transform)(**random_d.last_params)
        assert np.array_equal(replay(data, spacing_mm=self.spacing_mm), first)
        again = self.make_random()  # same sampler seed: same sequence of draws
        assert np.array_equal(again(data, spacing_mm=self.spacing_mm), first)
        assert again.last_params == random_d.last_params


class TestGaussianNoiseContract(DegradationContract):
    def make(self):
        return GaussianNoise(sigma=5.0, seed=3)

    def make_random(self):
        return RandomGaussianNoise(sigma_range=(1.0, 10.0), seed=11)


class TestRicianNoiseContract(DegradationContract):
    def make(self):
        return RicianNoise(sigma_fraction=0.05, seed=3)

    def make_random(self):
        return RandomRicianNoise(sigma_fraction_range=(0.01, 0.1), seed=11)


class TestLowDoseCTContract(DegradationContract):
    shape = (20, 20, 3)
    spacing_mm = (0.8, 0.8, 2.0)

    def data(self):
        return ct_phantom(self.shape)

    def make(self):
        return LowDoseCT(dose_fraction=0.5, photons_per_ray=1e4, seed=3)

    def make_random(self):
        return RandomLowDoseCT(dose_range=(0.1, 0.5), mode="insert", seed=11)


class TestThickSlicesContract(DegradationContract):
    def make(self):
        return ThickSlices(factor=3, axis=2, profile="gaussian")

    def make_random(self):
        return RandomThickSlices(factor_range=(2, 4), axis=1, seed=11)


class TestDownsampleContract(DegradationContract):
    def make(self):
        return IsotropicDownsample(factor=2.5)

    def make_random(self):
        return RandomIsotropicDownsample(factor_range=(1.5, 3.0), seed=11)


class TestKSpaceContract(DegradationContract):
    def make(self):
        return KSpaceTruncation(keep_fraction=0.5, axes=(0, 1), output="crop")

    def make_random(self):
        return RandomKSpaceTruncation(keep_range=(0.3, 0.8), seed=11)


def test_every_registered_degradation_has_a_contract_test():
    tested = {cls().make().name for cls in DegradationContract.__subclasses__()}
    assert tested == set(DEGRADATIONS)


# -- noise -----------------------------------------------------------------------------------


def test_gaussian_noise_has_the_requested_std_and_zero_mean():
    noise = GaussianNoise(sigma=12.0, seed=0)(np.zeros((40, 40, 40), np.float32))
    assert abs(noise.std() - 12.0) < 0.15  # 64000 samples: std error ~0.03
    assert abs(noise.mean()) < 0.2


def test_sigma_fraction_is_relative_to_the_robust_span():
    data = np.linspace(0, 1000, 40 * 40 * 40, dtype=np.float32).reshape(40, 40, 40)
    span = robust_intensity_scale(data)
    assert span == pytest.approx(990.0, rel=1e-4)  # p99.5 - p0.5 of a uniform ramp
    noise = GaussianNoise(sigma_fraction=0.02, seed=0)(data) - data
    assert noise.std() == pytest.approx(0.02 * span, rel=0.02)
    assert GaussianNoise(sigma_fraction=0.02).sigma_for(data) == pytest.approx(0.02 * span)


def test_noise_seed_none_draws_fresh_noise():
    d = GaussianNoise(sigma=1.0)
    x = np.zeros((8, 8, 8), np.float32)
    assert not np.array_equal(d(x), d(x))


def test_rician_noise_matches_rice_moments():
    a, sigma = 50.0, 10.0
    out = RicianNoise(sigma=sigma, seed=1)(np.full((40, 40, 40), a, np.float32))
    # E[M^2] = A^2 + 2 sigma^2 exactly; E[M] ~ sqrt(A^2 + sigma^2) at this SNR (error < 0.1 %)
    assert np.mean(out.astype(np.float64) ** 2) == pytest.approx(a**2 + 2 * sigma**2, rel=0.01)
    assert out.mean() == pytest.approx(np.sqrt(a**2 + sigma**2), rel=0.005)
    background = RicianNoise(sigma=sigma, seed=1)(np.zeros((40, 40, 40), np.float32))
    assert background.min() >= 0
    assert background.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"rician: give exactly one of `sigma` .* or `sigma_fraction`"),
        ({"sigma": 1.0, "sigma_fraction": 0.1}, r"give exactly one of `sigma`"),
        ({"sigma": -1}, r"`sigma` must be > 0, got -1.0"),
        ({"sigma": 1.0, "seed": -1}, r"`seed` must be an integer >= 0, got -1"),
    ],
)
def test_noise_parameter_errors(kwargs, message):
    with pytest.raises(ParameterError, match=message):
        RicianNoise(**kwargs)


# -- low-dose CT -----------------------------------------------------------------------------


def _disk_interior(shape, radius):
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    inside = (ii - (shape[0] - 1) / 2) ** 2 + (jj - (shape[1] - 1) / 2) ** 2 < radius**2
    return np.repeat(inside[:, :, None], shape[2], axis=2)


def test_lowdose_full_dose_many_photons_reproduces_the_slice():
    hu = ct_phantom((48, 48, 3))
    out = LowDoseCT(dose_fraction=1.0, photons_per_ray=1e12, seed=0)(hu, spacing_mm=(0.7, 0.7, 1.0))
    inside = _disk_interior(hu.shape, 14)  # the water disk has radius ~20 px: keep off its edge
    rmse = np.sqrt(np.mean((out - hu)[inside] ** 2))
    assert rmse < 50.0  # FBP of a sharp-edged phantom: ~28 HU measured
    air = ~_disk_interior(hu.shape, 22)
    assert abs(np.median(out[air]) + 1000.0) < 20.0


def _uniform_std(out, shape):
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    ci, cj = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    region = ((ii - ci - 6) ** 2 + (jj - cj) ** 2) < 30  # uniform water, away from the rod
    return float(out[region].std())


def test_lowdose_noise_grows_as_one_over_sqrt_dose():
    hu = ct_phantom((48, 48, 6))
    stds = {
        d: _uniform_std(
            LowDoseCT(dose_fraction=d, photons_per_ray=1e4, seed=0)(hu, spacing_mm=(1, 1, 1)),
            hu.shape,
        )
        for d in (1.0, 0.25)
    }
    assert stds[0.25] / stds[1.0] == pytest.approx(2.0, rel=0.15)


def test_lowdose_insert_adds_only_the_missing_noise():
    hu = ct_phantom((48, 48, 6))
    assert np.array_equal(
        LowDoseCT(dose_fraction=1.0, mode="insert", seed=0)(hu, spacing_mm=(1, 1, 1)), hu
    )
    stds = {
        d: _uniform_std(
            LowDoseCT(dose_fraction=d, mode="insert", photons_per_ray=1e4, seed=0)(
                hu, spacing_mm=(1, 1, 1)
            ),
            hu.shape,
        )
        for d in (0.5, 0.2)
    }
    # inserted variance ~ (1/d - 1): 1 at d=0.5, 4 at d=0.2 -> std ratio 2
    assert stds[0.2] / stds[0.5] == pytest.approx(2.0, rel=0.15)
    quarter = LowDoseCT(dose_fraction=0.25, mode="insert", photons_per_ray=1e4, seed=5)(
        hu, spacing_mm=(1, 1, 1)
    )
    assert abs(np.mean((quarter - hu)[_disk_interior(hu.shape, 14)])) < 5.0  # zero-mean noise


def test_lowdose_same_seed_same_noise_and_slice_axis():
    hu = ct_phantom((32, 32, 2))
    d = LowDoseCT(dose_fraction=0.3, photons_per_ray=1e4, seed=9)
    assert np.array_equal(d(hu, spacing_mm=(1, 1, 1)), d(hu, spacing_mm=(1, 1, 1)))
    moved = LowDoseCT(dose_fraction=0.3, photons_per_ray=1e4, seed=9, slice_axis=0)(
        np.moveaxis(hu, 2, 0), spacing_mm=(1, 1, 1)
    )
    np.testing.assert_allclose(np.moveaxis(moved, 0, 2), d(hu, spacing_mm=(1, 1, 1)), atol=1e-3)


def test_lowdose_errors():
    hu = ct_phantom((16, 16, 2))
    with pytest.raises(
        ParameterError, match=r"lowdose_ct: `spacing_mm` is required for a plain array"
    ):
        LowDoseCT(dose_fraction=0.5)(hu)
    with pytest.raises(
        ParameterError, match=r"needs square pixels in the slice plane, got 0.5 x 1 mm"
    ):
        LowDoseCT(dose_fraction=0.5)(hu, spacing_mm=(0.5, 1.0, 1.0))
    with pytest.raises(ParameterError, match=r"`dose_fraction` must be in \(0, 1\], got 0.0"):
        LowDoseCT(dose_fraction=0.0)
    with pytest.raises(
        ParameterError,
        match=r"`mode` must be one of 'resimulate', 'insert'; got 'insrt' \(did you mean 'insert'\?\)",
    ):
        LowDoseCT(dose_fraction=0.5, mode="insrt")


# -- resolution ------------------------------------------------------------------------------


def test_thick_slice_affine_puts_each_slice_at_the_mean_position():
    for factor in (2, 3, 4):
        thick = thick_slice_affine(OBLIQUE, factor, axis=2)
        for m in range(3):
            thin_centres = [OBLIQUE @ [5, 7, t, 1] for t in range(m * factor, m * factor + factor)]
            np.testing.assert_allclose(
                thick @ [5, 7, m, 1], np.mean(thin_centres, axis=0), atol=1e-12
            )
        np.testing.assert_allclose(thin_slice_affine(thick, factor, axis=2), OBLIQUE, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("profile", ["box", "gaussian"])
def test_thick_slices_of_world_coordinate_equal_world_coordinate_of_new_grid(axis, profile):
    # A volume holding each voxel's world z (linear in the indices): averaging it over a
    # symmetric slice profile returns the world z of the thick slice centre, which the new
    # affine must agree with.
    shape = (9, 10, 11)
    affine = np.array([[0, 0, 1.1, 3], [0.9, 0, 0, -2], [0.2, 0.3, 0.1, 5], [0, 0, 0, 1]])
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    world_z = (index @ affine[2, :3] + affine[2, 3]).astype(np.float32)
    low, new_affine = thick_slices(world_z, 3, axis=axis, profile=profile, affine=affine)
    expected_shape = list(shape)
    expected_shape[axis] //= 3
    assert low.shape == tuple(expected_shape)
    new_index = np.stack(np.meshgrid(*(np.arange(n) for n in low.shape), indexing="ij"), -1)
    expected = new_index @ new_affine[2, :3] + new_affine[2, 3]
    interior = [slice(None)] * 3
    atol = 1e-4
    if profile == "gaussian":  # weights cut (asymmetrically) by the volume's ends
        interior[axis] = slice(1, -1)
        atol = 1e-3  # the far tails (< 1e-3 of the weight) are what is cut
    np.testing.assert_allclose(low[tuple(interior)], expected[tuple(interior)], atol=atol)


def test_box_profile_is_the_mean_and_drops_the_remainder():
    x = np.arange(7, dtype=np.float32).reshape(1, 1, 7)
    np.testing.assert_array_equal(ThickSlices(factor=3)(x), [[[1.0, 4.0]]])
    weights = slice_profile_matrix(9, 3, "gaussian")
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    # FWHM of 3 thin slices: the weight 1.5 slices from the centre is half the peak
    centre_row = slice_profile_matrix(30, 3, "gaussian")[5]
    peak = centre_row[16]
    assert centre_row[15] == pytest.approx(peak * 0.5 ** ((1 / 1.5) ** 2), rel=1e-9)


def test_thick_slices_on_a_metatensor_update_its_affine():
    torch = pytest.importorskip("torch")
    monai_data = pytest.importorskip("monai.data")
    data = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 4, 5, 6)
    tensor = monai_data.MetaTensor(
        data, affine=torch.as_tensor(OBLIQUE), meta={"filename_or_obj": "x.nii"}
    )
    out = ThickSlices(factor=2, axis=2)(tensor)
    assert isinstance(out, monai_data.MetaTensor) and tuple(out.shape) == (2, 4, 5, 3)
    np.testing.assert_allclose(out.affine.numpy(), thick_slice_affine(OBLIQUE, 2, 2))
    assert out.meta["filename_or_obj"] == "x.nii"


def test_downsample_affine_matches_where_voxels_sample():
    # A linear ramp stays linear under linear interpolation and a symmetric blur, so away from
    # the edges each output voxel holds the input index its affine says it samples.
    shape = (30, 20, 25)
    ramp = np.broadcast_to(np.arange(shape[0], dtype=np.float32)[:, None, None], shape)
    d = IsotropicDownsample(factor=2.5)
    out = d(ramp)
    out_shape, affine = d.output_geometry(shape, np.eye(4))
    assert out.shape == out_shape == (12, 8, 10)
    expected = affine[0, 0] * np.arange(out_shape[0]) + affine[0, 3]
    np.testing.assert_allclose(out[2:-2, 4, 5], expected[2:-2], atol=1e-3)


def test_kspace_crop_samples_a_bandlimited_signal_exactly():
    n = 32
    k = np.arange(n)
    signal = (np.cos(2 * np.pi * 2 * k / n) + 0.5 * np.sin(2 * np.pi * 3 * k / n)).astype(
        np.float32
    )
    x = np.broadcast_to(signal[None, None, :], (4, 4, n)).copy()
    d = KSpaceTruncation(keep_fraction=0.5, axes=(2,), output="crop", magnitude=False)
    out = d(x)
    shape, affine = d.output_geometry(x.shape, np.eye(4))
    assert out.shape == shape == (4, 4, 16)
    positions = affine[2, 2] * np.arange(16) + affine[2, 3]  # input index of each output voxel
    expected = np.cos(2 * np.pi * 2 * positions / n) + 0.5 * np.sin(2 * np.pi * 3 * positions / n)
    np.testing.assert_allclose(out[1, 2], expected, atol=1e-5)
    zero_filled = KSpaceTruncation(keep_fraction=0.5, axes=(2,), magnitude=False)(x)
    np.testing.assert_allclose(zero_filled, x, atol=1e-5)  # below the cut: unchanged
    cut = KSpaceTruncation(keep_fraction=0.125, axes=(2,), magnitude=False)(x)  # keeps |freq| <= 2
    np.testing.assert_allclose(cut[0, 0], np.cos(2 * np.pi * 2 * k / n) * 0.5, atol=1e-5)


def test_kspace_magnitude_is_non_negative_and_keep_all_is_identity():
    x = np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32)
    np.testing.assert_allclose(
        KSpaceTruncation(keep_fraction=1.0, magnitude=False)(x), x, atol=1e-5
    )
    assert KSpaceTruncation(keep_fraction=0.5)(x).min() >= 0


# -- registry, random wrapper, chains ----------------------------------------------------------


def test_build_degradation_ranges_make_a_random_variant():
    d = build_degradation("rician", sigma=[1.0, 5.0], seed=4)
    assert isinstance(d, RandomDegradation) and d.ranges == {"sigma": (1.0, 5.0)}
    d(np.zeros((4, 4, 4), np.float32))
    assert 1.0 <= d.last_params["sigma"] <= 5.0 and isinstance(d.last_params["seed"], int)
    fixed = build_degradation("gaussian", sigma=2.0, seed=4)
    assert fixed == GaussianNoise(sigma=2.0, seed=4)
    kspace = build_degradation(
        "kspace", keep_fraction=0.5, axes=[0, 1]
    )  # a list that is not a range
    assert kspace == KSpaceTruncation(keep_fraction=0.5, axes=(0, 1))
    factors = {
        build_degradation("thick_slices", factor=[2, 3], seed=s).sample_params()["factor"]
        for s in range(20)
    }
    assert factors == {2, 3}


def test_build_degradation_errors():
    with pytest.raises(
        ParameterError, match=r"got 'thick_slice' \(did you mean 'thick_slices'\?\)"
    ):
        build_degradation("thick_slice", factor=2)
    with pytest.raises(
        ParameterError, match=r"thick_slices: unknown parameter 'factr' \(did you mean 'factor'\?\)"
    ):
        build_degradation("thick_slices", factr=2)
    with pytest.raises(ParameterError, match=r"`factor` must be an integer >= 1, got 0"):
        build_degradation("thick_slices", factor=[0, 2])  # both ends checked up front
    with pytest.raises(
        ParameterError, match=r"gaussian: unknown parameter 'sigm' \(did you mean 'sigma'\?\)"
    ):
        RandomDegradation("gaussian", sigm=(1, 2))


def test_random_set_random_state_restarts_the_sequence():
    x = np.zeros((6, 6, 6), np.float32)
    t = RandomGaussianNoise(sigma_range=(1.0, 3.0), seed=0)
    first = [t(x) for _ in range(3)]
    t.set_random_state(seed=0)
    second = [t(x) for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], first[1])


def test_chain_carries_spacing_and_records_steps():
    chain = DegradationChain([ThickSlices(factor=2, axis=0), LowDoseCT(dose_fraction=0.5)])
    with pytest.raises(
        ParameterError, match=r"needs square pixels in the slice plane, got 2 x 1 mm"
    ):
        chain(ct_phantom((16, 16, 2)), spacing_mm=(1, 1, 1))
    chain = DegradationChain(
        [ThickSlices(factor=2), build_degradation("lowdose_ct", dose_fraction=[0.2, 0.4], seed=1)]
    )
    out = chain(ct_phantom((16, 16, 4)), spacing_mm=(1, 1, 1))
    assert out.shape == (16, 16, 2)
    assert [name for name, _ in chain.last_params] == ["thick_slices", "lowdose_ct"]
    assert 0.2 <= chain.last_params[1][1]["dose_fraction"] <= 0.4


def test_degrade_modules_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, medgen.data.degrade, medgen.metrics.masks, medgen.baselines.super_resolution;"
        "print('torch' in sys.modules or 'monai' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
