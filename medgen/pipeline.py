"""Run a pipeline file: stages in order under one MLflow parent run, one nested run each.

A pipeline file is YAML naming stages and what they work on; the model, training and
degradation presets it trains with live in ``configs/``::

    name: demo
    experiment: medgen-demo
    stages:
      - ingest:   {src: ../data_samples, out: ../demo_out/ingest}
      - train:    {config: ../configs/demo-denoise-mr.yaml}
      - enhance:  {scan: ../demo_out/noisy.nii.gz, out: ../demo_out/denoised.nii.gz}

Paths are relative to the pipeline file. ``enhance.model`` defaults to the model of the
latest ``train`` stage; ``enhance.gate: {model: FLOW, policy: warn|skip}`` judges the scan
with an input gate first (:mod:`medgen.stages.gating`), ``synthesize.gate`` each generated
volume, and ``check`` lists verdicts for scans. Unknown keys and wrong types stop
the run before any work, with one line naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medgen.errors import ConfigError
from medgen.stages.augment import AugmentStep
from medgen.stages.gating import GateOption, resolve_model_path


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestStep(_Step):
    src: Path
    out: Path
    workers: int = Field(1, ge=1)


class DegradeStep(_Step):
    clean: Path
    out: Path
    noise: Literal["gaussian", "rician", "lowdose_ct", "none"] = "rician"
    sigma: float = Field(0.05, ge=0.0)
    seed: int = 0
    thick_factor: int = Field(1, ge=1)


class TrainStep(_Step):
    config: Path
    resume: bool = True


class EnhanceStep(_Step):
    scan: Path
    out: Path
    model: str | None = None  # None: the model of the latest train stage
    format: Literal["nifti", "dicom"] = "nifti"
    adapt_seconds: float = Field(0.0, ge=0.0)  # with adapt_steps: only a safety cap on the clock
    adapt_steps: int | None = Field(None, ge=1)  # step budget (super-resolution); rules over adapt_seconds
    gate: GateOption | None = None  # judge the scan first; policy skip: an "out" scan is not enhanced


class BaselineStep(_Step):
    scan: Path
    out: Path
    method: Literal["nlm", "gaussian"] = "nlm"
    noise: Literal["gaussian", "rician"] = "rician"


class EvaluateStep(_Step):
    out: Path
    reference: Path
    compare: dict[str, Path] = Field(default_factory=dict)


class ExportStep(_Step):
    volume: Path
    dicom: Path | None = None
    montage: Path | None = None


class CohortStep(_Step):
    """A seeded labelled phantom cohort (:func:`medgen.samples_cohort.write_cohort`)."""

    out: Path
    n_per_class: int = Field(10, ge=1)
    seed: int = 0
    shape_vox: list[int] = Field(default_factory=lambda: [48, 48, 48], min_length=3, max_length=3)
    task: Literal["lesion", "ventricles"] = "lesion"


class SynthesizeStep(_Step):
    out: Path
    model: str | None = None  # None: the model of the latest latent_diffusion (or decodable flow) train stage
    n: int = Field(4, ge=1)
    condition: dict[str, float | int | str] = Field(default_factory=dict)
    sampler: Literal["ddpm", "ddim", "rflow"] | None = None
    steps: int | None = Field(None, ge=1)
    seed: int = 0
    guidance_scale: float | None = Field(None, ge=0.0)
    temperature: float | None = Field(None, ge=0.0)  # flows only
    format: Literal["nifti", "dicom"] = "nifti"
    gate: GateOption | None = None  # judge each generated volume; policy skip: an "out" one is not written


class CheckStep(_Step):
    scans: list[Path] = Field(min_length=1)
    model: str | None = None  # None: the flow of the latest flow train stage
    out: Path | None = None  # the verdicts as JSON


class EvaluateSynthesisStep(_Step):
    synth: Path
    real: Path
    train: Path | None = None
    out: Path | None = None
    encoder_steps: int = Field(200, ge=1)


STEP_TYPES: dict[str, type[_Step]] = {
    "ingest": IngestStep,
    "degrade": DegradeStep,
    "train": TrainStep,
    "enhance": EnhanceStep,
    "baseline": BaselineStep,
    "evaluate": EvaluateStep,
    "export": ExportStep,
    "cohort": CohortStep,
    "synthesize": SynthesizeStep,
    "evaluate_synthesis": EvaluateSynthesisStep,
    "augment": AugmentStep,
    "check": CheckStep,
}


class Stage(_Step):
    """One list item: exactly one stage name mapping to its settings."""

    ingest: IngestStep | None = None
    degrade: DegradeStep | None = None
    train: TrainStep | None = None
    enhance: EnhanceStep | None = None
    baseline: BaselineStep | None = None
    evaluate: EvaluateStep | None = None
    export: ExportStep | None = None
    cohort: CohortStep | None = None
    synthesize: SynthesizeStep | None = None
    evaluate_synthesis: EvaluateSynthesisStep | None = None
    augment: AugmentStep | None = None
    check: CheckStep | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Stage:
        named = [name for name in STEP_TYPES if getattr(self, name) is not None]
        if len(named) != 1:
            raise ValueError(f"each stage names exactly one of {', '.join(STEP_TYPES)}; got {named or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in STEP_TYPES if getattr(self, name) is not None)

    @property
    def step(self) -> _Step:
        return getattr(self, self.kind)


class PipelineFile(_Step):
    name: str
    experiment: str = "medgen"
    stages: list[Stage] = Field(min_length=1)


@dataclass
class PipelineResult:
    """What each stage returned, in order, and the parent run that holds them."""

    name: str
    run_id: str | None
    results: list[tuple[str, Any]] = field(default_factory=list)


def load_pipeline(path: str | Path) -> PipelineFile:
    """Read and validate a pipeline file; paths become absolute (relative to the file)."""
    import yaml

    from medgen.config import format_validation_error

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read pipeline ({str(exc).splitlines()[0]})") from None
    try:
        pipeline = PipelineFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None
    base = path.resolve().parent
    for stage in pipeline.stages:
        _resolve_paths(stage.step, base)
    return pipeline


def _resolve_paths(step: _Step, base: Path) -> None:
    for name, value in step:
        if isinstance(value, Path) and not value.is_absolute():
            setattr(step, name, (base / value).resolve())
        elif isinstance(value, dict):
            setattr(step, name, {k: (base / v).resolve() if isinstance(v, Path) else v for k, v in value.items()})
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            setattr(step, name, [v if v.is_absolute() else (base / v).resolve() for v in value])
        elif isinstance(value, GateOption):
            value.model = resolve_model_path(value.model, base)


def run_pipeline(path: str | Path, *, tracking_uri: str | None = None, progress: bool = True,
                 on_stage=None) -> PipelineResult:
    """Run every stage of the pipeline at ``path`` in order; stop at the first failure.

    ``on_stage(kind, result)`` is called after each stage (the CLI prints from it).
    """
    from medgen.tracking import Tracker

    path = Path(path)
    pipeline = load_pipeline(path)
    tracker = Tracker(pipeline.experiment, uri=tracking_uri)
    outcome = PipelineResult(pipeline.name, None)
    with tracker.run(pipeline.name, tags={"medgen.kind": "pipeline"}) as parent:
        outcome.run_id = parent.run_id
        parent.log_artifact(path)
        parent.log_params({"pipeline.stages": ",".join(s.kind for s in pipeline.stages)})
        context = _Context(tracker.uri, parent.run_id, pipeline.experiment, progress)
        for stage in pipeline.stages:
            result = context.run(stage.kind, stage.step)
            outcome.results.append((stage.kind, result))
            if on_stage is not None:
                on_stage(stage.kind, result)
    return outcome


class _Context:
    """Carries the parent run and the latest trained model from stage to stage."""

    def __init__(self, tracking_uri: str, parent_run_id: str, experiment: str, progress: bool) -> None:
        self.tracking = dict(tracking_uri=tracking_uri, parent_run_id=parent_run_id)
        self.experiment = experiment
        self.progress = progress
        self.model: str | None = None  # the latest enhancement model
        self.synthesis_model: str | None = None  # the latest latent diffusion (or decodable flow) model
        self.flow_model: str | None = None  # the latest flow (an input gate)

    def run(self, kind: str, step: _Step) -> Any:
        return getattr(self, f"_{kind}")(step)

    def _ingest(self, step: IngestStep) -> Any:
        """Ingest, then a nested run with one table row per series (pseudonymous keys only)."""
        from medgen.archive.manifest import Manifest
        from medgen.stages.ingest import ingest
        from medgen.run_names import run_name
        from medgen.tracking import Tracker

        summary = ingest(step.src, step.out, workers=step.workers, progress=self.progress)
        with Manifest.open(summary.dst) as manifest:
            series = manifest.all_series()
        rows = [{"series": s.series_key, "status": s.status, "files": s.n_files,
                 "volumes": " ".join(n for n, _ in s.outputs if n.endswith((".nii.gz", ".nii"))),
                 "reason": s.reason} for s in series]
        counts = summary.counts
        name = run_name("ingest", f"{summary.n_volumes}-volumes", f"{counts['converted']}-new",
                        f"{counts['quarantined']}-quarantined")
        tracker = Tracker(self.experiment, uri=self.tracking["tracking_uri"])
        with tracker.run(name, parent_id=self.tracking["parent_run_id"], tags={"medgen.stage": "ingest"}) as run:
            run.log_params({"workers": step.workers, "pseudonymous": summary.pseudonymous,
                            "skipped_by_kind": summary.skipped_by_kind()})
            run.log_metrics({**{f"series_{k}": n for k, n in counts.items()}, "volumes": summary.n_volumes})
            run.log_table(rows or {"series": [], "status": [], "files": [], "volumes": [], "reason": []},
                          "ingest/series.json", csv_file="ingest/series.csv")
        return summary

    def _degrade(self, step: DegradeStep) -> Any:
        from medgen.stages.degrade import degrade

        return degrade(step.clean, step.out, step.noise, step.sigma, step.seed,
                       thick_factor=step.thick_factor, experiment=self.experiment, **self.tracking)

    def _train(self, step: TrainStep) -> Any:
        from medgen.stages.train import train

        summary = train(step.config, resume=step.resume, progress=self.progress, **self.tracking)
        kind = summary.config.model.kind
        if kind == "flow":
            self.flow_model = str(summary.model_path)
        if kind == "latent_diffusion" or (kind == "flow" and summary.config.model.flow.regions is None):
            self.synthesis_model = str(summary.model_path)
        elif kind not in ("autoencoder", "flow"):
            self.model = str(summary.model_path)
        return summary

    def _enhance(self, step: EnhanceStep) -> Any:
        from medgen.stages.enhance import enhance

        model = step.model or self.model
        if model is None:
            raise ConfigError("enhance: no `model` given and no train stage before it")
        gate = {"gate": step.gate.model, "gate_policy": step.gate.policy} if step.gate is not None else {}
        return enhance(step.scan, model, step.out, step.format, step.adapt_seconds, adapt_steps=step.adapt_steps,
                       experiment=self.experiment, progress=self.progress, **gate, **self.tracking)

    def _baseline(self, step: BaselineStep) -> Any:
        from medgen.stages.baseline import baseline

        return baseline(step.scan, step.out, method=step.method, noise=step.noise,
                        experiment=self.experiment, **self.tracking)

    def _evaluate(self, step: EvaluateStep) -> Any:
        from medgen.stages.evaluate import evaluate

        return evaluate(step.out, step.reference, compare=step.compare,
                        experiment=self.experiment, **self.tracking)

    def _export(self, step: ExportStep) -> Any:
        from medgen.stages.export import export

        return export(step.volume, dicom=step.dicom, montage=step.montage, experiment=self.experiment,
                      **self.tracking)

    def _cohort(self, step: CohortStep) -> Any:
        from medgen.samples_cohort import write_cohort

        return write_cohort(step.out, n_per_class=step.n_per_class, seed=step.seed,
                            shape=tuple(step.shape_vox), task=step.task)

    def _synthesize(self, step: SynthesizeStep) -> Any:
        from medgen.stages.synthesize import synthesize

        model = step.model or self.synthesis_model
        if model is None:
            raise ConfigError("synthesize: no `model` given and no latent_diffusion train stage before it "
                              "(nor a flow with `regions: null`)")
        gate = {"gate": step.gate.model, "gate_policy": step.gate.policy} if step.gate is not None else {}
        return synthesize(model, step.out, n=step.n, condition=step.condition, sampler=step.sampler,
                          steps=step.steps, seed=step.seed, guidance_scale=step.guidance_scale,
                          temperature=step.temperature,
                          format=step.format, experiment=self.experiment, progress=self.progress,
                          **gate, **self.tracking)

    def _evaluate_synthesis(self, step: EvaluateSynthesisStep) -> Any:
        from medgen.stages.evaluate_synthesis import evaluate_synthesis

        return evaluate_synthesis(step.synth, step.real, step.train, out=step.out,
                                  encoder_steps=step.encoder_steps, experiment=self.experiment,
                                  **self.tracking)

    def _check(self, step: CheckStep) -> Any:
        from medgen.stages.check import check_stage

        model = step.model or self.flow_model
        if model is None:
            raise ConfigError("check: no `model` given and no flow train stage before it")
        return check_stage(step.scans, model, out=step.out, experiment=self.experiment, **self.tracking)

    def _augment(self, step: AugmentStep) -> Any:
        from medgen.stages.augment import run_augment_experiment

        return run_augment_experiment(step, latest_model=self.synthesis_model, experiment=self.experiment,
                                      progress=self.progress, **self.tracking)
