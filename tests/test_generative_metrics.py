"""Generative metrics (FID, MMD, diversity, two-sample AUC, memorisation) and the pieces of
the contrastive feature encoder, against closed forms and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import linalg, ndimage

from medgen.metrics.features import (
    AugmentConfig,
    ContrastiveBatches,
    ContrastiveObjective,
    FeatureEncoder,
    ViewParams,
    apply_view,
    nt_xent,
    sample_view,
)
from medgen.metrics.generative import (
    diversity,
    frechet_distance,
    median_bandwidth,
    memorisation,
    mmd,
    ncc_matrix,
    roc_auc,
    two_sample_auc,
)
from medgen.validate import ParameterError
from tests.torch_helpers import one_torch_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smooth_volumes(n: int, seed: int, shape=(16, 16, 16), sigma: float = 2.0) -> np.ndarray:
    """Independent smooth random volumes scaled to [0, 1] each, shape (n, *shape)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, *shape), np.float32)
    for i in range(n):
        v = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
        out[i] = (v - v.min()) / (v.max() - v.min())
    return out


# -- Fréchet distance --------------------------------------------------------------------------


def test_frechet_of_a_set_with_itself_is_zero():
    a = np.random.default_rng(0).normal(size=(50, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_of_shifted_unit_gaussians_is_the_squared_mean_difference():
    # FD(N(mu1, I), N(mu2, I)) = |mu1 - mu2|^2; the sample estimate is within O(F^2 / N) of it.
    rng = np.random.default_rng(1)
    mu1, mu2 = np.zeros(4), np.array([1.0, -2.0, 0.5, 0.0])
    a = rng.normal(size=(5000, 4)) + mu1
    b = rng.normal(size=(5000, 4)) + mu2
    assert frechet_distance(a, b) == pytest.approx(float(np.sum((mu1 - mu2) ** 2)), abs=0.08)


def test_frechet_matches_the_formula_with_scipy_sqrtm():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 3)), 2.0 * rng.normal(size=(30, 3)) + 1.0
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb).real
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(sa + sb - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (np.zeros((1, 3)), np.zeros((5, 3)), r"`features_a` must hold at least 2 samples"),
        (np.zeros((5, 3)), np.zeros((5, 4)), r"`features_a` and `features_b` must have the same number of"),
        (np.zeros(5), np.zeros((5, 3)), r"`features_a` must be 2D"),
        (np.full((5, 3), np.nan), np.zeros((5, 3)), r"`features_a` must be finite"),
        (np.zeros((5, 1)), np.zeros((5, 1)), r"`features_a` must have at least 2 features"),
    ],
)
def test_frechet_input_errors_name_the_parameter(a, b, message):
    with pytest.raises(ParameterError, match=message):
        frechet_distance(a, b)


# -- MMD ------------------------------------------------------------------------------------


def test_linear_mmd_uses_monai_and_equals_the_u_statistic():
    from monai.metrics import MMDMetric

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(20, 5)), rng.normal(size=(20, 5)) + 0.3
    k_aa, k_bb, k_ab = a @ a.T, b @ b.T, a @ b.T
    u_stat = (
        (k_aa.sum() - np.trace(k_aa)) / (20 * 19)
        + (k_bb.sum() - np.trace(k_bb)) / (20 * 19)
        - 2 * k_ab.mean()
    )
    monai_value = float(MMDMetric()(torch.from_numpy(a), torch.from_numpy(b)))
    assert mmd(a, b, kernel="linear") == pytest.approx(monai_value, rel=1e-10)
    assert monai_value == pytest.approx(u_stat, rel=1e-10)
    # Unequal sizes (MONAI refuses them) take the written-out path.
    assert mmd(a, b[:15], kernel="linear") == pytest.approx(
        (k_aa.sum() - np.trace(k_aa)) / 380
        + (k_bb[:15, :15].sum() - np.trace(k_bb[:15, :15])) / (15 * 14)
        - 2 * k_ab[:, :15].mean()
    )


def test_linear_mmd_of_a_set_with_itself_is_minus_two_traces_over_n():
    # The unbiased estimator with b = a: -2 tr(unbiased covariance) / N (not exactly 0).
    a = np.random.default_rng(4).normal(size=(30, 3))
    expected = -2.0 * np.trace(np.cov(a, rowvar=False)) / 30
    assert mmd(a, a, kernel="linear") == pytest.approx(expected, rel=1e-9)


