"""Deterministic synthetic head phantoms (CT in HU, T1-/T2-like MR) for tests and demos.

The anatomy is defined in continuous space, normalised to the head's semi-axes, and every
random field is drawn on a fixed lattice from ``numpy.random.default_rng(seed)``: the same
seed gives the same anatomy on any grid over the same field of view (only the fine texture
is drawn per voxel), and different seeds give differently shaped heads. The model is a smoothly deformed ellipsoidal head with skin, fat, muscle, a
three-layer skull, subarachnoid CSF, a folded cortex (sulci with a grey-matter ribbon,
Sylvian and interhemispheric fissures), white matter, deep grey nuclei, lateral and third
ventricles, cerebellum with folia, brainstem, eyes, cortical vessels, calcifications and
two lesions (one hyper-, one hypo-dense). The head fills about 85-90% of the field of view.

Phantoms are noise-free (enhancement experiments add their own degradation) but carry a
faint tissue texture and, for MR, a smooth multiplicative bias field.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

__all__ = [
    "HeadVariation",
    "MRContrast",
    "centred_affine",
    "ct_head_phantom",
    "head_labels",
    "mr_brain_phantom",
    "write_samples",
]

MRContrast = Literal["T1", "T2"]

# Tissue labels painted by head_labels (later ones override earlier ones).
AIR, SKIN, FAT, MUSCLE, BONE, MARROW, CSF, GM, WM, DEEP_GM = range(10)
VENTRICLE, VESSEL, LESION_HYPER, LESION_HYPO, CALCIFICATION, VITREOUS, LENS = range(10, 17)
N_LABELS = 17

#: Physical value of each label: CT in HU, MR in arbitrary scanner-like units.
# fmt: off
TISSUE_VALUES: dict[str, tuple[float, ...]] = {
    # air, skin, fat, muscle, bone, marrow, CSF, GM, WM, deep GM,
    # ventricle, vessel, hyperdense lesion, hypodense lesion, calcification, vitreous, lens
    "CT": (-1000.0, 40.0, -90.0, 50.0, 1250.0, 650.0, 8.0, 40.0, 30.0, 37.0,
           5.0, 48.0, 65.0, 15.0, 250.0, 10.0, 90.0),
    "T1": (3.0, 350.0, 900.0, 300.0, 30.0, 650.0, 120.0, 480.0, 700.0, 560.0,
           110.0, 60.0, 850.0, 250.0, 80.0, 100.0, 400.0),
    "T2": (3.0, 300.0, 600.0, 200.0, 30.0, 350.0, 1000.0, 600.0, 420.0, 500.0,
           1000.0, 50.0, 200.0, 900.0, 60.0, 950.0, 200.0),
}
# fmt: on
_LATTICE_HALF_WIDTH = 1.25  # random fields cover normalised coordinates [-1.25, 1.25]^3


def _check_contrast(contrast: str) -> MRContrast:
    choices = get_args(MRContrast)
    if contrast in choices:
        return contrast  # type: ignore[return-value]
    import difflib

    close = difflib.get_close_matches(str(contrast).upper(), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"`contrast` must be one of {', '.join(choices)}, got {contrast!r}{hint}")


def _check_grid(shape: tuple[int, ...], spacing_mm: tuple[float, ...] | float) -> tuple:
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"`shape` must be 3 positive sizes, got {shape}")
    spacing = (float(spacing_mm),) * 3 if np.isscalar(spacing_mm) else tuple(map(float, spacing_mm))
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"`spacing_mm` must be > 0 (one value or three), got {spacing_mm}")
    return shape, spacing


def centred_affine(shape, spacing_mm, flip_ij: bool = False) -> np.ndarray:
    """Axis-aligned voxel -> RAS affine with the volume centre at (0, 0, 0) mm.

    ``flip_ij`` gives the usual DICOM axial layout (i towards the patient's left, j
    posterior), i.e. ``diag(-sx, -sy, sz)``.

    Examples
    --------
    >>> centred_affine((3, 3, 3), (1.0, 1.0, 2.0)) @ [1, 1, 1, 1]
    array([0., 0., 0., 1.])
    """
    signs = np.array([-1.0, -1.0, 1.0]) if flip_ij else np.ones(3)
    affine = np.diag([*(signs * np.asarray(spacing_mm, float)), 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, float) - 1) / 2)
    return affine


class _Fields:
    """Smooth random fields on fixed lattices over the normalised head cube."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def lattice(self, n: int, sigma_cells: float) -> np.ndarray:
        from scipy.ndimage import gaussian_filter

        field = gaussian_filter(self.rng.standard_normal((n, n, n)), sigma_cells, mode="wrap")
        return (field - field.mean()) / field.std()

    @staticmethod
    def sample(lattice: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Trilinear value of ``lattice`` at normalised points ``u`` (shape (3, N))."""
        from scipy.ndimage import map_coordinates

        n = lattice.shape[0]
        idx = (u + _LATTICE_HALF_WIDTH) * ((n - 1) / (2 * _LATTICE_HALF_WIDTH))
        return map_coordinates(lattice, idx, order=1, mode="nearest").astype(np.float32)


def _ellipsoid(u: np.ndarray, centre, semi) -> np.ndarray:
    c = np.asarray(centre, np.float32)[:, None]
    s = np.asarray(semi, np.float32)[:, None]
    return np.sum(((u - c) / s) ** 2, axis=0) < 1.0


@dataclass(frozen=True)
class HeadVariation:
    """Optional overrides of a phantom's anatomy; the defaults change nothing.

    Lengths are fractions of the head's semi-axes (normalised head coordinates), so they mean
    the same on any grid.

    Attributes
    ----------
    ventricle_scale : float or None
        Width and height of the lateral and third ventricles relative to the template
        (the seed draws 0.8-1.4 when None).
    lesions : tuple or None
        ``((label, centre, half_axes), ...)`` with ``centre`` and ``half_axes`` 3-tuples in
        normalised head coordinates (R, A, S); None keeps the seed's two lesions (one hyper-,
        one hypointense), ``()`` paints none.
    sulcal_width_scale : float
        Widening of the CSF in the sulci (atrophy), 1 = template.
    atrophy_fraction : float
        Extra subarachnoid CSF between skull and brain, as a fraction of the head's
        anterior-posterior semi-axis (0 = template).
    """

    ventricle_scale: float | None = None
    lesions: tuple | None = None
    sulcal_width_scale: float = 1.0
    atrophy_fraction: float = 0.0


_NO_VARIATION = HeadVariation()


class _HeadModel:
    """Every random choice of one phantom, drawn up front; evaluated on any set of points."""

    def __init__(
        self, extent_mm: np.ndarray, seed: int, variation: HeadVariation = _NO_VARIATION
    ) -> None:
        rng = np.random.default_rng(seed)
        fields = _Fields(rng)
        semi_y = 0.88 * extent_mm[1] / 2
        semi = [min(0.85 * extent_mm[0] / 2, 0.82 * semi_y), semi_y]
        semi.append(min(0.9 * extent_mm[2] / 2, 1.05 * semi_y))
        self.semi = np.array(semi) * rng.uniform(0.95, 1.0, 3)  # seed-dependent proportions
        self.scale = float(np.clip(semi_y / 90.0, 0.55, 1.0))  # thicknesses relative to an adult
        self.warp = [fields.lattice(12, 2.0) for _ in range(3)]
        self.sulcal = fields.lattice(100, 2.6)
        self.sulcus_depth = fields.lattice(16, 1.5)
        self.vessels = (fields.lattice(40, 2.0), fields.lattice(40, 2.0))
        self.face_mix = fields.lattice(24, 1.5)
        self.sylvian_offset = 0.04 * rng.standard_normal()
        self.ventricle_size = rng.uniform(0.8, 1.4)
        self.lesions = []
        for label in (LESION_HYPER, LESION_HYPO):
            direction = rng.standard_normal(3)
            centre = direction / np.linalg.norm(direction) * rng.uniform(0.25, 0.55)
            self.lesions.append((label, centre, rng.uniform(0.05, 0.09) * rng.uniform(0.7, 1.3, 3)))
        # Overrides come after every draw, so the seed's other choices stay the same.
        if variation.ventricle_scale is not None:
            self.ventricle_size = float(variation.ventricle_scale)
        if variation.lesions is not None:
            self.lesions = [(int(lb), np.asarray(c), np.asarray(h))
                            for lb, c, h in variation.lesions]  # fmt: skip
        self.sulcal_csf_width = 0.22 * variation.sulcal_width_scale
        self.brain_depth_mm = 14.0 * self.scale + variation.atrophy_fraction * self.semi[1]

    def labels(self, p_mm: np.ndarray) -> np.ndarray:
        """Tissue labels, shape (N,) uint8, at RAS points ``p_mm`` of shape (3, N)."""
        semi, scale = self.semi, self.scale
        u = p_mm / semi[:, None].astype(np.float32)  # normalised head coordinates
        u = u + 0.05 * np.stack([_Fields.sample(w, u) for w in self.warp])  # smooth deformation
        r = np.sqrt(np.sum(u**2, axis=0)) + 1e-6
        grad = np.sqrt(np.sum((u / semi[:, None]) ** 2, axis=0)) / r
        depth = (1.0 - r) / np.maximum(grad, 1e-6)  # approx. distance (mm) below the surface
        labels = np.zeros(u.shape[1], np.uint8)
        # Scalp and skull, outside in (thicknesses in adult mm, scaled to the head size).
        for label, start_mm in ((SKIN, 0.0), (FAT, 1.5), (MUSCLE, 4.0), (BONE, 5.0),
                                (MARROW, 7.0), (BONE, 10.0), (CSF, 12.0)):  # fmt: skip
            labels[depth > start_mm * scale] = label
        x, y, z = u
        # Anterior cranial fossa floor: the face (orbits) lies below it, the brain above.
        fossa_floor = -0.2 - 0.9 * np.maximum(0.5 - y, 0.0)
        face = (z < fossa_floor) & (depth > 10.0 * scale)
        idx = np.flatnonzero((depth > self.brain_depth_mm) & ~face)
        labels[idx] = self._brain(u[:, idx], depth[idx] - self.brain_depth_mm)
        # Face: soft tissue, orbital roof, ethmoid air cells, eyes and lenses.
        labels[face] = np.where(_Fields.sample(self.face_mix, u[:, face]) > 0.2, FAT, MUSCLE)
        roof = np.abs(z - fossa_floor) * semi[2] < 1.5 * scale
        labels[roof & (depth > 10.0 * scale) & (y > -0.1)] = BONE
        labels[_ellipsoid(u, (0.0, 0.72, -0.42), (0.1, 0.16, 0.12)) & face] = AIR
        eye = 12.0 * scale / semi
        for side in (-1.0, 1.0):
            labels[_ellipsoid(u, (side * 0.36, 0.74, -0.42), eye)] = VITREOUS
            lens_centre = (side * 0.36, 0.74 + 0.8 * eye[1], -0.42)
            labels[_ellipsoid(u, lens_centre, eye * [0.4, 0.15, 0.4])] = LENS
        labels[depth <= 0] = AIR
        return labels

    def _brain(self, ub: np.ndarray, bd: np.ndarray) -> np.ndarray:
        """Labels inside the brain; ``bd`` is the depth below the brain surface in mm."""
        semi, scale = self.semi, self.scale
        xb, yb, zb = ub
        # Fissures are extra brain surface: "surface" is the distance to the nearest of the
        # outer surface, the interhemispheric fissure and the Sylvian fissures.
        surface = bd.copy()
        # The fissure floor arches like the corpus callosum and drops in front and behind.
        arch = 0.1 * np.cos(np.clip(yb / 0.45, -1, 1) * np.pi / 2)
        fissure_floor = 0.14 + arch - 3.0 * np.maximum(np.abs(yb) - 0.4, 0.0) ** 2
        medial = np.abs(xb - 0.02 * np.sin(5.0 * yb)) * semi[0] - 1.0 * scale
        np.minimum(surface, np.where(zb > fissure_floor, medial, np.inf), out=surface)
        sylvian_reach = 24.0 * scale * np.maximum(0.0, 1.0 - ((yb - 0.1) / 0.35) ** 2)
        sylvian = np.abs(zb - (-0.05 + 0.3 * yb + self.sylvian_offset)) * semi[2] - 1.0 * scale
        lateral = (bd < sylvian_reach) & (np.abs(xb) > 0.3)
        np.minimum(surface, np.where(lateral, sylvian, np.inf), out=surface)

        # Folded cortex: sulci are the zero set of a smooth field that varies slowly with
        # depth (so they run roughly perpendicular to the surface), lined by grey matter.
        cortex_mm = 2.6 * max(scale, 0.8)
        radial = np.sqrt(np.sum(ub**2, axis=0)) + 1e-6
        sulcal = _Fields.sample(self.sulcal, ub * ((0.55 * 0.9 / radial) + 0.45))
        sulcus_depth = 14.0 * scale * (1.0 + 0.3 * _Fields.sample(self.sulcus_depth, ub))
        tissue = np.full(bd.size, WM, np.uint8)
        near_sulcus = (np.abs(sulcal) < 1.0) & (surface < sulcus_depth + cortex_mm)
        tissue[(surface < cortex_mm) | near_sulcus] = GM
        sulcal_csf = np.abs(sulcal) < self.sulcal_csf_width
        tissue[(surface < 0) | (sulcal_csf & (surface < sulcus_depth))] = CSF

        # Cerebellum below a sloping tentorium: folia alternate grey and white matter.
        tentorium = -0.38 - 0.3 * (yb + 0.25)
        cereb = (yb < -0.22) & (zb < tentorium)
        folia = np.sin(2 * np.pi * zb * semi[2] / (3.5 * max(scale, 0.7)) + 2.0 * sulcal)
        cer_tissue = np.where((folia > 0.3) & (bd > 4.0 * scale), WM, GM).astype(np.uint8)
        cer_tissue[(folia < -0.85) & (bd < 8.0 * scale)] = CSF
        tissue[cereb] = cer_tissue[cereb]
        tissue[(yb < -0.22) & (np.abs(zb - tentorium) * semi[2] < 0.8)] = CSF
        tissue[(np.hypot(xb / 0.11, (yb + 0.16) / 0.13) < 1.0) & (zb < -0.3)] = WM  # brainstem

        # Deep grey nuclei (thalamus, caudate head, lentiform nucleus).
        for side in (-1.0, 1.0):
            for centre, half in (((0.11, -0.12, 0.0), (0.09, 0.14, 0.09)),
                                 ((0.17, 0.18, 0.10), (0.05, 0.10, 0.08)),
                                 ((0.27, 0.05, 0.0), (0.05, 0.17, 0.10))):  # fmt: skip
                tissue[_ellipsoid(ub, (side * centre[0], *centre[1:]), half)] = DEEP_GM
        # Lateral ventricles (body, frontal, occipital and temporal horns), third ventricle,
        # choroid plexus and pineal calcifications.
        size = self.ventricle_size
        for side in (-1.0, 1.0):
            for centre, half in (((0.13, -0.02, 0.14), (0.07, 0.36, 0.08)),
                                 ((0.11, 0.25, 0.08), (0.06, 0.14, 0.09)),
                                 ((0.17, -0.40, 0.05), (0.05, 0.12, 0.06)),
                                 ((0.33, -0.05, -0.18), (0.035, 0.18, 0.04))):  # fmt: skip
                half = (half[0] * size, half[1], half[2] * size)
                tissue[_ellipsoid(ub, (side * centre[0], *centre[1:]), half)] = VENTRICLE
            tissue[_ellipsoid(ub, (side * 0.17, -0.33, 0.07), (0.03, 0.03, 0.03))] = CALCIFICATION
        tissue[_ellipsoid(ub, (0.0, -0.05, -0.02), (0.015 * size, 0.14, 0.08))] = VENTRICLE
        tissue[_ellipsoid(ub, (0.0, -0.33, 0.02), (0.02, 0.025, 0.02))] = CALCIFICATION
        for label, centre, half in self.lesions:
            tissue[_ellipsoid(ub, centre, half) & (tissue != VENTRICLE)] = label

        # Cortical vessels: curves where two smooth fields are both near zero.
        a, b = (_Fields.sample(v, ub) for v in self.vessels)
        width = 0.9 / (0.15 * float(semi.mean()))
        tissue[(np.abs(a) < width) & (np.abs(b) < width) & (bd < 1.5 * sulcus_depth)] = VESSEL
        return tissue


def _evaluate(shape, affine: np.ndarray, fn, dtype, points_per_slab: int = 1 << 20) -> np.ndarray:
    """``fn(p)`` at every voxel's RAS position ``p`` (3, N), a slab of k-slices at a time."""
    out = np.empty(shape, dtype)
    n_i, n_j, n_k = shape
    step = max(1, points_per_slab // (n_i * n_j))
    lin, offset = affine[:3, :3].astype(np.float32), affine[:3, 3:4].astype(np.float32)
    for k0 in range(0, n_k, step):
        k1 = min(n_k, k0 + step)
        ijk = np.indices((n_i, n_j, k1 - k0), dtype=np.float32).reshape(3, -1)
        ijk[2] += k0
        out[:, :, k0:k1] = fn(lin @ ijk + offset).reshape(n_i, n_j, k1 - k0)
    return out


def head_labels(
    shape,
    affine: np.ndarray,
    seed: int,
    *,
    variation: HeadVariation | None = None,
    extent_mm=None,
) -> np.ndarray:
    """Tissue label map (uint8, values ``AIR`` .. ``LENS``) of the phantom on a grid.

    Parameters
    ----------
    shape : 3 ints
    affine : ndarray, shape (4, 4)
        Voxel -> RAS mm. The head is centred at (0, 0, 0) mm and sized to fill the field
        of view (``abs(affine[:3, :3]) @ shape``).
    seed : int
    variation : HeadVariation, optional
        Anatomy overrides (ventricle size, lesions, atrophy); None = the seed's anatomy.
    extent_mm : 3 floats, optional
        The field of view (R, A, S) in mm that the head is sized to, when it should differ
        from the grid's own (a smaller head in a larger field of view, or one cut off).

    Returns
    -------
    ndarray, uint8, shape ``shape``
    """
    shape = tuple(int(n) for n in shape)
    extent = np.abs(affine[:3, :3]) @ np.asarray(shape, float)  # FOV along R, A, S in mm
    if extent_mm is not None:
        extent = np.asarray(extent_mm, float)
    model = _HeadModel(extent, seed, variation or _NO_VARIATION)
    return _evaluate(shape, affine, model.labels, np.uint8)


def _render(
    labels: np.ndarray,
    values: tuple[float, ...],
    spacing_mm,
    seed: int,
    texture: float,
    multiplicative: bool,
) -> np.ndarray:
    """Label map -> smooth float32 intensities with texture and a 0.45-voxel Gaussian PSF."""
    from scipy.ndimage import gaussian_filter

    image = np.asarray(values, np.float32)[labels]
    rng = np.random.default_rng([seed, 1])
    # Texture: band-limited noise, about 2 mm correlation length, only inside the head.
    grain = gaussian_filter(
        rng.standard_normal(labels.shape).astype(np.float32), [2.0 / s for s in spacing_mm]
    )
    grain /= grain.std() + 1e-12
    inside = labels != AIR
    if multiplicative:
        image[inside] *= 1.0 + texture * grain[inside]
    else:
        image[inside] += texture * grain[inside]
    return gaussian_filter(image, 0.45)


def ct_head_phantom(
    shape: tuple[int, int, int] = (128, 128, 48),
    spacing_mm: tuple[float, float, float] | float = (0.9, 0.9, 2.5),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A non-contrast head CT phantom in Hounsfield units.

    Parameters
    ----------
    shape : 3 ints
        (I, J, K): columns, rows, axial slices.
    spacing_mm : float or 3 floats
    seed : int

    Returns
    -------
    hu : ndarray, int16, shape ``shape``
        Air -1000, skull about +1000 (cortical tables 1250, diploe 650), grey/white
        matter 40/30, CSF 8, ventricles 5, lesions 65 and 15, calcifications 250.
    affine : ndarray, shape (4, 4)
        Voxel -> RAS mm in DICOM's axial layout ``diag(-sx, -sy, sz)``, centred.

    Examples
    --------
    >>> hu, affine = ct_head_phantom((24, 24, 8), (5.0, 5.0, 8.0), seed=0)
    >>> hu.dtype.name, int(hu[0, 0, 0]), int(hu[12, 12, 4]) in range(0, 60)
    ('int16', -1000, True)
    """
    shape, spacing = _check_grid(shape, spacing_mm)
    affine = centred_affine(shape, spacing, flip_ij=True)
    labels = head_labels(shape, affine, seed)
    hu = _render(labels, TISSUE_VALUES["CT"], spacing, seed, texture=3.0, multiplicative=False)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), affine


def mr_brain_phantom(
    shape: tuple[int, int, int] = (96, 112, 96),
    spacing_mm: tuple[float, float, float] | float = 1.5,
    seed: int = 0,
    contrast: MRContrast = "T1",
    bias_fraction: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """A T1- or T2-weighted MR head phantom with a smooth bias field.

    Parameters
    ----------
    shape : 3 ints
        (I, J, K) along R, A, S.
    spacing_mm : float or 3 floats
    seed : int
    contrast : {"T1", "T2"}
        T1: white matter brighter than grey matter, dark CSF. T2: bright CSF, dark white matter.
    bias_fraction : float
        Peak amplitude of the multiplicative bias field (0.15 = +/-15%), >= 0 and < 1.

    Returns
    -------
    image : ndarray, float32, shape ``shape``
        Positive values, white matter around 700 (T1) / CSF around 1000 (T2).
    affine : ndarray, shape (4, 4)
        ``diag(sx, sy, sz)`` (RAS, no obliquity), centred at 0 mm.

    Examples
    --------
    >>> img, _ = mr_brain_phantom((16, 20, 16), 9.0, seed=1, contrast="T2")
    >>> img.dtype.name, bool(img.min() > 0)
    ('float32', True)
    """
    contrast = _check_contrast(contrast)
    if not 0 <= bias_fraction < 1:
        raise ValueError(f"`bias_fraction` must be in [0, 1), got {bias_fraction}")
    shape, spacing = _check_grid(shape, spacing_mm)
    affine = centred_affine(shape, spacing)
    labels = head_labels(shape, affine, seed)
    image = _render(
        labels, TISSUE_VALUES[contrast], spacing, seed, texture=0.03, multiplicative=True
    )
    # Bias: a smooth field on a coarse lattice in normalised coordinates (grid independent).
    coarse = _Fields(np.random.default_rng([seed, 2])).lattice(6, 1.0)
    half_fov = (np.abs(affine[:3, :3]) @ np.asarray(shape, float) / 2)[:, None].astype(np.float32)
    bias = _evaluate(shape, affine, lambda p: _Fields.sample(coarse, p / half_fov), np.float32)
    bias = 1.0 + bias_fraction * bias / (np.abs(bias).max() + 1e-12)
    return np.maximum(image * bias, 1.0).astype(np.float32), affine


# ----------------------------------------------------------------------------------------
# The committed sample files (data_samples/), regenerated by data_samples/make_samples.py.

CT_SERIES_DIR = "ct_head_phantom"
MR_T1_FILE = "mr_t1_phantom.nii.gz"
MR_T2_FILE = "mr_t2_phantom.nii.gz"
_CREATED = _dt.datetime(2024, 1, 1, 12, 0, 0)


def _ct_source_dataset(seed: int):
    """A fake original-series header carrying (fake) PHI for de-identification tests."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.Dataset()
    ds.PatientName = "PHANTOM^CT"
    ds.PatientID = f"MEDGEN-PHANTOM-{seed:04d}"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "O"
    ds.PatientAge = "044Y"
    ds.InstitutionName = "Medgen Phantom Hospital"
    ds.ReferringPhysicianName = "REFERRER^DEMO"
    ds.OperatorsName = "OPERATOR^DEMO"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["medgen-ct-phantom-study", str(seed)])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["medgen-ct-phantom-frame", str(seed)])
    ds.StudyDate, ds.StudyTime = _CREATED.strftime("%Y%m%d"), _CREATED.strftime("%H%M%S")
    ds.StudyDescription = "CT HEAD PHANTOM"
    ds.AccessionNumber = f"PH{seed:06d}"
    ds.StudyID = "1"
    ds.Manufacturer = "Synthetic phantom (medgen)"
    ds.ManufacturerModelName = "synthetic head phantom"
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    ds.KVP = "120"
    ds.ConvolutionKernel = "SOFT"
    return ds


