"""Turn DICOM datasets into uniform 2D frames, whatever object they came in.

Classic single-frame images, enhanced multi-frame objects (per-frame functional groups)
and Siemens mosaics (many slices tiled in one image) all become :class:`Frame` records
with their own position, orientation and rescale, so that series splitting and geometry
never need to know where a frame came from. pydicom decodes the pixels; the un-tiling and
functional-group lookups are ours because no library exposes them as frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medgen.errors import InputError

# Words in ImageType / FrameType that mark a different kind of image of the same slices.
_IMAGE_KIND_WORDS = (
    "M", "P", "R", "I", "MAGNITUDE", "PHASE", "REAL", "IMAGINARY", "FIELD_MAP", "FIELDMAP",
    "B0", "B0 MAP", "ADC", "TRACEW", "FA", "T1 MAP", "T2 MAP", "MIXED", "MOSAIC",
)


class CorruptImageError(InputError):
    """An image file whose pixel data is missing, cut short or undecodable (a damaged copy)."""


class SplitKey(NamedTuple):
    """What makes frames of one series belong to different volumes."""

    series_uid: str
    series_number: int | None
    orientation: tuple
    shape: tuple
    kind: tuple  # image-kind words: magnitude, phase, field map ...
    echo: Any
    contrast: str


@dataclass
class Frame:
    """One 2D image plane with its geometry.

    ``pixels`` has shape (rows, cols) and holds stored values; ``ipp`` is the centre of the
    first transmitted pixel in LPS mm; ``iop`` the row and column direction cosines (LPS).
    """

    source: Path
    pixels: np.ndarray
    ipp: np.ndarray
    iop: np.ndarray
    pixel_spacing_mm: tuple[float, float]  # (between rows, between columns)
    slope: float
    intercept: float
    split_key: SplitKey
    time_key: tuple  # orders frames that share a position (4D); the last item only breaks ties
    uid: str  # SOP Instance UID plus frame number: duplicates are dropped
    slice_thickness_mm: float | None = None
    spacing_between_slices_mm: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.iop[:3], self.iop[3:])


def frames_from_dataset(ds: Any, path: Path) -> list[Frame]:
    """All frames of one dataset read with pixel data."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise CorruptImageError(path, "corrupt image: missing pixel data (file cut short?)")
    try:
        pixels = _native(ds.pixel_array)
    except Exception as exc:  # pydicom raises many types for corrupt or unsupported data
        raise CorruptImageError(
            path, f"corrupt image: cannot decode pixel data ({_first_line(exc)})"
        ) from None
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_frames(ds, path, pixels)
    mosaic = _mosaic_slice_count(ds)
    if mosaic:
        return _mosaic_frames(ds, path, pixels, mosaic)
    if pixels.ndim == 3 and int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(path, "multi-frame image without per-frame geometry")
    if pixels.ndim != 2:
        raise InputError(path, f"unsupported pixel layout {pixels.shape} (colour or multi-sample?)")
    return [_classic_frame(ds, path, pixels)]


def _classic_frame(ds: Any, path: Path, pixels: np.ndarray) -> Frame:
    ipp, iop, spacing = _plane_geometry(ds, path)
    return Frame(
        source=path,
        pixels=pixels,
        ipp=ipp,
        iop=iop,
        pixel_spacing_mm=spacing,
        slope=_float(ds.get("RescaleSlope"), 1.0),
        intercept=_float(ds.get("RescaleIntercept"), 0.0),
        split_key=_split_key(ds, iop, pixels.shape, _image_kind(ds.get("ImageType")), _echo(ds)),
        time_key=_time_key(ds),
        uid=f"{ds.get('SOPInstanceUID', path)}",
        slice_thickness_mm=_float(ds.get("SliceThickness"), None),
        spacing_between_slices_mm=_float(ds.get("SpacingBetweenSlices"), None),
    )


