"""Write small synthetic DICOM series for tests (pydicom only, no pytest).

Every slice holds a known pattern (:func:`voxel_pattern`), so a reader's output can be
checked voxel by voxel. Options produce the faults found in real archives: missing
slices, shuffled instance numbers, gantry tilt, all slices at one position, odd matrix
sizes, truncated files, files without pixel data, extensionless names.

Conventions
-----------
* ``shape = (rows, cols, nslices)``; ``spacing = (row_spacing, col_spacing, slice_spacing)``
  in mm, where ``row_spacing`` is the distance between adjacent rows (DICOM
  PixelSpacing[0]) and ``col_spacing`` between adjacent columns (PixelSpacing[1]).
* Slice ``k`` (0-based, in the order the slices are stacked along the slice normal) sits at
  ``origin + k * slice_spacing * normal`` unless ``positions`` says otherwise, and holds
  ``voxel_pattern(rows, cols, nslices)[:, :, k]`` as stored values. Omitting or shuffling
  slices does not change which pattern a slice holds.

Examples
--------
>>> import tempfile, pydicom
>>> from pathlib import Path
>>> with tempfile.TemporaryDirectory() as d:
...     paths = write_series(Path(d), shape=(4, 3, 2))
...     ds = pydicom.dcmread(paths[1])
...     same = bool(ds.pixel_array[1, 2] == voxel_pattern(4, 3, 2)[1, 2, 1])
...     (len(paths), ds.Rows, ds.Columns, same)
(2, 4, 3, True)
"""

from __future__ import annotations

import random
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"
DICOMDIR_STORAGE = "1.2.840.10008.1.3.10"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)

__all__ = [
    "AXIAL",
    "CORONAL",
    "SAGITTAL",
    "voxel_pattern",
    "slice_positions",
    "write_series",
    "write_structured_report",
    "write_dicomdir",
    "deflate_bomb",
]


def voxel_pattern(rows: int, cols: int, nslices: int) -> np.ndarray:
    """The stored values written by :func:`write_series`, shape ``(rows, cols, nslices)``.

    ``value[r, c, k] = (k * 97 + r * 7 + c * 3) % 1000``, so every slice differs and
    rows and columns can't be swapped unnoticed; values fit uint16 and int16.

    Examples
    --------
    >>> voxel_pattern(2, 2, 2)[:, :, 1].tolist()
    [[97, 100], [104, 107]]
    """
    r, c, k = np.meshgrid(np.arange(rows), np.arange(cols), np.arange(nslices), indexing="ij")
    return ((k * 97 + r * 7 + c * 3) % 1000).astype(np.uint16)