def test_linear_mmd_of_shifted_gaussians_estimates_the_squared_mean_difference():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(3000, 2)), rng.normal(size=(3000, 2)) + [2.0, 0.0]
    assert mmd(a, b, kernel="linear") == pytest.approx(4.0, abs=0.2)


def test_rbf_mmd_of_gaussians_matches_the_closed_form():
    # For N(mu_a, s^2 I) and N(mu_b, s^2 I) in d dimensions and bandwidth h:
    # E k = (h^2 / (h^2 + 2 s^2))^(d/2) exp(-|mu_a - mu_b|^2 / (2 (h^2 + 2 s^2))), so
    # MMD^2 = 2 c (1 - exp(-|delta|^2 / (2 (h^2 + 2 s^2)))) with c = (h^2 / (h^2 + 2 s^2))^(d/2).
    rng = np.random.default_rng(6)
    d, h = 2, 1.0
    a, b = rng.normal(size=(1500, d)), rng.normal(size=(1500, d)) + [1.0, 0.0]
    c = (h * h / (h * h + 2.0)) ** (d / 2)
    expected = 2 * c * (1 - math.exp(-1.0 / (2 * (h * h + 2.0))))
    assert mmd(a, b, bandwidth=h) == pytest.approx(expected, abs=0.01)
    same = rng.normal(size=(1500, d))
    assert abs(mmd(a, same, bandwidth=h)) < 0.005
    assert abs(mmd(a, a)) < 2.0 / len(a)  # unbiased: slightly below 0, by at most 2/N


def test_median_bandwidth_and_mmd_errors():
    a = np.random.default_rng(7).normal(size=(10, 2))
    assert median_bandwidth(a, a + 100.0) > 100.0
    assert median_bandwidth(np.zeros((3, 2)), np.zeros((3, 2))) == 1.0
    typo = r"`kernel` must be one of 'rbf', 'linear'; got 'rfb' \(did you mean 'rbf'\?\)"
    with pytest.raises(ParameterError, match=typo):
        mmd(a, a, kernel="rfb")
    with pytest.raises(ParameterError, match=r"`bandwidth` must be > 0, got -1.0"):
        mmd(a, a, bandwidth=-1)
    with pytest.raises(ParameterError, match=r"`features_b` must hold at least 2 samples"):
        mmd(a, a[:1])


# -- diversity --------------------------------------------------------------------------------


def test_diversity_of_identical_volumes_is_one():
    v = smooth_volumes(1, 0)[0]
    assert diversity(np.stack([v, v, v])) == pytest.approx(1.0, abs=1e-6)


def test_diversity_of_independent_noise_is_well_below_one():
    noise = np.random.default_rng(8).random((4, 16, 16, 16)).astype(np.float32)
    assert diversity(noise) < 0.2


def test_diversity_subsamples_pairs_deterministically_and_validates():
    vols = smooth_volumes(5, 9)
    assert diversity(vols, max_pairs=3, seed=1) == diversity(vols, max_pairs=3, seed=1)
    assert diversity(vols, max_pairs=10) == pytest.approx(diversity(vols, max_pairs=100))
    with pytest.raises(ParameterError, match=r"`volumes` must hold at least 2 volumes"):
        diversity(vols[:1])
    with pytest.raises(ParameterError, match=r"`volumes` must be 4D \(N, D, H, W\)"):
        diversity(vols[0])
    with pytest.raises(ParameterError, match=r"`data_range` must be > 0"):
        diversity(vols, data_range=0)


# -- ROC AUC and the two-sample test -----------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),  # perfectly ordered
        ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),  # perfectly reversed
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # 3 of 4 (pos, neg) pairs right
        ([0.5, 0.5, 0.2, 0.8], [1, 0, 0, 1], 0.875),  # one tie counts 1/2: (0.5 + 1 + 1 + 1) / 4
        ([3.0, 3.0, 3.0], [True, False, False], 0.5),  # all tied
        # positives 2, 4, 5 vs negatives 1, 3: all pairs won but (2, 3), so 5 of 6
        ([1.0, 2.0, 3.0, 4.0, 5.0], [0, 1, 0, 1, 1], 5 / 6),
    ],
)
def test_roc_auc_against_hand_computed_cases(scores, labels, expected):
    assert roc_auc(scores, labels) == pytest.approx(expected)


