"""Stack frames of one volume into a voxel array with an honest affine.

Slices are ordered by their position along the slice normal (never by InstanceNumber) and
spacing comes from the positions. Missing slices and frames that do not stack are refused
with a reason; uneven spacing (variable table increments) is resampled onto a regular grid
and reported; gantry tilt is corrected by shifting each slice in-plane
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
MAX_RESAMPLE_FACTOR = 8  # an equalised grid may hold at most this many times the slices


@dataclass
class StackedVolume:
    """Stored voxels (I, J, K[, T]) with a RAS affine, plus what was done to get them."""

    array: np.ndarray
    affine: np.ndarray
    slope: float
    intercept: float
    notes: list[str] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    is_2d: bool = False  # one slice position (a 2D image, or a 2D image over time)
    equalized: bool = False  # uneven slice spacing resampled onto a regular grid


def stack_frames(frames: list[Frame], *, single_ok: bool = False) -> StackedVolume:
    """Order, check and stack the frames of one volume (3D, or 4D when positions repeat).

    Parameters
    ----------
    frames : list of Frame
        The frames of one volume, in any order.
    single_ok : bool
        A lone image becomes a one-slice volume (a 2D acquisition, a localizer), its third
        spacing taken from SliceThickness; otherwise a lone image is refused.
    """
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
    notes: list[str] = []
    for group in by_position:
        group.sort(key=lambda f: f.time_key)
    if n_time > 1:
        _check_distinct_times(by_position, notes)
    if len(positions) == 1 and n_time == 1 and not single_ok:
        raise InputError(
            first.source, "lone slice: one image of a different size or kind among a stack"
        )
    slices = [group[0] for group in by_position]
    step_vector, tilt_shifts, resample_to = _slice_step(slices, positions, notes)
    ordered = [f for group in by_position for f in group]
    array = _assemble(by_position, tilt_shifts)
    slope, intercept, array = _common_rescale(ordered, array, notes)
    if resample_to is not None:
        array = resample_slices(array, positions - positions[0], resample_to)
    affine = _affine(slices[0], step_vector)
    if len(positions) == 1:
        notes.append(
            f"2D image: one slice, slice spacing {np.linalg.norm(step_vector):.4g} mm "
            "from SliceThickness"
        )
    return StackedVolume(
        array, affine, slope, intercept, notes, ordered, is_2d=len(positions) == 1,
        equalized=resample_to is not None,
    )


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


def _check_distinct_times(by_position: list[list[Frame]], notes: list[str]) -> None:
    """Images sharing a position must be told apart: time tags, else InstanceNumber.

    As dcm2niix does, classic series without temporal tags (GE EPI) fall back on
    acquisition/trigger/content time and then on InstanceNumber; the fallback is only
    trusted when several slice positions each repeat the same number of times.
    """
    fallback = False
    for group in by_position:
        times = [f.time_key[:-1] for f in group]
        if len(set(times)) == len(times):
            continue
        instances = [f.time_key[-1] for f in group]
        if len(by_position) > 1 and len(set(instances)) == len(instances):
            fallback = True
            continue
        raise InputError(
            group[0].source,
            f"{len(group)} different images at one slice position with nothing (time, "
            "acquisition number, instance number) to tell them apart",
        )
    if fallback:
        notes.append(
            f"{len(by_position[0])} volumes without temporal tags: ordered by InstanceNumber"
        )


def _slice_step(
    slices: list[Frame], positions: np.ndarray, notes: list[str]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The vector from one slice to the next (LPS mm), per-slice tilt shifts if any, and
    the regular positions to resample onto when the spacing is uneven (else None)."""
    first = slices[0]
    normal = first.normal
    if len(slices) == 1:
        thickness = first.slice_thickness_mm or first.spacing_between_slices_mm or 1.0
        return normal * thickness, None, None
    steps = np.diff(positions)
    step = float(np.median(steps))
    resample_to = None
    if np.any(np.abs(steps - step) > SPACING_TOLERANCE * step + POSITION_TOLERANCE_MM):
        # Gaps that are whole multiples of the smallest step are missing slices, not
        # variable table increments: refuse those rather than interpolate over them.
        step = float(steps.min())
        ratio = steps / step
        if np.all(np.abs(ratio - np.round(ratio)) < SPACING_TOLERANCE) and ratio.max() > 1.5:
            gaps = [int(i) for i in np.nonzero(np.round(ratio) > 1)[0]]
            missing = int(np.sum(np.round(ratio) - 1))
            raise InputError(
                first.source,
                f"{missing} missing slice(s): gap of {steps[gaps[0]]:.3g} mm after slice "
                f"{gaps[0] + 1} where the spacing is {step:.3g} mm",
            )
        resample_to = _regular_grid(first, positions, steps)
    span = slices[-1].ipp - first.ipp
    along = float(np.dot(span, normal))
    across = span - along * normal
    tilt_deg = float(np.degrees(np.arctan2(np.linalg.norm(across), abs(along))))
    if resample_to is not None:
        if tilt_deg > TILT_TOLERANCE_DEG:
            raise InputError(
                first.source,
                f"uneven slice spacing ({steps.min():.3g} to {steps.max():.3g} mm) with gantry "
                "tilt: cannot be made one regular grid safely",
            )
        new_step = float(resample_to[1] - resample_to[0])
        notes.append(
            f"uneven slice spacing ({steps.min():.3g} to {steps.max():.3g} mm) resampled "
            f"(linear) to {len(resample_to)} slices at {new_step:.4g} mm, as dcm2niix's "
            "equalised output"
        )
        return normal * new_step * np.sign(along or 1.0), None, resample_to
    if tilt_deg <= TILT_TOLERANCE_DEG:
        return span / (len(slices) - 1), None, None
    notes.append(f"gantry tilt {tilt_deg:.2f} deg corrected by shifting slices in-plane")
    offsets = np.array([s.ipp - first.ipp - np.dot(s.ipp - first.ipp, normal) * normal for s in slices])
    row_mm, col_mm = first.pixel_spacing_mm
    # Output voxel (i, j) of slice k lies at the untilted position; sample the input there.
    shifts = np.stack(
        [offsets @ first.iop[:3] / col_mm, offsets @ first.iop[3:] / row_mm], axis=1
    )
    return normal * (along / (len(slices) - 1)), shifts, None


