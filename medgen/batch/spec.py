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
for checking an archive and the plumbing quickly). Paths are relative to the file. Unknown
keys and wrong types stop the run before any work, with one line naming the file and key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medgen.errors import ConfigError

STAGE_ORDER = ("ingest", "enhance", "export", "metrics")
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


class BatchExport(_Step):
    """Derived DICOM beside the NIfTI, and a labelled input/output/difference montage."""

    dicom: bool = False
    montage: bool = True


class BatchMetrics(_Step):
    """No-reference numbers per volume: change from the input (PSNR/SSIM of output vs input,
    mean absolute change) and the noise sigma estimated before and after."""

    foreground: bool = True


class BatchStage(_Step):
    """One list item: exactly one stage name mapping to its settings."""

    ingest: BatchIngest | None = None
    enhance: BatchEnhance | None = None
    export: BatchExport | None = None
    metrics: BatchMetrics | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> BatchStage:
        named = [n for n in STAGE_ORDER if getattr(self, n) is not None]
        if len(named) != 1:
            raise ValueError(f"each stage names exactly one of {', '.join(STAGE_ORDER)}; got {named or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(n for n in STAGE_ORDER if getattr(self, n) is not None)


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
        if kinds != sorted(kinds, key=STAGE_ORDER.index):
            raise ValueError(f"`stages` must run in the order {' -> '.join(STAGE_ORDER)}, got {' -> '.join(kinds)}")
        for needed in ("ingest", "enhance"):
            if needed not in kinds:
                raise ValueError(f"`stages` must include `{needed}`, got {' -> '.join(kinds)}")
        return self

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.kind for s in self.stages)

    def settings(self, stage: str) -> _Step | None:
        """The settings of ``stage``, or None when the pipeline does not run it."""
        for s in self.stages:
            if s.kind == stage:
                return getattr(s, stage)
        return None


def load_batch_pipeline(path: str | Path) -> BatchPipeline:
    """Read and validate a batch pipeline file; a relative model path becomes absolute."""
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
    enhance = pipeline.settings("enhance")
    model = enhance.model
    if model != IDENTITY_MODEL and "://" not in model and not model.startswith(("runs:", "models:")):
        resolved = Path(model).expanduser()
        if not resolved.is_absolute():
            resolved = (path.resolve().parent / resolved).resolve()
        enhance.model = str(resolved)
    return pipeline


def model_identity(model: str) -> str:
    """What identifies a model for fingerprints: a local file's SHA-256, else the URI."""
    if model == IDENTITY_MODEL or model.startswith(("runs:", "models:")) or "://" in model:
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


def stage_fingerprints(pipeline: BatchPipeline, input_fingerprint: str, model_id: str) -> dict[str, str]:
    """One fingerprint per stage: its settings and everything upstream of it.

    Changing a stage's settings (or the model, for ``enhance``) changes its fingerprint and
    those of the stages after it, so only what it affects is redone.
    """
    out: dict[str, str] = {}
    upstream = input_fingerprint
    for stage in pipeline.stage_names:
        settings = pipeline.settings(stage).model_dump(mode="json")
        if stage == "enhance":
            settings["model"] = model_id
            settings.pop("device", None)  # where it runs does not change what it gives
        text = json.dumps({"stage": stage, "settings": settings, "upstream": upstream}, sort_keys=True)
        out[stage] = hashlib.sha256(text.encode()).hexdigest()[:32]
        if stage in ("ingest", "enhance"):
            upstream = out[stage]  # export and metrics both hang off enhance
    return out
