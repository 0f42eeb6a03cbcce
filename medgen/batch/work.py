"""The work on one study, as a worker process or a Ray actor does it.

A :class:`StudyWorker` holds the pipeline and, once loaded, the model: it is built once per
worker and reused for every study it is given. :meth:`StudyWorker.run` takes a
:class:`StudyTask` and runs the study's remaining stages in order, handing each stage's
:class:`StageOutcome` to a callback as soon as the stage is over; it never raises for a bad
study (a failure becomes the outcome's one-line ``reason`` and the study stops there).
Every file is written atomically to its final name under ``OUT/studies/<key>/``, so an
outcome only ever names complete files. With ``enhance.gate`` every volume is judged by the
input gate first; under policy ``skip`` a study with an "out" volume ends ``gated`` (nothing
enhanced), under ``warn`` it is enhanced and the verdict rides along in its metrics.

A study's work comes in three phases, so that a worker can overlap them across studies
(:mod:`medgen.batch.local`): :meth:`StudyWorker.read` (ingest, and reading the volumes the
model needs), :meth:`StudyWorker.think` (gate and model, in memory only) and
:meth:`StudyWorker.write` (the enhanced volumes written, then export and metrics). A stage's
outcome is handed on only once its files are in place, in stage order within a study.

Layout of a study folder (``<stem>`` is the ingest's pseudonymous output stem)::

    <stem>.nii.gz, <stem>.json                    ingest
    <stem>_enhanced.nii.gz, <stem>_enhanced.json  enhance
    <stem>_enhanced_dicom/IM_*.dcm                export (dicom: true)
    <stem>_montage.png                            export (montage: true)
    metrics.json                                  metrics

A synthesis pipeline's "study" is one sample (``task.sample``): ``think`` generates it and
``write`` saves ``studies/<key>/<key>.nii.gz`` with a sidecar saying ``"synthetic": true``.
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
from medgen.batch.spec import IDENTITY_MODEL, SYNTHESIS_STAGE, BatchPipeline

STUDIES_DIR = "studies"
ENHANCED_SUFFIX = "_enhanced.nii.gz"


@dataclass(frozen=True)
class StudyTask:
    """What a worker needs for one study (picklable).

    ``series`` are the ingest's :class:`~medgen.stages.ingest_plan.SeriesTask` of the study's
    series (absolute input paths; see :mod:`medgen.batch.studies`); ``stages`` the stages
    still to run, in order; ``fingerprints`` one per stage;
    ``volumes`` the ingested volume names (relative to OUT) when ingest is already done.
    """

    key: str
    series: tuple[Any, ...]
    out: str
    stages: tuple[str, ...]
    fingerprints: dict[str, str]
    volumes: tuple[str, ...] = ()
    sample: Any = None  # a synthesis pipeline's SyntheticSample (then ``series`` is empty)


@dataclass
class StageOutcome:
    """How one stage of one study ended. ``outputs``: ``(name, size, sha256)`` relative to
    OUT; ``reason``: one line when ``ok`` is False; ``gated``: not a failure but the input
    gate keeping the study out (policy ``skip``; ``ok`` is False, so the study stops)."""

    key: str
    stage: str
    ok: bool
    fingerprint: str
    seconds: float
    outputs: list[tuple[str, int, str]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # numbers, and the gate's verdict in words
    volumes: list[str] = field(default_factory=list)
    reason: str = ""
    gated: bool = False


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


@dataclass
class StudyInFlight:
    """One study between the phases of its work (read -> think -> write), in one worker.

    ``inputs``: the volumes read for the model, by name; ``results``: what the model made,
    not yet written; ``seconds``: time spent so far on a stage that ends in a later phase;
    ``stopped``: a stage failed (or the gate kept the study out), later phases pass it on.
    """

    task: StudyTask
    emit: Callable[[StageOutcome], None]
    volumes: list[str]
    inputs: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    outcomes: list[StageOutcome] = field(default_factory=list)
    gated: StageOutcome | None = None
    stopped: bool = False


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
        self._flow_gate = None
        self.models_loaded = 0  # how many times a model was read (1 per worker is the goal)
        self.gates_loaded = 0  # the same for the input gate's flow

    def run(self, task: StudyTask, emit: Callable[[StageOutcome], None]) -> list[StageOutcome]:
        """Run ``task.stages`` in order; stop after the first failure (the three phases of
        :meth:`read`, :meth:`think` and :meth:`write` one after the other)."""
        flight = self.read(task, emit)
        self.think(flight)
        self.write(flight)
        return flight.outcomes

    # -- the three phases of a study: a worker may overlap them across studies ---------------

    def read(self, task: StudyTask, emit: Callable[[StageOutcome], None]) -> StudyInFlight:
        """Ingest (when due), then read the volumes the model needs into memory."""
        flight = StudyInFlight(task, emit, list(task.volumes))
        if "ingest" in task.stages:
            outcome = self._attempt(flight, "ingest", lambda: self._ingest(task, flight.volumes))
            if outcome.ok:
                flight.volumes = outcome.volumes
        if "enhance" in task.stages and not flight.stopped:
            from medgen.stages.common import load_volume

            def load() -> None:
                flight.inputs = {name: load_volume(Path(task.out) / name) for name in flight.volumes}

            self._quietly(flight, "enhance", load)
        return flight

    def think(self, flight: StudyInFlight) -> None:
        """The model's part (gate and enhancement, or synthesis), in memory: nothing is written here."""
        if "enhance" in flight.task.stages and not flight.stopped:
            self._quietly(flight, "enhance", lambda: self._think(flight))
        if SYNTHESIS_STAGE in flight.task.stages:
            self._quietly(flight, SYNTHESIS_STAGE, lambda: self._synthesize(flight))

    def write(self, flight: StudyInFlight) -> None:
        """Write what the model made (atomically; only then is its stage over), then export
        and metrics."""
        task = flight.task
        if "enhance" in task.stages and not flight.stopped:
            self._attempt(flight, "enhance", lambda: self._write_enhanced(flight))
        if SYNTHESIS_STAGE in task.stages and not flight.stopped:
            self._attempt(flight, SYNTHESIS_STAGE, lambda: self._write_synthetic(flight))
        flight.inputs, flight.results = {}, {}  # what the model needed is written: let it go
        for stage in ("export", "metrics"):
            if stage in task.stages and not flight.stopped:
                self._attempt(flight, stage, lambda st=stage: getattr(self, f"_{st}")(task, flight.volumes))

    def _attempt(self, flight: StudyInFlight, stage: str, work: Callable[[], StageOutcome]) -> StageOutcome:
        """Run one stage (or its last part) and hand its outcome on; a failure stops the study."""
        fp = flight.task.fingerprints[stage]
        started = time.perf_counter()
        try:
            outcome = work()
            outcome.fingerprint = fp
        except Exception as exc:  # noqa: BLE001 - one bad study must not stop the batch
            outcome = StageOutcome(flight.task.key, stage, False, fp, 0.0, reason=_reason(exc, flight.task))
        outcome.seconds = flight.seconds.pop(stage, 0.0) + time.perf_counter() - started
        flight.outcomes.append(outcome)
        flight.emit(outcome)
        flight.stopped = not outcome.ok
        return outcome

    def _quietly(self, flight: StudyInFlight, stage: str, work: Callable[[], None]) -> None:
        """Part of a stage that ends later: its time is counted, a failure ends the stage now."""
        started = time.perf_counter()
        failure = None
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - one bad study must not stop the batch
            failure = StageOutcome(flight.task.key, stage, False, "", 0.0, reason=_reason(exc, flight.task))
        flight.seconds[stage] = flight.seconds.get(stage, 0.0) + time.perf_counter() - started
        ended = failure or flight.gated  # a failure, or the gate keeping the study out, ends the stage now
        if ended is not None:
            self._attempt(flight, stage, lambda: ended)

    # -- stages -------------------------------------------------------------------------

    def _ingest(self, task: StudyTask, volumes: list[str]) -> StageOutcome:
        """Convert every series of the study into its folder; the first bad series fails it."""
        from medgen.stages.ingest_run import convert_task

        out = Path(task.out)
        folder = study_dir(out, task.key)
        folder.mkdir(parents=True, exist_ok=True)
        names: list[str] = []
        vols: list[str] = []
        for index, series in enumerate(task.series):
            series = dataclasses.replace(series, dst=str(folder))
            result = convert_task(series)
            if result.error is not None:
                where = f"series {index + 1} of {len(task.series)}: " if len(task.series) > 1 else ""
                if result.error_path and result.error_path in series.rel_files:
                    at = f" (file {series.rel_files.index(result.error_path) + 1} of {len(series.rel_files)})"
                else:
                    at = ""
                return StageOutcome(task.key, "ingest", False, "", 0.0,
                                    reason=where + _scrub(result.error, task) + at)
            names += [f"{STUDIES_DIR}/{task.key}/{n}" for n, _ in result.outputs]
            vols += [f"{STUDIES_DIR}/{task.key}/{n}" for n in result.volumes]
        return StageOutcome(task.key, "ingest", True, "", 0.0, outputs=describe(out, names), volumes=vols)

    def _think(self, flight: StudyInFlight) -> None:
        """Gate every volume (a skipped study must have nothing written), then enhance each."""
        from medgen.stages import gating

        option = self.pipeline.settings("enhance").gate
        verdicts = {}
        if option is not None:
            gate = self._gate()
            verdicts = {name: gate.check(volume, name=Path(name).name) for name, volume in flight.inputs.items()}
        flight.metrics = gating.verdict_metrics(gating.worst(list(verdicts.values()))) if verdicts else {}
        if option is not None and option.policy == "skip" and flight.metrics.get("gate") == "out":
            verdict = gating.worst(list(verdicts.values()))
            flight.gated = StageOutcome(flight.task.key, "enhance", False, "", 0.0, metrics=flight.metrics,
                                        reason=gating.gated_reason(verdict), gated=True)
            return
        for name, volume in flight.inputs.items():
            result = self._enhance_volume(volume)
            if name in verdicts:
                result = gating.with_verdict(result, verdicts[name], option)
            flight.results[name] = result

    def _synthesize(self, flight: StudyInFlight) -> None:
        settings, sample = self.pipeline.settings(SYNTHESIS_STAGE), flight.task.sample
        request = settings.request(sample.condition, sample.index)
        synth = self._synthesizer()
        synth.check(request)
        flight.results[flight.task.key] = synth.generate(request, device=self._pick_device(), progress=False)[0]

    def _write_synthetic(self, flight: StudyInFlight) -> StageOutcome:
        """``studies/<key>/<key>.nii.gz`` and its sidecar, which says ``"synthetic": true``."""
        from medgen.io import save

        out, key = Path(flight.task.out), flight.task.key
        volume = flight.results[key]
        target = f"{STUDIES_DIR}/{key}/{key}.nii.gz"
        (out / target).parent.mkdir(parents=True, exist_ok=True)
        save(volume, out / target, sidecar=True)
        record = volume.meta.acquisition.get("synthesis", {})
        metrics = {"synthetic": True, **{k: record[k] for k in ("sampler", "steps", "seed", "index") if k in record}}
        return StageOutcome(key, SYNTHESIS_STAGE, True, "", 0.0,
                            outputs=describe(out, [target, target[: -len(".nii.gz")] + ".json"]), metrics=metrics)

    def _write_enhanced(self, flight: StudyInFlight) -> StageOutcome:
        from medgen.io import save

        out = Path(flight.task.out)
        written: list[str] = []
        for name, result in flight.results.items():
            target = enhanced_name(name)
            save(result, out / target, sidecar=True)
            written += [target, target[: -len(".nii.gz")] + ".json"]
        return StageOutcome(flight.task.key, "enhance", True, "", 0.0, outputs=describe(out, written),
                            metrics=flight.metrics)

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
                                   created=_fixed_time(), study_key=task.key)
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
            if settings.identity_seconds:
                time.sleep(settings.identity_seconds)  # stands for a model's time (GIL released, as in CUDA)
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
        from medgen.inference.enhance import box_predictor

        predict = box_predictor(loaded, volume, result, device=dev, overlap=settings.overlap, seed=settings.seed)
        adapted = adapt_with_model(loaded, volume, result.volume, settings.adapt_seconds,
                                   predict=predict, seed=settings.seed, device=dev, log=None)
        return adapted.volume

    def _model(self):
        if self._loaded is None:
            from medgen.inference.loading import load_model

            self._loaded = load_model(self.pipeline.settings("enhance").model, device=self._pick_device())
            self.models_loaded += 1
        return self._loaded, self._device

    def _synthesizer(self):
        """The synthesis model, loaded on first use and kept."""
        if self._loaded is None:
            from medgen.inference.loading import load_synthesis_model

            self._loaded = load_synthesis_model(self.pipeline.settings(SYNTHESIS_STAGE).model,
                                                device=self._pick_device())
            self.models_loaded += 1
        return self._loaded

    def _gate(self):
        """The input gate's flow, loaded on first use and kept (on the model's device)."""
        if self._flow_gate is None:
            from medgen.inference.gate import load_gate

            self._flow_gate = load_gate(self.pipeline.settings("enhance").gate.model, device=self._pick_device())
            self.gates_loaded += 1
        return self._flow_gate

    def _pick_device(self):
        if self._device is None:
            from medgen.training.distributed import pick_device

            self._device = pick_device(self.pipeline.model_settings().device, local_rank=self.device_index)
        return self._device


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
    text = str(text)
    roots = {r for series in task.series for r in (series.src, *(str(Path(p).parent) for p in series.files))}
    for root in sorted(roots, key=len, reverse=True):  # the deepest first: no half-replaced path
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
