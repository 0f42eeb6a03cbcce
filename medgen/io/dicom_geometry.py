"""Stack frames of one volume into a voxel array with an honest affine.

Slices are ordered by their position along the slice normal (never by InstanceNumber) and
spacing comes from the positions. Missing slices, uneven spacing and frames that do not
stack are refused with a reason; gantry tilt is corrected by shifting each slice in-plane
(as dcm2niix does) and reported, so no volume is written with silently wrong geometry.
None of pydicom, nibabel or SimpleITK checks these for a set of frames, hence this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medgen.errors import InputError
from medgen.io.dicom_frames import Frame

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
POSITION_TOLERANCE_MM = 0.01  # positions closer than this are the same slice position
SPACING_TOLERANCE = 0.02  # relative step deviation accepted as rounding in the headers
TILT_TOLERANCE_DEG = 0.05


@dataclass
class StackedVolume:
    """Stored voxels (I, J, K[, T]) with a RAS affine, plus what was done to get them."""

    array: np.ndarray
    affine: np.ndarray
    slope: float
    intercept: float
    notes: list[str] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)


def stack_frames(frames: list[Frame]) -> StackedVolume:
    """Order, check and stack the frames of one volume (3D, or 4D when positions repeat)."""
    frames = _drop_duplicates(frames)
    first = frames[0]
    normal = first.normal
    distance = np.array([float(np.dot(f.ipp, normal)) for f in frames])
    positions = _cluster_positions(distance)
    by_position: list[list[Frame]] = [[] for _ in positions]
    for frame, d in zip(frames, distance):
        by_position[int(np.argmin(np.abs(positions - d)))].append(frame)
    counts = {len(group) for group in by_position}
    if len(counts) != 1:
        raise InputError(
            first.source,
            f"uneven number of images per slice position ({min(counts)} to {max(counts)}): "
            "missing images in a repeated (4D) series",
        )
    n_time = counts.pop()
    for group in by_position:
        group.sort(key=lambda f: f.time_key)
        _check_distinct_times(group)
    if len(positions) == 1:
        if n_time == 1:
            raise InputError(first.source, "lone slice: a single image cannot form a 3D volume")
    notes: list[str] = []
    slices = [group[0] for group in by_position]
    step_vector, tilt_shifts = _slice_step(slices, positions, notes)
    ordered = [f for group in by_position for f in group]
    array = _assemble(by_position, tilt_shifts)
    slope, intercept, array = _common_rescale(ordered, array, notes)
    affine = _affine(slices[0], step_vector)
    return StackedVolume(array, affine, slope, intercept, notes, ordered)


def _drop_duplicates(frames: list[Frame]) -> list[Frame]:
    seen: dict[str, Frame] = {}
    for frame in frames:
        seen.setdefault(frame.uid, frame)
    return list(seen.values())


def _cluster_positions(distance: np.ndarray) -> np.ndarray:
    ordered = np.sort(distance)
    centres = [ordered[0]]
    for d in ordered[1:]:
        if d - centres[-1] > POSITION_TOLERANCE_MM:
            centres.append(d)
    return np.array(centres)


def _check_distinct_times(group: list[Frame]) -> None:
    if len(group) < 2:
        return
    times = [f.time_key[:-1] for f in group]
    if len(set(times)) != len(times):
        raise InputError(
            group[0].source,
            f"{len(group)} different images at one slice position with nothing (time, "
            "acquisition number) to tell them apart",
        )


def _slice_step(
    slices: list[Frame], positions: np.ndarray, notes: list[str]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The vector from one slice to the next (LPS mm), and per-slice tilt shifts if any."""
    first = slices[0]
    normal = first.normal
    if len(slices) == 1:
        thickness = first.spacing_between_slices_mm or first.slice_thickness_mm or 1.0
        return normal * thickness, None
    steps = np.diff(positions)
    step = float(np.median(steps))
    if np.any(np.abs(steps - step) > SPACING_TOLERANCE * step + POSITION_TOLERANCE_MM):
        ratio = steps / step
        if np.all(np.abs(ratio - np.round(ratio)) < SPACING_TOLERANCE) and ratio.max() > 1.5:
            gaps = [int(i) for i in np.nonzero(np.round(ratio) > 1)[0]]
            missing = int(np.sum(np.round(ratio) - 1))
            raise InputError(
                first.source,
                f"{missing} missing slice(s): gap of {steps[gaps[0]]:.3g} mm after slice "
                f"{gaps[0] + 1} where the spacing is {step:.3g} mm",
            )
        raise InputError(
            first.source,
            f"uneven slice spacing ({steps.min():.3g} to {steps.max():.3g} mm): "
            "cannot be one regular grid",
        )
    span = slices[-1].ipp - first.ipp
    along = float(np.dot(span, normal))
    across = span - along * normal
    tilt_deg = float(np.degrees(np.arctan2(np.linalg.norm(across), abs(along))))
    if tilt_deg <= TILT_TOLERANCE_DEG:
        return span / (len(slices) - 1), None
    notes.append(f"gantry tilt {tilt_deg:.2f} deg corrected by shifting slices in-plane")
    offsets = np.array([s.ipp - first.ipp - np.dot(s.ipp - first.ipp, normal) * normal for s in slices])
    row_mm, col_mm = first.pixel_spacing_mm
    # Output voxel (i, j) of slice k lies at the untilted position; sample the input there.
    shifts = np.stack(
        [offsets @ first.iop[:3] / col_mm, offsets @ first.iop[3:] / row_mm], axis=1
    )
    return normal * (along / (len(slices) - 1)), shifts