def _plane_geometry(ds: Any, path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    ipp = ds.get("ImagePositionPatient")
    iop = ds.get("ImageOrientationPatient")
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
        raise InputError(path, "no image position/orientation: not a slice of a 3D volume")
    if spacing is None or len(spacing) != 2:
        raise InputError(path, "no PixelSpacing")
    return _vector(ipp, path), _orientation(iop, path), (float(spacing[0]), float(spacing[1]))


def _orientation(values: Any, path: Path) -> np.ndarray:
    iop = _vector(values, path)
    row, col = iop[:3], iop[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if nr < 1e-3 or nc < 1e-3 or abs(np.dot(row, col)) > 1e-2 * nr * nc:
        raise InputError(path, f"invalid ImageOrientationPatient {list(np.round(iop, 4))}")
    return np.concatenate([row / nr, col / nc])


def _vector(values: Any, path: Path) -> np.ndarray:
    try:
        out = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(path, f"non-numeric geometry value {values!r}") from None
    if not np.all(np.isfinite(out)):
        raise InputError(path, f"non-finite geometry value {values!r}")
    return out


# ----------------------------------------------------------------------------- mosaics
def _mosaic_slice_count(ds: Any) -> int:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "MOSAIC" not in image_type:
        return 0
    csareader = _csareader()
    try:
        csa = csareader.get_csa_header(ds, "image")
        count = csareader.get_n_mosaic(csa) if csa else None
    except Exception:  # a damaged CSA header: fall through to the "no count" error below
        count = None
    return int(count or 0) or -1


def _mosaic_frames(ds: Any, path: Path, mosaic: np.ndarray, n_slices: int) -> list[Frame]:
    """Un-tile a Siemens mosaic into its slices, placed along the CSA slice normal."""
    csareader = _csareader()

    if n_slices < 0:
        raise InputError(path, "Siemens mosaic without NumberOfImagesInMosaic in its CSA header")
    tiles_per_side = int(np.ceil(np.sqrt(n_slices)))
    rows, cols = mosaic.shape[0] // tiles_per_side, mosaic.shape[1] // tiles_per_side
    if rows * tiles_per_side != mosaic.shape[0] or cols * tiles_per_side != mosaic.shape[1]:
        raise InputError(path, f"mosaic {mosaic.shape} does not split into {n_slices} tiles")
    ipp, iop, spacing = _plane_geometry(ds, path)
    # The stored position is the mosaic's corner; move it to the first tile's corner.
    ipp = ipp + iop[:3] * spacing[1] * (mosaic.shape[1] - cols) / 2 + iop[3:] * spacing[0] * (
        mosaic.shape[0] - rows
    ) / 2
    normal = np.cross(iop[:3], iop[3:])
    csa_normal = csareader.get_slice_normal(csareader.get_csa_header(ds, "image"))
    if csa_normal is not None and np.dot(np.asarray(csa_normal, float), normal) < 0:
        normal = -normal  # tiles run against the right-handed normal
    step = _float(ds.get("SpacingBetweenSlices"), None) or _float(ds.get("SliceThickness"), None)
    if not step:
        raise InputError(path, "mosaic without SpacingBetweenSlices or SliceThickness")
    base = _classic_frame(ds, path, mosaic[:rows, :cols])
    frames = []
    for s in range(n_slices):
        r, c = divmod(s, tiles_per_side)
        tile = mosaic[r * rows : (r + 1) * rows, c * cols : (c + 1) * cols]
        frames.append(
            Frame(
                **{**base.__dict__, "pixels": tile, "ipp": ipp + normal * step * s, "iop": iop,
                   "uid": f"{base.uid}#{s}", "info": {}}
            )
        )
    return frames


def _csareader() -> Any:
    import warnings

    with warnings.catch_warnings():  # nibabel warns that its DICOM *wrappers* are experimental
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader
    return csareader


# ----------------------------------------------------------------------------- enhanced
def _enhanced_frames(ds: Any, path: Path, pixels: np.ndarray) -> list[Frame]:
    per_frame = ds.PerFrameFunctionalGroupsSequence
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    if pixels.ndim == 2:
        pixels = pixels[None]
    if len(per_frame) != pixels.shape[0]:
        raise InputError(
            path, f"{len(per_frame)} per-frame groups for {pixels.shape[0]} frames of pixel data"
        )
    sop = str(ds.get("SOPInstanceUID", path))
    frames = []
    for index, group in enumerate(per_frame):
        lookup = _GroupLookup(group, shared)
        ipp = lookup.get("PlanePositionSequence", "ImagePositionPatient")
        iop = lookup.get("PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = lookup.get("PixelMeasuresSequence", "PixelSpacing")
        if ipp is None or iop is None or spacing is None:
            raise InputError(path, f"frame {index + 1} has no plane position/orientation/spacing")
        iop = _orientation(iop, path)
        frame_type = lookup.get("MRImageFrameTypeSequence", "FrameType") or lookup.get(
            "CTImageFrameTypeSequence", "FrameType"
        )
        component = lookup.get("MRImageFrameTypeSequence", "ComplexImageComponent")
        kind = _image_kind(frame_type) + ((str(component),) if component else ())
        echo = lookup.get("MREchoSequence", "EffectiveEchoTime")
        content = lookup.item("FrameContentSequence")
        slope, intercept = _enhanced_rescale(ds, lookup)
        frames.append(
            Frame(
                source=path,
                pixels=pixels[index],
                ipp=_vector(ipp, path),
                iop=iop,
                pixel_spacing_mm=(float(spacing[0]), float(spacing[1])),
                slope=slope,
                intercept=intercept,
                split_key=_split_key(ds, iop, pixels.shape[1:], kind, _round(echo)),
                time_key=_enhanced_time_key(ds, content, index),
                uid=f"{sop}#{index}",
                slice_thickness_mm=_float(lookup.get("PixelMeasuresSequence", "SliceThickness"), None),
                spacing_between_slices_mm=_float(
                    lookup.get("PixelMeasuresSequence", "SpacingBetweenSlices"), None
                ),
                info={"units": _real_world_units(lookup)},
            )
        )
    return frames


class _GroupLookup:
    """Per-frame functional group first, shared group second (the standard's precedence)."""

    def __init__(self, per_frame: Any, shared: Any) -> None:
        self.groups = [g for g in (per_frame, shared) if g is not None]

    def item(self, sequence: str) -> Any:
        for group in self.groups:
            seq = group.get(sequence)
            if seq:
                return seq[0]
        return None

    def get(self, sequence: str, keyword: str) -> Any:
        for group in self.groups:
            seq = group.get(sequence)
            if seq and keyword in seq[0]:
                return seq[0].get(keyword)
        return None


def _enhanced_rescale(ds: Any, lookup: _GroupLookup) -> tuple[float, float]:
    slope = _float(lookup.get("PixelValueTransformationSequence", "RescaleSlope"), None)
    intercept = _float(lookup.get("PixelValueTransformationSequence", "RescaleIntercept"), None)
    slope = _float(ds.get("RescaleSlope"), 1.0) if slope is None else slope
    intercept = _float(ds.get("RescaleIntercept"), 0.0) if intercept is None else intercept
    precise = _philips_precise_scale(ds, lookup, slope, intercept)
    return precise if precise is not None else (slope, intercept)


def _philips_precise_scale(
    ds: Any, lookup: _GroupLookup, slope: float, intercept: float
) -> tuple[float, float] | None:
    """Philips' floating-point ("precise") values: FP = SV / (RS * SS) + RI / (RS * SS).

    Used, as dcm2niix does, only where the real-world values carry no physical unit;
    a field map in Hz keeps the DICOM rescale, which already gives Hz.
    """
    if "philips" not in str(ds.get("Manufacturer", "")).lower():
        return None
    if _real_world_units(lookup) not in (None, "", "no units", "1"):
        return None
    private = _philips_private_item(lookup)
    if private is None or (0x2005, 0x100E) not in private:
        return None
    scale_slope = float(private[(0x2005, 0x100E)].value)
    if not np.isfinite(scale_slope) or scale_slope == 0 or slope == 0:
        return None
    return 1.0 / scale_slope, intercept / (slope * scale_slope)


def _philips_private_item(lookup: _GroupLookup) -> Any:
    for group in lookup.groups:
        if (0x2005, 0x140F) in group and group[(0x2005, 0x140F)].value:
            return group[(0x2005, 0x140F)].value[0]
    return None


def _real_world_units(lookup: _GroupLookup) -> str | None:
    mapping = lookup.item("RealWorldValueMappingSequence")
    if mapping is None or "MeasurementUnitsCodeSequence" not in mapping:
        return None
    units = mapping.MeasurementUnitsCodeSequence
    return str(units[0].get("CodeValue", "")) if units else None


def _enhanced_time_key(ds: Any, content: Any, index: int) -> tuple:
    content = content if content is not None else {}
    return (
        int(content.get("TemporalPositionIndex", 0) or 0),
        str(content.get("FrameAcquisitionDateTime", "")),
        (int(ds.get("InstanceNumber", 0) or 0), index),
    )


# ----------------------------------------------------------------------------- keys
def _split_key(ds: Any, iop: np.ndarray, shape: tuple, kind: tuple, echo: Any) -> SplitKey:
    return SplitKey(
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        series_number=_series_number(ds),
        orientation=tuple(np.round(iop, 3)),
        shape=tuple(int(s) for s in shape),
        kind=kind,
        echo=echo,
        contrast=str(ds.get("AcquisitionContrast", "")),
    )


def _series_number(ds: Any) -> int | None:
    # Some anonymisers give several series one UID; SeriesNumber still tells them apart.
    number = _float(ds.get("SeriesNumber"), None)
    return None if number is None else int(number)


def _image_kind(image_type: Any) -> tuple:
    words = [str(w).upper() for w in (image_type or [])][2:]
    return tuple(w for w in words if w in _IMAGE_KIND_WORDS and w != "MOSAIC")


def _echo(ds: Any) -> Any:
    number = ds.get("EchoNumbers")
    if number not in (None, ""):
        try:
            return int(number if not isinstance(number, (list, tuple)) else number[0])
        except (TypeError, ValueError):
            pass
    return _round(ds.get("EchoTime"))


def _time_key(ds: Any) -> tuple:
    return (
        int(_float(ds.get("TemporalPositionIdentifier"), 0) or 0),
        int(_float(ds.get("AcquisitionNumber"), 0) or 0),
        _float(ds.get("TriggerTime"), 0.0) or 0.0,
        str(ds.get("AcquisitionDateTime", "")) or str(ds.get("AcquisitionTime", "")),
        str(ds.get("ContentTime", "")),
        int(_float(ds.get("InstanceNumber"), 0) or 0),
    )


# ----------------------------------------------------------------------------- small helpers
def _native(array: np.ndarray) -> np.ndarray:
    """Native byte order: big-endian transfer syntaxes decode to '>i2' arrays."""
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "<" and np.little_endian is False):
        return array.astype(array.dtype.newbyteorder("="))
    return array


def _float(value: Any, default: float | None) -> float | None:
    if value is None or value == "":
        return default
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
        if value is None:
            return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


def _round(value: Any) -> float | None:
    out = _float(value, None)
    return None if out is None else round(out, 3)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]
