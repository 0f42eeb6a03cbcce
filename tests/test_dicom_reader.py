"""DICOM reading checked against dcm2niix references (real data) and known synthetic stacks."""

from __future__ import annotations

import numpy as np
import nibabel as nib
import pytest

from medgen.errors import InputError
from medgen.io.dicom_reader import read_dicom_series
from tests.dicom_factory import SAGITTAL, voxel_pattern, write_series

AFFINE_TOLERANCE_MM = 0.02  # the bar for agreement with dcm2niix


def canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sides reoriented to RAS before comparing, as dcm2niix may flip rows."""
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array), affine))
    return np.asarray(img.dataobj), img.affine


def reference(path) -> tuple[np.ndarray, np.ndarray, float, float]:
    img = nib.load(path)
    data, affine = canonical(img.dataobj.get_unscaled(), img.affine)
    return data, affine, float(img.dataobj.slope), float(img.dataobj.inter)


def assert_matches_reference(volume, ref_path) -> None:
    ref_data, ref_affine, _, _ = reference(ref_path)
    data, affine = canonical(volume.array, volume.affine)
    assert data.shape == ref_data.shape
    np.testing.assert_array_equal(data, ref_data)
    assert np.abs(affine - ref_affine).max() < AFFINE_TOLERANCE_MM


@pytest.mark.parametrize("number", range(1, 10))
def test_mosaic_in_every_transfer_syntax_matches_dcm2niix(shared_data, number):
    folder = shared_data / "dicom" / "dcm_qa_ts"
    result = read_dicom_series([folder / "In" / f"{number}.dcm"])
    assert len(result.volumes) == 1 and not result.rejected
    volume = result.volumes[0]
    assert volume.shape == (64, 64, 35)
    np.testing.assert_allclose(volume.spacing_mm, (3.25, 3.25, 3.6), atol=1e-4)
    assert_matches_reference(volume, folder / "Ref" / f"{number}.nii")


def test_enhanced_siemens_files_stack_into_4d(shared_data):
    folder = shared_data / "dicom" / "dcm_qa_enh"
    files = sorted((folder / "In" / "Siemens" / "XA10").glob("*.dcm"))
    result = read_dicom_series(list(reversed(files)))  # file order must not matter
    assert [v.shape for v in result.volumes] == [(64, 64, 6, 4)]
    assert_matches_reference(result.volumes[0], folder / "Ref" / "Siemens_REST1_w_SMS_PF7-8_6.nii")


def test_enhanced_philips_splits_magnitude_and_field_map(shared_data):
    folder = shared_data / "dicom" / "dcm_qa_enh"
    result = read_dicom_series([folder / "In" / "Philips" / "IM_0027_fMAP.dcm"])
    by_units = {v.meta.units: v for v in result.volumes}
    assert sorted(by_units) == ["Hz", "arbitrary"]
    magnitude, field_map = by_units["arbitrary"], by_units["Hz"]
    assert_matches_reference(magnitude, folder / "Ref" / "Philips_WIP_B0_NS_801_e1.nii")
    assert_matches_reference(field_map, folder / "Ref" / "Philips_WIP_B0_NS_801_e2_fieldmaphz.nii")
    # Scaling is its own check: Philips "precise" values for magnitude, DICOM rescale (Hz) for the map.
    _, _, slope, inter = reference(folder / "Ref" / "Philips_WIP_B0_NS_801_e1.nii")
    assert magnitude.slope == pytest.approx(slope, rel=1e-5) and magnitude.intercept == pytest.approx(inter)
    _, _, slope, inter = reference(folder / "Ref" / "Philips_WIP_B0_NS_801_e2_fieldmaphz.nii")
    assert field_map.slope == pytest.approx(slope, rel=1e-5)
    assert field_map.intercept == pytest.approx(inter, abs=1e-3)


def test_slices_are_ordered_by_position_not_instance_number(tmp_path):
    paths = write_series(tmp_path, shape=(8, 6, 7), spacing=(0.8, 0.7, 2.0), shuffle_instances=3)
    volume = read_dicom_series(paths[::-1]).volumes[0]
    expected = voxel_pattern(8, 6, 7).transpose(1, 0, 2).astype(np.int16) * 1
    np.testing.assert_array_equal(volume.array, expected)
    np.testing.assert_allclose(volume.spacing_mm, (0.7, 0.8, 2.0), atol=1e-6)
    assert volume.meta.units == "HU" and volume.intercept == -1024.0
    np.testing.assert_allclose(volume.values()[0, 0, 0], -1024.0)


def test_affine_maps_voxels_to_ras_positions(tmp_path):
    paths = write_series(tmp_path, shape=(5, 4, 3), spacing=(0.5, 0.6, 3.0), orientation=SAGITTAL,
                         origin=(10.0, -20.0, 30.0), modality="MR", rescale=None)
    volume = read_dicom_series(paths).volumes[0]
    # Voxel (i=col 2, j=row 1, k=slice 2) in LPS: origin + 2*0.6*row_dir + 1*0.5*col_dir + 2*3*normal.
    row_dir, col_dir = np.array(SAGITTAL[:3]), np.array(SAGITTAL[3:])
    lps = np.array([10.0, -20.0, 30.0]) + 1.2 * row_dir + 0.5 * col_dir + 6.0 * np.cross(row_dir, col_dir)
    ras = volume.affine @ [2, 1, 2, 1]
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-6)


def test_missing_slice_is_refused_with_reason(tmp_path):
    paths = write_series(tmp_path, shape=(6, 6, 8), omit_slices=[4])
    with pytest.raises(InputError, match=r"1 missing slice\(s\): gap of 4 mm"):
        read_dicom_series(paths)


def test_uneven_spacing_is_resampled_to_a_regular_grid_and_said(tmp_path):
    zs = (0.0, 2.0, 4.0, 7.1, 9.1)
    paths = write_series(tmp_path, shape=(6, 6, 5), positions=[(0.0, 0.0, z) for z in zs])
    result = read_dicom_series(paths)
    volume = result.volumes[0]
    # 9.1 mm at the smallest step (2 mm) -> 6 slices 1.82 mm apart, ends where the input ends.
    assert volume.shape == (6, 6, 6)
    np.testing.assert_allclose(volume.spacing_mm, (0.7, 0.8, 9.1 / 5), atol=1e-6)
    stored = voxel_pattern(6, 6, 5).transpose(1, 0, 2).astype(float)  # (I=cols, J=rows, K)
    np.testing.assert_array_equal(volume.array[:, :, 0], stored[:, :, 0])
    np.testing.assert_array_equal(volume.array[:, :, 5], stored[:, :, 4])
    # Slice 2 lies at 3.64 mm: 82 % of the way from the slice at 2 mm to the one at 4 mm.
    expected = np.rint(stored[:, :, 1] * (1 - 0.82) + stored[:, :, 2] * 0.82)
    np.testing.assert_array_equal(volume.array[:, :, 2], expected)
    assert any("uneven slice spacing (2 to 3.1 mm) resampled" in n for n in volume.meta.provenance)
    assert volume.meta.acquisition["SliceSpacingResampled"] is True


def test_uneven_spacing_with_a_whole_missing_slice_is_still_refused(tmp_path):
    zs = (0.0, 2.0, 4.0, 8.0, 10.0, 12.0)  # a slice at 6 mm is missing: not variable spacing
    paths = write_series(tmp_path, shape=(4, 4, 6), positions=[(0.0, 0.0, z) for z in zs])
    with pytest.raises(InputError, match=r"1 missing slice\(s\)"):
        read_dicom_series(paths)


def test_gantry_tilt_is_corrected_and_reported(tmp_path):
    spacing = (1.0, 1.0, 2.0)
    tilted = write_series(tmp_path / "tilt", shape=(16, 16, 6), spacing=spacing, gantry_tilt_deg=20.0)
    result = read_dicom_series(tilted)
    volume = result.volumes[0]
    assert any("gantry tilt 20.00 deg corrected" in note for note in result.notes)
    assert any("gantry tilt" in p for p in volume.meta.provenance)
    # The corrected grid is orthogonal, with the true distance between slices along the normal.
    columns = volume.affine[:3, :3]
    assert abs(np.dot(columns[:, 1], columns[:, 2])) < 1e-6
    np.testing.assert_allclose(volume.spacing_mm, (1.0, 1.0, 2.0), atol=1e-6)
    # Slice k moved k*2*tan(20deg) mm along the column (j) direction: the pattern shifts back by that.
    shift_rows = 5 * 2.0 * np.tan(np.deg2rad(20.0))
    row = int(np.ceil(shift_rows)) + 1
    raw = voxel_pattern(16, 16, 6)[:, :, 5].T.astype(float)
    expected = np.interp(row - shift_rows, np.arange(16), raw[3])  # i=3 column of the last slice
    assert volume.array[3, row, 5] == pytest.approx(round(expected), abs=1)


def test_slices_at_one_position_are_refused(tmp_path):
    paths = write_series(tmp_path, shape=(6, 6, 4), same_position=True)
    with pytest.raises(InputError, match="at one slice position with nothing"):
        read_dicom_series(paths)


def test_one_image_series_is_a_one_slice_2d_volume(tmp_path):
    paths = write_series(tmp_path, shape=(6, 5, 1), spacing=(0.8, 0.7, 3.5))
    volume = read_dicom_series(paths).volumes[0]
    assert volume.shape == (5, 6, 1)
    np.testing.assert_allclose(volume.spacing_mm, (0.7, 0.8, 3.5))  # third from SliceThickness
    assert volume.meta.acquisition["ImageDimensions"] == 2
    assert any("2D image" in p for p in volume.meta.provenance)
    np.testing.assert_array_equal(volume.array[:, :, 0], voxel_pattern(6, 5, 1)[:, :, 0].T)


def test_mixed_matrix_sizes_split_and_odd_slice_is_rejected(tmp_path):
    paths = write_series(tmp_path, shape=(8, 8, 6), matrix_overrides={5: (4, 4)})
    result = read_dicom_series(paths)
    assert [v.shape for v in result.volumes] == [(8, 8, 5)]
    ((path, reason),) = result.rejected
    assert path == paths[5].resolve() and reason.startswith("lone slice: one image of a different")


@pytest.mark.parametrize("fault", [{"truncate": [2]}, {"no_pixel_data": [4]}, {"truncate": [0]}])
def test_corrupt_image_refuses_its_volume_as_a_missing_slice(tmp_path, fault):
    paths = write_series(tmp_path, shape=(6, 6, 5), **fault)
    bad = paths[(fault.get("truncate") or fault.get("no_pixel_data"))[0]]
    with pytest.raises(InputError) as info:
        read_dicom_series(paths)
    assert info.value.path == bad  # the line names the damaged file, not a good one
    assert "corrupt image" in info.value.reason and "slice would be missing" in info.value.reason


def test_corrupt_image_of_one_volume_leaves_the_others(tmp_path):
    uid = "1.2.826.0.1.3680043.8.498.77"
    good = write_series(tmp_path, shape=(6, 6, 4), series_uid=uid, name_pattern="A{index}")
    bad = write_series(tmp_path, shape=(8, 8, 4), series_uid=uid, name_pattern="B{index}",
                       truncate=[1])
    result = read_dicom_series(good + bad)
    assert [v.shape for v in result.volumes] == [(6, 6, 4)]
    reasons = {p.name: r for p, r in result.rejected}
    assert sorted(reasons) == sorted(p.name for p in bad)
    assert "cannot decode pixel data" in reasons[bad[1].name]


def test_header_claiming_a_huge_image_is_refused_before_decoding(tmp_path):
    paths = write_series(tmp_path, shape=(6, 6, 3), extra={"Rows": 60000, "Columns": 60000})
    with pytest.raises(InputError, match=r"image too large to decode: declares 60000x60000"):
        read_dicom_series(paths, max_image_mb=2048)


def test_repeated_positions_with_acquisition_numbers_form_4d(tmp_path):
    paths = []
    for t in range(3):
        paths += write_series(tmp_path / f"t{t}", shape=(4, 4, 3), series_uid="1.2.3.4",
                              modality="MR", rescale=None, extra={"AcquisitionNumber": t + 1},
                              name_pattern=f"T{t}_{{index}}")
    volume = read_dicom_series(paths[::-1]).volumes[0]
    assert volume.shape == (4, 4, 3, 3)


def test_per_slice_rescale_becomes_float_physical_values(tmp_path):
    paths = []
    for k, slope in enumerate((1.0, 2.0, 0.5)):
        positions = [(0.0, 0.0, 2.0 * k)]
        paths += write_series(tmp_path, shape=(4, 4, 1), positions=positions, rescale=(slope, 10.0),
                              series_uid="1.2.3.5", name_pattern=f"S{k}_{{index}}")
    volume = read_dicom_series(paths).volumes[0]
    assert volume.array.dtype == np.float32 and not volume.is_scaled
    stored = voxel_pattern(4, 4, 1)[:, :, 0].T
    np.testing.assert_allclose(volume.array[:, :, 1], stored * 2.0 + 10.0)


def test_phi_only_on_request(tmp_path):
    paths = write_series(tmp_path, shape=(4, 4, 3))
    plain = read_dicom_series(paths).volumes[0].meta.acquisition
    kept = read_dicom_series(paths, keep_phi=True).volumes[0].meta.acquisition
    assert "DOE^JANE" not in repr(plain) and "12345" not in repr(plain)
    assert kept["PatientName"] == "DOE^JANE" and kept["PatientID"] == "12345"


def test_series_sharing_a_uid_are_told_apart_by_series_number(shared_data):
    files = sorted((shared_data / "dicom" / "dcm_qa_ts" / "In").glob("*.dcm"))
    result = read_dicom_series(files)
    assert len(result.volumes) == 9 and not result.rejected
    parts = sorted(v.meta.acquisition["VolumePart"] for v in result.volumes)
    assert parts == sorted(f"s{n}" for n in range(1, 10))


def test_derived_series_written_by_medgen_reads_back_identically(tmp_path):
    from medgen import Volume, VolumeMeta
    from medgen.io.dicom_writer import write_dicom_series

    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.6, 0.8, 2.5])
    affine[:3, 3] = (12.0, -30.0, 5.0)
    stored = np.random.default_rng(1).integers(0, 3000, size=(10, 12, 7)).astype(np.int16)
    volume = Volume(stored, affine, VolumeMeta(modality="CT", units="HU"), slope=1.0, intercept=-1024.0)
    paths = write_dicom_series(volume, tmp_path / "derived")
    back = read_dicom_series(paths).volumes[0]
    np.testing.assert_allclose(back.values(), volume.values())
    assert np.abs(back.affine - affine).max() < 1e-4
    assert "DERIVED" in back.meta.acquisition["ImageType"]


def test_compressed_pixel_data_split_over_many_fragments(shared_data, tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate, generate_fragments, generate_frames

    source = pydicom.dcmread(shared_data / "dicom" / "dcm_qa_ts" / "In" / "7.dcm")  # JPEG-LS
    (frame,) = list(generate_frames(source.PixelData, number_of_frames=1))
    source.PixelData = encapsulate([frame], fragments_per_frame=5)
    source["PixelData"].is_undefined_length = True
    source.save_as(tmp_path / "fragmented.dcm")
    stored = pydicom.dcmread(tmp_path / "fragmented.dcm").PixelData
    assert len(list(generate_fragments(stored))) == 6  # the offset table item, then 5 fragments
    volume = read_dicom_series([tmp_path / "fragmented.dcm"]).volumes[0]
    assert_matches_reference(volume, shared_data / "dicom" / "dcm_qa_ts" / "Ref" / "7.nii")


def test_deflated_transfer_syntax(tmp_path):
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    paths = write_series(tmp_path / "plain", shape=(6, 5, 4))
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(tmp_path / path.name, enforce_file_format=True)
    deflated = [tmp_path / p.name for p in paths]
    assert pydicom.dcmread(deflated[0]).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    volume = read_dicom_series(deflated).volumes[0]
    np.testing.assert_array_equal(volume.array, voxel_pattern(6, 5, 4).transpose(1, 0, 2))