def _regular_grid(first: Frame, positions: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Offsets (mm from the first slice) of a regular grid at the smallest step."""
    span = float(positions[-1] - positions[0])
    smallest = float(steps.min())
    n = int(round(span / smallest)) + 1
    if n > MAX_RESAMPLE_FACTOR * len(positions):
        raise InputError(
            first.source,
            f"uneven slice spacing ({smallest:.3g} to {steps.max():.3g} mm): a regular grid "
            f"would need {n} slices for {len(positions)} images",
        )
    return np.linspace(0.0, span, n)


def resample_slices(array: np.ndarray, offsets_mm: np.ndarray, grid_mm: np.ndarray) -> np.ndarray:
    """Linear interpolation along axis 2 from slices at ``offsets_mm`` onto ``grid_mm``.

    ``array`` has shape (I, J, K[, T]); offsets increase. Integer data is rounded back to
    its type (as dcm2niix keeps int16).

    Examples
    --------
    >>> a = np.zeros((1, 1, 3), np.int16); a[0, 0] = [0, 10, 40]
    >>> resample_slices(a, np.array([0.0, 1.0, 4.0]), np.arange(5.0))[0, 0].tolist()
    [0, 10, 20, 30, 40]
    """
    upper = np.clip(np.searchsorted(offsets_mm, grid_mm, side="right"), 1, len(offsets_mm) - 1)
    lower = upper - 1
    width = offsets_mm[upper] - offsets_mm[lower]
    weight = np.clip((grid_mm - offsets_mm[lower]) / np.where(width > 0, width, 1.0), 0.0, 1.0)
    shape = (1, 1, len(grid_mm)) + (1,) * (array.ndim - 3)
    w = weight.reshape(shape)
    low = np.take(array, lower, axis=2).astype(np.float64)
    high = np.take(array, upper, axis=2).astype(np.float64)
    out = low * (1.0 - w) + high * w
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return np.asfortranarray(out.astype(array.dtype))


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
