"""Typed configuration for training and enhancement pipelines, read from YAML.

A config holds values, never code. Every section forbids unknown keys, so a typo stops the
run before any work with one line naming the file and the dotted key::

    pipelines/denoise.yaml: training.stpes: unknown key (did you mean 'steps'?)

Sections
--------
``model``        which network (:class:`ModelConfig`), built by :func:`medgen.models.build_model`.
``training``     optimiser, schedule, checkpoints (:class:`TrainingConfig`).
``degradations`` the list of degradations that turn a clean patch into the network's input
                 (:class:`DegradationConfig`), applied in order.
``data``         the clean training/validation scans and the intensity normalisation.

Examples
--------
>>> cfg = PipelineConfig.model_validate({"name": "demo", "model": {"kind": "unet"}})
>>> cfg.training.steps, cfg.model.unet.features
(1000, [8, 8, 16, 32, 64, 8])
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medgen.errors import ConfigError

__all__ = [
    "ConfigError",
    "DataConfig",
    "DegradationConfig",
    "AutoencoderConfig",
    "DiffusionConfig",
    "DiscriminatorConfig",
    "FlowConfig",
    "GridConfig",
    "LatentDiffusionConfig",
    "LossConfig",
    "ModelConfig",
    "NormalisationConfig",
    "PipelineConfig",
    "TrainingConfig",
    "UNetConfig",
    "config_from_json",
    "config_to_json",
    "format_validation_error",
    "load_config",
]

ModelKind = Literal["unet", "gan", "diffusion", "autoencoder", "latent_diffusion", "flow"]
SYNTHESIS_KINDS = ("autoencoder", "latent_diffusion", "flow")
LatentTraining = Literal["ddpm", "rflow"]
SamplerName = Literal["ddpm", "ddim", "rflow"]
Task = Literal["denoise", "super_resolution", "synthesis"]
NormMode = Literal["percentile", "fixed"]
LrSchedule = Literal["constant", "cosine"]
DeviceName = Literal["auto", "cpu", "cuda"]
BetaSchedule = Literal["linear_beta", "scaled_linear_beta", "cosine"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
DiffusionTarget = Literal["residual", "image"]
UpsampleMode = Literal["deconv", "nontrainable", "pixelshuffle"]

PositiveInt = Annotated[int, Field(gt=0)]
Triple = Annotated[list[PositiveInt], Field(min_length=3, max_length=3)]
ParamValue = float | int | bool | str | list[float]


class _Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class UNetConfig(_Section):
    """MONAI ``BasicUNet`` used as a residual generator: ``output = input + net(input)``."""

    features: Annotated[list[PositiveInt], Field(min_length=6, max_length=6)] = [8, 8, 16, 32, 64, 8]
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    upsample: UpsampleMode = "deconv"


class DiscriminatorConfig(_Section):
    """MONAI ``PatchDiscriminator`` for the GAN."""

    channels: PositiveInt = 8
    num_layers_d: PositiveInt = 2


class DiffusionConfig(_Section):
    """MONAI ``DiffusionModelUNet`` conditioned on the degraded image (an extra input channel)."""

    channels: Annotated[list[PositiveInt], Field(min_length=1)] = [16, 32, 32]
    attention_levels: list[bool] = [False, False, False]
    num_res_blocks: PositiveInt = 1
    norm_num_groups: PositiveInt = 8
    num_train_timesteps: PositiveInt = 1000
    schedule: BetaSchedule = "scaled_linear_beta"
    prediction_type: PredictionType = "v_prediction"
    target: DiffusionTarget = "residual"
    target_scale: float = Field(1.0, gt=0.0)
    sampling_steps: Annotated[int, Field(gt=0, le=20)] = 10
    n_samples: PositiveInt = 4

    @model_validator(mode="after")
    def _levels_match(self) -> DiffusionConfig:
        _check_levels(self.channels, self.attention_levels, self.norm_num_groups)
        return self


class AutoencoderConfig(_Section):
    """MONAI ``AutoencoderKL`` (3D): each level after the first halves every axis, so three
    levels compress 4x per axis into ``latent_channels`` channels."""

    channels: Annotated[list[PositiveInt], Field(min_length=1)] = [32, 64, 64]
    attention_levels: list[bool] = [False, False, False]
    num_res_blocks: PositiveInt = 1
    latent_channels: PositiveInt = 3
    norm_num_groups: PositiveInt = 16
    with_nonlocal_attention: bool = False

    @model_validator(mode="after")
    def _levels_match(self) -> AutoencoderConfig:
        _check_levels(self.channels, self.attention_levels, self.norm_num_groups)
        return self

    @property
    def downsample_factor(self) -> int:
        """Voxels per latent voxel along each axis."""
        return 2 ** (len(self.channels) - 1)


class LatentDiffusionConfig(_Section):
    """MONAI ``DiffusionModelUNet`` on the frozen autoencoder's (1/std scaled) latents.

    ``autoencoder`` is the trained autoencoder (model file, run folder or MLflow URI; relative
    paths against the config file). ``training``: ``ddpm`` (noise/v prediction, sampled with
    DDPM or DDIM) or ``rflow`` (rectified flow, sampled with ``RFlowScheduler``).
    Conditioning: a class label (``num_classes`` > 0, read from the labels CSV column
    ``label``) through ``num_class_embeds``, and scalar ``covariates`` (CSV columns, scaled
    to [0, 1] by their training range) through cross-attention. ``label_dropout`` trains an
    unconditional class as well, for classifier-free guidance. ``flip_augment`` adds every
    training scan's left-right mirror image.
    """

    autoencoder: str = ""
    channels: Annotated[list[PositiveInt], Field(min_length=1)] = [32, 64, 64]
    attention_levels: list[bool] = [False, False, True]
    num_res_blocks: PositiveInt = 1
    norm_num_groups: PositiveInt = 16
    num_head_channels: PositiveInt = 16
    num_train_timesteps: PositiveInt = 1000
    schedule: BetaSchedule = "scaled_linear_beta"
    prediction_type: PredictionType = "epsilon"
    training: LatentTraining = "ddpm"
    num_classes: int = Field(0, ge=0)
    covariates: list[str] = []
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    flip_augment: bool = True
    sampler: SamplerName = "ddim"
    sampling_steps: Annotated[int, Field(gt=0, le=1000)] = 25
    guidance_scale: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _levels_match(self) -> LatentDiffusionConfig:
        _check_levels(self.channels, self.attention_levels, self.norm_num_groups)
        # Attention levels need whole heads, and so does the middle block, which always attends.
        for c, attends in zip(self.channels, [*self.attention_levels[:-1], True]):
            if attends and c % self.num_head_channels:
                raise ValueError(
                    f"`channels` of every attending level (and the last, whose middle block always "
                    f"attends) must be a multiple of `num_head_channels` ({self.num_head_channels}), got {c}"
                )
        if len(set(self.covariates)) != len(self.covariates):
            raise ValueError(f"`covariates` must not repeat a name, got {self.covariates}")
        if self.training == "rflow" and "sampler" not in self.model_fields_set:
            object.__setattr__(self, "sampler", "rflow")  # the only sampler a flow model takes
        if (self.sampler == "rflow") != (self.training == "rflow"):
            usable = "rflow" if self.training == "rflow" else "ddpm or ddim"
            raise ValueError(f"`sampler` {self.sampler!r} cannot sample a model trained with {self.training!r}: use {usable}")
        return self


class FlowConfig(_Section):
    """A normalizing flow (``zuko`` neural spline coupling flow) over a frozen autoencoder's
    latents of a whole scan, trained by exact maximum likelihood.

    ``regions``: the latent grid is average-pooled into this many regions per axis and each
    region's latent mean and standard deviation per channel are the features (what the
    input gate scores); ``null`` models the whole latent grid instead, which is what
    synthesis needs (a pooled flow cannot be decoded). ``intensity_descriptors`` adds a few
    statistics of the scan's raw values (range, zero point, background, saturation, noise):
    per-scan normalisation hides scaling errors from the autoencoder by design.
    ``calibration_fraction`` of the scans are held back from training; their scores set the
    gate's threshold at ``false_positive_rate``. ``feature_noise`` (in training standard
    deviations) smooths the density between the few training scans.
    """

    autoencoder: str = ""
    regions: Triple | None = [2, 2, 2]
    intensity_descriptors: bool = True
    transforms: PositiveInt = 4
    hidden_features: Annotated[list[PositiveInt], Field(min_length=1)] = [128, 128]
    bins: PositiveInt = 8
    num_classes: int = Field(0, ge=0)
    feature_noise: float = Field(0.1, ge=0.0)
    flip_augment: bool = True
    calibration_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    false_positive_rate: float = Field(0.01, gt=0.0, lt=0.5)


def _check_levels(channels: list[int], attention_levels: list[bool], groups: int) -> None:
    """One attention flag per level, and channel counts the group norm can split."""
    if len(attention_levels) != len(channels):
        raise ValueError(
            f"`attention_levels` needs one entry per level of `channels` "
            f"({len(channels)}), got {len(attention_levels)}"
        )
    for c in channels:
        if c % groups:
            raise ValueError(
                f"every entry of `channels` must be a multiple of `norm_num_groups` ({groups}), got {c}"
            )


class ModelConfig(_Section):
    """Which network enhances a volume.

    ``upsample_factor`` (per voxel axis i, j, k) is the grid refinement applied to the input
    before the network for super-resolution; ``[1, 1, 1]`` for denoising.
    """

    kind: ModelKind = "unet"
    task: Task = "denoise"
    noise_conditioning: bool = False
    upsample_factor: Triple = [1, 1, 1]
    unet: UNetConfig = Field(default_factory=UNetConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    latent_diffusion: LatentDiffusionConfig = Field(default_factory=LatentDiffusionConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)

    @model_validator(mode="after")
    def _synthesis_task(self) -> ModelConfig:
        synthesis = self.kind in SYNTHESIS_KINDS
        if synthesis and "task" not in self.model_fields_set:
            object.__setattr__(self, "task", "synthesis")  # the only task these kinds have
        if synthesis != (self.task == "synthesis"):
            wanted = "synthesis" if synthesis else "denoise or super_resolution"
            raise ValueError(f"`task` must be {wanted} for a {self.kind!r} model, got {self.task!r}")
        return self


class LossConfig(_Section):
    """Weights of the loss terms (0 switches a term off)."""

    l1: float = Field(1.0, ge=0.0)
    ssim: float = Field(0.0, ge=0.0)
    adversarial: float = Field(0.01, ge=0.0)
    kl: float = Field(1e-6, ge=0.0)
    perceptual: float = Field(0.0, ge=0.0)
    perceptual_network: Literal["squeeze", "alex", "vgg"] = "squeeze"
    perceptual_weights: Path | None = None
    adversarial_start_step: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _perceptual_weights(self) -> LossConfig:
        if self.perceptual > 0 and self.perceptual_weights is None:
            raise ValueError(
                "`perceptual` > 0 needs `perceptual_weights`: a local weights file "
                "(nothing is downloaded); set `perceptual: 0` to train without it"
            )
        return self


class TrainingConfig(_Section):
    """Optimisation, checkpoints and logging."""

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 2
    lr: float = Field(2e-4, gt=0.0)
    discriminator_lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_schedule: LrSchedule = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_clip_norm: float | None = Field(1.0, gt=0.0)
    ema_decay: float | None = Field(0.999, gt=0.0, lt=1.0)
    amp: bool = True
    checkpoint_every: PositiveInt = 100
    log_every: PositiveInt = 10
    val_every: PositiveInt = 200
    seed: int = 0
    device: DeviceName = "auto"
    out_dir: Path = Path("runs")
    loss: LossConfig = Field(default_factory=LossConfig)


class DegradationConfig(_Section):
    """One degradation from :mod:`medgen.data.degrade`, by name, with its parameters.

    Parameters carry their units in their names (``sigma_fraction``, ``dose_fraction``,
    ``factor``); a ``[low, high]`` list asks the random variant to draw from that range.
    """

    name: str
    params: dict[str, ParamValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> DegradationConfig:
        # Build the random transform once so that a typo in a name or parameter stops the
        # run at load time (with the degradation layer's "did you mean ...?" message).
        import importlib.util

        if importlib.util.find_spec("medgen.data.degrade") is None:
            return self  # degradation layer not installed: checked when training starts
        from medgen.data.degrade_base import RandomDegradation

        RandomDegradation(self.name, seed=0, **self.params)
        return self


class NormalisationConfig(_Section):
    """Map physical values to the network's range: ``(x - offset) / scale``.

    ``percentile``: offset and scale from the ``lower``/``upper`` percentiles of each volume.
    ``fixed``: offset = ``lower``, scale = ``upper - lower`` in physical units (e.g. HU).
    """

    mode: NormMode = "percentile"
    lower: float = 0.5
    upper: float = 99.5

    @model_validator(mode="after")
    def _ordered(self) -> NormalisationConfig:
        if not self.upper > self.lower:
            raise ValueError(f"`upper` must be > `lower` ({self.lower}), got {self.upper}")
        if self.mode == "percentile" and not (0.0 <= self.lower and self.upper <= 100.0):
            raise ValueError(f"percentiles must lie in [0, 100], got lower={self.lower}, upper={self.upper}")
        return self


class GridConfig(_Section):
    """The common grid synthesis models work on: every scan is reoriented to RAS and
    resampled onto ``shape_vox`` voxels of ``spacing_mm``, centred on the scan's centre."""

    shape_vox: Triple = [48, 48, 48]
    spacing_mm: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=3, max_length=3)] = [
        4.0,
        4.0,
        4.0,
    ]