def write_samples(out_dir: str | Path) -> dict[str, Path]:
    """Write the sample data set into ``out_dir`` (byte-identical on every run).

    * ``ct_head_phantom/``: CT series, 48 axial slices of 128x128 at 0.9x0.9x2.5 mm,
      int16 with RescaleIntercept -1024, ImageType ORIGINAL\\PRIMARY\\AXIAL, fake PHI.
    * ``mr_t1_phantom.nii.gz``: T1-like, seed 0, 96x112x96 at 1.5 mm, int16.
    * ``mr_t2_phantom.nii.gz``: T2-like, seed 1 (a differently shaped head), same grid.

    Returns
    -------
    dict of name -> Path
    """
    from medgen.io.dicom_writer import write_dicom_series
    from medgen.io.nifti import write_nifti
    from medgen.volume import Volume, VolumeMeta

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hu, affine = ct_head_phantom(seed=0)
    ct = Volume(
        (hu.astype(np.int32) + 1024).astype(np.int16),
        affine,
        VolumeMeta(
            modality="CT", units="HU", series_key="phantom-ct", acquisition={"SliceThickness": 2.5}
        ),
        slope=1.0,
        intercept=-1024.0,
    )
    write_dicom_series(
        ct,
        out_dir / CT_SERIES_DIR,
        series_description="CT HEAD PHANTOM 2.5mm",
        source_dataset=_ct_source_dataset(0),
        keep_study=True,
        keep_phi=True,
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        series_number=2,
        overwrite=True,
        uid_seed="medgen-ct-phantom-0",
        created=_CREATED,
    )
    paths = {"ct": out_dir / CT_SERIES_DIR}
    for key, name, seed, contrast in (
        ("mr_t1", MR_T1_FILE, 0, "T1"),
        ("mr_t2", MR_T2_FILE, 1, "T2"),
    ):
        image, mr_affine = mr_brain_phantom(seed=seed, contrast=contrast)
        meta = VolumeMeta(
            modality="MR", units="arbitrary", series_key=f"phantom-{contrast.lower()}"
        )
        paths[key] = write_nifti(
            Volume(np.rint(image).astype(np.int16), mr_affine, meta), out_dir / name
        )
    return paths
