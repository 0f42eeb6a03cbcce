"""BIDS-flavoured JSON sidecars, de-identified by default.

A sidecar holds what the voxels do not: acquisition parameters (``meta.acquisition``, keys
named like BIDS/dcm2niix sidecars), units, scaling, source file names, provenance and the
medgen version. :func:`strip_phi` removes keys that identify a patient before anything is
written, unless the caller explicitly keeps PHI.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from medgen.io.atomic import atomic_write_bytes
from medgen.io.suffixes import image_suffix
from medgen.volume import Volume

__all__ = ["PHI_KEYS", "is_phi_key", "sidecar_dict", "sidecar_path", "strip_phi", "write_sidecar"]

#: Keys removed by :func:`strip_phi` (DICOM keywords; matched case-insensitively and
#: ignoring spaces, underscores and punctuation, so ``patient_name`` and ``Patient's Name``
#: match too). Chosen from the attributes that the DICOM basic de-identification profile
#: (PS3.15 Annex E) removes or replaces: direct identifiers, quasi-identifiers of the
#: patient (age, sex, size, weight), people and places, free-text comments, dates, and
#: instance UIDs. Acquisition times without dates are kept (BIDS uses them).
PHI_KEYS: tuple[str, ...] = (
    # patient
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "IssuerOfPatientID",
    "PatientAge",
    "PatientSex",
    "PatientSize",
    "PatientWeight",
    "EthnicGroup",
    "Occupation",
    "MilitaryRank",
    "BranchOfService",
    "MedicalRecordLocator",
    "PatientInsurancePlanCodeSequence",
    "PatientReligiousPreference",
    "AdditionalPatientHistory",
    "PatientComments",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "CountryOfResidence",
    "RegionOfResidence",
    # study / visit identifiers
    "AccessionNumber",
    "StudyID",
    "AdmissionID",
    "IssuerOfAdmissionID",
    "RequestAttributesSequence",
    "RequestedProcedureID",
    "ScheduledProcedureStepID",
    "PerformedProcedureStepID",
    # people and places
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PhysiciansOfRecord",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "OperatorsName",
    "StationName",
    "DeviceSerialNumber",
    # free text that often carries names (descriptions: the basic profile removes them too)
    "SeriesDescription",
    "ProtocolName",
    "StudyDescription",
    "StudyComments",
    "ImageComments",
    "InterpretationText",
    # dates (times alone are kept)
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "AcquisitionDateTime",
    "InstanceCreationDate",
    # instance UIDs link the file back to the hospital archive
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "MediaStorageSOPInstanceUID",
    "ReferencedSOPInstanceUID",
)


def _norm(key: str) -> str:
    return re.sub(r"[^0-9a-z]", "", key.lower())


_PHI_NORMALISED = frozenset(_norm(k) for k in PHI_KEYS)


def is_phi_key(key: str) -> bool:
    """True when ``key`` names a patient-identifying attribute (see :data:`PHI_KEYS`).

    Examples
    --------
    >>> is_phi_key("patient_name"), is_phi_key("PATIENTID"), is_phi_key("EchoTime")
    (True, True, False)
    """
    return _norm(key) in _PHI_NORMALISED


def strip_phi(d: Mapping[str, Any], *, keep_phi: bool = False) -> dict[str, Any]:
    """A copy of ``d`` without patient-identifying keys, also inside nested dicts/lists.

    Parameters
    ----------
    d : mapping
    keep_phi : bool
        Return an unfiltered (deep) copy instead.

    Examples
    --------
    >>> strip_phi({"PatientName": "DOE^JOHN", "EchoTime": 0.03, "x": [{"patientid": 7}]})
    {'EchoTime': 0.03, 'x': [{}]}
    """

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items() if keep_phi or not is_phi_key(str(k))}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(d)


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays unwrapped, NaN/inf as null, paths as str."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v) for v in items]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def sidecar_dict(volume: Volume, *, keep_phi: bool = False) -> dict[str, Any]:
    """The sidecar content for ``volume`` as a JSON-ready dict.

    Keys: everything in ``meta.acquisition``, then ``Modality``, ``Units``,
    ``RescaleSlope``/``RescaleIntercept`` (only for a scaled volume), ``SourceFileCount``
    and ``SourceFiles`` (base names only, never folders), ``Provenance``,
    ``ConversionSoftware`` = ``"medgen"``, ``ConversionSoftwareVersion`` and
    ``MedgenVersion``. Patient-identifying keys are removed unless ``keep_phi``.

    Examples
    --------
    >>> import numpy as np
    >>> from medgen.volume import Volume, VolumeMeta
    >>> meta = VolumeMeta(modality="CT", units="HU", source_files=("/pacs/DOE/1.dcm",),
    ...                   acquisition={"PatientName": "DOE^J", "SliceThickness": 2.5})
    >>> d = sidecar_dict(Volume(np.zeros((1, 1, 1), np.int16), np.eye(4), meta))
    >>> d["SourceFiles"], d["SliceThickness"], "PatientName" in d
    (['1.dcm'], 2.5, False)
    """
    from medgen import __version__

    meta = volume.meta
    d: dict[str, Any] = dict(meta.acquisition)
    if meta.modality:
        d.setdefault("Modality", meta.modality)
    d["Units"] = meta.units
    if volume.is_scaled:
        d["RescaleSlope"] = volume.slope
        d["RescaleIntercept"] = volume.intercept
    names = [PurePath(str(p).replace("\\", "/")).name for p in meta.source_files]
    d["SourceFileCount"] = len(names)
    d["SourceFiles"] = names
    d["Provenance"] = list(meta.provenance)
    d["ConversionSoftware"] = "medgen"
    d["ConversionSoftwareVersion"] = __version__
    d["MedgenVersion"] = __version__
    return _jsonable(strip_phi(d, keep_phi=keep_phi))


def sidecar_path(image_path: str | Path) -> Path:
    """``a/b.nii.gz`` -> ``a/b.json`` (the BIDS/dcm2niix convention).

    Examples
    --------
    >>> sidecar_path("out/sub.nii.gz").as_posix(), sidecar_path("x.nrrd").as_posix()
    ('out/sub.json', 'x.json')
    """
    p = Path(image_path)
    name = p.name
    suffix = image_suffix(name)
    return p.with_name(name[: -len(suffix)] + ".json") if suffix else p.with_suffix(".json")


def write_sidecar(volume: Volume, path: str | Path, *, keep_phi: bool = False) -> Path:
    """Write :func:`sidecar_dict` as JSON (sorted keys, indent 2) to ``path``, atomically."""
    path = Path(path)
    text = json.dumps(sidecar_dict(volume, keep_phi=keep_phi), indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))
