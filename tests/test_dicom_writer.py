"""DICOM series writer: geometry tags, rescale, identity handling, and dcm2niix agreement."""

from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medgen.errors import InputError
from medgen.io.dicom_writer import (
    CT_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    encode_pixels,
    write_dicom_series,
)
from medgen.volume import Volume, VolumeMeta


def oblique_affine():
    """RAS affine of an oblique DICOM-like grid: i to the patient's left, j posterior."""
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_euler("xyz", [12.0, -8.0, 25.0], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.8, -0.9, 2.5])
    affine[:3, 3] = [40.0, -12.0, 7.0]
    return affine


def ct_volume(shape=(20, 24, 6)) -> Volume:
    stored = np.random.default_rng(0).integers(-1000, 2000, shape).astype(np.int16)
    meta = VolumeMeta(modality="CT", units="HU", series_key="case-7")
    return Volume(stored, oblique_affine(), meta, slope=0.5, intercept=-1024.0)


def read_series(files):
    return [pydicom.dcmread(f) for f in files]


def test_geometry_tags_and_pixels(tmp_path):
    vol = ct_volume()
    files = write_dicom_series(vol, tmp_path / "out")
    assert [f.name for f in files] == [f"IM_{k:04d}.dcm" for k in range(1, 7)]
    series = read_series(files)
    lps = np.diag([-1.0, -1.0, 1.0]) @ vol.affine[:3, :]
    row_cos = lps[:, 0] / 0.8  # direction of growing column index (i)
    col_cos = lps[:, 1] / 0.9  # direction of growing row index (j)
    for k, ds in enumerate(series):
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == CT_IMAGE_STORAGE and ds.Modality == "CT"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.InstanceNumber == k + 1
        assert (ds.Rows, ds.Columns) == (24, 20)
        np.testing.assert_allclose(
            [float(v) for v in ds.ImageOrientationPatient], [*row_cos, *col_cos], atol=1e-9
        )
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [0.9, 0.8])
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient], lps @ [0, 0, k, 1], atol=1e-9
        )
        assert float(ds.SliceThickness) == pytest.approx(2.5)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(2.5)
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (0.5, -1024.0)
        np.testing.assert_array_equal(ds.pixel_array, vol.array[:, :, k].T)
    assert len({ds.SOPInstanceUID for ds in series}) == 6
    assert len({ds.SeriesInstanceUID for ds in series}) == 1
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not installed")
def test_dcm2niix_reads_same_voxels_and_affine(tmp_path):
    vol = ct_volume()
    write_dicom_series(vol, tmp_path / "dcm")
    subprocess.run(
        ["dcm2niix", "-z", "n", "-f", "out", "-o", str(tmp_path), str(tmp_path / "dcm")],
        check=True,
        capture_output=True,
    )
    theirs = nib.as_closest_canonical(nib.load(tmp_path / "out.nii"))
    ours = nib.as_closest_canonical(nib.Nifti1Image(vol.values(np.float64), vol.affine))
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=0.02)
    np.testing.assert_array_equal(theirs.get_fdata(), ours.get_fdata())