def slice_positions(
    nslices: int,
    slice_spacing: float,
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    gantry_tilt_deg: float = 0.0,
) -> list[tuple[float, float, float]]:
    """ImagePositionPatient of each slice, in mm (LPS, as DICOM stores them).

    With ``gantry_tilt_deg`` the stack is sheared: slice ``k`` moves a further
    ``k * slice_spacing * tan(tilt)`` along the column direction (the image's y axis), the
    way a tilted CT gantry places its slices.

    Examples
    --------
    >>> slice_positions(2, 2.5)
    [(0.0, 0.0, 0.0), (0.0, 0.0, 2.5)]
    """
    row_dir = np.asarray(orientation[:3], float)
    col_dir = np.asarray(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    shear = np.tan(np.deg2rad(gantry_tilt_deg))
    out = []
    for k in range(nslices):
        p = np.asarray(origin, float) + k * slice_spacing * (normal + shear * col_dir)
        out.append(tuple(round(float(v), 6) for v in p))
    return out


def write_series(
    directory: str | Path,
    shape: tuple[int, int, int] = (8, 6, 5),
    spacing: tuple[float, float, float] = (0.8, 0.7, 2.0),
    orientation: Sequence[float] = AXIAL,
    positions: Sequence[Sequence[float]] | None = None,
    modality: str = "CT",
    rescale: tuple[float, float] | None = (1.0, -1024.0),
    series_uid: str | None = None,
    study_uid: str | None = None,
    patient_name: str = "DOE^JANE",
    patient_id: str = "12345",
    birth_date: str = "19700101",
    transfer_syntax: str = ExplicitVRLittleEndian,
    instance_numbers: Sequence[int] | None = None,
    extension: str = ".dcm",
    extra: Mapping[str, Any] | None = None,
    *,
    series_number: int = 1,
    series_description: str = "AX HEAD",
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    gantry_tilt_deg: float = 0.0,
    same_position: bool = False,
    omit_slices: Sequence[int] = (),
    shuffle_instances: bool | int = False,
    matrix_overrides: Mapping[int, tuple[int, int]] | None = None,
    truncate: Sequence[int] = (),
    no_pixel_data: Sequence[int] = (),
    name_pattern: str = "IM{index:04d}",
    signed: bool = False,
) -> list[Path]:
    """Write one series, one file per slice, into ``directory`` (created if needed).

    Parameters
    ----------
    directory : path-like
    shape : (rows, cols, nslices)
    spacing : (row_spacing, col_spacing, slice_spacing), mm
    orientation : 6 floats
        ImageOrientationPatient (row direction cosines, then column direction cosines).
    positions : list of (x, y, z), optional
        ImagePositionPatient per slice (overrides ``origin``/``gantry_tilt_deg``).
    modality : str
        "CT" writes CT Image Storage, anything else MR Image Storage.
    rescale : (slope, intercept) or None
        RescaleSlope/RescaleIntercept; None leaves them out (as MR usually does).
    series_uid, study_uid : str, optional
        Fresh UIDs when not given.
    patient_name, patient_id, birth_date : str
        PHI written into every file, so tests can check it never leaks.
    transfer_syntax : UID
        Explicit/Implicit VR Little Endian, Explicit VR Big Endian, or RLE Lossless.
    instance_numbers : list of int, optional
        InstanceNumber per slice (default ``1..nslices``).
    extension : str
        File name suffix, e.g. ".dcm", ".IMA" or "" (extensionless).
    extra : mapping, optional
        More DICOM keywords -> values set on every slice (e.g. ``{"EchoTime": 30.0}``).
    series_number, series_description : int, str
    origin : (x, y, z)
        Position of slice 0, mm.
    gantry_tilt_deg : float
        Shear the slice positions (see :func:`slice_positions`) and set GantryDetectorTilt.
    same_position : bool
        Put every slice at ``origin`` (a broken or non-spatial stack).
    omit_slices : list of int
        Slice indices not written (a gap in the stack).
    shuffle_instances : bool or int
        Randomly permute the instance numbers (and so the file names); an int is the seed.
    matrix_overrides : {slice index: (rows, cols)}
        Give some slices another matrix size (filled with the pattern for that size).
    truncate : list of int
        Slice indices whose file loses the second half of its pixel data after writing.
    no_pixel_data : list of int
        Slice indices written without PixelData (header only).
    name_pattern : str
        File name before ``extension``; ``{index}`` is the InstanceNumber.
    signed : bool
        Store int16 (PixelRepresentation 1) instead of uint16.

    Returns
    -------
    list of Path
        The written files, in slice order (omitted slices left out).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows, cols, nslices = (int(n) for n in shape)
    if rows < 1 or cols < 1 or nslices < 1:
        raise ValueError(f"`shape` must be positive (rows, cols, nslices), got {shape}")
    if len(orientation) != 6:
        raise ValueError(f"`orientation` must hold 6 direction cosines, got {len(orientation)}")
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    if positions is None:
        positions = slice_positions(nslices, spacing[2], orientation, origin, gantry_tilt_deg)
        if same_position:
            positions = [tuple(float(v) for v in origin)] * nslices
    if len(positions) != nslices:
        raise ValueError(f"`positions` must hold {nslices} entries, got {len(positions)}")
    if instance_numbers is None:
        instance_numbers = list(range(1, nslices + 1))
        if shuffle_instances is not False:
            seed = 0 if shuffle_instances is True else int(shuffle_instances)
            random.Random(seed).shuffle(instance_numbers)
    if len(instance_numbers) != nslices:
        raise ValueError(
            f"`instance_numbers` must hold {nslices} entries, got {len(instance_numbers)}"
        )
    overrides = dict(matrix_overrides or {})
    pattern = voxel_pattern(rows, cols, nslices)
    sop_class = CT_IMAGE_STORAGE if modality.upper() == "CT" else MR_IMAGE_STORAGE

    paths: list[Path] = []
    for k in range(nslices):
        if k in omit_slices:
            continue
        if k in overrides:
            r_k, c_k = overrides[k]
            pixels = voxel_pattern(r_k, c_k, nslices)[:, :, k]
        else:
            pixels = pattern[:, :, k]
        ds = _base_dataset(sop_class, transfer_syntax)
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = birth_date
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.AccessionNumber = "ACC001"
        ds.StudyID = "1"
        ds.Modality = modality
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in positions[k]]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = float(spacing[2])
        ds.SliceLocation = float(np.dot(np.cross(orientation[:3], orientation[3:]), positions[k]))
        if gantry_tilt_deg:
            ds.GantryDetectorTilt = float(gantry_tilt_deg)
        if rescale is not None:
            ds.RescaleSlope = float(rescale[0])
            ds.RescaleIntercept = float(rescale[1])
            if modality.upper() == "CT":
                ds.RescaleType = "HU"
        _set_pixels(ds, pixels, with_data=k not in no_pixel_data, signed=signed)
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        if transfer_syntax == RLELossless and k not in no_pixel_data:
            ds.compress(RLELossless)
        path = directory / (name_pattern.format(index=int(instance_numbers[k])) + extension)
        ds.save_as(path, enforce_file_format=True)
        if k in truncate:
            # Cut the file in the middle of its pixel data, like an interrupted copy.
            data = path.read_bytes()
            path.write_bytes(data[: len(data) - max(1, pixels.nbytes // 2)])
        paths.append(path)
    return paths


def write_structured_report(
    path: str | Path,
    series_uid: str | None = None,
    patient_name: str = "DOE^JANE",
    patient_id: str = "12345",
) -> Path:
    """Write a minimal Basic Text SR (a DICOM file with no image) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _base_dataset(BASIC_TEXT_SR_STORAGE, ExplicitVRLittleEndian)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "SR"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicomdir(directory: str | Path, paths: Sequence[str | Path]) -> Path:
    """Write ``directory/DICOMDIR`` indexing ``paths`` (which must lie under ``directory``).

    The index holds one PATIENT/STUDY/SERIES/IMAGE record chain per file; the files are
    referenced in place, never copied or changed.
    """
    directory = Path(directory)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DICOMDIR_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "MEDGENTEST"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    records = []
    for p in paths:
        src = pydicom.dcmread(p, stop_before_pixels=True)
        for level, keys in (
            ("PATIENT", ("PatientID", "PatientName")),
            ("STUDY", ("StudyInstanceUID", "StudyDate")),
            ("SERIES", ("SeriesInstanceUID", "Modality", "SeriesNumber")),
        ):
            rec = Dataset()
            rec.DirectoryRecordType = level
            for key in keys:
                if key in src:
                    setattr(rec, key, src[key].value)
            records.append(rec)
        image = Dataset()
        image.DirectoryRecordType = "IMAGE"
        # Referenced File IDs are CS values (upper case by the standard); tests use any case.
        with pydicom.config.disable_value_validation():
            image.ReferencedFileID = list(Path(p).relative_to(directory).parts)
        image.ReferencedSOPClassUIDInFile = src.SOPClassUID
        image.ReferencedSOPInstanceUIDInFile = src.SOPInstanceUID
        image.ReferencedTransferSyntaxUIDInFile = src.file_meta.TransferSyntaxUID
        image.InstanceNumber = src.get("InstanceNumber", 1)
        records.append(image)
    ds.DirectoryRecordSequence = records
    out = directory / "DICOMDIR"
    ds.save_as(out, enforce_file_format=True)
    return out


def _base_dataset(sop_class: str, transfer_syntax: str) -> Dataset:
    ts = UID(transfer_syntax)
    if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless):
        raise ValueError(
            "`transfer_syntax` must be Explicit/Implicit VR Little Endian, Explicit VR Big "
            f"Endian or RLE Lossless, got {ts.name or ts}"
        )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    # RLE is compressed after the pixels are set; until then the dataset is uncompressed.
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if ts == RLELossless else ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, *, with_data: bool, signed: bool) -> None:
    """Set the image pixel module from ``pixels`` (shape (rows, cols))."""
    dtype = np.dtype("<i2" if signed else "<u2")
    big_endian = ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    if with_data:
        data = np.ascontiguousarray(pixels.astype(dtype))
        if big_endian:
            data = data.astype(dtype.newbyteorder(">"))
        ds.PixelData = data.tobytes()


