"""The batch pipeline file: which per-study stages run over an archive, with what settings.

::

    name: denoise-archive
    experiment: medgen-batch
    stages:
      - ingest:  {}
      - enhance: {model: ../runs/demo-denoise-mr/model.pt, adapt_seconds: 0}
      - export:  {dicom: true, montage: true}
      - metrics: {}

Stages run in the order ingest -> enhance -> export -> metrics for every study; ``ingest``
and ``enhance`` are required, ``export`` and ``metrics`` optional. ``enhance.model`` is a
model file, a training checkpoint, an MLflow URI or ``identity`` (output = input, no torch:
for checking an archive and the plumbing quickly; ``identity_seconds`` makes it wait that
long per volume, as a GPU model would, for benchmarks). ``enhance.gate: {model: FLOW, policy:
warn|skip}`` judges every volume with an input gate (a calibrated flow, loaded once per
worker, like the model) before it is enhanced: ``warn`` enhances it anyway and records the
verdict in the study's metrics; ``skip`` leaves a study with an "out" volume unenhanced, in
the ledger state ``gated`` with its score and reason (see :mod:`medgen.stages.gating`).
Paths are relative to the file. Unknown keys and wrong types stop the run before any work,
with one line naming the file and key.

A synthesis pipeline has the one stage ``synthesize`` and reads no archive::

    name: synth-t1
    stages:
      - synthesize: {model: ../runs/ldm/model.pt, n_per_condition: 50,
                     conditions: [{label: 0, age_years: 70}, {label: 1, age_years: 70}], seed: 0}

Each sample is a "study" of the ledger (kind ``synthetic``, key ``synthetic-<condition>-<i>``)
and is done, failed or pending like any study: a killed run resumes, and raising
``n_per_condition`` or adding a condition makes only the new samples.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medgen.errors import ConfigError
from medgen.stages.gating import GateOption, is_uri, resolve_model_path

STAGE_ORDER = ("ingest", "enhance", "export", "metrics")
SYNTHESIS_STAGE = "synthesize"  # a pipeline of its own: no archive, one "study" per sample
ALL_STAGES = (*STAGE_ORDER, SYNTHESIS_STAGE)
IDENTITY_MODEL = "identity"


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchIngest(_Step):
    """Reading a study into volumes (see ``medgen ingest``)."""

    keep_phi: bool = False
    max_image_mb: float = Field(2048.0, gt=0)


class BatchEnhance(_Step):
    """Enhancing every volume of a study with one model, loaded once per worker."""

    model: str
    adapt_seconds: float = Field(0.0, ge=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    seed: int = 0
    gate: GateOption | None = None  # judge each volume first (loaded once per worker)
    # With model identity: seconds each volume takes, as if a model ran. The wait leaves the
    # CPU free, as a GPU model does: for benchmarks and for checking the plumbing.
    identity_seconds: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _identity_only(self) -> BatchEnhance:
        if self.identity_seconds and self.model != IDENTITY_MODEL:
            raise ValueError(f"`identity_seconds` is for model {IDENTITY_MODEL} only, got model {self.model!r}")
        return self


class BatchExport(_Step):
    """Derived DICOM beside the NIfTI, and a labelled input/output/difference montage."""

    dicom: bool = False
    montage: bool = True


class BatchMetrics(_Step):
    """No-reference numbers per volume: change from the input (PSNR/SSIM of output vs input,
    mean absolute change) and the noise sigma estimated before and after."""

    foreground: bool = True


class BatchSynthesize(_Step):
    """Synthetic volumes from a generative model (latent diffusion, or a flow over whole
    latent grids), ``n_per_condition`` for each condition: sample ``i`` of every condition
    draws its noise from ``(seed, i)``, so a killed run regenerates exactly what it lost."""

    model: str
    conditions: list[dict[str, int | float | str]] = Field(default_factory=lambda: [{}], min_length=1)
    n_per_condition: int = Field(1, ge=1)
    seed: int = 0
    sampler: str | None = None
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = None
    temperature: float | None = Field(None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _distinct(self) -> BatchSynthesize:
        texts = [json.dumps(c, sort_keys=True) for c in self.conditions]
        if len(set(texts)) != len(texts):
            raise ValueError(f"`conditions` lists a condition twice: {self.conditions}")
        return self

    def request(self, condition: dict, index: int):
        """The :class:`~medgen.inference.synthesis.SynthesisRequest` of sample ``index`` under ``condition``."""
        from medgen.inference.synthesis import SynthesisRequest

        return SynthesisRequest(n=1, condition=condition, seed=self.seed, sampler=self.sampler, steps=self.steps,
                                guidance_scale=self.guidance_scale, first_index=index, temperature=self.temperature)


class BatchStage(_Step):
    """One list item: exactly one stage name mapping to its settings."""

    ingest: BatchIngest | None = None
    enhance: BatchEnhance | None = None
    export: BatchExport | None = None
    metrics: BatchMetrics | None = None
    synthesize: BatchSynthesize | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> BatchStage:
        named = [n for n in ALL_STAGES if getattr(self, n) is not None]
        if len(named) != 1:
            raise ValueError(f"each stage names exactly one of {', '.join(ALL_STAGES)}; got {named or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(n for n in ALL_STAGES if getattr(self, n) is not None)


class BatchReport(_Step):
    """The HTML report: how many studies get a montage in it."""

    sample_montages: int = Field(6, ge=0)


class BatchPipeline(_Step):
    """Root of a batch pipeline file."""

    name: str
    experiment: str = "medgen-batch"
    stages: list[BatchStage] = Field(min_length=1)
    report: BatchReport = Field(default_factory=BatchReport)

    @model_validator(mode="after")
    def _order(self) -> BatchPipeline:
        kinds = [s.kind for s in self.stages]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"`stages` names a stage twice: {kinds}")
        if SYNTHESIS_STAGE in kinds:
            if kinds != [SYNTHESIS_STAGE]:
                raise ValueError(f"a synthesis pipeline has one stage, `{SYNTHESIS_STAGE}`; got {' -> '.join(kinds)}")
            return self
        if kinds != sorted(kinds, key=STAGE_ORDER.index):
            raise ValueError(f"`stages` must run in the order {' -> '.join(STAGE_ORDER)}, got {' -> '.join(kinds)}")
        for needed in ("ingest", "enhance"):
            if needed not in kinds:
                raise ValueError(f"`stages` must include `{needed}`, got {' -> '.join(kinds)}")
        return self

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.kind for s in self.stages)

    @property
    def is_synthesis(self) -> bool:
        """Makes synthetic volumes (no archive) instead of enhancing an archive."""
        return self.stage_names == (SYNTHESIS_STAGE,)

    def model_settings(self) -> BatchEnhance | BatchSynthesize:
        """The settings of the stage that holds the model (``enhance`` or ``synthesize``)."""
        return self.settings(SYNTHESIS_STAGE if self.is_synthesis else "enhance")

    def settings(self, stage: str) -> _Step | None:
        """The settings of ``stage``, or None when the pipeline does not run it."""
        for s in self.stages:
            if s.kind == stage:
                return getattr(s, stage)
        return None


def load_batch_pipeline(path: str | Path) -> BatchPipeline:
    """Read and validate a batch pipeline file; relative model paths become absolute."""
    import yaml

    from medgen.config import format_validation_error

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read pipeline ({str(exc).splitlines()[0]})") from None
    try:
        pipeline = BatchPipeline.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None
    settings = pipeline.model_settings()
    base = path.resolve().parent
    settings.model = resolve_model_path(settings.model, base)
    if getattr(settings, "gate", None) is not None:
        settings.gate.model = resolve_model_path(settings.gate.model, base)
    return pipeline


def model_identity(model: str) -> str:
    """What identifies a model for fingerprints: a local file's SHA-256, else the URI."""
    if model == IDENTITY_MODEL or is_uri(model):
        return model
    path = Path(model)
    if path.is_dir():
        path = path / "model.pt"
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return "sha256:" + digest.hexdigest()
    except OSError:
        return model