def test_float_values_are_quantised_with_smallest_int16_slope(tmp_path):
    values = np.random.default_rng(1).uniform(-3.0, 5.0, (8, 9, 3))
    vol = Volume(values.astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    pixels, slope, intercept = encode_pixels(vol)
    assert pixels.dtype == np.int16
    span = float(vol.array.max()) - float(vol.array.min())
    assert slope == pytest.approx(span / 65535, rel=1e-9)
    assert int(pixels.min()) == -32768 and int(pixels.max()) in (32766, 32767)
    assert np.abs(pixels * slope + intercept - vol.array).max() <= slope / 2 + 1e-9
    ds = read_series(write_dicom_series(vol, tmp_path / "f"))[1]
    recon = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(recon, vol.array[:, :, 1].T, atol=slope)


def test_integer_ranges_beyond_int16_stay_exact():
    wide = Volume(np.array([0, 65535], np.int32).reshape(2, 1, 1), np.eye(4))
    pixels, slope, intercept = encode_pixels(wide)
    assert pixels.dtype == np.uint16 and (slope, intercept) == (1.0, 0.0)
    shifted = Volume(
        np.array([-40000, 20000], np.int32).reshape(2, 1, 1), np.eye(4), slope=2.0, intercept=1.0
    )
    pixels, slope, intercept = encode_pixels(shifted)
    assert pixels.dtype == np.int16
    np.testing.assert_array_equal(pixels * slope + intercept, shifted.values(np.float64))
    whole = Volume(np.array([-1000.0, 3000.0]).reshape(2, 1, 1), np.eye(4))
    pixels, slope, intercept = encode_pixels(whole)
    assert pixels.ravel().tolist() == [-1000, 3000] and (slope, intercept) == (1.0, 0.0)


def source_dataset() -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = "MRN123"
    ds.PatientBirthDate = "19600101"
    ds.InstitutionName = "General Hospital"
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.StudyDate = "20200202"
    ds.AccessionNumber = "ACC9"
    ds.FrameOfReferenceUID = "1.2.3.4.6"
    ds.Manufacturer = "ACME"
    ds.MagneticFieldStrength = "3"
    ds.SeriesNumber = "4"
    return ds


def test_identity_default_is_pseudonymous(tmp_path):
    vol = ct_volume(shape=(4, 4, 2))
    vol.meta.modality = "MR"
    ds = read_series(write_dicom_series(vol, tmp_path / "a", source_dataset=source_dataset()))[0]
    assert ds.SOPClassUID == MR_IMAGE_STORAGE and ds.Modality == "MR"
    assert (str(ds.PatientName), ds.PatientID) == ("case-7", "case-7")
    assert ds.PatientIdentityRemoved == "YES"
    assert "InstitutionName" not in ds and ds.StudyInstanceUID != "1.2.3.4.5"
    assert ds.AccessionNumber == "" and ds.PatientBirthDate == ""
    assert (
        ds.Manufacturer == "ACME" and float(ds.MagneticFieldStrength) == 3.0
    )  # acquisition copied
    assert ds.SeriesNumber == 1004


def test_keep_study_files_beside_original_without_phi(tmp_path):
    vol = ct_volume(shape=(4, 4, 2))
    ds = read_series(
        write_dicom_series(vol, tmp_path / "b", source_dataset=source_dataset(), keep_study=True)
    )[0]
    assert (ds.StudyInstanceUID, ds.StudyDate, ds.AccessionNumber) == (
        "1.2.3.4.5",
        "20200202",
        "ACC9",
    )
    assert ds.FrameOfReferenceUID == "1.2.3.4.6"
    assert ds.PatientID == "case-7" and "InstitutionName" not in ds
    ds = read_series(
        write_dicom_series(
            vol, tmp_path / "c", source_dataset=source_dataset(), keep_study=True, keep_phi=True
        )
    )[0]
    assert (str(ds.PatientName), ds.PatientID, ds.InstitutionName) == (
        "DOE^JOHN",
        "MRN123",
        "General Hospital",
    )
    assert "PatientIdentityRemoved" not in ds


def test_uid_seed_and_created_make_output_reproducible(tmp_path):
    import datetime

    vol = ct_volume(shape=(4, 4, 2))
    kw = {"uid_seed": "abc", "created": datetime.datetime(2024, 5, 6, 7, 8, 9)}
    a = write_dicom_series(vol, tmp_path / "a", **kw)
    b = write_dicom_series(vol, tmp_path / "b", **kw)
    assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]
    assert pydicom.dcmread(a[0]).SeriesDate == "20240506"


def test_series_of_one_study_key_share_study_uid_and_pseudonym(tmp_path):
    vol = ct_volume(shape=(4, 4, 2))
    one = [read_series(write_dicom_series(vol, tmp_path / n, uid_seed=n, study_key="study-9"))[0] for n in "ab"]
    other = read_series(write_dicom_series(vol, tmp_path / "c", uid_seed="c", study_key="study-10"))[0]
    assert one[0].StudyInstanceUID == one[1].StudyInstanceUID != other.StudyInstanceUID
    assert one[0].SeriesInstanceUID != one[1].SeriesInstanceUID
    assert [ds.PatientID for ds in (*one, other)] == ["study-9", "study-9", "study-10"]


def test_existing_folder_needs_overwrite(tmp_path):
    vol = ct_volume(shape=(4, 4, 3))
    out = tmp_path / "s"
    write_dicom_series(vol, out)
    with pytest.raises(
        InputError, match="s: folder is not empty; choose a new folder or pass overwrite=True"
    ):
        write_dicom_series(vol, out)
    files = write_dicom_series(vol.with_array(vol.array[:, :, :2]), out, overwrite=True)
    assert sorted(out.iterdir()) == files and len(files) == 2
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_invalid_inputs(tmp_path):
    vol = ct_volume(shape=(4, 4, 2))
    with pytest.raises(
        ValueError, match=r"DICOM series take a 3D volume, got shape \(4, 4, 2, 2\)"
    ):
        write_dicom_series(Volume(np.zeros((4, 4, 2, 2)), np.eye(4)), tmp_path / "unused")
    with pytest.raises(ValueError, match="`keep_study` needs a `source_dataset`"):
        write_dicom_series(vol, tmp_path / "unused", keep_study=True)
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="i and j axes of `volume.affine` are not perpendicular"):
        write_dicom_series(Volume(vol.array, sheared), tmp_path / "unused")
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_dicom_series(Volume(np.full((2, 2, 2), np.nan), np.eye(4)), tmp_path / "unused")
    assert list(tmp_path.iterdir()) == []
