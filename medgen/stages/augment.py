"""Does synthetic data help a classifier? Real-only against real + synthetic, paired by seed.

The ``augment`` pipeline stage (:class:`AugmentStep`, :func:`run_augment_experiment`):

1. the labelled scans: a phantom cohort written by :func:`medgen.samples_cohort.write_cohort`
   (``cohort:``) or a labels CSV of real data (``labels_csv:``, 0/1 labels);
2. a deterministic split stratified by label: ``n_train_per_class`` training scans per class
   and ``n_test_per_class`` held-out test scans per class (``split/train.csv``, ``test.csv``);
3. the synthesis model: trained here on the *training split only* from an autoencoder and a
   latent diffusion preset (:func:`medgen.stages.train.train`, nested runs), or given
   (a model file or MLflow URI, or ``"latest"``: the latest ``train`` stage of the pipeline;
   then make sure it never saw the test scans);
4. for every seed: a classifier on the real training scans only (arm ``real``), and one per
   ratio ``r`` on the real scans plus ``round(r * n_train_per_class)`` generated volumes per
   class (arm ``synth-<r>x``, class-balanced through the label condition), and (unless
   ``synthetic_only: false``) one on the largest ratio's synthetic volumes alone (arm
   ``synth-only``: train on synthetic, test on real - does the generator carry the class at
   all?). Every arm of a seed starts from the same initial weights (the seed), so arms are
   compared *paired*: the table holds ``auc_diff = auc(arm) - auc(real)`` per seed.
   Synthetic sets are nested: item ``i`` of a class does not depend on how many are drawn, so
   the 1x set is a prefix of the 2x set;
5. AUC and accuracy on the held-out real test scans; mean and sample standard deviation
   (ddof 1) over seeds per arm, and of the paired differences, with a verdict: "helps" when
   the mean difference minus two standard errors is > 0, "hurts" when the mean plus two
   standard errors is < 0, else "no clear difference".

The spread is over training randomness (initial weights, batch order, augmentation, which
synthetic volumes): the real training and test scans are the same for every seed, since the
generator is trained once on exactly the real training scans.

Outputs in ``out/``: ``cohort/`` (when generated), ``split/``, ``generator/`` (derived configs,
trained models), ``synthetic/`` (the generated volumes, a cache keyed by model and request),
``results.csv`` (one row per arm and seed) and ``summary.json``; the MLflow run holds the
summary as metrics (``<arm>/auc_mean``, ``<arm>/auc_diff_mean``, ...), per-seed metrics
(``<arm>/auc`` at step = seed) and both files under ``augment/``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from medgen.errors import ConfigError
from medgen.validate import ParameterError

__all__ = ["Arm", "AugmentResult", "AugmentStep", "arm_name", "arms_of", "run_augment_experiment", "split_train_test", "summarise"]

EXPERIMENT_NAME = "medgen-augment"
REAL_ARM = "real"
SYNTHETIC_ONLY_ARM = "synth-only"
#: Grid spacing for a generated phantom cohort: the phantom head spans ~88 % of the shortest
#: axis at 1.25 mm (medgen.samples_cohort), so 1.4 mm keeps every head, with some air, in view.
COHORT_GRID_SPACING_MM = 1.4
TABLE_COLUMNS = ("arm", "ratio", "seed", "n_real", "n_synthetic", "auc", "accuracy", "auc_diff",
                 "accuracy_diff", "train_seconds")  # fmt: skip

Triple = Annotated[list[PositiveInt], Field(min_length=3, max_length=3)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CohortSection(_Section):
    """A phantom cohort to write (:func:`medgen.samples_cohort.write_cohort`)."""

    n_per_class: PositiveInt = 36
    seed: int = Field(0, ge=0)
    task: Literal["lesion", "ventricles"] = "ventricles"
    shape_vox: Triple = [32, 32, 32]


class GridSection(_Section):
    """The common grid every scan is resampled onto (and the generator is trained on)."""

    shape_vox: Triple
    spacing_mm: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=3, max_length=3)]


class ClassifierSection(_Section):
    """:class:`medgen.augment.classifier.ClassifierSettings` and the step count."""

    steps: PositiveInt = 200
    batch_size: PositiveInt = 8
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    block_inplanes: Annotated[list[PositiveInt], Field(min_length=4, max_length=4)] = [8, 16, 32, 64]
    layers: Annotated[list[PositiveInt], Field(min_length=4, max_length=4)] = [1, 1, 1, 1]
    augment: bool = True


class SamplingSection(_Section):
    """How synthetic volumes are sampled (None: the model's defaults)."""

    sampler: Literal["ddpm", "ddim", "rflow"] | None = None
    steps: PositiveInt | None = None
    guidance_scale: float | None = Field(None, ge=0)


class AugmentStep(_Section):
    """The ``augment`` stage of a pipeline file (paths relative to the pipeline file).

    Exactly one of ``labels_csv`` / ``cohort``; ``synthesis_model`` or both
    ``autoencoder_config`` and ``latent_diffusion_config``.
    """

    out: Path
    labels_csv: Path | None = None
    cohort: CohortSection | None = None
    synthesis_model: str | None = None  # file / URI, or "latest": the latest train stage's model
    autoencoder_config: Path | None = None
    latent_diffusion_config: Path | None = None
    grid: GridSection | None = None
    n_train_per_class: PositiveInt = 16
    n_test_per_class: PositiveInt | None = 20  # None: every scan not in the training split
    split_seed: int = Field(0, ge=0)
    ratios: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] = [1.0, 2.0]
    seeds: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = [0, 1, 2, 3, 4]
    synthetic_only: bool = True  # also train on synthetic volumes alone (as many as the largest ratio)
    classifier: ClassifierSection = Field(default_factory=ClassifierSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> AugmentStep:
        if (self.labels_csv is None) == (self.cohort is None):
            raise ValueError("give exactly one of `labels_csv` (real data) or `cohort` (a phantom cohort to write)")
        presets = (self.autoencoder_config is not None, self.latent_diffusion_config is not None)
        if self.synthesis_model is None and not all(presets):
            raise ValueError("give `synthesis_model` (file, URI or 'latest'), or both `autoencoder_config` and "
                             "`latent_diffusion_config` to train one on the training split")  # fmt: skip
        if self.synthesis_model is not None and any(presets):
            raise ValueError("give `synthesis_model` or the two generator configs, not both")
        for name in ("ratios", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"`{name}` must not repeat a value, got {values}")
        if self.cohort is not None and self.n_test_per_class is not None:
            need = self.n_train_per_class + self.n_test_per_class
            if self.cohort.n_per_class < need:
                raise ValueError(f"`cohort.n_per_class` must be >= n_train_per_class + n_test_per_class = {need}, "
                                 f"got {self.cohort.n_per_class}")  # fmt: skip
        return self


@dataclass
class AugmentResult:
    """What :func:`run_augment_experiment` measured (``summary`` as in ``summary.json``)."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    run_id: str | None
    table_path: Path
    summary_path: Path
    model: str
    timings: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """Per arm: AUC and accuracy mean ± std, and the paired difference against real-only."""
        lines = [f"{'arm':<12} {'n_synth':>7} {'AUC':>15} {'accuracy':>15} {'AUC - real':>16}  verdict"]
        for arm, s in self.summary["arms"].items():
            diff = f"{s['auc_diff_mean']:+.3f} ± {s['auc_diff_std']:.3f}" if "auc_diff_mean" in s else ""
            lines.append(f"{arm:<12} {s['n_synthetic']:>7d} {s['auc_mean']:>7.3f} ± {s['auc_std']:.3f} "
                         f"{s['accuracy_mean']:>7.3f} ± {s['accuracy_std']:.3f} {diff:>16}  {s.get('verdict', '')}")  # fmt: skip
        return "\n".join(lines)


def arm_name(ratio: float | None) -> str:
    """``"real"`` for real-only, ``"synth-<ratio>x"`` for real + ratio x synthetic.

    Examples
    --------
    >>> arm_name(None), arm_name(1.0), arm_name(0.5)
    ('real', 'synth-1x', 'synth-0.5x')
    """
    return REAL_ARM if ratio is None else f"synth-{float(ratio):g}x"


def synthetic_seed(seed: int, label: int) -> int:
    """The SyntheticDataset seed of class ``label`` in experiment seed ``seed`` (classes get
    independent noise, not the same noise under two conditions)."""
    return int(np.random.SeedSequence([int(seed), int(label), 0xA06]).generate_state(1)[0] >> 1)


def split_train_test(records: Sequence[Any], n_train_per_class: int, n_test_per_class: int | None, seed: int = 0):
    """Stratified split: per label, a seeded permutation; the first ``n_train_per_class`` train,
    the next ``n_test_per_class`` (default: all the rest) test.

    Raises
    ------
    ParameterError
        A label without enough scans, or labels other than 0/1.
    """
    labels = sorted({r.label for r in records}, key=lambda v: (v is None, v))
    if labels != [0, 1]:
        raise ParameterError(f"the classifier needs labels 0 and 1, got {labels}")
    train, test = [], []
    for label in labels:
        group = [r for r in records if r.label == label]
        need = n_train_per_class + (n_test_per_class or 1)
        if len(group) < need:
            raise ParameterError(f"label {label} has {len(group)} scans; n_train_per_class + n_test_per_class needs {need}")
        order = np.random.default_rng([seed, label]).permutation(len(group))
        train += [group[i] for i in order[:n_train_per_class]]
        end = None if n_test_per_class is None else n_train_per_class + n_test_per_class
        test += [group[i] for i in order[n_train_per_class:end]]
    return train, test


def _write_split(records, path: Path) -> Path:
    from medgen.io.atomic import atomic_write_bytes

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "label"])
    writer.writerows([str(Path(r.path).resolve()), r.label] for r in records)
    return atomic_write_bytes(path, buffer.getvalue().encode())


def _stats(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm: AUC/accuracy mean and std over seeds; for synthetic arms also the paired
    differences against ``real`` (mean, std, standard error, wins) and the verdict."""
    arms: dict[str, dict[str, Any]] = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        s: dict[str, Any] = {"ratio": mine[0]["ratio"], "n_real": mine[0]["n_real"],
                             "n_synthetic": mine[0]["n_synthetic"], "n_seeds": len(mine)}  # fmt: skip
        for metric in ("auc", "accuracy"):
            s[f"{metric}_mean"], s[f"{metric}_std"] = _stats([r[metric] for r in mine])
        if arm != REAL_ARM:
            for metric in ("auc", "accuracy"):
                diffs = [r[f"{metric}_diff"] for r in mine]
                mean, std = _stats(diffs)
                s[f"{metric}_diff_mean"], s[f"{metric}_diff_std"] = mean, std
                s[f"{metric}_diff_se"] = std / np.sqrt(len(diffs))
                s[f"{metric}_wins"] = int(sum(d > 0 for d in diffs))
            low = s["auc_diff_mean"] - 2 * s["auc_diff_se"]
            high = s["auc_diff_mean"] + 2 * s["auc_diff_se"]
            s["verdict"] = "helps" if low > 0 else "hurts" if high < 0 else "no clear difference"
        arms[arm] = s
    return arms


# -- the generator ---------------------------------------------------------------------------
def _derived_config(preset: Path, out: Path, updates: Mapping[str, Any]) -> Path:
    """``preset`` with dotted ``updates`` applied, written to ``out`` (paths made absolute)."""
    import yaml

    from medgen.io.atomic import atomic_write_bytes

    try:
        config = yaml.safe_load(preset.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{preset}: cannot read config ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{preset}: expected a mapping at the top level")
    weights = ((config.get("training") or {}).get("loss") or {}).get("perceptual_weights")
    if weights and not Path(weights).is_absolute():
        updates = {**updates, "training.loss.perceptual_weights": str((preset.parent / weights).resolve())}
    for dotted, value in updates.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{preset}: `{key}` must be a mapping")
        node[leaf] = value
    return atomic_write_bytes(out, yaml.safe_dump(config, sort_keys=False).encode())


def _train_generator(step: AugmentStep, train_csv: Path, grid: GridSection | None, experiment: str,
                     tracking_uri: str | None, parent_run_id: str, progress: bool) -> str:  # fmt: skip
    """Autoencoder, then class-conditional latent diffusion, on the training split only."""
    from medgen.stages.train import train

    folder = step.out / "generator"
    common: dict[str, Any] = {"experiment": experiment, "data.labels_csv": str(train_csv)}
    if grid is not None:
        common["data.grid"] = grid.model_dump()
    ae_cfg = _derived_config(step.autoencoder_config, folder / "autoencoder.yaml",
                             {**common, "training.out_dir": str(folder / "autoencoder")})  # fmt: skip
    ae = train(ae_cfg, tracking_uri=tracking_uri, parent_run_id=parent_run_id, progress=progress)
    ldm_cfg = _derived_config(step.latent_diffusion_config, folder / "latent_diffusion.yaml", {
        **common, "training.out_dir": str(folder / "latent_diffusion"),
        "model.latent_diffusion.autoencoder": str(ae.model_path), "model.latent_diffusion.num_classes": 2,
    })  # fmt: skip
    ldm = train(ldm_cfg, tracking_uri=tracking_uri, parent_run_id=parent_run_id, progress=progress)
    return str(ldm.model_path)


# -- the experiment --------------------------------------------------------------------------
def _records(step: AugmentStep):
    from medgen.data.synthesis_data import read_labels_csv

    if step.cohort is not None:
        from medgen.samples_cohort import write_cohort

        c = step.cohort
        csv_path = write_cohort(step.out / "cohort", c.n_per_class, c.seed, tuple(c.shape_vox), c.task)
        return read_labels_csv(csv_path, need_label=True)
    return read_labels_csv(step.labels_csv, need_label=True)


def _default_grid(step: AugmentStep) -> GridSection | None:
    if step.grid is not None or step.cohort is None or step.synthesis_model is not None:
        return step.grid
    return GridSection(shape_vox=list(step.cohort.shape_vox), spacing_mm=[COHORT_GRID_SPACING_MM] * 3)


def _params(step: AugmentStep) -> dict[str, Any]:
    """The step as MLflow params, without local paths (folder names may name people)."""
    from medgen.tracking import flatten_config, is_model_uri

    data = step.model_dump(mode="json", exclude={"out", "labels_csv", "autoencoder_config", "latent_diffusion_config"})
    if data.get("synthesis_model") and not is_model_uri(data["synthesis_model"]) and data["synthesis_model"] != "latest":
        data["synthesis_model"] = Path(data["synthesis_model"]).name
    return flatten_config(data)


def run_augment_experiment(
    step: AugmentStep | Mapping[str, Any],
    *,
    latest_model: str | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    experiment: str = EXPERIMENT_NAME,
    progress: bool = False,
) -> AugmentResult:
    """Run the experiment described by ``step`` (see the module docstring).

    Parameters
    ----------
    step : AugmentStep or mapping
        A mapping is validated first (unknown keys and wrong types stop before any work).
    latest_model : str, optional
        What ``synthesis_model: latest`` means (the pipeline's latest train stage).
    tracking_uri, parent_run_id, experiment
        MLflow store, the pipeline's parent run (this run nests under it), experiment name.
    progress : bool
        Progress bars while the generator trains.

    Raises
    ------
    ConfigError, ParameterError, InputError
        One line each: a bad step, too few scans per class, a grid other than the model's,
        an unreadable scan or model.
    """
    import torch

    from medgen.tracking import Tracker

    step = _validated(step)
    model_ref = step.synthesis_model
    if model_ref == "latest":
        if latest_model is None:
            raise ConfigError("augment: `synthesis_model: latest` needs a train stage before it")
        model_ref = latest_model
    device = step.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(step.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    tracker = Tracker(experiment, uri=tracking_uri)
    with tracker.run("augment-classifier", parent_id=parent_run_id, tags={"medgen.stage": "augment"}) as run:
        run.log_params(_params(step))
        started = time.perf_counter()
        train_records, test_records = split_train_test(_records(step), step.n_train_per_class,
                                                       step.n_test_per_class, step.split_seed)  # fmt: skip
        train_csv = _write_split(train_records, out / "split" / "train.csv")
        _write_split(test_records, out / "split" / "test.csv")
        timings["data_seconds"] = time.perf_counter() - started
        if model_ref is None:
            started = time.perf_counter()
            model_ref = _train_generator(step, train_csv, _default_grid(step), experiment, tracking_uri,
                                         run.run_id, progress)  # fmt: skip
            timings["generator_train_seconds"] = time.perf_counter() - started
        sets = _SyntheticSets(step, model_ref, device, tracking_uri)
        started = time.perf_counter()
        real = [_real_arrays(records, sets.first) for records in (train_records, test_records)]
        timings["real_load_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        synthetic, n_cached = sets.arrays()
        timings["synthetic_seconds_per_volume"] = (time.perf_counter() - started) / max(sets.n_volumes, 1)
        timings["synthetic_cached_fraction"] = n_cached / max(sets.n_volumes, 1)
        rows = _run_arms(step, device, real, synthetic, run)
        timings["classifier_train_seconds_mean"] = float(np.mean([r["train_seconds"] for r in rows]))
        arms = summarise(rows)
        summary = {
            "arms": arms, "seeds": list(step.seeds), "ratios": list(step.ratios),
            "n_train_per_class": step.n_train_per_class, "n_test": len(real[1][1]),
            "grid": {"shape_vox": list(sets.first.shape_vox), "spacing_mm": list(sets.first.spacing_mm)},
            "model": _shareable(model_ref), "model_sha256": sets.first.model_sha256,
            "classifier_steps": step.classifier.steps, "device": device, "timings": timings,
            "spread": "std over seeds (ddof 1): training randomness and synthetic draws; real train/test fixed",
        }  # fmt: skip
        table_path, summary_path = _log_results(run, rows, summary, out)
        run_id = run.run_id
    return AugmentResult(rows, summary, run_id, table_path, summary_path, str(model_ref), timings)


def _validated(step: AugmentStep | Mapping[str, Any]) -> AugmentStep:
    if isinstance(step, AugmentStep):
        return step
    try:
        return AugmentStep.model_validate(dict(step))
    except ValidationError as exc:
        from medgen.config import format_validation_error

        raise ConfigError(format_validation_error("augment", exc)) from None


def _shareable(model_ref: str) -> str:
    """A model URI as it is; a local file by its name only (folders may name people)."""
    from medgen.tracking import is_model_uri

    return model_ref if is_model_uri(model_ref) else Path(model_ref).name


class _SyntheticSets:
    """One :class:`SyntheticDataset` per (seed, label), as long as the largest ratio needs;
    smaller ratios take a prefix (item ``i`` does not depend on the length)."""

    def __init__(self, step: AugmentStep, model_ref: str, device: str, tracking_uri: str | None) -> None:
        from medgen.augment.dataset import SyntheticDataset

        n = max(arm.n_synthetic_per_class for arm in arms_of(step))
        sampling = step.sampling.model_dump()
        self.datasets = {
            (seed, label): SyntheticDataset(model_ref, n, {"label": label}, synthetic_seed(seed, label),
                                            cache_dir=Path(step.out) / "synthetic", device=device,
                                            tracking_uri=tracking_uri, **sampling)  # fmt: skip
            for seed in step.seeds for label in (0, 1)
        }
        self.first = next(iter(self.datasets.values()))
        self.n_volumes = n * len(self.datasets)
        grid = step.grid
        if grid is not None and (list(self.first.shape_vox) != list(grid.shape_vox)
                                 or not np.allclose(self.first.spacing_mm, grid.spacing_mm)):  # fmt: skip
            model_grid = {"shape_vox": list(self.first.shape_vox), "spacing_mm": list(self.first.spacing_mm)}
            raise ParameterError(f"`grid` {grid.model_dump()} differs from the synthesis model's grid {model_grid}: "
                                 "drop `grid` or use a model trained on it")  # fmt: skip

    def arrays(self) -> tuple[dict[tuple[int, int], np.ndarray], int]:
        """Normalised volumes ``(n, D, H, W)`` per (seed, label), and how many came from the cache."""
        out, cached = {}, 0
        for key, ds in self.datasets.items():
            cached += sum(ds.is_cached(i) for i in range(len(ds)))
            out[key] = np.stack([ds[i]["image"][0].numpy() for i in range(len(ds))])
        return out, cached


def _real_arrays(records, synth) -> tuple[np.ndarray, np.ndarray]:
    """Normalised real scans ``(N, D, H, W)`` on the model's grid, and their labels."""
    from medgen.augment.dataset import CohortDataset

    ds = CohortDataset(records, synth.shape_vox, synth.spacing_mm, cache=False)
    return np.stack([ds.values(i) for i in range(len(ds))]), np.array([r.label for r in records])


@dataclass(frozen=True)
class Arm:
    """One way of training: ``n_synthetic_per_class`` generated volumes per class, with the
    real training scans or without them; ``ratio`` is synthetic:real per class."""

    name: str
    ratio: float
    n_synthetic_per_class: int
    with_real: bool = True


def arms_of(step: AugmentStep) -> list[Arm]:
    """``real``, then ``synth-<r>x`` per ratio, then ``synth-only`` (the largest ratio's volumes)."""
    arms = [Arm(REAL_ARM, 0.0, 0)]
    for r in step.ratios:
        n = int(round(r * step.n_train_per_class))
        if n < 1:
            raise ParameterError(f"`ratios` {r:g} gives no synthetic volume with n_train_per_class "
                                 f"{step.n_train_per_class}: use a ratio >= {0.5 / step.n_train_per_class:g}")  # fmt: skip
        arms.append(Arm(arm_name(r), float(r), n))
    if step.synthetic_only:
        top = max(step.ratios)
        arms.append(Arm(SYNTHETIC_ONLY_ARM, float(top), int(round(top * step.n_train_per_class)), with_real=False))
    return arms


def _run_arms(step: AugmentStep, device: str, real, synthetic, run) -> list[dict[str, Any]]:
    """Per seed, every arm (real-only first); one table row each, differences against real-only."""
    from medgen.augment.classifier import ClassifierSettings, evaluate, train_classifier

    c = step.classifier
    settings = ClassifierSettings(tuple(c.block_inplanes), tuple(c.layers), c.batch_size, c.lr, c.weight_decay, c.augment)
    (x_train, y_train), (x_test, y_test) = real
    rows: list[dict[str, Any]] = []
    for seed in step.seeds:
        baseline: dict[str, float] = {}
        for arm in arms_of(step):
            n = arm.n_synthetic_per_class
            images = ([x_train] if arm.with_real else []) + [synthetic[(seed, label)][:n] for label in (0, 1)]
            labels = ([y_train] if arm.with_real else []) + [np.full(n, label) for label in (0, 1)]
            started = time.perf_counter()
            model = train_classifier(np.concatenate(images), np.concatenate(labels), steps=c.steps, seed=seed,
                                     settings=settings, device=device)  # fmt: skip
            seconds = time.perf_counter() - started
            scores = evaluate(model, x_test, y_test)
            row = {"arm": arm.name, "ratio": arm.ratio, "seed": seed, "n_real": len(y_train) if arm.with_real else 0,
                   "n_synthetic": 2 * n, **scores, "auc_diff": None, "accuracy_diff": None,
                   "train_seconds": seconds}  # fmt: skip
            if arm.name == REAL_ARM:
                baseline = scores
            else:
                row["auc_diff"] = scores["auc"] - baseline["auc"]
                row["accuracy_diff"] = scores["accuracy"] - baseline["accuracy"]
            rows.append(row)
            run.log_metrics({f"{arm.name}/auc": scores["auc"], f"{arm.name}/accuracy": scores["accuracy"]}, step=seed)
    return rows


def _log_results(run, rows, summary: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """results.csv and summary.json in ``out`` and in the run; the summary as metrics."""
    from medgen.io.atomic import atomic_write_bytes

    table_path = _write_table(rows, out / "results.csv")
    summary_path = atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    arms = summary["arms"]
    metrics = {f"{arm}/{k}": v for arm, s in arms.items() for k, v in s.items()
               if k.startswith(("auc_", "accuracy_")) and not k.endswith("_wins")}  # fmt: skip
    metrics.update({f"time/{k}": v for k, v in summary["timings"].items()})
    run.log_metrics(metrics)
    run.log_artifact(table_path, "augment")
    run.log_artifact(summary_path, "augment")
    run.set_tags({f"medgen.augment.{arm}": s["verdict"] for arm, s in arms.items() if "verdict" in s})
    return table_path, summary_path


def _write_table(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    from medgen.io.atomic import atomic_write_bytes

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row[k] is None else f"{row[k]:.6g}" if isinstance(row[k], float) else row[k])
                         for k in TABLE_COLUMNS})  # fmt: skip
    return atomic_write_bytes(path, buffer.getvalue().encode())
