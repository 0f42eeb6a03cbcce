"""Synthetic phantoms: tissue values, contrasts, determinism, and the committed sample files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medgen import samples
from medgen.io.nifti import read_nifti
from medgen.samples import ct_head_phantom, head_labels, mr_brain_phantom, write_samples

DATA_SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"
SMALL = ((48, 56, 48), 3.0)  # a coarse MR grid: same field of view as the default


def median_by_label(image: np.ndarray, labels: np.ndarray, label: int) -> float:
    assert np.count_nonzero(labels == label) > 0, f"label {label} absent"
    return float(np.median(image[labels == label]))


@pytest.fixture(scope="module")
def ct_default():
    hu, affine = ct_head_phantom()
    labels = head_labels(hu.shape, affine, 0)
    return hu, affine, labels


def test_ct_phantom_tissue_values_in_hu(ct_default):
    hu, affine, labels = ct_default
    assert hu.shape == (128, 128, 48) and hu.dtype == np.int16
    np.testing.assert_allclose(np.diag(affine), [-0.9, -0.9, 2.5, 1.0])
    np.testing.assert_allclose(affine @ [63.5, 63.5, 23.5, 1], [0, 0, 0, 1], atol=1e-12)
    assert hu[0, 0, 0] == -1000 and hu[-1, -1, -1] == -1000
    assert median_by_label(hu, labels, samples.GM) == pytest.approx(40, abs=4)
    assert median_by_label(hu, labels, samples.WM) == pytest.approx(30, abs=4)
    assert median_by_label(hu, labels, samples.VENTRICLE) == pytest.approx(5, abs=8)
    assert median_by_label(hu, labels, samples.BONE) > 700
    assert median_by_label(hu, labels, samples.AIR) == -1000
    # The head fills most of the field of view and has a closed skull.
    head_fraction = np.mean(labels != samples.AIR)
    assert 0.15 < head_fraction < 0.5
    assert np.all(
        np.isin(
            [
                samples.CALCIFICATION,
                samples.LESION_HYPER,
                samples.LESION_HYPO,
                samples.VESSEL,
                samples.DEEP_GM,
                samples.VITREOUS,
            ],
            labels,
        )
    )


def test_phantoms_are_deterministic_and_seed_dependent():
    a, _ = ct_head_phantom((32, 32, 12), (3.6, 3.6, 10.0), seed=3)
    b, _ = ct_head_phantom((32, 32, 12), (3.6, 3.6, 10.0), seed=3)
    c, _ = ct_head_phantom((32, 32, 12), (3.6, 3.6, 10.0), seed=4)
    np.testing.assert_array_equal(a, b)
    head = (a > -900) | (c > -900)
    assert np.mean(np.abs(a[head].astype(int) - c[head]) > 20) > 0.05


@pytest.mark.parametrize("contrast", ["T1", "T2"])
def test_mr_contrast_orders_tissues(contrast):
    shape, spacing = SMALL
    image, affine = mr_brain_phantom(shape, spacing, seed=0, contrast=contrast)
    labels = head_labels(shape, affine, 0)
    assert image.dtype == np.float32 and image.min() > 0
    np.testing.assert_allclose(np.diag(affine), [3.0, 3.0, 3.0, 1.0])
    wm, gm, vent = (
        median_by_label(image, labels, t) for t in (samples.WM, samples.GM, samples.VENTRICLE)
    )
    if contrast == "T1":
        assert wm > 1.2 * gm and gm > 2 * vent
    else:
        assert vent > 1.3 * gm and gm > 1.2 * wm


def test_mr_bias_field_is_smooth_and_bounded():
    shape, spacing = SMALL
    flat, _ = mr_brain_phantom(shape, spacing, seed=0, bias_fraction=0.0)
    biased, _ = mr_brain_phantom(shape, spacing, seed=0, bias_fraction=0.15)
    ratio = biased[flat > 100] / flat[flat > 100]
    assert 0.84 < ratio.min() < 0.95 and 1.05 < ratio.max() < 1.16


def test_phantom_argument_errors():
    with pytest.raises(
        ValueError, match=r"`contrast` must be one of T1, T2, got 't2x'; did you mean 'T2'\?"
    ):
        mr_brain_phantom((8, 8, 8), 10.0, contrast="t2x")
    with pytest.raises(
        ValueError, match=r"`spacing_mm` must be > 0 \(one value or three\), got -1"
    ):
        ct_head_phantom((8, 8, 8), -1)
    with pytest.raises(ValueError, match=r"`bias_fraction` must be in \[0, 1\), got 1.5"):
        mr_brain_phantom((8, 8, 8), 10.0, bias_fraction=1.5)


# --- the committed files in data_samples/ -------------------------------------------------


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    if not DATA_SAMPLES.is_dir():
        pytest.skip(f"{DATA_SAMPLES} not found")
    return write_samples(tmp_path_factory.mktemp("samples"))


def assert_close_voxels(new: np.ndarray, committed: np.ndarray) -> None:
    """Equal, allowing rare off-by-one roundings from CPU-specific float maths (SIMD exp/sin)."""
    assert new.shape == committed.shape and new.dtype == committed.dtype
    diff = np.abs(new.astype(np.int64) - committed.astype(np.int64))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-4 * diff.size


@pytest.mark.parametrize("name", [samples.MR_T1_FILE, samples.MR_T2_FILE])
def test_committed_mr_samples_match_regeneration(regenerated, name):
    new, committed = (
        read_nifti(regenerated["mr_t1" if "t1" in name else "mr_t2"]),
        read_nifti(DATA_SAMPLES / name),
    )
    assert committed.shape == (96, 112, 96) and committed.array.dtype == np.int16
    np.testing.assert_allclose(committed.affine[:3, :3], np.diag([1.5, 1.5, 1.5]))
    np.testing.assert_allclose(committed.affine @ [47.5, 55.5, 47.5, 1], [0, 0, 0, 1], atol=1e-4)
    assert committed.meta.modality == "MR"
    assert_close_voxels(new.array, committed.array)


def test_committed_ct_series_matches_regeneration_and_carries_fake_phi(regenerated):
    committed = sorted((DATA_SAMPLES / samples.CT_SERIES_DIR).glob("*.dcm"))
    new = sorted(regenerated["ct"].glob("*.dcm"))
    assert len(committed) == len(new) == 48
    positions = []
    for a, b in zip(new, committed, strict=True):
        ds_new, ds = pydicom.dcmread(a), pydicom.dcmread(b)
        assert_close_voxels(ds_new.pixel_array, ds.pixel_array)
        positions.append(float(ds.ImagePositionPatient[2]))
    assert (str(ds.PatientName), ds.Modality, ds.SOPClassUID) == (
        "PHANTOM^CT",
        "CT",
        "1.2.840.10008.5.1.4.1.1.2",
    )
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (-1024.0, 1.0)
    assert (ds.Rows, ds.Columns, ds.PixelRepresentation) == (128, 128, 1)
    np.testing.assert_allclose(np.diff(positions), 2.5)
    hu = pydicom.dcmread(committed[24]).pixel_array.astype(int) - 1024  # a mid-head slice
    assert hu.min() == -1000 and hu.max() > 900


def test_data_samples_stay_small():
    if not DATA_SAMPLES.is_dir():
        pytest.skip(f"{DATA_SAMPLES} not found")
    total = sum(p.stat().st_size for p in DATA_SAMPLES.rglob("*") if p.is_file())
    assert total < 5 * 2**20
