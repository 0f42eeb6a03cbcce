"""Acquisition metadata for the sidecar, in BIDS-style names and SI-ish units.

Only what a researcher needs to interpret the voxels; patient-identifying fields are added
solely on request (``keep_phi``).
"""

from __future__ import annotations

from typing import Any

# (sidecar name, DICOM keyword, scale): times in DICOM are ms, BIDS wants seconds.
_FIELDS: tuple[tuple[str, str, float | None], ...] = (
    ("Modality", "Modality", None),
    ("Manufacturer", "Manufacturer", None),
    ("ManufacturersModelName", "ManufacturerModelName", None),
    ("MagneticFieldStrength", "MagneticFieldStrength", 1.0),
    ("BodyPartExamined", "BodyPartExamined", None),
    ("SeriesDescription", "SeriesDescription", None),
    ("ProtocolName", "ProtocolName", None),
    ("SeriesNumber", "SeriesNumber", None),
    ("ImageType", "ImageType", None),
    ("ScanningSequence", "ScanningSequence", None),
    ("SequenceName", "SequenceName", None),
    ("MRAcquisitionType", "MRAcquisitionType", None),
    ("EchoTime", "EchoTime", 0.001),
    ("RepetitionTime", "RepetitionTime", 0.001),
    ("InversionTime", "InversionTime", 0.001),
    ("FlipAngle", "FlipAngle", 1.0),
    ("SliceThickness", "SliceThickness", 1.0),
    ("SpacingBetweenSlices", "SpacingBetweenSlices", 1.0),
    ("KVP", "KVP", 1.0),
    ("XRayTubeCurrent", "XRayTubeCurrent", 1.0),
    ("ConvolutionKernel", "ConvolutionKernel", None),
    ("ReconstructionDiameter", "ReconstructionDiameter", 1.0),
    ("GantryDetectorTilt", "GantryDetectorTilt", 1.0),
    ("PatientPosition", "PatientPosition", None),
)
_PHI_FIELDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyDate",
    "StudyTime", "AccessionNumber", "InstitutionName", "StudyInstanceUID", "SeriesInstanceUID",
)


def acquisition_fields(ds: Any, *, keep_phi: bool = False) -> dict[str, Any]:
    """JSON-ready acquisition parameters of one dataset (enhanced objects included)."""
    out: dict[str, Any] = {}
    for name, keyword, scale in _FIELDS:
        value = _lookup(ds, keyword)
        if value is None or value == "":
            continue
        out[name] = _jsonable(value, scale)
    if "SYNTHETIC" in [str(v).upper() for v in (out.get("ImageType") or [])]:
        out["synthetic"] = True  # a generated series stays marked through any later stage
    if keep_phi:
        for keyword in _PHI_FIELDS:
            value = ds.get(keyword)
            if value not in (None, ""):
                out[keyword] = str(value)
    return out


def _lookup(ds: Any, keyword: str) -> Any:
    """Top level first, then the first frame's functional groups (enhanced objects)."""
    if keyword in ds:
        return ds.get(keyword)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(groups)
        if not seq:
            continue
        for element in seq[0]:
            if element.VR == "SQ" and element.value and keyword in element.value[0]:
                return element.value[0].get(keyword)
    if keyword == "EchoTime":
        return _lookup(ds, "EffectiveEchoTime")
    return None


def _jsonable(value: Any, scale: float | None) -> Any:
    if type(value).__name__ == "MultiValue" or isinstance(value, (list, tuple)):
        return [_jsonable(v, scale) for v in value]
    if scale is not None:
        try:
            return round(float(value) * scale, 9)
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, (int, float)):
        return value
    text = str(value)
    return int(text) if text.isdigit() else text
