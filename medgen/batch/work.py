"""The work on one study, as a worker process or a Ray actor does it.

A :class:`StudyWorker` holds the pipeline and, once loaded, the model: it is built once per
worker and reused for every study it is given. :meth:`StudyWorker.run` takes a
:class:`StudyTask` and runs the study's remaining stages in order, handing each stage's
:class:`StageOutcome` to a callback as soon as the stage is over; it never raises for a bad
study (a failure becomes the outcome's one-line ``reason`` and the study stops there).
Every file is written atomically to its final name under ``OUT/studies/<key>/``, so an
outcome only ever names complete files.

Layout of a study folder (``<stem>`` is the ingest's pseudonymous output stem)::

    <stem>.nii.gz, <stem>.json                    ingest
    <stem>_enhanced.nii.gz, <stem>_enhanced.json  enhance
    <stem>_enhanced_dicom/IM_*.dcm                export (dicom: true)
    <stem>_montage.png                            export (montage: true)
    metrics.json                                  metrics
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgen.archive.ledger import file_sha256, one_line
from medgen.batch.spec import IDENTITY_MODEL, BatchPipeline

STUDIES_DIR = "studies"
ENHANCED_SUFFIX = "_enhanced.nii.gz"


@dataclass(frozen=True)
class StudyTask:
    """What a worker needs for one study (picklable).

    ``series`` is the ingest's :class:`~medgen.stages.ingest_plan.SeriesTask` (absolute input
    paths); ``stages`` the stages still to run, in order; ``fingerprints`` one per stage;
    ``volumes`` the ingested volume names (relative to OUT) when ingest is already done.
    """

    key: str
    series: Any
    out: str
    stages: tuple[str, ...]
    fingerprints: dict[str, str]
    volumes: tuple[str, ...] = ()


@dataclass
class StageOutcome:
    """How one stage of one study ended. ``outputs``: ``(name, size, sha256)`` relative to
    OUT; ``reason``: one line when ``ok`` is False."""

    key: str
    stage: str
    ok: bool
    fingerprint: str
    seconds: float
    outputs: list[tuple[str, int, str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    volumes: list[str] = field(default_factory=list)
    reason: str = ""


def study_dir(out: str | Path, key: str) -> Path:
    """``OUT/studies/<key>``."""
    return Path(out) / STUDIES_DIR / key


def describe(out: Path, names: list[str]) -> list[tuple[str, int, str]]:
    """``(name, size, sha256)`` for files (folders: every file inside), names relative to OUT."""
    found: list[tuple[str, int, str]] = []
    for name in names:
        path = out / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            found.append((f.relative_to(out).as_posix(), f.stat().st_size, file_sha256(f)))
    return found


class StudyWorker:
    """Runs studies through a batch pipeline; loads the model on first use and keeps it.

    Parameters
    ----------
    pipeline : BatchPipeline
    worker_id : str
        Named in the ledger while this worker runs a study.
    device_index : int
        Which GPU this worker's model lives on (modulo the GPUs there are): one model
        instance per GPU when there are as many workers as GPUs.
    """

    def __init__(self, pipeline: BatchPipeline, worker_id: str = "w0", device_index: int = 0) -> None:
        self.pipeline = pipeline
        self.worker_id = worker_id
        self.device_index = int(device_index)
        self._loaded = None
        self._device = None
        self.models_loaded = 0  # how many times a model was read (1 per worker is the goal)

    def run(self, task: StudyTask, emit: Callable[[StageOutcome], None]) -> list[StageOutcome]:
        """Run ``task.stages`` in order; stop after the first failure."""
        volumes = list(task.volumes)
        done: list[StageOutcome] = []
        for stage in task.stages:
            started = time.perf_counter()
            fp = task.fingerprints[stage]
            try:
                outcome = getattr(self, f"_{stage}")(task, volumes)
                outcome.fingerprint, outcome.seconds = fp, time.perf_counter() - started
            except Exception as exc:  # noqa: BLE001 - one bad study must not stop the batch
                outcome = StageOutcome(task.key, stage, False, fp, time.perf_counter() - started,
                                       reason=_reason(exc, task))
            if stage == "ingest" and outcome.ok:
                volumes = outcome.volumes
            done.append(outcome)
            emit(outcome)
            if not outcome.ok:
                break
        return done

    # -- stages -------------------------------------------------------------------------

    def _ingest(self, task: StudyTask, volumes: list[str]) -> StageOutcome:
        from medgen.stages.ingest_run import convert_task

        out = Path(task.out)
        folder = study_dir(out, task.key)
        folder.mkdir(parents=True, exist_ok=True)
        series = dataclasses.replace(task.series, dst=str(folder))
        result = convert_task(series)
        if result.error is not None:
            where = ""
            if result.error_path and result.error_path in series.rel_files:
                where = f" (file {series.rel_files.index(result.error_path) + 1} of {len(series.rel_files)})"
            return StageOutcome(task.key, "ingest", False, "", 0.0,
                                reason=_scrub(result.error, task) + where)
        names = [f"{STUDIES_DIR}/{task.key}/{n}" for n, _ in result.outputs]
        vols = [f"{STUDIES_DIR}/{task.key}/{n}" for n in result.volumes]
        return StageOutcome(task.key, "ingest", True, "", 0.0, outputs=describe(out, names), volumes=vols)

    def _enhance(self, task: StudyTask, volumes: list[str]) -> StageOutcome:
        from medgen.io import save
        from medgen.stages.common import load_volume

        out = Path(task.out)
        written: list[str] = []
        for name in volumes:
            volume = load_volume(out / name)
            result = self._enhance_volume(volume)
            target = enhanced_name(name)
            save(result, out / target, sidecar=True)
            written += [target, target[: -len(".nii.gz")] + ".json"]
        return StageOutcome(task.key, "enhance", True, "", 0.0, outputs=describe(out, written))

    def _export(self, task: StudyTask, volumes: list[str]) -> StageOutcome:
        from medgen.batch.montage import comparison_montage
        from medgen.io.dicom_writer import write_dicom_series
        from medgen.stages.common import load_volume

        settings = self.pipeline.settings("export")
        out = Path(task.out)
        written: list[str] = []
        for name in volumes:
            enhanced = load_volume(out / enhanced_name(name))
            stem = name[: -len(".nii.gz")]
            if settings.dicom:
                folder = f"{stem}_enhanced_dicom"
                write_dicom_series(enhanced, out / folder, series_description="medgen batch enhanced",
                                   overwrite=True, uid_seed=f"{task.key}/{Path(stem).name}",
                                   created=_fixed_time())
                written.append(folder)
            if settings.montage:
                picture = f"{stem}_montage.png"
                comparison_montage(load_volume(out / name), enhanced, out / picture)
                written.append(picture)
        return StageOutcome(task.key, "export", True, "", 0.0, outputs=describe(out, written))

    def _metrics(self, task: StudyTask, volumes: list[str]) -> StageOutcome:
        from medgen.io.atomic import atomic_write_bytes
        from medgen.stages.common import load_volume

        out = Path(task.out)
        per_volume: dict[str, dict[str, float]] = {}
        for name in volumes:
            before = load_volume(out / name).values(np.float32)
            after = load_volume(out / enhanced_name(name)).values(np.float32)
            per_volume[Path(name).name] = change_metrics(before, after, self.pipeline.settings("metrics").foreground)
        first = next(iter(per_volume.values()), {})
        target = f"{STUDIES_DIR}/{task.key}/metrics.json"
        atomic_write_bytes(out / target, json.dumps(per_volume, indent=2, sort_keys=True).encode())
        return StageOutcome(task.key, "metrics", True, "", 0.0, outputs=describe(out, [target]),
                            metrics=dict(first))

    # -- the model ----------------------------------------------------------------------

    def _enhance_volume(self, volume):
        settings = self.pipeline.settings("enhance")
        if settings.model == IDENTITY_MODEL:
            meta = volume.meta.copy()
            meta.provenance.append("batch identity stage (output = input)")
            from medgen.volume import Volume

            return Volume(volume.values(np.float32), volume.affine, meta)
        from medgen.inference.enhance import enhance_with

        loaded, dev = self._model()
        result = enhance_with(loaded, volume, device=dev, overlap=settings.overlap, seed=settings.seed)
        if settings.adapt_seconds <= 0:
            return result.volume
        from medgen.adapt.with_model import adapt_with_model
        from medgen.volume import Volume

        def predict(values: np.ndarray) -> np.ndarray:
            box = Volume(values, volume.affine, volume.meta)
            again = enhance_with(loaded, box, device=dev, overlap=settings.overlap, seed=settings.seed,
                                 norm=result.norm, noise_level=result.noise_level)
            return again.volume.values(np.float32)

        adapted = adapt_with_model(loaded, volume, result.volume, settings.adapt_seconds,
                                   predict=predict, seed=settings.seed, device=dev, log=None)
        return adapted.volume

    def _model(self):
        if self._loaded is None:
            from medgen.inference.loading import load_model
            from medgen.training.distributed import pick_device

            settings = self.pipeline.settings("enhance")
            self._device = pick_device(settings.device, local_rank=self.device_index)
            self._loaded = load_model(settings.model, device=self._device)
            self.models_loaded += 1
        return self._loaded, self._device


def enhanced_name(volume_name: str) -> str:
    """``studies/k/x.nii.gz`` -> ``studies/k/x_enhanced.nii.gz``."""
    return volume_name[: -len(".nii.gz")] + ENHANCED_SUFFIX


def change_metrics(before: np.ndarray, after: np.ndarray, foreground: bool = True) -> dict[str, float]:
    """No-reference numbers for an enhanced volume against its input (same grid).

    ``psnr_vs_input``/``ssim_vs_input`` (data range: the input's max - min; PSNR is capped
    at 100 dB for an unchanged volume), ``mean_abs_change`` and ``sigma_input``/
    ``sigma_output`` (:func:`noise_sigma` of the central axial slice, input units).
    """
    from medgen.metrics.quality import psnr, ssim

    estimate_sigma = noise_sigma

    if before.ndim == 4:
        before, after = before[..., 0], after[..., 0]
    if before.shape != after.shape:  # super-resolution: compare on the output's grid only
        return {"sigma_output": float(estimate_sigma(after[:, :, after.shape[2] // 2]))}
    rng = float(max(before.max() - before.min(), 1e-6))
    mask = None
    if foreground:
        from medgen.metrics.masks import foreground_mask

        mask = foreground_mask(before)
        if not mask.any():
            mask = None
    diff = float(np.abs(after - before).mean())
    mid = before.shape[2] // 2
    p = psnr(after, before, rng) if diff > 0 else 100.0
    return {
        "psnr_vs_input": float(min(p, 100.0)),
        "ssim_vs_input": float(ssim(after, before, rng)) if min(before.shape) >= 11 else float("nan"),
        "mean_abs_change": diff,
        "sigma_input": float(estimate_sigma(before[:, :, mid])),
        "sigma_output": float(estimate_sigma(after[:, :, mid])),
    }


def noise_sigma(image: np.ndarray) -> float:
    """Gaussian noise sigma of a 2D image by Immerkaer's Laplacian-difference estimator.

    J. Immerkaer, "Fast Noise Variance Estimation", CVIU 64(2), 1996:
    ``sigma = sqrt(pi/2) / (6 (W-2)(H-2)) * sum |I * N|``, ``N`` = [[1,-2,1],[-2,4,-2],[1,-2,1]].

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> round(noise_sigma(rng.normal(0, 2.0, (256, 256))), 1)
    2.0
    """
    x = np.asarray(image, np.float64)
    if min(x.shape) < 3:
        return float("nan")
    conv = (x[:-2, :-2] - 2 * x[:-2, 1:-1] + x[:-2, 2:] - 2 * x[1:-1, :-2] + 4 * x[1:-1, 1:-1]
            - 2 * x[1:-1, 2:] + x[2:, :-2] - 2 * x[2:, 1:-1] + x[2:, 2:])
    return float(np.sqrt(np.pi / 2) * np.abs(conv).sum() / (6.0 * conv.size))


def _fixed_time():
    import datetime as _dt

    return _dt.datetime(2000, 1, 1, tzinfo=_dt.timezone.utc)  # same bytes for the same input


def _scrub(text: str, task: StudyTask) -> str:
    """One line with the archive's absolute paths replaced by ``<archive>``."""
    series = task.series
    text = str(text)
    for root in {getattr(series, "src", ""), *(str(Path(p).parent) for p in getattr(series, "files", ()))}:
        if root and len(root) > 1:
            text = text.replace(root, "<archive>")
    return one_line(text)


def _reason(exc: BaseException, task: StudyTask) -> str:
    from medgen.errors import InputError

    if isinstance(exc, InputError):
        return _scrub(exc.reason, task)
    if isinstance(exc, MemoryError):
        return "out of memory"
    first = (str(exc).strip().splitlines() or [""])[0]
    return _scrub(f"{type(exc).__name__}: {first}" if first else type(exc).__name__, task)
