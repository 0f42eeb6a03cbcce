"""A seeded, labelled cohort of T1-like MR head phantoms for synthesis models and classifiers.

Every subject is the :mod:`medgen.samples` head of its own seed with drawn nuisance variation
(age, sex, head size, voxel size, tissue contrast, bias field, Rician noise) and, for half of
the cohort, one class-defining change:

* ``task="lesion"``: label 1 has 1-3 hyperintense lesions, label 0 none;
* ``task="ventricles"``: label 1 has enlarged ventricles (scale 1.6-2.2 before ageing),
  label 0 normal ones (0.8-1.3).

Both classes draw every parameter from the same stream in the same order, so the class is the
only systematic difference. Age is a real covariate in both classes: older heads get larger
ventricles, wider sulci and more CSF around the brain. Parameters are drawn first and recorded
in a :class:`CohortSubject`; rendering is deterministic given the subject, so any subject can
be re-rendered alone, on any grid.

Like :func:`medgen.samples.mr_brain_phantom` the phantom is scale-free: the head is sized to
the grid (a ``head_scale`` 1 head spans about 88% of the shortest axis at
``REFERENCE_SPACING_MM``) and the subject's ``spacing_mm`` sets how much of the field of view
it covers (coarser voxels show more air around a smaller head). Anatomical sizes are
therefore fractions of the head's semi-axes, which mean the same on every grid.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medgen.samples import AIR, LESION_HYPER, N_LABELS, TISSUE_VALUES, WM, HeadVariation
from medgen.samples import centred_affine, head_labels
from medgen.validate import ParameterError, check_int, literal_options, look_up_option

__all__ = ["COHORT_CSV", "CSV_COLUMNS", "CohortSubject", "CohortTask", "cohort_subjects",
           "read_cohort", "render_subject", "subject_labels", "write_cohort"]  # fmt: skip

CohortTask = Literal["lesion", "ventricles"]
COHORT_CSV = "labels.csv"
#: Tissue names in label order (``medgen.samples.AIR`` .. ``LENS``), for the gain columns.
TISSUE_NAMES = ("air", "skin", "fat", "muscle", "bone", "marrow", "csf", "gm", "wm", "deep_gm",
                "ventricle", "vessel", "lesion_hyper", "lesion_hypo", "calcification",
                "vitreous", "lens")  # fmt: skip
AGE_RANGE_YEARS = (20.0, 85.0)
SPACING_RANGE_MM = (1.2, 2.0)
REFERENCE_SPACING_MM = 1.25
LESION_RADIUS_RANGE = (0.12, 0.2)  # fraction of the head's semi-axes
_HEAD_FOV_MM = 180.0  # the anatomy is built for this field of view (adult proportions)
# Nominal T1 values (WM 700); lesions at 1000 stay brighter than WM under the +/-10% gains.
_NOMINAL_T1 = np.array(TISSUE_VALUES["T1"], np.float64)
_NOMINAL_T1[LESION_HYPER] = 1000.0
_TEXTURE_FRACTION = 0.03
_SPACING_NAMES = ("spacing_i_mm", "spacing_j_mm", "spacing_k_mm")


@dataclass(frozen=True)
class CohortSubject:
    """Every drawn parameter of one cohort subject (rendering adds nothing random of its own).

    Attributes
    ----------
    subject_id : str
        ``"sub-0001"``, ``"sub-0002"``, ... (the subject's number in the cohort).
    label : int
        Class, 0 or 1.
    seed : int
        Anatomy and texture seed, from ``SeedSequence([cohort seed, number])``.
    age_years : float
    sex : int
        0 or 1 (1: heads about 3% larger).
    head_scale : float
        Head size relative to a head that spans ~88% of the grid at ``REFERENCE_SPACING_MM``.
    spacing_mm : tuple of 3 floats
        Voxel size along i, j, k (R, A, S) in mm.
    tissue_gains : tuple of ``N_LABELS`` floats
        Multiplies each tissue's nominal T1 value (contrast jitter, 0.9-1.1).
    bias_fraction : float
        Peak amplitude of the multiplicative bias field (0.1 = +/-10%).
    noise_fraction : float
        Rician noise sigma as a fraction of the white-matter value.
    ventricle_scale : float
        Ventricle width/height relative to the template: 0.8-1.3 (1.6-2.2 for enlarged
        ventricles) times an age factor from 0.8 at 20 years to 1.2 at 85 years.
    sulcal_width_scale : float
        Widening of the sulcal CSF with age (1 = template).
    atrophy_fraction : float
        Extra CSF around the brain, fraction of the head's anterior-posterior semi-axis.
    lesion_count : int
        Number of hyperintense lesions (0 unless task "lesion" and label 1).
    lesion_radius_fraction : float
        Lesion semi-axes as a fraction of the head's semi-axes (0 without lesions).
    """

    subject_id: str
    label: int
    seed: int
    age_years: float
    sex: int
    head_scale: float
    spacing_mm: tuple[float, float, float]
    tissue_gains: tuple[float, ...]
    bias_fraction: float
    noise_fraction: float
    ventricle_scale: float
    sulcal_width_scale: float
    atrophy_fraction: float
    lesion_count: int = 0
    lesion_radius_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name in ("label", "sex"):
            if getattr(self, name) not in (0, 1):
                raise ParameterError(f"`{name}` must be 0 or 1, got {getattr(self, name)!r}")
        spacing = tuple(float(v) for v in self.spacing_mm)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ParameterError(f"`spacing_mm` must be 3 values > 0, got {self.spacing_mm}")
        gains = tuple(float(v) for v in self.tissue_gains)
        if len(gains) != N_LABELS:
            raise ParameterError(f"`tissue_gains` must have {N_LABELS} values, got {len(gains)}")
        if not 0 <= self.bias_fraction < 1:
            raise ParameterError(f"`bias_fraction` must be in [0, 1), got {self.bias_fraction}")
        if self.noise_fraction < 0:
            raise ParameterError(f"`noise_fraction` must be >= 0, got {self.noise_fraction}")
        if self.head_scale <= 0:
            raise ParameterError(f"`head_scale` must be > 0, got {self.head_scale}")
        object.__setattr__(self, "spacing_mm", spacing)  # tuples of floats, whatever came in
        object.__setattr__(self, "tissue_gains", gains)


def _draw_subject(seed: int, number: int, task: str) -> CohortSubject:
    """Subject ``number`` (1-based) of the cohort ``seed``: shared draws first, class last."""
    subject_seed = int(np.random.SeedSequence([seed, number]).generate_state(1)[0])
    rng = np.random.default_rng([subject_seed, 0])  # the anatomy uses default_rng(subject_seed)
    label = (number - 1) % 2
    age = rng.uniform(*AGE_RANGE_YEARS)
    ageing = (age - AGE_RANGE_YEARS[0]) / (AGE_RANGE_YEARS[1] - AGE_RANGE_YEARS[0])  # 0..1
    sex = int(rng.integers(2))
    head_scale = rng.uniform(0.88, 0.98) + 0.03 * sex
    spacing = np.clip(rng.uniform(*SPACING_RANGE_MM) * rng.uniform(0.95, 1.05, 3),
                      *SPACING_RANGE_MM)  # fmt: skip
    gains = rng.uniform(0.9, 1.1, N_LABELS)
    bias, noise = rng.uniform(0.0, 0.2), rng.uniform(0.0, 0.03)
    sulcal = (1.0 + 0.6 * ageing) * rng.uniform(0.9, 1.1)
    atrophy = 0.03 * ageing * rng.uniform(0.7, 1.3)
    normal_ventricles, large_ventricles = rng.uniform(0.8, 1.3), rng.uniform(1.6, 2.2)
    n_lesions, lesion_radius = int(rng.integers(1, 4)), rng.uniform(*LESION_RADIUS_RANGE)
    # Only now does the label choose between values that both classes have drawn.
    ventricles = large_ventricles if (task == "ventricles" and label) else normal_ventricles
    has_lesions = task == "lesion" and label == 1
    r4 = lambda x: round(float(x), 4)  # noqa: E731 - readable CSV that round-trips exactly
    return CohortSubject(
        subject_id=f"sub-{number:04d}",
        label=label,
        seed=subject_seed,
        age_years=round(float(age), 1),
        sex=sex,
        head_scale=r4(head_scale),
        spacing_mm=tuple(r4(s) for s in spacing),
        tissue_gains=tuple(r4(g) for g in gains),
        bias_fraction=r4(bias),
        noise_fraction=r4(noise),
        ventricle_scale=r4(ventricles * (0.8 + 0.4 * ageing)),  # x0.8 at 20 y, x1.2 at 85 y
        sulcal_width_scale=r4(sulcal),
        atrophy_fraction=r4(atrophy),
        lesion_count=n_lesions if has_lesions else 0,
        lesion_radius_fraction=r4(lesion_radius) if has_lesions else 0.0,
    )


def cohort_subjects(n_per_class: int = 10, seed: int = 0, task: CohortTask = "lesion"):
    """Draw a balanced cohort: ``2 * n_per_class`` subjects, labels 0, 1, 0, 1, ...

    Subject ``n`` depends only on ``(seed, n, task)``, so a larger cohort extends a smaller one
    and the two tasks share every head (only the class-defining change differs).

    Parameters
    ----------
    n_per_class : int
        Subjects per class, >= 1.
    seed : int
        Cohort seed, >= 0.
    task : {"lesion", "ventricles"}

    Returns
    -------
    list of CohortSubject

    Examples
    --------
    >>> subjects = cohort_subjects(n_per_class=2, seed=0, task="ventricles")
    >>> [(s.subject_id, s.label) for s in subjects][:2]
    [('sub-0001', 0), ('sub-0002', 1)]
    >>> subjects[1].ventricle_scale > subjects[0].ventricle_scale
    True
    """
    n_per_class = check_int("n_per_class", n_per_class, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    task = look_up_option("task", task, literal_options(CohortTask))
    return [_draw_subject(seed, number, task) for number in range(1, 2 * n_per_class + 1)]


def _check_subject(subject) -> CohortSubject:
    if not isinstance(subject, CohortSubject):
        raise ParameterError(f"`subject` must be a CohortSubject, got {type(subject).__name__}")
    return subject


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        sizes = tuple(check_int("shape", n, minimum=8) for n in shape)
    except (TypeError, ParameterError):
        sizes = ()
    if len(sizes) != 3:
        raise ParameterError(f"`shape` must be 3 integers >= 8, got {shape!r}")
    return sizes  # type: ignore[return-value]


def _lesions(subject: CohortSubject) -> tuple:
    """Lesion ellipsoids in normalised head coordinates, in the cerebral white matter."""
    rng = np.random.default_rng([subject.seed, 4])
    lesions = []
    while len(lesions) < subject.lesion_count:
        centre = rng.uniform([-0.45, -0.45, -0.05], [0.45, 0.5, 0.45])
        if 0.25 <= np.linalg.norm(centre) <= 0.5 and abs(centre[0]) > 0.12:
            half = subject.lesion_radius_fraction * rng.uniform(0.85, 1.15, 3)
            lesions.append((LESION_HYPER, tuple(centre), tuple(half)))
    return tuple(lesions)


def _labels_and_affine(subject: CohortSubject, shape) -> tuple[np.ndarray, np.ndarray]:
    affine = centred_affine(shape, subject.spacing_mm)
    # The head lives in a fixed anatomical frame; grid mm map onto it by one factor.
    head_mm_per_grid_mm = _HEAD_FOV_MM / (min(shape) * REFERENCE_SPACING_MM)
    model_affine = np.diag([head_mm_per_grid_mm] * 3 + [1.0]) @ affine
    variation = HeadVariation(
        ventricle_scale=subject.ventricle_scale,
        lesions=_lesions(subject),
        sulcal_width_scale=subject.sulcal_width_scale,
        atrophy_fraction=subject.atrophy_fraction,
    )
    extent_mm = [_HEAD_FOV_MM * subject.head_scale] * 3
    labels = head_labels(shape, model_affine, subject.seed, variation=variation,
                         extent_mm=extent_mm)  # fmt: skip
    return labels, affine


def subject_labels(subject: CohortSubject, shape=(48, 48, 48)) -> np.ndarray:
    """The tissue label map behind :func:`render_subject` (uint8, ``medgen.samples`` labels).

    Examples
    --------
    >>> from medgen import samples
    >>> s = cohort_subjects(1, seed=0, task="lesion")[1]
    >>> bool(np.any(subject_labels(s, (32, 32, 32)) == samples.LESION_HYPER))
    True
    """
    return _labels_and_affine(_check_subject(subject), _check_shape(shape))[0]


def _bias_field(subject: CohortSubject, shape) -> np.ndarray:
    """1 + a random quadratic in normalised grid coordinates, peak deviation bias_fraction."""
    rng = np.random.default_rng([subject.seed, 2])
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    terms = (x, y, z, x * x, y * y, z * z, x * y, y * z, x * z)
    field = sum(np.float32(c) * t for c, t in zip(rng.standard_normal(9), terms, strict=True))
    field = np.broadcast_to(field, shape)
    return 1.0 + subject.bias_fraction * field / (np.abs(field).max() + 1e-12)


def render_subject(subject: CohortSubject, shape=(48, 48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """Render one subject: T1-like intensities with texture, bias field and Rician noise.

    Parameters
    ----------
    subject : CohortSubject
    shape : 3 ints
        (I, J, K) along R, A, S, each >= 8. The same subject looks the same on any grid.

    Returns
    -------
    image : ndarray, float32, shape ``shape``
        Positive, arbitrary units: white matter about 700 (times its gain), grey matter
        ~480, CSF ~120, lesions ~1000.
    affine : ndarray, shape (4, 4)
        ``diag(*subject.spacing_mm, 1)`` (RAS), centred at 0 mm.

    Examples
    --------
    >>> s = cohort_subjects(1, seed=3)[0]
    >>> image, affine = render_subject(s, shape=(24, 24, 24))
    >>> image.shape, image.dtype.name, bool(image.min() > 0)
    ((24, 24, 24), 'float32', True)
    >>> bool(np.allclose(np.diag(affine)[:3], s.spacing_mm))
    True
    """
    from scipy.ndimage import gaussian_filter

    subject, shape = _check_subject(subject), _check_shape(shape)
    labels, affine = _labels_and_affine(subject, shape)
    values = (_NOMINAL_T1 * np.asarray(subject.tissue_gains)).astype(np.float32)
    image = values[labels]
    rng = np.random.default_rng([subject.seed, 1])
    # Texture: band-limited multiplicative grain, ~2 mm of the anatomical frame.
    head_mm_per_voxel = np.asarray(subject.spacing_mm) * _HEAD_FOV_MM / (
        min(shape) * REFERENCE_SPACING_MM
    )
    grain = gaussian_filter(rng.standard_normal(shape, np.float32),
                            np.maximum(2.0 / head_mm_per_voxel, 0.5))  # fmt: skip
    inside = labels != AIR
    image[inside] *= 1.0 + _TEXTURE_FRACTION * grain[inside] / (grain.std() + 1e-12)
    image = gaussian_filter(image, 0.45) * _bias_field(subject, shape)
    sigma = np.float32(subject.noise_fraction * values[WM])
    if sigma > 0:  # Rician: magnitude of a complex signal with Gaussian noise in both parts
        noise = rng.standard_normal((2, *shape), np.float32) * sigma
        image = np.hypot(image + noise[0], noise[1])
    return np.maximum(image, 1.0).astype(np.float32), affine


# ----------------------------------------------------------------------------------------
# Files: one NIfTI per subject plus labels.csv.

_PARAM_COLUMNS = ("head_scale", *_SPACING_NAMES, "bias_fraction", "noise_fraction",
                  "ventricle_scale", "sulcal_width_scale", "atrophy_fraction", "lesion_count",
                  "lesion_radius_fraction")  # fmt: skip
CSV_COLUMNS = ("file", "subject_id", "label", "age_years", "sex", "seed", *_PARAM_COLUMNS,
               *(f"gain_{name}" for name in TISSUE_NAMES))  # fmt: skip


def _row(subject: CohortSubject, file_name: str) -> list:
    values = dataclasses.asdict(subject)
    values.update(zip(_SPACING_NAMES, subject.spacing_mm, strict=True))
    values.update((f"gain_{n}", g) for n, g in zip(TISSUE_NAMES, subject.tissue_gains, strict=True))
    values["file"] = file_name
    return [values[column] for column in CSV_COLUMNS]


def read_cohort(csv_path: str | Path) -> list[CohortSubject]:
    """Read the subjects back from a :data:`COHORT_CSV` (exactly the written values).

    Raises :class:`medgen.errors.InputError` naming the file when a column is missing.
    """
    from medgen.errors import InputError

    csv_path = Path(csv_path)
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(csv_path, f"missing column(s) {', '.join(missing)}")
        rows = list(reader)
    ints = {"label", "sex", "seed", "lesion_count"}
    scalars = [f.name for f in dataclasses.fields(CohortSubject) if f.name in CSV_COLUMNS]
    return [
        CohortSubject(
            **{n: row[n] if n == "subject_id" else (int if n in ints else float)(row[n])
               for n in scalars},  # fmt: skip
            spacing_mm=tuple(float(row[c]) for c in _SPACING_NAMES),
            tissue_gains=tuple(float(row[f"gain_{n}"]) for n in TISSUE_NAMES),
        )
        for row in rows
    ]


def _write_subject(subject: CohortSubject, shape, path: Path) -> Path:
    from medgen.io.nifti import write_nifti
    from medgen.volume import Volume, VolumeMeta

    image, affine = render_subject(subject, shape)
    stored = np.clip(np.rint(image), -32768, 32767).astype(np.int16)
    meta = VolumeMeta(modality="MR", units="arbitrary", series_key=subject.subject_id)
    return write_nifti(Volume(stored, affine, meta), path)


def write_cohort(
    out_dir: str | Path,
    n_per_class: int = 10,
    seed: int = 0,
    shape=(48, 48, 48),
    task: CohortTask = "lesion",
    workers: int = 1,
) -> Path:
    """Render a cohort into ``out_dir``: ``sub-NNNN.nii.gz`` (int16) and :data:`COHORT_CSV`.

    Every file is written atomically (temporary name, then rename); existing files of the same
    names are replaced. The CSV is written last, so its presence means the cohort is complete.

    Parameters
    ----------
    out_dir : str or Path
        Created if missing.
    n_per_class, seed, task
        As for :func:`cohort_subjects`.
    shape : 3 ints
        Grid of every volume (the voxel size varies per subject).
    workers : int
        Processes to render with (1: in this process).

    Returns
    -------
    Path
        The CSV, with columns :data:`CSV_COLUMNS`; ``file`` is relative to its folder.
    """
    from medgen.io.atomic import atomic_path

    subjects = cohort_subjects(n_per_class, seed, task)
    shape = _check_shape(shape)
    workers = check_int("workers", workers, minimum=1)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ParameterError(f"`out_dir` must be a folder, got the file {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{s.subject_id}.nii.gz" for s in subjects]
    jobs = [(s, shape, out_dir / name) for s, name in zip(subjects, names, strict=True)]
    if workers == 1:
        for job in jobs:
            _write_subject(*job)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # safe even with threads in the parent
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
            list(pool.map(_write_subject, *zip(*jobs, strict=True)))
    csv_path = out_dir / COHORT_CSV
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(_row(s, name) for s, name in zip(subjects, names, strict=True))
    return csv_path
