"""Out-of-distribution inputs for the input-gate benchmark (``bench/gate.py``).

Given in-distribution (ID) MR head scans, :func:`ood_cases` builds inputs that a gate should
turn away, grouped by kind (see :data:`KINDS`). Every case is a :class:`medgen.volume.Volume`
that carries the metadata of the ID scan it was made from (or of the first one), so header
fields such as ``modality`` give nothing away: a gate must judge by the voxels and geometry.
Derived cases take their source scans round-robin from the ID list, starting at ``seed``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from medgen.samples import AIR, BONE, CSF, FAT, GM, MARROW, MUSCLE, SKIN, TISSUE_VALUES, WM
from medgen.samples import ct_head_phantom
from medgen.volume import Volume

KINDS = ("modality", "body_region", "scaling", "noise_artefact", "empty_constant", "orientation")
#: The real head CT beside the repository (uint8 with a slope, not strictly HU).
REAL_CT_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nifti" / "CT_AVM.nii.gz"
_T1 = np.asarray(TISSUE_VALUES["T1"], np.float32)

Cases = list[tuple[str, Volume]]


def _name(volume: Volume, index: int) -> str:
    return volume.meta.series_key or f"id{index}"


def _foreground(values: np.ndarray) -> np.ndarray:
    """Voxels above 10% of the robust maximum: the head, whatever the units' offset."""
    finite = values[np.isfinite(values)]
    low, high = np.percentile(finite, [1, 99])
    return np.isfinite(values) & (values > low + 0.1 * (high - low))


def _like(reference: Volume, array: np.ndarray, affine: np.ndarray | None = None) -> Volume:
    """A volume with the reference's metadata (and by default its affine)."""
    return Volume(array, reference.affine if affine is None else affine, reference.meta.copy())


# ----------------------------------------------------------------------------------------
# modality: CT heads in HU.

def modality_cases(reference: Volume, seed: int, ct_path: Path | None = REAL_CT_PATH) -> Cases:
    """CT head phantoms on three grids, plus the real CT at ``ct_path`` (None: phantoms only).

    A missing file is skipped with a printed note, so the benchmark runs without shared data.
    """
    grids = (((48, 48, 48), 4.0), ((64, 64, 40), (3.5, 3.5, 4.5)), ((96, 96, 40), (2.2, 2.2, 4.0)))
    cases = []
    for n, (shape, spacing) in enumerate(grids):
        hu, affine = ct_head_phantom(shape, spacing, seed=seed * 10 + n)
        cases.append((f"ct_phantom_{'x'.join(map(str, shape))}", _like(reference, hu, affine)))
    if ct_path is None:  # asked for phantoms only
        return cases
    if not Path(ct_path).is_file():
        print(f"note: real CT not found at {ct_path}; the modality kind has phantoms only")
        return cases
    from medgen.stages.common import load_volume

    ct = load_volume(ct_path)  # an angiography head CT stored as uint8 with a slope
    cases.append(("ct_real_avm", Volume(ct.array, ct.affine, reference.meta.copy(),
                                        ct.slope, ct.intercept)))  # fmt: skip
    return cases


# ----------------------------------------------------------------------------------------
# body_region: non-head anatomy in the cohort's T1-like units, on the reference's grid.

