"""The gate benchmark's OOD inputs (bench/gate_inputs.py) and baselines (gate_baselines.py)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.gate_baselines import HistogramDistance, ReconstructionError, auroc, rates_at
from bench.gate_inputs import KINDS, REAL_CT_PATH, ood_cases, orientation_cases, scaling_cases
from medgen.samples_cohort import cohort_subjects, render_subject
from medgen.volume import Volume, VolumeMeta

SHAPE = (32, 32, 32)


def _cohort(n_per_class: int, seed: int = 0) -> list[Volume]:
    volumes = []
    for subject in cohort_subjects(n_per_class, seed):
        image, affine = render_subject(subject, SHAPE)
        meta = VolumeMeta(modality="MR", series_key=subject.subject_id)
        volumes.append(Volume(np.rint(image).astype(np.int16), affine, meta))
    return volumes


@pytest.fixture(scope="module")
def cohort() -> list[Volume]:
    return _cohort(4)  # 8 scans: 6 to fit on, 2 held back


@pytest.fixture(scope="module")
def cases(cohort) -> dict:
    return ood_cases(cohort[6:], seed=0, ct_path=None)


def test_every_kind_gives_3d_volumes_finite_except_the_nan_cases(cases):
    assert tuple(cases) == KINDS
    for kind, named in cases.items():
        assert named, kind
        names = [name for name, _ in named]
        assert len(set(names)) == len(names), kind
        for name, volume in named:
            values = volume.values(np.float32)
            assert values.ndim == 3 and volume.affine.shape == (4, 4), name
            assert np.all(np.isfinite(values)) == ("nan" not in name), name
    assert sum("nan" in name for name, _ in cases["empty_constant"]) == 2


def test_derived_cases_carry_the_source_metadata(cases):
    # Header fields must not give the answer away: every case looks like an MR scan.
    for named in cases.values():
        assert all(v.meta.modality == "MR" for _, v in named)
    assert cases["scaling"][0][0] == "slope_x100(sub-0007)"


def test_orientation_cases_keep_the_affine_but_change_the_data(cohort):
    source = cohort[0]
    for name, volume in orientation_cases(source):
        np.testing.assert_array_equal(volume.affine, source.affine)
        assert not np.array_equal(volume.values(), source.values()), name


def test_scaling_x100_has_100_times_the_percentiles(cohort):
    source = cohort[1]
    named = dict(scaling_cases(source))
    p_source = np.percentile(source.values(np.float64), [50, 95])
    np.testing.assert_allclose(np.percentile(named["slope_x100"].values(np.float64), [50, 95]),
                               100 * p_source, rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(named["offset_+1000"].values(np.float64),
                               source.values(np.float64) + 1000)  # fmt: skip
    assert named["clipped_p80"].values().max() < source.values().max()


def test_generation_is_deterministic_per_seed(cohort, cases):
    again = ood_cases(cohort[6:], seed=0, ct_path=None)
    other = ood_cases(cohort[6:], seed=1, ct_path=None)
    for kind in KINDS:
        assert [n for n, _ in again[kind]] == [n for n, _ in cases[kind]]
        for (_, a), (_, b) in zip(again[kind], cases[kind], strict=True):
            np.testing.assert_array_equal(a.values(), b.values())
    for kind in ("modality", "body_region", "noise_artefact"):
        assert not np.array_equal(other[kind][0][1].values(), cases[kind][0][1].values()), kind


def test_body_regions_are_mr_like_on_the_reference_grid(cases, cohort):
    id_high = np.percentile(cohort[6].values(), 99.9)
    for name, volume in cases["body_region"]:
        values = volume.values()
        assert volume.shape == SHAPE and values.min() >= 1.0, name
        assert 0.5 * id_high < values.max() < 2 * id_high, name  # same units, not a head


@pytest.mark.skipif(not REAL_CT_PATH.is_file(), reason="real CT not in ../shared/data")
def test_the_real_ct_joins_the_modality_kind(cohort):
    names = [name for name, _ in ood_cases(cohort[6:7], seed=0)["modality"]]
    assert names[-1] == "ct_real_avm" and len(names) == 4


def test_auroc_and_rates():
    assert auroc([0.1, 0.2, 0.3], [0.5, 0.9]) == 1.0
    assert auroc([0.5, 0.9], [0.1, 0.2, 0.3]) == 0.0
    assert auroc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5
    assert auroc([0.1, 0.4], [0.2, np.inf]) == 0.75
    assert auroc([0.1], [np.nan]) == 1.0  # NaN counts as maximally out
    assert rates_at(0.5, [0.1, 0.5, 0.6, np.inf]) == 0.5
    assert rates_at(0.5, [np.nan]) == 1.0


@pytest.mark.parametrize("metric", ["js", "wasserstein"])
def test_histogram_distance_ranks_a_slope_error_above_a_held_back_scan(cohort, cases, metric):
    baseline = HistogramDistance(metric).fit(cohort[:6])
    assert baseline.train_scores.shape == (6,) and np.all(np.isfinite(baseline.train_scores))
    held_back = baseline.score(cohort[6])
    named = {n.split("(")[0]: v for n, v in cases["scaling"] + cases["empty_constant"]}
    assert baseline.score(named["slope_x100"]) > held_back
    assert baseline.score(named["nan_voxels"]) == np.inf
    assert baseline.score(named["nan_slab"]) == np.inf


def test_reconstruction_error_uses_the_gate_interface(cohort, cases):
    torch = pytest.importorskip("torch")
    from monai.networks.nets import AutoencoderKL
    from scipy.ndimage import zoom

    torch.manual_seed(0)
    ae = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 8),
                       attention_levels=(False, False), latent_channels=2, num_res_blocks=1,
                       norm_num_groups=4)  # fmt: skip

    def prepare(volume):  # stand-in for gate.prepare: 16^3 grid, scaled by the 99.5th pct
        image = zoom(volume.values(np.float32), [16 / n for n in volume.shape], order=1)
        top = np.percentile(image, 99.5)
        if top <= 0:
            raise ValueError("nothing above zero")
        return (image / top).astype(np.float32), np.zeros(2, np.float32)

    baseline = ReconstructionError(prepare, ae).fit(cohort[:2])
    assert baseline.train_scores.shape == (2,) and np.all(np.isfinite(baseline.train_scores))
    named = {n.split("(")[0]: v for n, v in cases["empty_constant"]}
    assert np.isfinite(baseline.score(cohort[6]))
    assert baseline.score(named["nan_slab"]) == np.inf
    assert baseline.score(named["zeros"]) == np.inf  # prepare refuses it: recorded, not raised
    assert len(baseline.failures) == 1 and "nothing above zero" in baseline.failures[0][1]
