"""Synthesis: sample latents with DDPM, DDIM or rectified flow, decode them (in exact slabs
when large), and restore them as volumes on the training data's grid, in its units, marked
synthetic.

Sample ``i`` of a request draws all its randomness from ``(seed, first_index + i)``, so the
same seed always gives the same volume, whatever ``n`` is and in whichever batch it is made.
Normalizing flows reuse the decoding and marking here (:mod:`medgen.inference.flow_synthesis`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medgen.data.synthesis_data import SynthesisSpec, grid_affine
from medgen.validate import ParameterError, check_int, look_up_option
from medgen.volume import Volume, VolumeMeta

SAMPLERS = ("ddpm", "ddim", "rflow")
LABEL_KEY = "label"


@dataclass
class DiffusionSettings:
    """How the denoiser was trained, and the sampling defaults (from its config)."""

    training: str = "ddpm"  # "ddpm" (noise / v / sample prediction) or "rflow"
    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"
    prediction_type: str = "epsilon"
    sampler: str = "ddim"
    steps: int = 25
    guidance_scale: float = 1.0
    schedule_args: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg) -> DiffusionSettings:
        ld = cfg.model.latent_diffusion
        return cls(ld.training, ld.num_train_timesteps, ld.schedule, ld.prediction_type,
                   ld.sampler, ld.sampling_steps, ld.guidance_scale)  # fmt: skip


@dataclass
class SynthesisRequest:
    """What to make: ``n`` volumes under ``condition`` (e.g. ``{"label": 1, "age_years": 70}``).

    ``sampler``/``steps``/``guidance_scale`` default to the model's settings (latent
    diffusion); ``temperature`` scales a flow model's base noise (default 1).
    """

    n: int = 1
    condition: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    first_index: int = 0
    temperature: float | None = None


def scheduler_for(settings: DiffusionSettings, sampler: str, steps: int):
    """The MONAI scheduler that samples with ``sampler`` in ``steps`` steps."""
    from medgen.inference.schedulers import ddpm_sampling_scheduler, rflow_scheduler, sampling_scheduler

    sampler = look_up_option("sampler", sampler, SAMPLERS)
    steps = check_int("steps", steps, minimum=1)
    if (sampler == "rflow") != (settings.training == "rflow"):
        usable = "rflow" if settings.training == "rflow" else "ddpm or ddim"
        raise ParameterError(f"`sampler` {sampler!r} does not fit a model trained with {settings.training}: use {usable}")
    if steps > settings.num_train_timesteps:
        raise ParameterError(f"`steps` must be <= {settings.num_train_timesteps}, got {steps}")
    if sampler == "rflow":
        return rflow_scheduler(settings.num_train_timesteps, steps)
    args = (steps, settings.num_train_timesteps, settings.schedule, settings.prediction_type)
    if sampler == "ddpm" and steps == settings.num_train_timesteps:
        return ddpm_sampling_scheduler(*args, **settings.schedule_args)
    # DDIM; for "ddpm" in fewer steps than training, DDIM with eta = 1 is the ancestral
    # sampler on the skipped schedule (MONAI's DDPMScheduler only steps t -> t - 1).
    return sampling_scheduler(*args, **settings.schedule_args)


def step_eta(sampler: str) -> float:
    """DDIM's ``eta``: 1 (fresh noise every step, as DDPM) for "ddpm", 0 (deterministic)."""
    return 1.0 if sampler == "ddpm" else 0.0


def default_steps(settings: DiffusionSettings, sampler: str, steps: int | None) -> int:
    """``steps`` when given, else the model's: DDPM walks every training timestep."""
    if steps is not None:
        return steps
    return settings.num_train_timesteps if sampler == "ddpm" else settings.steps