# ----------------------------------------------------------------------------- damage
# Byte-level faults found in real archives and fuzzing; each rewrites one written file.


def set_unknown_vr(path: str | Path, tag: tuple[int, int] = (0x0008, 0x0060), vr: bytes = b"ZZ") -> Path:
    """Give one explicit-VR element an unknown VR code (``ZZ``): pydicom cannot parse it."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    needle = struct.pack("<HH", *tag)
    at = data.find(needle, 132 + 12)  # past the preamble and the file meta group length
    if at < 0:
        raise ValueError(f"tag {tag} not found in {path}")
    data[at + 4 : at + 6] = vr
    path.write_bytes(bytes(data))
    return path


def claim_deflate(path: str | Path) -> Path:
    """Relabel the transfer syntax as Deflated Explicit VR LE without deflating the data."""
    path = Path(path)
    ds = pydicom.dcmread(path)
    raw = path.read_bytes()
    old_uid = str(ds.file_meta.TransferSyntaxUID).encode()
    old_uid += b"\x00" * (len(old_uid) % 2)
    new_uid = b"1.2.840.10008.1.2.1.99"
    at = raw.index(old_uid)
    raw = raw[: at - 2] + struct.pack("<H", len(new_uid)) + new_uid + raw[at + len(old_uid) :]
    group_at = raw.index(b"\x02\x00\x00\x00UL")  # (0002,0000) file meta group length
    length = struct.unpack("<I", raw[group_at + 8 : group_at + 12])[0]
    raw = raw[: group_at + 8] + struct.pack("<I", length + len(new_uid) - len(old_uid)) + raw[group_at + 12 :]
    path.write_bytes(raw)
    return path


def jpeg2000_bomb(path: str | Path, claimed: tuple[int, int] = (60000, 60000)) -> Path:
    """Rewrite an image as JPEG 2000 whose codestream claims ``claimed`` (cols, rows) pixels.

    The DICOM header keeps its small Rows/Columns; only the codestream's SIZ marker lies,
    so a decoder would allocate for the claim (a decompression bomb of a few KB).
    """
    import openjpeg
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    path = Path(path)
    ds = pydicom.dcmread(path)
    stream = bytearray(openjpeg.encode(ds.pixel_array, codec_format=0))
    siz = stream.index(b"\xff\x4f\xff\x51") + 4
    struct.pack_into(">II", stream, siz + 4, *claimed)  # Xsiz, Ysiz
    ds.PixelData = encapsulate([bytes(stream)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(path, enforce_file_format=True)
    return path


def deflate_bomb(path: str | Path, expands_to_mb: float = 600.0) -> Path:
    """Rewrite an explicit-VR file in the deflated transfer syntax, padded with zeros.

    The dataset gains a private OB element of zeros so that it inflates to about
    ``expands_to_mb`` MB, while the file stays a few hundred KB (a deflate bomb).
    """
    import zlib

    path = Path(path)
    claim_deflate(path)  # relabel the file meta; the dataset is still plain
    raw = path.read_bytes()
    group_at = raw.index(b"\x02\x00\x00\x00UL")
    start = group_at + 12 + struct.unpack("<I", raw[group_at + 8 : group_at + 12])[0]
    n_zeros = int(expands_to_mb * 2**20)
    packer = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [raw[:start], packer.compress(raw[start:])]
    parts.append(packer.compress(struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"OB", 0, n_zeros)))
    block = bytes(1 << 22)
    for _ in range(n_zeros // len(block)):
        parts.append(packer.compress(block))
    parts.append(packer.compress(bytes(n_zeros % len(block))))
    parts.append(packer.flush())
    path.write_bytes(b"".join(parts))
    return path