def stage_fingerprints(pipeline: BatchPipeline, input_fingerprint: str, model_id: str,
                       gate_id: str | None = None) -> dict[str, str]:
    """One fingerprint per stage: its settings and everything upstream of it.

    Changing a stage's settings (or the model or the gate's model, for ``enhance``) changes
    its fingerprint and those of the stages after it, so only what it affects is redone.
    ``gate_id``: :func:`model_identity` of the gate's model (when the pipeline has a gate).
    """
    out: dict[str, str] = {}
    upstream = input_fingerprint
    for stage in pipeline.stage_names:
        settings = pipeline.settings(stage).model_dump(mode="json")
        if stage in ("enhance", SYNTHESIS_STAGE):
            settings["model"] = model_id
            settings.pop("device", None)  # where it runs does not change what it gives
        if stage == SYNTHESIS_STAGE:  # a sample's own condition and index are its input fingerprint:
            settings.pop("conditions")  # more conditions or samples add studies, they redo none
            settings.pop("n_per_condition")
        if stage == "enhance":
            if settings.get("gate") is None:
                settings.pop("gate", None)  # fingerprints of pipelines without a gate stay as they were
            else:
                settings["gate"]["model"] = gate_id or settings["gate"]["model"]
            if not settings.get("identity_seconds"):
                settings.pop("identity_seconds", None)  # the same for a plain identity model
        text = json.dumps({"stage": stage, "settings": settings, "upstream": upstream}, sort_keys=True)
        out[stage] = hashlib.sha256(text.encode()).hexdigest()[:32]
        if stage in ("ingest", "enhance"):
            upstream = out[stage]  # export and metrics both hang off enhance
    return out
