"""The labelled phantom cohort: determinism, balance, the class-defining change, files."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import spearmanr

from medgen import samples
from medgen.errors import InputError
from medgen.io.nifti import read_nifti
from medgen.samples_cohort import (
    COHORT_CSV,
    CSV_COLUMNS,
    CohortSubject,
    cohort_subjects,
    read_cohort,
    render_subject,
    subject_labels,
    write_cohort,
)
from medgen.validate import ParameterError

SHAPE = (32, 32, 32)
BRAIN = [samples.CSF, samples.GM, samples.WM, samples.DEEP_GM, samples.VENTRICLE,
         samples.VESSEL, samples.LESION_HYPER, samples.CALCIFICATION]  # fmt: skip


def fraction_of_brain(labels: np.ndarray, label: int) -> float:
    return np.count_nonzero(labels == label) / np.count_nonzero(np.isin(labels, BRAIN))


# --- drawing the cohort ---------------------------------------------------------------------


def test_cohort_is_balanced_interleaved_and_reproducible():
    subjects = cohort_subjects(n_per_class=6, seed=5, task="lesion")
    assert [s.label for s in subjects] == [0, 1] * 6
    assert [s.subject_id for s in subjects[:3]] == ["sub-0001", "sub-0002", "sub-0003"]
    assert subjects == cohort_subjects(n_per_class=6, seed=5, task="lesion")
    assert len({s.seed for s in subjects}) == 12
    # Subject n depends on (seed, n) only: a larger cohort extends a smaller one.
    assert cohort_subjects(n_per_class=8, seed=5, task="lesion")[:12] == subjects
    assert {s.seed for s in cohort_subjects(6, seed=6)}.isdisjoint(s.seed for s in subjects)


def test_parameters_lie_in_their_documented_ranges():
    subjects = cohort_subjects(n_per_class=20, seed=0, task="ventricles")
    ages = np.array([s.age_years for s in subjects])
    assert 20 <= ages.min() and ages.max() <= 85 and np.ptp(ages) > 40
    spacing = np.array([s.spacing_mm for s in subjects])
    assert 1.2 <= spacing.min() and spacing.max() <= 2.0 and np.ptp(spacing[:, 0]) > 0.4
    assert np.all(np.ptp(spacing, axis=1) < 0.25)  # isotropic-ish
    gains = np.array([s.tissue_gains for s in subjects])
    assert gains.shape == (40, samples.N_LABELS) and 0.9 <= gains.min() and gains.max() <= 1.1
    assert all(0 <= s.noise_fraction <= 0.03 and 0 <= s.bias_fraction <= 0.2 for s in subjects)
    assert {s.sex for s in subjects} == {0, 1}


def test_only_the_class_defining_parameters_differ_between_tasks():
    lesion = cohort_subjects(5, seed=2, task="lesion")
    ventricles = cohort_subjects(5, seed=2, task="ventricles")
    class_fields = {"ventricle_scale", "lesion_count", "lesion_radius_fraction"}
    for a, b in zip(lesion, ventricles, strict=True):
        for field in dataclasses.fields(CohortSubject):
            if field.name not in class_fields:
                assert getattr(a, field.name) == getattr(b, field.name), field.name
        # Label 0 is the same subject in both tasks; label 1 differs only by its change.
        if a.label == 0:
            assert a == b and a.lesion_count == 0
        else:
            assert a.lesion_count >= 1 and b.lesion_count == 0
            assert b.ventricle_scale > a.ventricle_scale


# --- rendering ------------------------------------------------------------------------------


def test_render_is_deterministic_and_seed_dependent():
    a, b = cohort_subjects(1, seed=0)
    image, affine = render_subject(a, SHAPE)
    again, _ = render_subject(a, SHAPE)
    np.testing.assert_array_equal(image, again)
    other, _ = render_subject(dataclasses.replace(b, spacing_mm=a.spacing_mm), SHAPE)
    head = (subject_labels(a, SHAPE) != samples.AIR) | (subject_labels(b, SHAPE) != samples.AIR)
    assert np.mean(np.abs(image[head] - other[head]) > 100) > 0.2


def test_render_shape_dtype_affine_and_t1_contrast():
    subject = cohort_subjects(1, seed=1)[0]
    image, affine = render_subject(subject, (32, 36, 30))
    labels = subject_labels(subject, (32, 36, 30))
    assert image.shape == labels.shape == (32, 36, 30) and image.dtype == np.float32
    assert image.min() >= 1.0 and labels.dtype == np.uint8
    np.testing.assert_allclose(np.diag(affine), [*subject.spacing_mm, 1.0])
    np.testing.assert_allclose(affine @ [15.5, 17.5, 14.5, 1], [0, 0, 0, 1], atol=1e-9)
    median = {t: np.median(image[labels == t]) for t in (samples.WM, samples.GM, samples.CSF)}
    wm_value = 700 * subject.tissue_gains[samples.WM]
    assert median[samples.WM] == pytest.approx(wm_value, rel=0.12)
    assert median[samples.WM] > 1.2 * median[samples.GM] > 1.2 * median[samples.CSF]


def test_same_subject_on_any_grid_and_coarser_voxels_show_more_air():
    subject = cohort_subjects(1, seed=4)[0]
    head = [np.mean(subject_labels(subject, (n,) * 3) != samples.AIR) for n in (24, 48)]
    assert head[0] == pytest.approx(head[1], rel=0.1)
    fine, coarse = (dataclasses.replace(subject, spacing_mm=(s,) * 3) for s in (1.2, 2.0))
    covered = [np.mean(subject_labels(s, SHAPE) != samples.AIR) for s in (fine, coarse)]
    assert covered[1] == pytest.approx(covered[0] * (1.2 / 2.0) ** 3, rel=0.15)


def test_rician_noise_follows_noise_fraction():
    subject = dataclasses.replace(cohort_subjects(1, seed=0)[0], bias_fraction=0.0)
    clean, _ = render_subject(dataclasses.replace(subject, noise_fraction=0.0), SHAPE)
    noisy, _ = render_subject(dataclasses.replace(subject, noise_fraction=0.03), SHAPE)
    air = subject_labels(subject, SHAPE) == samples.AIR
    sigma = 0.03 * 700 * subject.tissue_gains[samples.WM]
    # Far from the head the Rician magnitude of pure noise has mean sigma * sqrt(pi / 2).
    corner = noisy[:6, :6, :6][air[:6, :6, :6]]
    assert corner.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.15)
    assert np.all(clean[:6, :6, :6] < 10)


# --- the class-defining change and the age covariate ----------------------------------------


def test_lesion_class_has_hyperintense_lesions_and_the_other_none():
    for subject in cohort_subjects(n_per_class=5, seed=0, task="lesion"):
        labels = subject_labels(subject, SHAPE)
        lesion = labels == samples.LESION_HYPER
        if subject.label == 0:
            assert not lesion.any() and not np.any(labels == samples.LESION_HYPO)
            continue
        image, _ = render_subject(subject, SHAPE)
        assert np.count_nonzero(lesion) >= 8, subject.subject_id
        assert np.median(image[lesion]) > 1.15 * np.median(image[labels == samples.WM])


def test_enlarged_ventricles_class_and_age_as_a_covariate():
    subjects = cohort_subjects(n_per_class=15, seed=0, task="ventricles")
    labels = [subject_labels(s, SHAPE) for s in subjects]
    ventricles = np.array([fraction_of_brain(lab, samples.VENTRICLE) for lab in labels])
    cls = np.array([s.label for s in subjects])
    assert ventricles[cls == 1].mean() > 2.0 * ventricles[cls == 0].mean()
    # Within the normal class (the same heads as task "lesion"), older -> larger ventricles
    # and more CSF (wider sulci, atrophy). Expected rank correlations ~0.6 and ~0.85.
    ages = np.array([s.age_years for s in subjects])
    normal = cls == 0
    assert spearmanr(ages[normal], ventricles[normal])[0] > 0.3
    csf = np.array([fraction_of_brain(lab, samples.CSF) for lab in labels])
    assert spearmanr(ages, csf)[0] > 0.6


# --- files ----------------------------------------------------------------------------------


def test_write_cohort_files_and_csv_round_trip(tmp_path):
    out = tmp_path / "cohort"
    csv_path = write_cohort(out, n_per_class=2, seed=3, shape=(24, 24, 24), task="ventricles")
    assert csv_path == out / COHORT_CSV
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert rows[0][:6] == ["file", "subject_id", "label", "age_years", "sex", "seed"]
    assert [r[2] for r in rows[1:]] == ["0", "1", "0", "1"]
    subjects = cohort_subjects(n_per_class=2, seed=3, task="ventricles")
    assert read_cohort(csv_path) == subjects
    assert sorted(p.name for p in out.iterdir()) == [COHORT_CSV] + [
        f"sub-000{n}.nii.gz" for n in range(1, 5)
    ]
    for row, subject in zip(rows[1:], subjects, strict=True):
        volume = read_nifti(out / row[0])
        assert volume.shape == (24, 24, 24) and volume.array.dtype == np.int16
        np.testing.assert_allclose(volume.spacing_mm, subject.spacing_mm, rtol=1e-6)
        image, _ = render_subject(subject, (24, 24, 24))
        assert np.abs(volume.array.astype(np.float32) - image).max() <= 0.5


def test_write_cohort_with_workers_gives_the_same_files(tmp_path):
    one = write_cohort(tmp_path / "a", n_per_class=1, seed=0, shape=(16, 16, 16))
    two = write_cohort(tmp_path / "b", n_per_class=1, seed=0, shape=(16, 16, 16), workers=2)
    for name in ("sub-0001.nii.gz", "sub-0002.nii.gz", COHORT_CSV):
        assert (one.parent / name).read_bytes() == (two.parent / name).read_bytes()


def test_read_cohort_names_the_file_and_missing_column(tmp_path):
    bad = tmp_path / COHORT_CSV
    bad.write_text("file,subject_id,label\nsub-0001.nii.gz,sub-0001,0\n")
    with pytest.raises(InputError, match=r"labels\.csv: missing column\(s\) age_years, sex"):
        read_cohort(bad)


def test_module_imports_no_torch():
    code = "import sys, medgen.samples_cohort; print(sorted({'torch', 'monai'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- bad arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_per_class": 0}, r"`n_per_class` must be an integer >= 1, got 0"),
        ({"seed": -1}, r"`seed` must be an integer >= 0, got -1"),
        ({"task": "lesions"}, r"`task` must be one of 'lesion', 'ventricles'; got 'lesions' "
                              r"\(did you mean 'lesion'\?\)"),  # fmt: skip
    ],
)
def test_cohort_argument_errors(kwargs, message):
    with pytest.raises(ParameterError, match=message):
        cohort_subjects(**kwargs)


def test_render_and_write_argument_errors(tmp_path):
    subject = cohort_subjects(1)[0]
    with pytest.raises(ParameterError, match=r"`shape` must be 3 integers >= 8, got \(32, 32\)"):
        render_subject(subject, (32, 32))
    with pytest.raises(ParameterError, match=r"`shape` must be 3 integers >= 8, got \(4, 32, 32\)"):
        render_subject(subject, (4, 32, 32))
    with pytest.raises(ParameterError, match=r"`subject` must be a CohortSubject, got str"):
        render_subject("sub-0001")
    with pytest.raises(ParameterError, match=r"`workers` must be an integer >= 1, got 0"):
        write_cohort(tmp_path, n_per_class=1, shape=(8, 8, 8), workers=0)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ParameterError, match=r"`out_dir` must be a folder, got the file .*file"):
        write_cohort(a_file, n_per_class=1, shape=(8, 8, 8))
    with pytest.raises(ParameterError, match=r"`label` must be 0 or 1, got 2"):
        dataclasses.replace(subject, label=2)
    assert not any(tmp_path.glob("*.nii.gz"))
