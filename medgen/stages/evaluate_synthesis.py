"""``medgen evaluate-synthesis SYNTH_DIR --real REAL_DIR [--train TRAIN_DIR]``: is synthesis any good?

Compares a folder of synthetic NIfTI volumes with a folder of real ones (and, with
``--train``, with the generator's training volumes, to look for copies):

* Fréchet distance, RBF and linear MMD and a two-sample classifier AUC in the feature space
  of :mod:`medgen.metrics.features` (a contrastive 3D encoder medgen trains on the real, or
  training, volumes: *not* an Inception/Med3D space; metric names end in ``_medgen3d``);
* diversity (mean pairwise MS-SSIM) of the synthetic and of the real set, side by side;
* memorisation against the training set (nearest training volume, feature distance, NCC).

Preparation: every volume is reoriented to the closest canonical (RAS) axes and resampled
by trilinear interpolation onto the grid of the first synthetic volume (same shape and voxel
size, centres aligned: positions in the scanner are not compared), then its 0.5-99.5
percentiles are mapped onto [0, 1] (clipped). Results go to a JSON report and an MLflow run.

This module also holds the training and the files of the feature encoder
(:func:`train_feature_encoder`, :func:`save_feature_encoder`, :func:`load_feature_encoder`):
they use :mod:`medgen.training`, which ``medgen.metrics`` may not import.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from medgen.errors import InputError

if TYPE_CHECKING:
    from medgen.metrics.features import AugmentConfig, FeatureEncoder
    from medgen.volume import Volume

ENCODER_KIND = "medgen-feature-encoder"
PERCENTILES = (0.5, 99.5)
REPORT_ARTIFACT = "evaluate_synthesis.json"
ENCODER_ARTIFACT_DIR = "feature_encoder"

__all__ = [
    "evaluate_synthesis",
    "load_feature_encoder",
    "load_folder",
    "normalise_percentiles",
    "register",
    "save_feature_encoder",
    "synthesis_report",
    "train_feature_encoder",
    "volumes_on_grid",
]


# -- the feature encoder: training and files ----------------------------------------------


def train_feature_encoder(
    volumes: Any,
    *,
    steps: int = 200,
    batch_size: int = 8,
    feature_dim: int = 64,
    seed: int = 0,
    lr: float = 1e-3,
    out_path: str | Path | None = None,
    device: str = "auto",
    augment: AugmentConfig | None = None,
    temperature: float = 0.5,
) -> FeatureEncoder:
    """Train a :class:`~medgen.metrics.features.FeatureEncoder` contrastively on ``volumes``.

    The project's :class:`~medgen.training.trainer.Trainer` (AdamW, cosine schedule, gradient
    clipping) runs :class:`~medgen.metrics.features.ContrastiveObjective` on
    :class:`~medgen.metrics.features.ContrastiveBatches`; weights are initialised from
    ``seed`` and batch ``s`` depends only on ``(seed, s)``, so equal arguments give equal
    weights (on one device).

    Parameters
    ----------
    volumes : array_like, shape (N, D, H, W)
        Real volumes normalised to about [0, 1], N >= 2, sides >= 8 voxels.
    steps, batch_size, feature_dim, seed, lr
        Optimiser steps, volumes per batch (two views each), feature length, seed, learning rate.
    out_path : path, optional
        Also write the encoder there (:func:`save_feature_encoder`).
    device : {"auto", "cpu", "cuda"}
    augment : AugmentConfig, optional
    temperature : float
        NT-Xent temperature.

    Returns
    -------
    FeatureEncoder, in eval mode on the CPU, with ``provenance`` filled in.
    """
    import torch

    from medgen.metrics.features import (
        FEATURE_SPACE,
        AugmentConfig,
        ContrastiveBatches,
        ContrastiveObjective,
        FeatureEncoder,
        check_volume_stack,
    )
    from medgen.training.distributed import DistInfo, pick_device
    from medgen.training.trainer import Trainer
    from medgen.validate import check_int, check_positive

    vols = check_volume_stack("volumes", volumes, min_side=8)
    steps = check_int("steps", steps, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    lr = check_positive("lr", lr)
    augment = augment if augment is not None else AugmentConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = FeatureEncoder(feature_dim=feature_dim)
    batches = ContrastiveBatches(vols, batch_size=batch_size, seed=seed, augment=augment)
    provenance = {
        "feature_space": FEATURE_SPACE,
        "method": "SimCLR NT-Xent contrastive training on real volumes",
        "n_volumes": int(vols.shape[0]),
        "volume_shape": list(vols.shape[1:]),
        "steps": steps,
        "batch_size": batches.batch_size,
        "seed": seed,
        "lr": lr,
        "temperature": float(temperature),
        "augment": augment.to_dict(),
    }
    trainer = Trainer(
        encoder,
        ContrastiveObjective(temperature),
        batches,
        total_steps=steps,
        lr=lr,
        weight_decay=1e-4,
        warmup_steps=min(10, steps // 10),
        metadata={"kind": ENCODER_KIND, "provenance": provenance},
        dist=DistInfo(device=pick_device(device)),
        log_every=max(1, steps),
    )
    result = trainer.fit()
    provenance["final_loss"] = round(float(result.last_logs.get("loss", float("nan"))), 6)
    provenance["final_contrastive_accuracy"] = round(
        float(result.last_logs.get("contrastive_accuracy", float("nan"))), 6
    )
    encoder = encoder.cpu().eval()
    encoder.provenance = provenance
    if out_path is not None:
        save_feature_encoder(encoder, out_path)
    return encoder


def save_feature_encoder(encoder: FeatureEncoder, path: str | Path) -> Path:
    """Write weights, config and provenance as a medgen model file (atomic; loads with
    ``torch.load(weights_only=True)``)."""
    from medgen.metrics.features import FEATURE_SPACE, FEATURE_SPACE_DESCRIPTION
    from medgen.training.trainer import save_model_file

    metadata = {
        "kind": ENCODER_KIND,
        "feature_space": FEATURE_SPACE,
        "description": FEATURE_SPACE_DESCRIPTION,
        "config": encoder.config,
        "provenance": encoder.provenance,
    }
    return save_model_file(path, encoder, metadata)


def load_feature_encoder(path: str | Path) -> FeatureEncoder:
    """Read a file written by :func:`save_feature_encoder`; eval mode, on the CPU.

    Raises
    ------
    InputError
        The file is missing, not a medgen model file, or holds another kind of model.
    """
    from medgen.metrics.features import FeatureEncoder
    from medgen.training.checkpoint import MODEL_FORMAT, load_checkpoint

    payload = load_checkpoint(path)
    metadata = json.loads(payload.get("metadata_json") or "{}")
    if payload.get("format") != MODEL_FORMAT or metadata.get("kind") != ENCODER_KIND:
        raise InputError(
            path,
            f"not a medgen feature encoder (kind {metadata.get('kind')!r}); "
            "train one with evaluate-synthesis",
        )
    encoder = FeatureEncoder(**metadata["config"])
    encoder.load_state_dict(payload["model"])
    encoder.provenance = dict(metadata.get("provenance") or {})
    return encoder.eval()


# -- volumes onto one grid -----------------------------------------------------------------


def normalise_percentiles(values: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """Map the ``percentiles`` of ``values`` onto [0, 1] and clip; a constant volume -> zeros.

    Examples
    --------
    >>> normalise_percentiles(np.arange(201.0), (0, 50))[[0, 50, 100, 200]].tolist()
    [0.0, 0.5, 1.0, 1.0]
    """
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:
        return np.zeros(values.shape, np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def load_folder(folder: str | Path, option: str) -> list[tuple[Path, Volume]]:
    """The NIfTI volumes under ``folder`` (recursively, sorted by path); at least two.

    Raises
    ------
    InputError
        ``"<folder>: <option> holds no NIfTI files (.nii, .nii.gz)"`` or fewer than two.
    """
    from medgen.io.nifti import is_nifti_path
    from medgen.stages.common import load_volume

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, f"{option} must be a folder of NIfTI files")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and is_nifti_path(p) and not p.name.startswith(".")
    )
    if not files:
        raise InputError(folder, f"{option} holds no NIfTI files (.nii, .nii.gz)")
    if len(files) < 2:
        raise InputError(folder, f"{option} holds 1 NIfTI volume; at least 2 are needed to compare sets")
    return [(f, load_volume(f)) for f in files]


def volumes_on_grid(
    loaded: list[tuple[Path, Volume]], shape: tuple[int, ...], spacing: tuple[float, ...]
) -> np.ndarray:
    """Loaded volumes on the synthesis grid of ``shape`` x ``spacing`` (mm) centred on each
    (:func:`medgen.data.synthesis_data.onto_grid`: RAS, anti-aliased, linear), normalised by
    their percentiles: ``(N, *shape)`` float32 in [0, 1]."""
    from medgen.data.synthesis_data import onto_grid

    out = np.empty((len(loaded), *shape), np.float32)
    for i, (path, volume) in enumerate(loaded):
        if volume.array.ndim != 3:
            raise InputError(path, f"expected a 3D volume, got shape {volume.shape}")
        out[i] = normalise_percentiles(onto_grid(volume, shape, spacing)[0])
    return out


# -- the report ------------------------------------------------------------------------------


def synthesis_report(
    synth: Any,
    real: Any,
    train: Any | None,
    encoder: FeatureEncoder,
    *,
    seed: int = 0,
    diversity_pairs: int = 45,
) -> dict[str, Any]:
    """All synthesis metrics for prepared arrays (one grid, normalised to [0, 1]).

    Parameters
    ----------
    synth, real : array_like, shape (N, D, H, W) and (M, D, H, W)
    train : array_like, shape (K, D, H, W), optional
        The generator's training volumes: enables the memorisation check.
    encoder : FeatureEncoder
    seed : int
        Seed of the two-sample test's folds and of the pairs drawn for diversity.
    diversity_pairs : int
        At most this many pairs per set for the mean pairwise MS-SSIM.

    Returns
    -------
    dict
        ``metrics`` (MLflow names, ``synthesis/...``), ``feature_space`` (what the features
        are), ``reference_real_split`` (the same distances between two random halves of the
        real set: the floor a perfect generator reaches at that set size), ``memorisation``
        (or None), ``counts``, ``grid_shape``, ``notes``.
    """
    from medgen.metrics import generative as gm
    from medgen.metrics.features import FEATURE_SPACE, FEATURE_SPACE_DESCRIPTION, check_volume_stack
    from medgen.validate import ParameterError

    synth = check_volume_stack("synth", synth, min_side=8)
    real = check_volume_stack("real", real, min_side=8)
    train = None if train is None else check_volume_stack("train", train, min_side=8)
    for name, other in (("real", real), ("train", train)):
        if other is not None and other.shape[1:] != synth.shape[1:]:
            raise ParameterError(
                f"`{name}` volumes must be on the grid of `synth`, "
                f"got {other.shape[1:]} and {synth.shape[1:]}"
            )
    fs, fr = encoder.features(synth), encoder.features(real)
    fsp = FEATURE_SPACE
    bandwidth = gm.median_bandwidth(fr, fs)
    metrics = {
        f"synthesis/fid_{fsp}": gm.frechet_distance(fr, fs),
        f"synthesis/mmd_rbf_{fsp}": gm.mmd(fr, fs, kernel="rbf", bandwidth=bandwidth),
        f"synthesis/mmd_linear_{fsp}": gm.mmd(fr, fs, kernel="linear"),
        f"synthesis/two_sample_auc_{fsp}": gm.two_sample_auc(fr, fs, seed=seed),
        "synthesis/diversity_msssim_synth": gm.diversity(synth, max_pairs=diversity_pairs, seed=seed),
        "synthesis/diversity_msssim_real": gm.diversity(real, max_pairs=diversity_pairs, seed=seed),
    }
    notes: list[str] = []
    reference = None
    if real.shape[0] >= 4:
        order = np.random.default_rng(seed).permutation(real.shape[0])
        half_a, half_b = fr[order[: len(order) // 2]], fr[order[len(order) // 2 :]]
        reference = {
            f"fid_{fsp}": gm.frechet_distance(half_a, half_b),
            f"mmd_rbf_{fsp}": gm.mmd(half_a, half_b, kernel="rbf", bandwidth=bandwidth),
            "n_per_half": int(len(order) // 2),
        }
    smallest = min(synth.shape[0], real.shape[0])
    if smallest <= encoder.feature_dim:
        notes.append(
            f"{smallest} samples for {encoder.feature_dim} features: covariances are rank-deficient and "
            "the Fréchet distance is biased upwards; compare it only between runs with equal set sizes "
            "(see reference_real_split)"
        )
    memorisation = None
    if train is not None:
        report = gm.memorisation(fs, encoder.features(train), synth, train)
        memorisation = report.to_dict()
        metrics["synthesis/memorisation_fraction_flagged"] = report.fraction_flagged
        metrics["synthesis/memorisation_chance_fraction"] = report.chance_fraction
        if report.distance_threshold == 0.0 or report.ncc_threshold >= 1.0 - 1e-9:
            notes.append("the training set holds duplicate volumes: the memorisation thresholds flag nothing")
    return {
        "metrics": metrics,
        "feature_space": {
            "name": fsp,
            "description": FEATURE_SPACE_DESCRIPTION,
            "encoder_fingerprint": encoder.fingerprint(),
            "encoder_config": encoder.config,
            "encoder_provenance": encoder.provenance,
        },
        "mmd_rbf_bandwidth": bandwidth,
        "reference_real_split": reference,
        "memorisation": memorisation,
        "counts": {
            "synth": int(synth.shape[0]),
            "real": int(real.shape[0]),
            "train": None if train is None else int(train.shape[0]),
        },
        "grid_shape": list(synth.shape[1:]),
        "notes": notes,
    }


def evaluate_synthesis(
    synth_dir: str | Path,
    real_dir: str | Path,
    train_dir: str | Path | None = None,
    *,
    encoder: str | Path | FeatureEncoder | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    experiment: str = "medgen",
    out: str | Path | None = None,
    seed: int = 0,
    encoder_steps: int = 200,
) -> dict[str, Any]:
    """Load three folders, put them on one grid, compute :func:`synthesis_report`, log it.

    Parameters
    ----------
    synth_dir, real_dir : path
        Folders of NIfTI files (searched recursively), at least two each.
    train_dir : path, optional
        The generator's training volumes: memorisation is checked against them, and the
        encoder (when trained here) is trained on them instead of ``real_dir``.
    encoder : path or FeatureEncoder, optional
        An encoder file from an earlier run (``feature_encoder/encoder.pt`` of its MLflow run,
        or the ``.encoder.pt`` beside its report): only then are numbers comparable across
        runs. Default: train one here for ``encoder_steps`` steps with ``seed``.
    out : path, optional
        Write the JSON report there (and a trained encoder beside it, ``<stem>.encoder.pt``).

    Returns
    -------
    dict
        The report, plus ``files`` (file names per set, local only: not sent to MLflow),
        ``run_id`` and ``out``.
    """
    from medgen.io.atomic import atomic_write_bytes
    from medgen.metrics.features import FEATURE_SPACE, FEATURE_SPACE_DESCRIPTION
    from medgen.tracking import Tracker

    loaded_synth = load_folder(synth_dir, "SYNTH_DIR")
    loaded_real = load_folder(real_dir, "--real")
    loaded_train = load_folder(train_dir, "--train") if train_dir is not None else None
    first = loaded_synth[0][1]
    shape, spacing = tuple(first.shape[:3]), first.spacing_mm
    synth = volumes_on_grid(loaded_synth, shape, spacing)
    real = volumes_on_grid(loaded_real, shape, spacing)
    train = volumes_on_grid(loaded_train, shape, spacing) if loaded_train is not None else None

    trained_here = encoder is None
    if trained_here:
        on = "train" if train is not None else "real"
        enc = train_feature_encoder(train if train is not None else real, steps=encoder_steps, seed=seed)
        enc.provenance["trained_on"] = on
        source = f"trained here on the {on} volumes (seed {seed}, {encoder_steps} steps)"
    elif isinstance(encoder, (str, Path)):
        enc = load_feature_encoder(encoder)
        source = f"file {Path(encoder).name}"
    else:
        enc = encoder
        source = "given"
    report = synthesis_report(synth, real, train, enc, seed=seed)
    report["feature_space"]["encoder_source"] = source
    if trained_here and train is None:
        report["notes"].append(
            "the encoder was trained on the real volumes it compares with: they may sit apart from "
            "any unseen volume in its features; prefer --train (the encoder then trains on those) "
            "or a saved --encoder"
        )
    report["grid_spacing_mm"] = [round(float(s), 4) for s in spacing]
    report["normalisation"] = f"per volume: percentiles {PERCENTILES[0]}-{PERCENTILES[1]} -> [0, 1], clipped"

    tracker = Tracker(experiment, uri=tracking_uri)
    tags = {"medgen.stage": "evaluate-synthesis"}
    with (
        tracker.run("evaluate-synthesis", parent_id=parent_run_id, tags=tags) as run,
        tempfile.TemporaryDirectory(prefix="medgen-encoder-") as tmp,
    ):
        run.log_params(
            {
                "feature_space": FEATURE_SPACE,
                "feature_space.description": FEATURE_SPACE_DESCRIPTION,
                "feature_space.encoder_source": source,
                "feature_space.encoder_fingerprint": report["feature_space"]["encoder_fingerprint"],
                "feature_space.feature_dim": enc.feature_dim,
                "n_synth": report["counts"]["synth"],
                "n_real": report["counts"]["real"],
                "n_train": report["counts"]["train"],
                "grid.shape": list(shape),
                "grid.spacing_mm": report["grid_spacing_mm"],
                "normalisation": report["normalisation"],
                "seed": seed,
            }
        )
        run.log_metrics(report["metrics"])
        run.log_dict(report, REPORT_ARTIFACT)
        if trained_here:
            run.log_artifact(save_feature_encoder(enc, Path(tmp) / "encoder.pt"), ENCODER_ARTIFACT_DIR)
        run_id = run.run_id

    report["files"] = {
        "synth": [p.name for p, _ in loaded_synth],
        "real": [p.name for p, _ in loaded_real],
        "train": None if loaded_train is None else [p.name for p, _ in loaded_train],
    }
    report["run_id"] = run_id
    if out is not None:
        out = Path(out)
        if trained_here:
            encoder_file = save_feature_encoder(enc, out.with_name(out.name.split(".")[0] + ".encoder.pt"))
            report["feature_space"]["encoder_file"] = str(encoder_file)
        report["out"] = str(out)
        atomic_write_bytes(out, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    return report


# -- the command -----------------------------------------------------------------------------

_TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."
_FOLDER = {"exists": True, "file_okay": False, "dir_okay": True}


def evaluate_synthesis_command(
    synth_dir: Annotated[
        Path, typer.Argument(metavar="SYNTH_DIR", help="Folder of synthetic NIfTI volumes.", **_FOLDER)
    ],
    real: Annotated[
        Path, typer.Option("--real", metavar="REAL_DIR", help="Folder of real NIfTI volumes.", **_FOLDER)
    ],
    train: Annotated[
        Path | None,
        typer.Option(
            "--train", metavar="TRAIN_DIR", help="The generator's training volumes (memorisation check).",
            **_FOLDER,
        ),
    ] = None,
    encoder: Annotated[
        Path | None,
        typer.Option(
            "--encoder", exists=True, dir_okay=False,
            help="Feature encoder file from an earlier run (default: train one here).",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", metavar="REPORT.json", help="Write the JSON report here.")
    ] = None,
    encoder_steps: Annotated[
        int, typer.Option("--encoder-steps", min=1, help="Steps when training the encoder.")
    ] = 200,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Seed of encoder training, folds and pairs.")
    ] = 0,
    experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment.")] = "medgen",
    parent_run_id: Annotated[
        str | None, typer.Option("--parent-run-id", help="Nest the run under this MLflow run.")
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help=_TRACKING_HELP)] = None,
) -> None:
    """FID/MMD/two-sample AUC (medgen's own 3D feature space), diversity and memorisation of SYNTH_DIR."""
    from rich.console import Console

    report = evaluate_synthesis(
        synth_dir, real, train, encoder=encoder, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
        experiment=experiment, out=out, seed=seed, encoder_steps=encoder_steps,
    )
    console = Console(highlight=False, soft_wrap=True)
    space = report["feature_space"]
    console.print(f"feature space: {space['name']} ({space['encoder_source']})", markup=False)
    for key, value in report["metrics"].items():
        console.print(f"  {key} = {value:.4f}", markup=False)
    for note in report["notes"]:
        console.print(f"note: {note}", markup=False)
    console.print(f"MLflow run {report['run_id']}" + (f"; report {report['out']}" if out is not None else ""))


def register(app: typer.Typer) -> None:
    """Add ``evaluate-synthesis`` to ``app``."""
    app.command("evaluate-synthesis")(evaluate_synthesis_command)
