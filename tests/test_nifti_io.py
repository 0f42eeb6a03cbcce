"""NIfTI / NRRD / MetaImage I/O, atomic writes, JSON sidecars and the `save` dispatcher."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgen.errors import InputError
from medgen.io.atomic import atomic_path, atomic_write_bytes
from medgen.io.itk import read_itk, write_itk
from medgen.io.nifti import read_nifti, write_nifti
from medgen.io.sidecar import sidecar_dict, strip_phi, write_sidecar
from medgen.io.writers import save
from medgen.volume import Volume, VolumeMeta


def oblique_affine(
    spacing=(0.8, 0.9, 2.5), angles_deg=(12.0, -8.0, 25.0), origin=(-40.0, 12.0, 7.0)
):
    from scipy.spatial.transform import Rotation

    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix() @ np.diag(
        spacing
    )
    affine[:3, 3] = origin
    return affine


def ct_volume(shape=(6, 7, 5), seed=0) -> Volume:
    stored = np.random.default_rng(seed).integers(0, 3000, shape).astype(np.int16)
    meta = VolumeMeta(modality="CT", units="HU", source_files=("/secret/DOE_JOHN/IM1.dcm",))
    return Volume(stored, oblique_affine(), meta, slope=1.0, intercept=-1024.0)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# --- atomic writes ------------------------------------------------------------------------


def test_atomic_write_bytes_replaces_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_atomic_path_failure_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.txt.tmp-")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


# --- NIfTI --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz"])
def test_nifti_round_trip_keeps_stored_values_scaling_and_affine(tmp_path, name):
    vol = ct_volume()
    write_nifti(vol, tmp_path / name)
    back = read_nifti(tmp_path / name)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, vol.array)
    assert (back.slope, back.intercept) == (1.0, -1024.0)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    assert (back.meta.modality, back.meta.units) == ("CT", "HU")
    hdr = nib.load(tmp_path / name).header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (1, 1)
    assert hdr.get_xyzt_units() == ("mm", "sec")
    assert leftovers(tmp_path) == []


def test_nifti_gz_is_standard_gzip_and_reproducible(tmp_path):
    vol = ct_volume()
    write_nifti(vol, tmp_path / "a.nii.gz")
    write_nifti(vol, tmp_path / "b.nii.gz")
    raw = gzip.decompress((tmp_path / "a.nii.gz").read_bytes())
    assert raw[344:348] == b"n+1\x00"  # NIfTI-1 single-file magic
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    # nibabel's own reader (zlib) agrees with ours (isal).
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "a.nii.gz").dataobj.get_unscaled()), vol.array
    )


def test_nifti_4d_float_keeps_values_scaling_and_repetition_time(tmp_path):
    data = np.random.default_rng(1).random((3, 4, 5, 2)).astype(np.float32)
    vol = Volume(
        data,
        np.diag([2.0, 2.0, 3.0, 1.0]),
        VolumeMeta(acquisition={"RepetitionTime": 2.5}),
        slope=2.0,
        intercept=1.0,
    )
    back = read_nifti(write_nifti(vol, tmp_path / "f.nii.gz"))
    assert back.shape == (3, 4, 5, 2) and back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, data)
    assert (back.slope, back.intercept) == (2.0, 1.0)
    assert back.meta.acquisition["RepetitionTime"] == pytest.approx(2.5)


def test_read_nifti_zero_slope_means_unscaled_and_metres_become_mm(tmp_path):
    img = nib.Nifti1Image(
        np.arange(8, dtype=np.int16).reshape(2, 2, 2), np.diag([0.001, 0.001, 0.002, 1])
    )
    img.header.set_xyzt_units("meter")
    img.header["scl_slope"] = 0.0
    img.header["scl_inter"] = 5.0
    nib.save(img, tmp_path / "m.nii")
    vol = read_nifti(tmp_path / "m.nii")
    assert (vol.slope, vol.intercept) == (1.0, 0.0)
    assert vol.spacing_mm == pytest.approx((1.0, 1.0, 2.0))


def test_read_nifti_real_ct_keeps_uint8_and_scale(shared_data):
    path = shared_data / "nifti" / "CT_AVM.nii.gz"
    ref = nib.load(path)
    vol = read_nifti(path)
    assert vol.shape == (256, 242, 154) and vol.array.dtype == np.uint8
    assert vol.slope == pytest.approx(float(ref.dataobj.slope))
    np.testing.assert_allclose(vol.affine, ref.affine)
    np.testing.assert_allclose(
        vol.values()[100:110, 120, 77], ref.get_fdata()[100:110, 120, 77], rtol=1e-6
    )


def test_read_nifti_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.nii: file not found"):
        read_nifti(tmp_path / "missing.nii")
    bad = tmp_path / "bad.nii"
    bad.write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(InputError, match="bad.nii: cannot read as NIfTI"):
        read_nifti(bad)


def test_write_nifti_rejects_other_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"`path` must end in .nii or .nii.gz, got 'a.nrrd'"):
        write_nifti(ct_volume(), tmp_path / "a.nrrd")


# --- NRRD / MetaImage ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_oblique_nifti_to_itk_round_trip_keeps_affine_and_voxels(tmp_path, suffix):
    vol = Volume(ct_volume().array, oblique_affine(), VolumeMeta(modality="CT", units="HU"))
    nifti = read_nifti(write_nifti(vol, tmp_path / "o.nii.gz"))
    back = read_itk(write_itk(nifti, tmp_path / f"o{suffix}"))
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.array.dtype == np.int16
    assert (back.meta.modality, back.meta.units) == ("CT", "HU")
    assert leftovers(tmp_path) == []


def test_itk_geometry_is_lps_and_kji(tmp_path):
    import SimpleITK as sitk

    vol = ct_volume()
    write_itk(vol, tmp_path / "g.nrrd")
    image = sitk.ReadImage(str(tmp_path / "g.nrrd"))
    ijk = (4, 2, 3)
    lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
    ras = (vol.affine @ [*ijk, 1])[:3]
    np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-4)
    # ITK arrays are (k, j, i); the file holds physical values (stored - 1024 here).
    assert sitk.GetArrayFromImage(image)[3, 2, 4] == vol.array[4, 2, 3] - 1024


def test_write_itk_stores_physical_values_of_scaled_volume(tmp_path):
    vol = ct_volume()  # intercept -1024, integer stored values -> int16 HU
    back = read_itk(write_itk(vol, tmp_path / "s.mha"))
    assert back.array.dtype == np.int16 and not back.is_scaled
    np.testing.assert_array_equal(back.array, vol.values(np.float64).astype(np.int16))
    frac = vol.with_array(vol.array, slope=0.5, intercept=0.25)
    back = read_itk(write_itk(frac, tmp_path / "f.mha"))
    assert back.array.dtype == np.float32
    np.testing.assert_allclose(back.array, frac.values(np.float64), rtol=1e-6)


def test_itk_4d_and_detached_header_files(tmp_path):
    data = np.random.default_rng(2).random((3, 4, 5, 2)).astype(np.float32)
    vol = Volume(data, oblique_affine())
    back = read_itk(write_itk(vol, tmp_path / "v.mhd"))
    np.testing.assert_array_equal(back.array, data)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "v.mhd" and names[1].startswith("v.") and len(names) == 2


def test_read_itk_missing_and_unreadable(tmp_path):
    with pytest.raises(InputError, match="nope.nrrd: file not found"):
        read_itk(tmp_path / "nope.nrrd")
    bad = tmp_path / "bad.mha"
    bad.write_text("garbage")
    with pytest.raises(InputError, match="bad.mha: cannot read with SimpleITK"):
        read_itk(bad)


# --- sidecars -----------------------------------------------------------------------------


def test_strip_phi_is_case_insensitive_and_recursive():
    d = {
        "PatientName": "DOE^JOHN",
        "patient_id": "123",
        "ACCESSIONNUMBER": "A1",
        "EchoTime": 0.03,
        "Nested": {"InstitutionName": "X", "FlipAngle": 9},
        "List": [{"OperatorsName": "Y", "k": 1}],
    }
    assert strip_phi(d) == {"EchoTime": 0.03, "Nested": {"FlipAngle": 9}, "List": [{"k": 1}]}
    assert strip_phi(d, keep_phi=True) == d


def test_sidecar_content_and_file(tmp_path):
    vol = ct_volume()
    vol.meta.acquisition.update(
        {
            "Manufacturer": "ACME",
            "SliceThickness": np.float32(2.5),
            "PatientName": "DOE^JOHN",
            "StudyDate": "20200101",
        }
    )
    vol.meta.provenance.append("denoise sigma_hu=10")
    d = sidecar_dict(vol)
    assert d["SourceFiles"] == ["IM1.dcm"] and d["SourceFileCount"] == 1
    assert d["RescaleSlope"] == 1.0 and d["RescaleIntercept"] == -1024.0
    assert d["Units"] == "HU" and d["Modality"] == "CT" and d["ConversionSoftware"] == "medgen"
    assert d["Provenance"] == ["denoise sigma_hu=10"] and d["SliceThickness"] == 2.5
    assert "PatientName" not in d and "StudyDate" not in d
    assert sidecar_dict(vol, keep_phi=True)["PatientName"] == "DOE^JOHN"
    path = write_sidecar(vol, tmp_path / "ct.json")
    text = path.read_text()
    assert json.loads(text) == d
    keys = [line.split('"')[1] for line in text.splitlines() if line.startswith('  "')]
    assert keys == sorted(keys)
    assert "DOE" not in text and "/secret" not in text


def test_sidecar_omits_rescale_for_unscaled_volume():
    d = sidecar_dict(Volume(np.zeros((2, 2, 2), np.float32), np.eye(4)))
    assert "RescaleSlope" not in d and d["Units"] == "arbitrary"


# --- save() dispatch ----------------------------------------------------------------------


def test_save_dispatches_by_suffix(tmp_path):
    vol = ct_volume()
    out = vol.save(tmp_path / "a.nii.gz", sidecar=True)
    assert out == tmp_path / "a.nii.gz" and read_nifti(out).shape == vol.shape
    assert json.loads((tmp_path / "a.json").read_text())["Units"] == "HU"
    np.testing.assert_allclose(
        read_itk(save(vol, tmp_path / "a.nrrd")).affine, vol.affine, atol=1e-4
    )
    assert save(vol, tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = sorted(save(vol, tmp_path / "series", format="dicom").iterdir())
    assert len(files) == vol.shape[2]


def test_save_unknown_suffix_and_format_typo(tmp_path):
    with pytest.raises(ValueError, match=r"cannot tell the output format from suffix '\.nii\.gzz'"):
        save(ct_volume(), tmp_path / "x.nii.gzz")
    with pytest.raises(
        ValueError, match=r"`format` must be one of .*got 'dicm'; did you mean 'dicom'\?"
    ):
        save(ct_volume(), tmp_path / "d", format="dicm")
    with pytest.raises(
        ValueError, match="`sidecar` applies to NIfTI, NRRD and MHA outputs, not png"
    ):
        save(ct_volume(), tmp_path / "x.png", sidecar=True)