def resolve_condition(spec: SynthesisSpec, condition: Mapping[str, Any]) -> tuple[int | None, dict[str, float]]:
    """Check a condition against what the model was trained on.

    Returns the class label (None: unconditional) and every covariate's value (the model's
    default, else the middle of its training range, when not given).

    Raises
    ------
    ParameterError
        An unknown key (with "did you mean"), a label out of range or not an integer, a
        covariate that is not a number.
    """
    known = ([LABEL_KEY] if spec.num_classes else []) + list(spec.covariates)
    for key in condition:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            takes = ", ".join(known) if known else "no conditions"
            raise ParameterError(f"unknown condition {key!r}{hint}; this model takes: {takes}")
    label = None
    if spec.num_classes and condition.get(LABEL_KEY) is not None:
        raw = condition[LABEL_KEY]
        try:
            label = int(raw)
            if float(raw) != label:
                raise ValueError
        except (TypeError, ValueError):
            raise ParameterError(f"condition `label` must be an integer, got {raw!r}") from None
        if not 0 <= label < spec.num_classes:
            raise ParameterError(f"condition `label` must be in 0..{spec.num_classes - 1}, got {label}")
    covariates = {}
    for name in spec.covariates:
        lo, hi = spec.covariate_ranges.get(name, [0.0, 1.0])
        raw = condition.get(name, spec.covariate_defaults.get(name, (lo + hi) / 2.0))
        try:
            covariates[name] = float(raw)
        except (TypeError, ValueError):
            raise ParameterError(f"condition `{name}` must be a number, got {raw!r}") from None
        if not np.isfinite(covariates[name]):
            raise ParameterError(f"condition `{name}` must be finite, got {raw!r}")
    return label, covariates


def check_latent_shape(latent_shape, multiple: int) -> list[int]:
    """``(C, d, h, w)`` whose sides the denoiser can halve ``log2(multiple)`` times."""
    shape = [int(s) for s in latent_shape]
    if len(shape) != 4 or any(s < 1 for s in shape):
        raise ParameterError(f"latent shape must be (channels, d, h, w), got {shape}")
    if any(s % multiple for s in shape[1:]):
        raise ParameterError(f"latent shape {shape[1:]} cannot be taken by this denoiser: sides must be multiples of {multiple}")
    return shape


def _denoiser_multiple(model: nn.Module) -> int:
    net = getattr(getattr(model, "denoiser", None), "net", None)
    channels = getattr(net, "block_out_channels", None)
    return 2 ** (len(channels) - 1) if channels else 1


@dataclass(frozen=True)
class _Resolved:
    """A request with the model's defaults filled in and its condition checked."""

    sampler: str
    steps: int
    guidance_scale: float
    label: int | None
    covariates: dict[str, float]


def _resolve(settings: DiffusionSettings, spec: SynthesisSpec, request: SynthesisRequest) -> _Resolved:
    sampler = request.sampler or settings.sampler
    guidance = settings.guidance_scale if request.guidance_scale is None else float(request.guidance_scale)
    if guidance < 0:
        raise ParameterError(f"`guidance_scale` must be >= 0, got {guidance}")
    if request.temperature is not None and request.temperature != 1.0:
        raise ParameterError(f"`temperature` applies to flow models only, not to latent diffusion (got {request.temperature})")
    label, covariates = resolve_condition(spec, request.condition)
    return _Resolved(sampler, int(default_steps(settings, sampler, request.steps)), guidance, label, covariates)