def test_roc_auc_errors():
    with pytest.raises(ParameterError, match=r"`labels` must hold both classes, got 0 positives and 3"):
        roc_auc([1, 2, 3], [0, 0, 0])
    with pytest.raises(ParameterError, match=r"`labels` must be 0/1 or bool"):
        roc_auc([1, 2, 3], [0, 1, 2])
    with pytest.raises(ParameterError, match=r"`scores` and `labels` must be 1D of one length"):
        roc_auc([1, 2, 3], [0, 1])
    with pytest.raises(ParameterError, match=r"`scores` must be finite"):
        roc_auc([1, np.nan], [0, 1])


def test_two_sample_auc_is_chance_for_one_distribution():
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    assert 0.35 <= two_sample_auc(a, b, seed=0) <= 0.65


def test_two_sample_auc_is_high_for_separated_sets_and_deterministic():
    rng = np.random.default_rng(11)
    a = rng.normal(size=(60, 8))
    b = rng.normal(size=(40, 8)) + np.r_[3.0, np.zeros(7)]
    auc = two_sample_auc(a, b, seed=3)
    assert auc > 0.95
    assert two_sample_auc(a, b, seed=3) == auc


def test_two_sample_auc_uses_at_most_as_many_folds_as_the_smaller_set_and_validates():
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=(3, 2)), rng.normal(size=(20, 2)) + 10.0
    assert two_sample_auc(a, b, folds=10) == 1.0  # 3 folds, each with one real sample
    with pytest.raises(ParameterError, match=r"`folds` must be an integer >= 2, got 1"):
        two_sample_auc(a, b, folds=1)
    with pytest.raises(ParameterError, match=r"`synth_features` must hold at least 2 samples"):
        two_sample_auc(a, b[:1])
    with pytest.raises(ParameterError, match=r"`real_features` and `synth_features` must have the same"):
        two_sample_auc(a, b[:, :1])


# -- memorisation ---------------------------------------------------------------------------


def pooled_features(volumes: np.ndarray) -> np.ndarray:
    """A fixed feature map for the tests: 4x4x4 block means (64 features)."""
    n, d, h, w = volumes.shape
    return volumes.reshape(n, 4, d // 4, 4, h // 4, 4, w // 4).mean(axis=(2, 4, 6)).reshape(n, -1)


def test_ncc_of_affine_relations_and_constants():
    v = np.random.default_rng(13).normal(size=(1, 6, 6, 6))
    both = np.concatenate([v, 2 * v + 5, -v, np.ones_like(v)])
    ncc = ncc_matrix(v, both)
    assert ncc[0].round(9).tolist() == [1.0, 1.0, -1.0, 0.0]


def test_memorisation_flags_exact_and_near_copies_and_names_their_source():
    train = smooth_volumes(12, 14)
    rng = np.random.default_rng(15)
    copies = np.stack([train[3], train[7] + 0.02 * rng.normal(size=train[7].shape).astype(np.float32)])
    independent = smooth_volumes(4, 16)
    synth = np.concatenate([copies, independent])
    report = memorisation(pooled_features(synth), pooled_features(train), synth, train)
    assert report.nearest_train[:2].tolist() == [3, 7]
    assert report.max_ncc_train[:2].tolist() == [3, 7]
    assert report.flagged_by_distance[:2].all() and report.flagged_by_ncc[:2].all()
    assert report.feature_distance[0] == 0.0 and report.max_ncc[0] == pytest.approx(1.0)
    assert report.max_ncc[1] > 0.95
    # Independent samples correlate with the training volumes no more than those among themselves.
    assert report.max_ncc[2:].max() < 0.6 < report.max_ncc[1]
    assert report.chance_fraction == pytest.approx(2 / 13)
    record = report.to_dict()
    assert record["samples"][0]["flagged_by"] == ["feature_distance", "ncc"]
    assert record["fraction_flagged"] == report.fraction_flagged


def test_memorisation_flags_independent_samples_only_at_the_chance_rate():
    # By exchangeability, a sample independent of 9 training samples is closer to one of them
    # than any two of them are with probability 2 / (9 + 1) = 0.2, per criterion: the rule's
    # false-positive rate, which the report states as chance_fraction.
    rng = np.random.default_rng(17)
    by_distance, by_ncc = [], []
    for _ in range(200):  # the threshold varies from one training set to the next: many sets
        train, synth = rng.normal(size=(9, 4, 4, 4)), rng.normal(size=(20, 4, 4, 4))
        report = memorisation(synth.reshape(20, -1)[:, :3], train.reshape(9, -1)[:, :3], synth, train)
        by_distance.append(report.flagged_by_distance.mean())
        by_ncc.append(report.flagged_by_ncc.mean())
    assert report.chance_fraction == pytest.approx(0.2)
    assert np.mean(by_distance) == pytest.approx(0.2, abs=0.04)
    assert np.mean(by_ncc) == pytest.approx(0.2, abs=0.04)


def test_memorisation_input_errors():
    train = smooth_volumes(3, 18, shape=(8, 8, 8))
    feats = pooled_features(train)
    with pytest.raises(ParameterError, match=r"`train_features` must hold at least 2 samples"):
        memorisation(feats, feats[:1], train, train[:1])
    message = r"`synth_volumes` must hold one volume per row of `synth_features`, got 2 and 3"
    with pytest.raises(ParameterError, match=message):
        memorisation(feats, feats, train[:2], train)
    with pytest.raises(ParameterError, match=r"`volumes_a` and `volumes_b` must share one grid"):
        memorisation(feats[:1], feats, train[:1, :4], train)


# -- the feature encoder's pieces -----------------------------------------------------------


def test_a_view_is_replayed_exactly_from_its_parameters():
    v = torch.from_numpy(smooth_volumes(1, 19)[0])
    params = sample_view(np.random.default_rng(0))
    assert torch.equal(apply_view(v, params), apply_view(v, params))
    identity = ViewParams((0.0, 0.0, 0.0), 1.0, (), 1.0, 1.0, 0.0, 0.0, 0.0, 0)
    assert torch.allclose(apply_view(v, identity), v)
    mirrored = ViewParams((0.0, 0.0, 0.0), 1.0, (0,), 1.0, 1.0, 0.0, 0.0, 0.0, 0)
    assert torch.equal(apply_view(v, mirrored), torch.flip(v, dims=[0]))


def test_views_flip_only_left_right_by_default_and_config_is_checked():
    rng = np.random.default_rng(1)
    assert {a for _ in range(50) for a in sample_view(rng).flip} == {0}
    with pytest.raises(ParameterError, match=r"`crop_scale` values must be <= 1"):
        AugmentConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ParameterError, match=r"`flip_axes` must hold axes in 0..2"):
        AugmentConfig(flip_axes=(3,))


