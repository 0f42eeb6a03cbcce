"""Write a 3D volume as a DICOM series (one CT or MR Image Storage file per slice).

Geometry: medgen's array is (I, J, K) with I along DICOM columns, so the DICOM frame of
slice k is ``array[:, :, k].T`` (rows = j, columns = i). The RAS affine becomes LPS by
negating x and y; the row direction cosine (the direction in which the column index grows)
is the affine's i axis, the column cosine its j axis, and ImagePositionPatient of slice k is
the LPS position of voxel (0, 0, k).

Pixels are 16-bit integers with RescaleSlope/RescaleIntercept chosen so that integer stored
data keep their physical values exactly; other data are quantised with the smallest slope
that fits the int16 range.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medgen.errors import InputError
from medgen.io.atomic import fsync_file, staging_dir, temp_name
from medgen.volume import Volume

if TYPE_CHECKING:
    import pydicom

__all__ = ["CT_IMAGE_STORAGE", "MR_IMAGE_STORAGE", "encode_pixels", "write_dicom_series"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_LPS = np.array([-1.0, -1.0, 1.0])

# Copied from ``source_dataset`` whenever one is given: acquisition physics, not identity.
_ACQUISITION_TAGS = (
    "Manufacturer",
    "ManufacturerModelName",
    "BodyPartExamined",
    "PatientPosition",
    "KVP",
    "ConvolutionKernel",
    "MagneticFieldStrength",
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "FlipAngle",
    "EchoTrainLength",
    "ImagingFrequency",
    "ImagedNucleus",
)
# Copied with keep_study, so the new series files beside the original in the same study.
_STUDY_TAGS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "AccessionNumber",
    "StudyID",
    "FrameOfReferenceUID",
)
# Copied only with keep_phi (patient module and named people/places).
_PHI_TAGS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "OtherPatientIDs",
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "OperatorsName",
)


def _ds(x: float) -> str:
    """A decimal string of at most 16 characters, as the DS value representation allows."""
    from pydicom.valuerep import format_number_as_ds

    x = float(x)
    short = repr(x)  # the shortest text that reads back as the same float
    return short if len(short) <= 16 else format_number_as_ds(x)


def _ds_round(x: float) -> float:
    return float(_ds(x))


def encode_pixels(volume: Volume) -> tuple[np.ndarray, float, float]:
    """16-bit stored pixels plus the rescale that maps them to ``volume.values()``.

    Parameters
    ----------
    volume : Volume
        3D.

    Returns
    -------
    pixels : ndarray, int16 or uint16, shape (I, J, K)
    slope, intercept : float
        ``physical = pixels * slope + intercept``, both representable as DICOM DS.

    Examples
    --------
    >>> import numpy as np
    >>> v = Volume(np.array([0, 40000], np.int32).reshape(2, 1, 1), np.eye(4), intercept=-1024)
    >>> px, slope, inter = encode_pixels(v)
    >>> px.dtype.name, px.ravel().tolist(), slope, inter
    ('uint16', [0, 40000], 1.0, -1024.0)
    >>> px, slope, inter = encode_pixels(v.with_array(np.array([0.0, 0.5]).reshape(2, 1, 1)))
    >>> px.dtype.name, bool(np.abs(px.ravel() * slope + inter - [0.0, 0.5]).max() <= slope / 2)
    ('int16', True)
    """
    if volume.array.ndim != 3:
        raise ValueError(f"DICOM series take a 3D volume, got shape {volume.shape}")
    array = volume.array
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        stored = array.astype(np.int64)
        slope, intercept = volume.slope, volume.intercept
    else:
        values = volume.values(np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError("`volume` has NaN or infinite values; DICOM pixels cannot hold them")
        if not np.array_equal(values, np.round(values)):
            return _quantise(values)
        stored, slope, intercept = values.astype(np.int64), 1.0, 0.0
    lo, hi = (int(stored.min()), int(stored.max())) if stored.size else (0, 0)
    if lo >= -32768 and hi <= 32767:
        return stored.astype(np.int16), _ds_round(slope), _ds_round(intercept)
    if lo >= 0 and hi <= 65535:
        return stored.astype(np.uint16), _ds_round(slope), _ds_round(intercept)
    if hi - lo <= 65535:  # shift into int16 and move the offset into the intercept
        shift = lo + 32768
        return (
            (stored - shift).astype(np.int16),
            _ds_round(slope),
            _ds_round(intercept + shift * slope),
        )
    return _quantise(stored * slope + intercept)


def _quantise(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    lo, hi = float(values.min()), float(values.max())
    slope = _ds_round((hi - lo) / 65535.0) if hi > lo else 1.0
    if slope <= 0:  # range below DS resolution
        slope = 1.0
    intercept = _ds_round(lo + 32768.0 * slope)
    pixels = np.clip(np.rint((values - intercept) / slope), -32768, 32767).astype(np.int16)
    return pixels, slope, intercept


def _geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray]:
    """Row cosine, column cosine (LPS), column and row spacing (mm), slice normal (LPS)."""
    lps = affine[:3, :3] * _LPS[:, None]
    col_spacing, row_spacing = np.linalg.norm(lps[:, 0]), np.linalg.norm(lps[:, 1])
    if col_spacing == 0 or row_spacing == 0:
        raise ValueError("`volume.affine` has a zero-length in-plane axis")
    row_cos, col_cos = lps[:, 0] / col_spacing, lps[:, 1] / row_spacing
    if abs(float(row_cos @ col_cos)) > 1e-4:
        raise ValueError(
            "the i and j axes of `volume.affine` are not perpendicular; DICOM cannot store a"
            " shear between rows and columns (resample the volume first)"
        )
    normal = np.cross(row_cos, col_cos)
    return row_cos, col_cos, float(col_spacing), float(row_spacing), normal


def _new_uid(seed: str | None, *parts: object) -> str:
    from pydicom.uid import generate_uid

    if seed is None:
        return str(generate_uid())
    return str(generate_uid(entropy_srcs=[seed, *map(str, parts)]))


def _copy_tags(dst: pydicom.Dataset, src: pydicom.Dataset, keywords: Sequence[str]) -> None:
    for kw in keywords:
        if kw in src:
            dst[kw] = src[kw]  # pydicom.DataElement keeps its VR and value


def _base_dataset(
    volume: Volume,
    *,
    series_description: str,
    source_dataset: pydicom.Dataset | None,
    keep_study: bool,
    keep_phi: bool,
    image_type: Sequence[str],
    series_number: int | None,
    uid_seed: str | None,
    created: _dt.datetime,
    study_key: str | None = None,
) -> pydicom.Dataset:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from medgen import __version__

    is_ct = (volume.meta.modality or "").upper() == "CT"
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE if is_ct else MR_IMAGE_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.ImageType = [str(v).upper() for v in image_type]
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.StudyDate, ds.StudyTime = date, time
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.AccessionNumber = ""
    ds.Modality = "CT" if is_ct else "MR"
    # Left empty: dcm2niix keys vendor quirks on the first letters ("ME" reads as Mediso).
    ds.Manufacturer = ""
    ds.SoftwareVersions = f"medgen {__version__}"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = series_description[:64]
    pseudonym = (study_key or volume.meta.series_key or "anonymous")[:64]
    ds.PatientName = pseudonym
    ds.PatientID = pseudonym
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # Series written under one study key belong together: one new study, one patient pseudonym.
    ds.StudyInstanceUID = _new_uid(uid_seed, "study") if study_key is None else _new_uid(study_key, "study")
    ds.SeriesInstanceUID = _new_uid(uid_seed, "series")
    ds.FrameOfReferenceUID = _new_uid(uid_seed, "frame")
    ds.StudyID = ""
    ds.PositionReferenceIndicator = ""
    if is_ct:
        ds.KVP = ""
        ds.RescaleType = "HU" if volume.meta.units.upper() == "HU" else "US"
    else:
        ds.ScanningSequence = "RM"  # research mode: synthesised, not one sequence
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = ""
        ds.EchoTime = ""
        ds.EchoTrainLength = ""
    ds.AcquisitionNumber = 1
    if source_dataset is not None:
        _copy_tags(ds, source_dataset, _ACQUISITION_TAGS)
        if keep_study:
            _copy_tags(ds, source_dataset, _STUDY_TAGS)
            if keep_phi and "ReferringPhysicianName" in source_dataset:
                ds.ReferringPhysicianName = source_dataset.ReferringPhysicianName
        if keep_phi:
            _copy_tags(ds, source_dataset, _PHI_TAGS)
    if not keep_phi and not keep_study:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "medgen: new UIDs, pseudonymous PatientID"
    if series_number is None:
        src_number = getattr(source_dataset, "SeriesNumber", None) if source_dataset else None
        series_number = int(src_number) + 1000 if src_number not in (None, "") else 1001
    ds.SeriesNumber = int(series_number)
    if "DERIVED" in ds.ImageType:
        steps = "; ".join(volume.meta.provenance) or series_description
        ds.DerivationDescription = f"medgen {__version__}: {steps}"[:1024]
    body_part = volume.meta.acquisition.get("BodyPartExamined")
    if "BodyPartExamined" not in ds and isinstance(body_part, str):
        ds.BodyPartExamined = body_part[:16]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def write_dicom_series(
    volume: Volume,
    out_dir: str | Path,
    *,
    series_description: str = "medgen derived",
    source_dataset: pydicom.Dataset | None = None,
    keep_study: bool = False,
    keep_phi: bool = False,
    image_type: Sequence[str] = ("DERIVED", "SECONDARY"),
    series_number: int | None = None,
    overwrite: bool = False,
    uid_seed: str | None = None,
    created: _dt.datetime | None = None,
    study_key: str | None = None,
) -> list[Path]:
    """Write a 3D volume as one DICOM file per slice (Explicit VR Little Endian).

    Parameters
    ----------
    volume : Volume
        3D, shape (I, J, K); slice k becomes file ``IM_<k+1>.dcm`` with frame
        ``array[:, :, k].T``. ``meta.modality == "CT"`` gives CT Image Storage, anything
        else MR Image Storage.
    out_dir : str or Path
        A new or empty folder (or any folder with ``overwrite=True``, which replaces it).
    series_description : str
        SeriesDescription (cut to 64 characters).
    source_dataset : pydicom.Dataset, optional
        A dataset of the series this one derives from; acquisition tags (manufacturer,
        kVp, echo time, ...) are copied from it.
    keep_study : bool
        Also copy StudyInstanceUID, StudyDate/Time, StudyDescription, AccessionNumber,
        StudyID and FrameOfReferenceUID, so the series files beside the original.
    keep_phi : bool
        Also copy the patient's identity (name, ID, birth date, sex, ...) and institution.
        Without it PatientName/PatientID are ``volume.meta.series_key`` or "anonymous".
    image_type : sequence of str
        ImageType values, ``DERIVED\\SECONDARY`` by default.
    series_number : int, optional
        Default: the source's SeriesNumber + 1000, else 1001.
    overwrite : bool
        Replace an existing non-empty ``out_dir``.
    uid_seed : str, optional
        Derive the new UIDs from this string instead of randomly (reproducible output).
    created : datetime, optional
        Date/time written as series/content/instance creation time; default now.
    study_key : str, optional
        Pseudonymous key of the study the series belongs to: every series written with the
        same key gets the same new StudyInstanceUID (derived from the key) and the key as
        PatientName/PatientID, so a study's derived series stay one study in a PACS. Ignored
        for the UID with ``keep_study``, which copies the source's.

    Returns
    -------
    list of Path
        The files, in slice order.

    Raises
    ------
    ValueError
        Not 3D, NaN values, sheared in-plane axes, or ``keep_study`` without a source.
    InputError
        ``out_dir`` exists, is not empty, and ``overwrite`` is False.
    """
    if keep_study and source_dataset is None:
        raise ValueError("`keep_study` needs a `source_dataset` to copy the study from")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(out_dir, "folder is not empty; choose a new folder or pass overwrite=True")
    pixels, slope, intercept = encode_pixels(volume)
    row_cos, col_cos, col_spacing, row_spacing, normal = _geometry(volume.affine)
    created = created or _dt.datetime.now()
    ds = _base_dataset(
        volume,
        series_description=series_description,
        source_dataset=source_dataset,
        keep_study=keep_study,
        keep_phi=keep_phi,
        image_type=image_type,
        series_number=series_number,
        uid_seed=uid_seed,
        created=created,
        study_key=study_key,
    )
    n_i, n_j, n_k = pixels.shape
    k_step = volume.affine[:3, 2] * _LPS
    spacing_between = abs(float(k_step @ normal))
    thickness = volume.meta.acquisition.get("SliceThickness")
    if not isinstance(thickness, (int, float)) or thickness <= 0:
        thickness = spacing_between
    ds.Rows, ds.Columns = n_j, n_i
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]  # (between rows, between columns)
    ds.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
    ds.SliceThickness = _ds(thickness)
    ds.SpacingBetweenSlices = _ds(spacing_between)
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = _ds(slope)
    origin = volume.affine[:3, 3] * _LPS
    width = max(4, len(str(n_k)))
    names = [f"IM_{k + 1:0{width}d}.dcm" for k in range(n_k)]
    with staging_dir(out_dir.parent, out_dir.name) as stage:
        for k in range(n_k):
            position = origin + k * k_step
            uid = _new_uid(uid_seed, "sop", k) if uid_seed is not None else _new_uid(None)
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.SliceLocation = _ds(float(position @ normal))
            frame = np.ascontiguousarray(pixels[:, :, k].T)  # (rows = j, columns = i)
            ds.PixelData = frame.astype(frame.dtype.newbyteorder("<"), copy=False).tobytes()
            ds.save_as(stage / names[k], enforce_file_format=True)
            fsync_file(stage / names[k])
        _commit_dir(stage, out_dir)
    return [out_dir / name for name in names]


def _commit_dir(stage: Path, out_dir: Path) -> None:
    """Move the finished staging folder onto ``out_dir`` (replacing an existing one)."""
    if not out_dir.exists():
        os.replace(stage, out_dir)
        return
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
        os.replace(stage, out_dir)
        return
    trash = temp_name(out_dir)
    os.replace(out_dir, trash)
    os.replace(stage, out_dir)
    shutil.rmtree(trash, ignore_errors=True)