class DataConfig(_Section):
    """Clean scans for training and validation (NIfTI files or DICOM folders, globs allowed).

    Relative paths are resolved against the folder of the config file. Synthesis models may
    take their scans from ``labels_csv`` instead (a ``file`` column, relative to the CSV,
    plus ``label`` and covariate columns); ``val_fraction`` of its rows (at least one) are
    held back for validation. ``grid`` puts every scan on one common grid first.
    """

    train: list[str] = []
    val: list[str] = []
    labels_csv: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    grid: GridConfig | None = None
    patch_size_vox: Triple = [32, 32, 32]
    normalisation: NormalisationConfig = Field(default_factory=NormalisationConfig)
    foreground_only: bool = True


class PipelineConfig(_Section):
    """A whole training pipeline: the root of a config file."""

    name: str = "medgen"
    experiment: str = "medgen"
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    degradations: list[DegradationConfig] = Field(default_factory=list)
    data: DataConfig = Field(default_factory=DataConfig)

    @field_validator("name", "experiment")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty string")
        return value


def _dotted(loc: tuple[Any, ...]) -> str:
    """``('training', 'loss', 'l1')`` -> ``'training.loss.l1'`` (list indices included)."""
    return ".".join(str(part) for part in loc) if loc else "<root>"


def _section_for(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of ``loc`` (to suggest close key names)."""
    model: type[BaseModel] | None = PipelineConfig
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _describe(error: dict[str, Any]) -> str:
    """One readable line for one pydantic error: the key and what was expected."""
    loc = tuple(error.get("loc", ()))
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        owner = _section_for(loc)
        hint = ""
        if owner is not None and loc:
            close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1)
            if close:
                hint = f" (did you mean '{close[0]}'?)"
        return f"{_dotted(loc)}: unknown key{hint}"
    if kind == "missing":
        return f"{_dotted(loc)}: required key is missing"
    message = str(error.get("msg", "invalid value"))
    if kind == "value_error":  # our own validators already say what they got
        return f"{_dotted(loc)}: {message.removeprefix('Value error, ')}"
    message = message[:1].lower() + message[1:]
    shown = repr(error.get("input"))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{_dotted(loc)}: {message}, got {shown}"


def format_validation_error(source: str | Path, exc: ValidationError) -> str:
    """``"<file>: <dotted.key>: <what was expected>"`` for the first error, on one line."""
    errors = exc.errors()
    line = f"{source}: {_describe(errors[0])}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more)"
    return line


def _resolve_paths(cfg: PipelineConfig, base_dir: Path) -> PipelineConfig:
    """Make data paths, the autoencoder paths, the perceptual weights and ``training.out_dir``
    absolute against ``base_dir``."""

    def resolve(entry: str) -> str:
        p = Path(entry).expanduser()
        return str(p if p.is_absolute() else (base_dir / p))

    update: dict[str, Any] = {
        "train": [resolve(e) for e in cfg.data.train],
        "val": [resolve(e) for e in cfg.data.val],
    }
    if cfg.data.labels_csv:
        update["labels_csv"] = resolve(cfg.data.labels_csv)
    data = cfg.data.model_copy(update=update)
    for section in ("latent_diffusion", "flow"):  # both name the autoencoder they build on
        sub = getattr(cfg.model, section)
        if sub.autoencoder and "://" not in sub.autoencoder and not sub.autoencoder.startswith(("runs:", "models:")):
            model = cfg.model.model_copy(update={section: sub.model_copy(update={"autoencoder": resolve(sub.autoencoder)})})
            cfg = cfg.model_copy(update={"model": model})
    loss = cfg.training.loss
    if loss.perceptual_weights is not None:
        loss = loss.model_copy(update={"perceptual_weights": Path(resolve(str(loss.perceptual_weights)))})
    out_dir = cfg.training.out_dir.expanduser()
    training = cfg.training.model_copy(
        update={"out_dir": out_dir if out_dir.is_absolute() else base_dir / out_dir, "loss": loss}
    )
    return cfg.model_copy(update={"data": data, "training": training})


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML file.

    Parameters
    ----------
    path : str or Path
        A YAML mapping with the sections of :class:`PipelineConfig`.

    Returns
    -------
    PipelineConfig
        Relative data paths and ``training.out_dir`` are resolved against the file's folder.

    Raises
    ------
    ConfigError
        One line ``"<file>: <dotted.key>: <what was expected>"`` for an unknown key or a value
        of the wrong type; also for a missing or unparsable file.
    """
    import yaml  # lazy: keeps `import medgen.config` cheap

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: <root>: expected a mapping of sections, got {type(raw).__name__}")
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None
    return _resolve_paths(cfg, path.resolve().parent)


def config_to_json(cfg: PipelineConfig) -> str:
    """The config as a JSON string (how checkpoints and MLflow store it)."""
    return cfg.model_dump_json()


def config_from_json(text: str | dict[str, Any], source: str = "<checkpoint>") -> PipelineConfig:
    """Rebuild a :class:`PipelineConfig` stored by :func:`config_to_json` (or its dict)."""
    try:
        data = json.loads(text) if isinstance(text, str) else text
        return PipelineConfig.model_validate(data)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: stored config is not valid JSON ({exc.msg})") from None
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None