def _ras_coordinates(reference: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised [-1, 1] coordinates along R, A and S, whichever data axes they run along."""
    shape, linear = reference.shape[:3], reference.affine[:3, :3]
    coords = []
    for row in range(3):  # R, A, S
        axis = int(np.argmax(np.abs(linear[row])))
        line = np.linspace(-1, 1, shape[axis], dtype=np.float32) * np.sign(linear[row, axis])
        coords.append(line.reshape([-1 if a == axis else 1 for a in range(3)]))
    return tuple(np.broadcast_to(c, shape) for c in coords)


def _render_t1(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels -> T1-like values with the cohort's kind of gain jitter, grain, blur and noise."""
    image = (_T1 * rng.uniform(0.9, 1.1, _T1.size).astype(np.float32))[labels]
    grain = gaussian_filter(rng.standard_normal(labels.shape).astype(np.float32), 1.0)
    image *= 1.0 + 0.03 * grain / (grain.std() + 1e-12)
    image = gaussian_filter(image, 0.45)
    noise = rng.standard_normal((2, *labels.shape)).astype(np.float32) * 0.015 * _T1[WM]
    return np.maximum(np.hypot(image + noise[0], noise[1]), 1.0).astype(np.float32)


def knee_phantom(reference: Volume, seed: int) -> Volume:
    """A leg along S through the whole field of view: femur over tibia, fibula, joint space."""
    rng = np.random.default_rng([seed, 101])
    r, a, s = _ras_coordinates(reference)
    cx, cy = rng.uniform(-0.1, 0.1, 2)
    limb = ((r - cx) / rng.uniform(0.6, 0.8)) ** 2 + ((a - cy) / rng.uniform(0.55, 0.75)) ** 2
    labels = np.where(limb < 1.0, SKIN, AIR).astype(np.uint8)
    labels[limb < 0.92] = FAT
    labels[limb < rng.uniform(0.55, 0.75)] = MUSCLE
    joint = rng.uniform(-0.2, 0.2)  # S position of the joint line
    # Main bone: thin shaft far from the joint, wide condyles close to it.
    radius = 0.16 * (1 + 1.2 * np.exp(-(((s - joint) / 0.25) ** 2)))
    shaft = np.hypot(r - cx, a - cy) / radius
    labels[shaft < 1.0] = BONE
    labels[shaft < 0.75] = MARROW
    fibula = np.hypot(r - cx - 0.35, a - cy + 0.15) / 0.07
    below = s < joint - 0.1
    labels[below & (fibula < 1.0)] = BONE
    labels[below & (fibula < 0.6)] = MARROW
    labels[(np.abs(s - joint) < 0.03) & (shaft < 1.0)] = CSF  # joint fluid between the bones
    return _like(reference, _render_t1(labels, rng))


def abdomen_phantom(reference: Volume, seed: int) -> Volume:
    """An axial torso slab: elliptic body, fat ring, liver, kidneys, spine, aorta, bowel gas."""
    rng = np.random.default_rng([seed, 102])
    r, a, s = _ras_coordinates(reference)

    def ellipse(x0, y0, sx, sy):  # an infinite cylinder along S, elliptic in R-A
        return ((r - x0) / sx) ** 2 + ((a - y0) / sy) ** 2 < 1.0

    body_r, body_a = rng.uniform(0.8, 0.95), rng.uniform(0.5, 0.65)
    labels = np.where(ellipse(0, 0, body_r, body_a), SKIN, AIR).astype(np.uint8)
    labels[ellipse(0, 0, body_r - 0.03, body_a - 0.03)] = FAT
    inner = rng.uniform(0.1, 0.2)  # subcutaneous fat thickness
    labels[ellipse(0, 0, body_r - inner, body_a - inner)] = MUSCLE
    labels[ellipse(0, 0, body_r - inner - 0.05, body_a - inner - 0.05)] = FAT  # visceral fat
    labels[ellipse(rng.uniform(0.2, 0.35), 0.05, 0.35, 0.3) & (s > rng.uniform(-0.6, 0))] = GM
    for side in (-1, 1):
        labels[ellipse(side * 0.3, -0.25, 0.1, 0.12)] = WM  # kidneys
    spine = np.hypot(r, a + body_a - inner - 0.12) / 0.1
    labels[spine < 1.0] = BONE
    labels[spine < 0.8] = MARROW
    labels[ellipse(-0.05, -body_a + inner + 0.28, 0.05, 0.05)] = AIR  # aorta: flow void
    for _ in range(int(rng.integers(3, 7))):  # bowel loops: gas or fluid
        x0, y0 = rng.uniform(-0.4, 0.1), rng.uniform(-0.1, 0.3)
        labels[ellipse(x0, y0, 0.07, 0.07)] = rng.choice([AIR, CSF])
    return _like(reference, _render_t1(labels, rng))


def body_region_cases(reference: Volume, seed: int) -> Cases:
    return [(f"knee_s{seed}", knee_phantom(reference, seed)),
            (f"abdomen_s{seed}", abdomen_phantom(reference, seed))]  # fmt: skip


# ----------------------------------------------------------------------------------------
# scaling: intensity calibration errors of an ID scan.

def scaling_cases(volume: Volume, tag: str = "") -> Cases:
    """Header slope/intercept errors keep the stored voxels; the rest rewrite the values."""
    v = volume.values(np.float32)
    fg = v[_foreground(v)]
    p60, p80 = np.percentile(fg, [60, 80])
    slope, intercept = volume.slope, volume.intercept
    return [
        (f"slope_x100{tag}", volume.with_array(volume.array, slope * 100, intercept * 100)),
        (f"slope_x0.01{tag}", volume.with_array(volume.array, slope / 100, intercept / 100)),
        (f"inverted{tag}", volume.with_array(v.max() - v)),
        (f"clipped_p60{tag}", volume.with_array(np.minimum(v, p60))),
        (f"clipped_p80{tag}", volume.with_array(np.minimum(v, p80))),
        (f"offset_+1000{tag}", volume.with_array(volume.array, slope, intercept + 1000)),
    ]


# ----------------------------------------------------------------------------------------
# noise_artefact: acquisition failures on an ID scan.

def noise_artefact_cases(volume: Volume, seed: int, tag: str = "") -> Cases:
    rng = np.random.default_rng([seed, 103])
    v = volume.values(np.float32)
    fg_mean = float(v[_foreground(v)].mean())
    cases = []
    for fraction in (0.25, 0.5):  # Rician: magnitude of a complex signal with noisy parts
        noise = rng.standard_normal((2, *v.shape)).astype(np.float32) * fraction * fg_mean
        cases.append((f"rician_{int(fraction * 100)}pct{tag}", np.hypot(v + noise[0], noise[1])))
    gauss = v + rng.standard_normal(v.shape).astype(np.float32) * 0.5 * fg_mean
    cases.append((f"gaussian_50pct{tag}", gauss))
    # Motion ghosting: attenuated copies shifted along the phase-encoding axis (j here).
    shift, amplitude = v.shape[1] // 4 + int(rng.integers(-2, 3)), rng.uniform(0.3, 0.45)
    ghosts = v.copy()
    for k in (1, 2):
        ghosts += amplitude**k * (np.roll(v, k * shift, axis=1) + np.roll(v, -k * shift, axis=1))
    cases.append((f"motion_ghosts{tag}", ghosts))
    # Spike: one corrupt k-space sample -> a plane wave (stripes) across the whole image,
    # scaled so that the stripes reach half the foreground mean.
    kspace = np.fft.fftn(v)
    where = tuple(int(rng.integers(n // 6, n // 3)) for n in v.shape)
    kspace[where] += 0.5 * fg_mean * v.size * np.exp(1j * rng.uniform(0, 2 * np.pi))
    cases.append((f"kspace_spike{tag}", np.abs(np.fft.ifftn(kspace)).astype(np.float32)))
    # Bias ramp: a multiplicative field from x0.35 to x2.8 along a random axis.
    axis = int(rng.integers(3))
    ramp = np.linspace(-1, 1, v.shape[axis], dtype=np.float32).reshape(
        [-1 if a == axis else 1 for a in range(v.ndim)])  # fmt: skip
    cases.append((f"bias_ramp{tag}", v * np.exp(np.float32(np.log(8) / 2) * ramp)))
    return [(name, volume.with_array(arr.astype(np.float32))) for name, arr in cases]


# ----------------------------------------------------------------------------------------
# empty_constant: degenerate inputs (failed exports, wrong series, corrupt files).

def empty_constant_cases(volume: Volume, seed: int, tag: str = "") -> Cases:
    """Zeros, a constant, a tiny blob in zeros, and the scan with NaNs (the only non-finite)."""
    rng = np.random.default_rng([seed, 104])
    v = volume.values(np.float32)
    fg_mean = float(v[_foreground(v)].mean())
    idx = np.indices(v.shape, dtype=np.float32)
    centre = [rng.uniform(0.3, 0.7) * n for n in v.shape]
    blob = np.exp(-sum((i - c) ** 2 for i, c in zip(idx, centre, strict=True)) / (2 * 1.5**2))
    nan_slab = v.copy()
    k = int(rng.integers(v.shape[2] // 3, 2 * v.shape[2] // 3))
    nan_slab[:, :, k : k + 2] = np.nan  # a few unreadable slices
    nan_voxels = v.copy()
    nan_voxels.flat[rng.choice(v.size, 5, replace=False)] = np.nan  # scattered NaNs only
    arrays = {
        "zeros": np.zeros_like(v),
        "constant": np.full_like(v, fg_mean),
        "tiny_blob": (fg_mean * blob).astype(np.float32),
        "nan_slab": nan_slab,
        "nan_voxels": nan_voxels,
    }
    return [(f"{name}{tag}", volume.with_array(arr)) for name, arr in arrays.items()]


# ----------------------------------------------------------------------------------------
# orientation: data axes reordered while the header still claims the original geometry.

def orientation_cases(volume: Volume, tag: str = "") -> Cases:
    s_axis = int(np.argmax(np.abs(volume.affine[2, :3])))  # the data axis running along S
    v = volume.array
    arrays = {
        "transpose_ik": np.ascontiguousarray(np.swapaxes(v, 0, 2)),
        "transpose_ij": np.ascontiguousarray(np.swapaxes(v, 0, 1)),
        "flip_si": np.ascontiguousarray(np.flip(v, axis=s_axis)),
    }
    return [(f"{name}{tag}", volume.with_array(arr, volume.slope, volume.intercept))
            for name, arr in arrays.items()]  # fmt: skip


# ----------------------------------------------------------------------------------------

def ood_cases(
    id_volumes: list[Volume], seed: int = 0, ct_path: Path | None = REAL_CT_PATH
) -> dict[str, list[tuple[str, Volume]]]:
    """All OOD cases by kind (:data:`KINDS` order), deterministic for given inputs and seed.

    Each derived kind uses the next ID scan in turn (round-robin from ``seed``), and names
    carry the source, e.g. ``"slope_x100(sub-0003)"``.
    """
    if not id_volumes:
        raise ValueError("`id_volumes` must hold at least one in-distribution volume")
    order = [(seed + n) % len(id_volumes) for n in range(4)]
    src = [id_volumes[i] for i in order]
    tags = [f"({_name(id_volumes[i], i)})" for i in order]
    return {
        "modality": modality_cases(id_volumes[0], seed, ct_path),
        "body_region": body_region_cases(id_volumes[0], seed),
        "scaling": scaling_cases(src[0], tags[0]),
        "noise_artefact": noise_artefact_cases(src[1], seed, tags[1]),
        "empty_constant": empty_constant_cases(src[2], seed, tags[2]),
        "orientation": orientation_cases(src[3], tags[3]),
    }
