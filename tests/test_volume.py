"""The Volume type: isolation from the caller's arrays, validation, physical values."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from medgen import Volume, VolumeMeta


def test_changing_callers_affine_afterwards_does_not_change_volume():
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    volume = Volume(np.zeros((2, 2, 2)), affine)
    affine[0, 0] = 99.0
    assert volume.affine[0, 0] == 1.0
    assert volume.affine.dtype == np.float64


def test_affine_is_copied_as_float64_even_from_integers():
    volume = Volume(np.zeros((2, 2, 2)), np.eye(4, dtype=np.int32))
    assert volume.affine.dtype == np.float64


def test_with_array_copies_metadata():
    volume = Volume(np.zeros((2, 2, 2)), np.eye(4), VolumeMeta(provenance=["read"]))
    derived = volume.with_array(np.ones((2, 2, 2)))
    derived.meta.provenance.append("denoised")
    assert volume.meta.provenance == ["read"]


@pytest.mark.parametrize(
    "array, affine, message",
    [
        (np.zeros((2, 2)), np.eye(4), r"`array` must be 3D or 4D, got shape \(2, 2\)"),
        (np.zeros((2, 2, 2)), np.eye(3), r"`affine` must be 4x4, got shape \(3, 3\)"),
        (np.zeros((2, 2, 2)), np.full((4, 4), np.nan), "`affine` must be finite"),
    ],
)
def test_invalid_inputs_are_refused_with_named_parameter(array, affine, message):
    with pytest.raises(ValueError, match=message):
        Volume(array, affine)


def test_values_apply_rescale_to_stored_integers():
    volume = Volume(np.array([[[0, 1024]]], dtype=np.int16), np.eye(4), slope=1.0, intercept=-1024.0)
    np.testing.assert_array_equal(volume.values(), [[[-1024.0, 0.0]]])
    assert volume.array.dtype == np.int16  # stored values kept


def test_spacing_from_oblique_affine():
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.5, 0.7, 2.5])
    assert Volume(np.zeros((2, 2, 2)), affine).spacing_mm == pytest.approx((0.5, 0.7, 2.5))


def test_io_layer_imports_no_torch():
    code = "import sys, medgen, medgen.io.dicom_reader, medgen.io.discover; print('torch' in sys.modules, 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