def test_contrastive_batches_depend_only_on_seed_and_step():
    vols = smooth_volumes(5, 20)
    a = ContrastiveBatches(vols, batch_size=4, seed=7)
    b = ContrastiveBatches(vols, batch_size=4, seed=7)
    first = a.batch(3)
    assert first["view_a"].shape == first["view_b"].shape == (4, 1, 16, 16, 16)
    a.batch(0)  # other steps in between change nothing
    assert all(torch.equal(first[k], b.batch(3)[k]) for k in first)
    assert not torch.equal(first["view_a"], a.batch(4)["view_a"])
    assert ContrastiveBatches(vols[:3], batch_size=8).batch(0)["view_a"].shape[0] == 3
    with pytest.raises(ParameterError, match=r"`volumes` must hold at least 2 volumes"):
        ContrastiveBatches(vols[:1])


def test_nt_xent_rewards_matching_pairs():
    rng = torch.Generator().manual_seed(0)
    z = torch.randn(6, 8, generator=rng)
    good, good_acc = nt_xent(z, z + 0.01 * torch.randn(6, 8, generator=rng))
    bad, _ = nt_xent(z, torch.roll(z, 1, dims=0))
    assert float(good_acc) == 1.0 and float(good) < float(bad)
    # Uniform similarities: loss = log(2B - 1).
    flat, _ = nt_xent(torch.ones(3, 2), torch.ones(3, 2))
    assert float(flat) == pytest.approx(math.log(5))


def test_encoder_features_shape_batching_and_objective():
    torch.manual_seed(0)
    enc = FeatureEncoder(feature_dim=16, channels=(4, 8, 8))
    vols = smooth_volumes(5, 21)
    f = enc.features(vols, batch_size=2)
    assert f.shape == (5, 16) and f.dtype == np.float64
    assert np.allclose(f, enc.features(vols, batch_size=5), atol=1e-6)  # GroupNorm: no batch coupling
    assert enc.training  # features() restores the mode
    batch = ContrastiveBatches(vols, batch_size=3).batch(0)
    loss, logs = ContrastiveObjective()(enc, batch)
    loss.backward()
    assert set(logs) == {"loss", "contrastive_accuracy"} and math.isfinite(logs["loss"])
    assert enc.projection[0].weight.grad is not None
    with pytest.raises(ParameterError, match=r"`volumes` volumes must be at least 8 voxels along every axis"):
        enc.features(np.zeros((2, 4, 8, 8)))