def check_request(settings: DiffusionSettings, spec: SynthesisSpec, request: SynthesisRequest) -> None:
    """Raise :class:`ParameterError` for a request the model cannot serve, before any work."""
    resolved = _resolve(settings, spec, request)
    scheduler_for(settings, resolved.sampler, resolved.steps)


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    settings: DiffusionSettings,
    spec: SynthesisSpec,
    request: SynthesisRequest,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Scaled latents ``(n, C, d, h, w)`` of ``request``, one reverse diffusion per sample."""
    from medgen.inference.sampling import reverse_diffusion

    n = check_int("n", request.n, minimum=1)
    resolved = _resolve(settings, spec, request)
    sampler, steps, guidance, label = resolved.sampler, resolved.steps, resolved.guidance_scale, resolved.label
    shape = check_latent_shape(spec.latent_shape, _denoiser_multiple(model))
    device = torch.device(device)
    model = model.to(device).eval()
    labels = None if label is None else torch.full((1,), label, dtype=torch.long, device=device)
    covs = None
    if spec.covariates:
        covs = torch.from_numpy(spec.scale_covariates(resolved.covariates))[None].to(device)
    guided = labels is not None and guidance != 1.0
    null = torch.full((1,), spec.num_classes, dtype=torch.long, device=device) if guided else None

    def predict(x: torch.Tensor, t: int) -> torch.Tensor:
        timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
        out = model(x, timesteps, labels, covs)
        if guided:  # classifier-free guidance: push away from the unconditional prediction
            uncond = model(x, timesteps, null, covs)
            out = uncond + guidance * (out - uncond)
        return out

    samples = []
    for i in range(n):
        index = request.first_index + i
        generator = torch.Generator().manual_seed(_sample_seed(request.seed, index))
        x = torch.randn((1, *shape), generator=generator, dtype=torch.float32).to(device)
        step_generator = torch.Generator(device=device).manual_seed(_sample_seed(request.seed, index, 1))
        scheduler = scheduler_for(settings, sampler, steps)
        samples.append(reverse_diffusion(predict, x, scheduler, step_generator=step_generator, progress=progress,
                                         eta=step_eta(sampler),
                                         description=f"sample {index}"))  # fmt: skip
    return torch.cat(samples)


def _sample_seed(seed: int, index: int, stream: int = 0) -> int:
    return int(np.random.SeedSequence([int(seed), int(index), stream]).generate_state(1)[0])


@torch.no_grad()
def decode_latents(model: nn.Module, latents: torch.Tensor, *, slab_latent_vox: int | None = None) -> torch.Tensor:
    """Images ``(n, 1, D, H, W)`` from scaled latents; with ``slab_latent_vox``, decoded
    exactly in slabs of that many latent voxels (plus a halo) so memory stays bounded for
    large volumes (:func:`medgen.inference.split_decode.split_decode`)."""
    if slab_latent_vox is None or slab_latent_vox >= latents.shape[2]:
        return model.decode(latents)
    from medgen.inference.split_decode import split_decode

    return split_decode(model.autoencoder, latents / model.scale_factor, slab_latent_vox)


def synthetic_volume(image: np.ndarray, spec: SynthesisSpec, record: dict[str, Any], key: str) -> Volume:
    """A generated image (normalised, ``(D, H, W)`` on the grid) as a Volume in the training
    data's units, on its grid (centred at 0 mm), marked synthetic with ``record``."""
    values = image.astype(np.float32) * spec.intensity_scale + spec.intensity_offset
    affine = grid_affine(spec.shape_vox, spec.spacing_mm, (0.0, 0.0, 0.0))
    meta = VolumeMeta(
        modality=spec.modality,
        units=spec.units,
        series_key=key,
        acquisition={"synthetic": True, "synthesis": record},
        provenance=[f"SYNTHETIC: generated by medgen from {record.get('model', 'a synthesis model')}"],
    )
    return Volume(values, affine, meta)


def generate_volumes(
    model: nn.Module,
    settings: DiffusionSettings,
    spec: SynthesisSpec,
    request: SynthesisRequest,
    *,
    device: torch.device | str = "cpu",
    source: str = "",
    slab_latent_vox: int | None = None,
    progress: bool = False,
) -> list[Volume]:
    """``request.n`` synthetic volumes (see :func:`sample_latents`, :func:`decode_latents`)."""
    latents = sample_latents(model, settings, spec, request, device=device, progress=progress)
    resolved = _resolve(settings, spec, request)
    volumes = []
    for i in range(latents.shape[0]):
        image = decode_latents(model, latents[i : i + 1], slab_latent_vox=slab_latent_vox)[0, 0]
        index = request.first_index + i
        record = {
            "model": source,
            "seed": int(request.seed),
            "index": int(index),
            "condition": {**({LABEL_KEY: resolved.label} if resolved.label is not None else {}), **resolved.covariates},
            "sampler": resolved.sampler,
            "steps": resolved.steps,
            "guidance_scale": resolved.guidance_scale,
            "settings": asdict(settings),
        }
        volumes.append(synthetic_volume(image.float().cpu().numpy(), spec, record, f"synthetic-s{request.seed}-{index:05d}"))
    return volumes