def _assemble(by_position: list[list[Frame]], tilt_shifts: np.ndarray | None) -> np.ndarray:
    """Voxels in (I=columns, J=rows, K=slices[, T]) order, Fortran-contiguous for NIfTI."""
    rows, cols = by_position[0][0].pixels.shape
    n_time = len(by_position[0])
    dtype = np.result_type(*{g[0].pixels.dtype for g in by_position})
    shape = (cols, rows, len(by_position)) + ((n_time,) if n_time > 1 else ())
    array = np.empty(shape, dtype=dtype, order="F")
    for k, group in enumerate(by_position):
        for t, frame in enumerate(group):
            plane = frame.pixels.T
            if tilt_shifts is not None:
                plane = _shift_plane(plane, tilt_shifts[k])
            if n_time > 1:
                array[:, :, k, t] = plane
            else:
                array[:, :, k] = plane
    if array.dtype == np.uint16 and array.size and array.max() <= np.iinfo(np.int16).max:
        array = array.astype(np.int16, order="F")  # signed like dcm2niix: friendlier to tools
    return array


def _shift_plane(plane: np.ndarray, shift_ij: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    moved = ndimage.shift(plane.astype(np.float64), shift_ij, order=1, mode="nearest")
    if np.issubdtype(plane.dtype, np.integer):
        info = np.iinfo(plane.dtype)
        return np.clip(np.rint(moved), info.min, info.max).astype(plane.dtype)
    return moved.astype(plane.dtype)


def _common_rescale(
    frames: list[Frame], array: np.ndarray, notes: list[str]
) -> tuple[float, float, np.ndarray]:
    pairs = {(f.slope, f.intercept) for f in frames}
    if len(pairs) == 1:
        slope, intercept = pairs.pop()
        return slope, intercept, array
    # Per-slice rescale (PET, some CT): keep exact physical values as float32.
    notes.append("rescale slope/intercept vary between images: stored as float32 physical values")
    values = np.empty(array.shape, dtype=np.float32, order="F")
    for frame, index in _frame_indices(frames, array.shape):
        values[index] = array[index] * np.float32(frame.slope) + np.float32(frame.intercept)
    return 1.0, 0.0, values


def _frame_indices(frames: list[Frame], shape: tuple[int, ...]):
    """Pairs each frame (in slice-major, then time order) with its plane in the array."""
    n_time = shape[3] if len(shape) == 4 else 1
    for n, frame in enumerate(frames):
        k, t = divmod(n, n_time)
        yield frame, (slice(None), slice(None), k) + ((t,) if len(shape) == 4 else ())


def _affine(first: Frame, step_vector: np.ndarray) -> np.ndarray:
    row_mm, col_mm = first.pixel_spacing_mm
    lps = np.eye(4)
    lps[:3, 0] = first.iop[:3] * col_mm  # i runs along a row: next column
    lps[:3, 1] = first.iop[3:] * row_mm  # j runs down a column: next row
    lps[:3, 2] = step_vector
    lps[:3, 3] = first.ipp
    return LPS_TO_RAS @ lps


def source_files(frames: list[Frame]) -> tuple[str, ...]:
    """The distinct files the frames came from, in slice order."""
    return tuple(dict.fromkeys(str(Path(f.source).resolve()) for f in frames))
