"""What ``medgen train`` needs for the synthesis kinds: data, network, objective, validation.

* ``autoencoder``: patches of the training scans (on the common grid when ``data.grid`` is
  set) normalised per scan like every other model; L1 + KL + patch-adversarial loss.
  Validation: reconstruction PSNR/SSIM (whole and foreground) of the held-back scans.
* ``latent_diffusion``: the trained autoencoder (``model.latent_diffusion.autoencoder``)
  is loaded and frozen inside the model; every training scan (and its left-right mirror) is
  put on the grid, encoded once, and the latents scaled by 1/std; the denoiser then trains
  on fresh posterior samples of them. Validation: a sample per class, as a montage.

The :class:`~medgen.data.synthesis_data.SynthesisSpec` (grid, units, conditions) goes into
the model file's metadata so that ``medgen synthesize`` needs nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medgen.config import PipelineConfig
from medgen.data.synthesis_data import (
    CohortRecord,
    LatentBatches,
    SynthesisSpec,
    onto_grid,
    read_labels_csv,
    split_records,
)
from medgen.errors import ConfigError, InputError
from medgen.volume import Volume, VolumeMeta

VAL_CROP_VOX = (96, 96, 96)
ENCODE_BATCH = 4


@dataclass
class SynthesisTraining:
    """Everything :func:`medgen.stages.train.train` plugs into the trainer."""

    config: PipelineConfig
    paths: list[Path]
    batches: Any
    model: nn.Module
    objective: nn.Module
    metadata: dict[str, Any] = field(default_factory=dict)
    make_validator: Callable[[Any, torch.device], Callable[[nn.Module, int], dict[str, float]]] | None = None
    # After training, on the main rank: the trained (EMA) model and the run -> metadata to add.
    finalise: Callable[[nn.Module, Any], dict[str, Any]] | None = None


def _records(cfg: PipelineConfig, need_label: bool, covariates: list[str]):
    """(train, val) records from ``data.labels_csv`` or ``data.train``/``data.val``."""
    from medgen.stages.common import expand_paths

    if cfg.data.labels_csv:
        records = read_labels_csv(cfg.data.labels_csv, covariates, need_label=need_label)
        return split_records(records, cfg.data.val_fraction, cfg.training.seed)
    if need_label or covariates:
        raise ConfigError("data.labels_csv: a conditioned model needs a labels CSV (labels and covariates)")
    if not cfg.data.train:
        raise ConfigError("data.train: no training scans given (or set data.labels_csv)")
    train = [CohortRecord(p) for p in expand_paths(cfg.data.train, "data.train")]
    val = [CohortRecord(p) for p in expand_paths(cfg.data.val, "data.val")] if cfg.data.val else []
    return train, val


def _volume(record: CohortRecord, cfg: PipelineConfig) -> Volume:
    """The scan as it is, or on the common grid (physical values, float32)."""
    from medgen.stages.common import load_volume, require_3d

    volume = require_3d(load_volume(record.path), record.path)
    if cfg.data.grid is None:
        return volume
    values, affine = onto_grid(volume, cfg.data.grid.shape_vox, cfg.data.grid.spacing_mm)
    return Volume(values, affine, VolumeMeta(modality=volume.meta.modality, units=volume.meta.units))


def _spec(cfg: PipelineConfig, volumes: list[Volume], norms, covariate_ranges=None) -> SynthesisSpec | None:
    if cfg.data.grid is None:
        return None
    first = volumes[0].meta
    ld = cfg.model.latent_diffusion
    num_classes = {"latent_diffusion": ld.num_classes, "flow": cfg.model.flow.num_classes}.get(cfg.model.kind, 0)
    return SynthesisSpec(
        shape_vox=list(cfg.data.grid.shape_vox),
        spacing_mm=list(cfg.data.grid.spacing_mm),
        intensity_offset=float(np.median([n.offset for n in norms])),
        intensity_scale=float(np.median([n.scale for n in norms])),
        units=first.units,
        modality=first.modality or "OT",
        num_classes=num_classes,
        covariates=list(ld.covariates) if cfg.model.kind == "latent_diffusion" else [],
        covariate_ranges=covariate_ranges or {},
    )


def _check_divisible(shape, factor: int, what: str, source: str) -> None:
    for axis, side in enumerate(shape):
        if side % factor:
            raise ConfigError(f"{source}: {what}.{axis}: must be a multiple of {factor}, got {side}")


# -- autoencoder ------------------------------------------------------------------------
def autoencoder_training(cfg: PipelineConfig, dist, source: str) -> SynthesisTraining:
    from medgen.models import build_discriminator, build_model
    from medgen.training.objectives_synthesis import AutoencoderObjective, perceptual_loss
    from medgen.training.patches import PatchPairs, TrainingVolume

    factor = cfg.model.autoencoder.downsample_factor
    if cfg.data.grid is not None:
        # Whole grid volumes, as the latent diffusion model will encode them: GroupNorm
        # statistics of smaller patches differ (measured: 17 vs 27 dB on held-back phantoms).
        _check_divisible(cfg.data.grid.shape_vox, factor, "data.grid.shape_vox", source)
        if "patch_size_vox" in cfg.data.model_fields_set and cfg.data.patch_size_vox != cfg.data.grid.shape_vox:
            raise ConfigError(
                f"{source}: data.patch_size_vox: with data.grid the autoencoder trains on whole grid volumes "
                f"({cfg.data.grid.shape_vox}), the size the latent diffusion model encodes; leave it out, got "
                f"{cfg.data.patch_size_vox}"
            )
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"patch_size_vox": list(cfg.data.grid.shape_vox)})})
    _check_divisible(cfg.data.patch_size_vox, factor, "data.patch_size_vox", source)
    train_records, val_records = _records(cfg, need_label=False, covariates=[])
    n = cfg.data.normalisation
    volumes = [_volume(r, cfg) for r in train_records]
    training_volumes = [
        TrainingVolume.from_volume(v, n.mode, n.lower, n.upper, cfg.data.foreground_only, name=r.path.name)
        for v, r in zip(volumes, train_records)
    ]
    batches = PatchPairs(
        training_volumes, [], cfg.data.patch_size_vox, cfg.training.batch_size, seed=cfg.training.seed, rank=dist.rank
    )
    torch.manual_seed(cfg.training.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    loss = cfg.training.loss
    perceptual = None
    if loss.perceptual:
        perceptual = perceptual_loss(loss.perceptual_network, loss.perceptual_weights)
    objective = AutoencoderObjective(
        build_discriminator(cfg), l1=loss.l1, kl=loss.kl, adversarial=loss.adversarial,
        lr=cfg.training.discriminator_lr, perceptual=loss.perceptual, perceptual_module=perceptual,
        adversarial_start_step=loss.adversarial_start_step,
    )  # fmt: skip
    spec = _spec(cfg, volumes, [tv.norm for tv in training_volumes])
    val_volumes = [_volume(r, cfg) for r in val_records] if dist.is_main else []

    def make_validator(run, device):
        return reconstruction_validator(cfg, val_volumes, run, device) if val_volumes else None

    return SynthesisTraining(
        config=cfg,
        paths=[r.path for r in train_records],
        batches=batches,
        model=model,
        objective=objective,
        metadata={"synthesis": spec.to_dict()} if spec is not None else {},
        make_validator=make_validator,
    )


def reconstruct(model: nn.Module, normalised: np.ndarray, device, patch_vox=None) -> np.ndarray:
    """Autoencoder reconstruction (posterior mean) of one normalised volume ``(I, J, K)``.

    With ``patch_vox`` (the training patch size) a larger volume goes through in overlapping
    patches of that size (Gaussian-blended): a patch-trained autoencoder's GroupNorm
    statistics hold for patches, not for whole volumes.
    """
    x = torch.from_numpy(np.ascontiguousarray(normalised))[None, None].to(device)

    def autoencode(batch: torch.Tensor) -> torch.Tensor:
        return model.decode(model.encode(batch)[0])

    with torch.inference_mode():
        if patch_vox is None or all(s <= p for s, p in zip(x.shape[2:], patch_vox)):
            return autoencode(x)[0, 0].float().cpu().numpy()
        from monai.inferers import sliding_window_inference  # lazy: MONAI is heavy to import

        out = sliding_window_inference(x, tuple(patch_vox), 1, autoencode, overlap=0.5, mode="gaussian")
        return out[0, 0].float().cpu().numpy()


def reconstruction_validator(cfg: PipelineConfig, volumes: list[Volume], run, device):
    """``on_validate``: reconstruction quality of held-back scans (normalised units)."""
    from medgen.inference.normalise import IntensityNorm
    from medgen.metrics.masks import foreground_mask
    from medgen.metrics.quality import quality_report
    from medgen.stages.common import central_crop

    n = cfg.data.normalisation
    factor = cfg.model.autoencoder.downsample_factor
    crops = [central_crop(v, VAL_CROP_VOX, multiple=(factor,) * 3) for v in volumes]
    prepared = []
    for crop in crops:
        values = crop.values(np.float32)
        prepared.append((crop, IntensityNorm.fit(values, n.mode, n.lower, n.upper).forward(values)))

    def validate(model, step: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        for i, (crop, x) in enumerate(prepared):
            out = reconstruct(model, x, device, patch_vox=cfg.data.patch_size_vox)
            report = quality_report(out, x, 1.0, mask=foreground_mask(x))
            for key, value in report.items():
                sums[key] = sums.get(key, 0.0) + value
            if run is not None and i == 0:
                images = {"input": crop.with_array(x), "reconstruction": crop.with_array(out),
                          "difference": crop.with_array(out - x)}  # fmt: skip
                run.log_montage(images, f"montages/val{i}-step{step:07d}.png")
        return {f"val/{k}": v / len(prepared) for k, v in sums.items()}

    return validate


# -- latent diffusion -------------------------------------------------------------------
def load_base_autoencoder(ref: str, key: str, source: str):
    """The trained autoencoder a latent model builds on (``key`` names the config entry)."""
    from medgen.inference.loading import article, load_model

    if not ref:
        raise ConfigError(f"{source}: {key}: name the trained autoencoder")
    loaded = load_model(ref)
    if loaded.kind != "autoencoder":
        raise InputError(ref, f"is {article(loaded.kind)} model, not an autoencoder")
    return loaded


def on_autoencoder_grid(cfg: PipelineConfig, ae, source: str) -> PipelineConfig:
    """``cfg`` with the autoencoder's architecture, and its training grid when ``data.grid``
    is not set; the grid must be divisible by the autoencoder's downsampling."""
    data = cfg.data
    if data.grid is None:
        stored = ae.metadata.get("synthesis")
        if not stored:
            raise ConfigError(
                f"{source}: data.grid: a latent model needs a common grid (set data.grid, or train the autoencoder with one)"
            )
        from medgen.config import GridConfig

        data = data.model_copy(update={"grid": GridConfig(shape_vox=stored["shape_vox"], spacing_mm=stored["spacing_mm"])})
    model_section = cfg.model.model_copy(update={"autoencoder": ae.config.model.autoencoder})
    cfg = cfg.model_copy(update={"model": model_section, "data": data})
    _check_divisible(cfg.data.grid.shape_vox, cfg.model.autoencoder.downsample_factor, "data.grid.shape_vox", source)
    return cfg


def _covariate_matrix(records, names: list[str]) -> tuple[np.ndarray | None, dict[str, list[float]]]:
    if not names:
        return None, {}
    raw = np.array([[r.covariates[n] for n in names] for r in records], np.float64)
    lo, hi = raw.min(axis=0), raw.max(axis=0)
    scaled = np.where(hi > lo, (raw - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    return scaled.astype(np.float32), {n: [float(a), float(b)] for n, a, b in zip(names, lo, hi)}


def encode_all(model, images: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled posterior means and stds of normalised images ``(N, D, H, W)``."""
    means, stds = [], []
    ae = model.autoencoder.to(device).eval()
    with torch.inference_mode():
        for start in range(0, len(images), ENCODE_BATCH):
            x = torch.from_numpy(images[start : start + ENCODE_BATCH])[:, None].to(device)
            m, s = ae.encode(x)
            means.append(m.float().cpu())
            stds.append(s.float().cpu())
    return torch.cat(means), torch.cat(stds)


def with_mirrors(images: np.ndarray, *per_scan):
    """Images ``(N, D, H, W)`` and their left-right mirrors (heads are near mirror-symmetric:
    the mirrored scans double the data); per-scan arrays repeated to match, None kept."""
    mirrored = np.concatenate([images, images[:, ::-1].copy()])
    return (mirrored, *[None if a is None else np.concatenate([a, a]) for a in per_scan])


def build_on_autoencoder(cfg: PipelineConfig, ae, images: np.ndarray, device):
    """``cfg``'s latent model holding the trained autoencoder ``ae``, and the unscaled posterior
    means and stds of ``images``; the model is left on the CPU (the trainer places it)."""
    from medgen.models import build_model

    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg)
    model.autoencoder.load_state_dict(ae.model.state_dict())
    means, stds = encode_all(model, images, device)
    return model.cpu(), means, stds


def latent_diffusion_training(cfg: PipelineConfig, dist, source: str) -> SynthesisTraining:
    from medgen.inference.normalise import IntensityNorm
    from medgen.training.objectives_synthesis import LatentDiffusionObjective

    ld = cfg.model.latent_diffusion
    ae = load_base_autoencoder(ld.autoencoder, "model.latent_diffusion.autoencoder", source)
    cfg = on_autoencoder_grid(cfg, ae, source)
    factor = cfg.model.autoencoder.downsample_factor
    latent_side = [s // factor for s in cfg.data.grid.shape_vox]
    _check_divisible(latent_side, 2 ** (len(ld.channels) - 1), "latent shape (data.grid.shape_vox / autoencoder downsampling)", source)

    train_records, val_records = _records(cfg, need_label=ld.num_classes > 0, covariates=list(ld.covariates))
    if ld.num_classes:
        for r in train_records + val_records:
            if r.label is None or not 0 <= r.label < ld.num_classes:
                raise InputError(cfg.data.labels_csv, f"{r.path.name}: label {r.label} is outside 0..{ld.num_classes - 1}")
    records = train_records + val_records  # a generative model learns from every scan
    n = cfg.data.normalisation
    volumes = [_volume(r, cfg) for r in records]
    norms = [IntensityNorm.fit(v.values(np.float32), n.mode, n.lower, n.upper) for v in volumes]
    images = np.stack([norm.forward(v.values(np.float32)) for v, norm in zip(volumes, norms)])
    labels = np.array([r.label for r in records]) if ld.num_classes else None
    covariates, ranges = _covariate_matrix(records, list(ld.covariates))
    if ld.flip_augment:
        images, labels, covariates = with_mirrors(images, labels, covariates)
    model, means, stds = build_on_autoencoder(cfg, ae, images, dist.device)
    scale = 1.0 / float(means.std())
    model.scale_factor.fill_(scale)
    batches = LatentBatches(means * scale, stds * scale, labels, covariates, cfg.training.batch_size,
                            seed=cfg.training.seed, rank=dist.rank)  # fmt: skip
    objective = LatentDiffusionObjective(
        ld.training, ld.num_train_timesteps, ld.schedule, ld.prediction_type, ld.num_classes, ld.label_dropout
    )
    spec = _spec(cfg, volumes, norms, ranges)
    spec.latent_shape = list(means.shape[1:])
    metadata = {
        "synthesis": spec.to_dict(),
        "latent_scale_factor": scale,
        "autoencoder_source": Path(ld.autoencoder).name if "://" not in ld.autoencoder else ld.autoencoder,
        "autoencoder_step": int(ae.metadata.get("step", 0) or 0),
    }

    def make_validator(run, device):
        return sample_validator(cfg, spec, run, device) if run is not None else None

    return SynthesisTraining(cfg, [r.path for r in records], batches, model, objective, metadata, make_validator)


def sample_validator(cfg: PipelineConfig, spec: SynthesisSpec, run, device):
    """``on_validate``: one sample per class (10 steps), logged as a montage."""
    from medgen.inference.synthesis import DiffusionSettings, SynthesisRequest, generate_volumes

    settings = DiffusionSettings.from_config(cfg)
    settings.sampler = "rflow" if settings.training == "rflow" else "ddim"

    def validate(model, step: int) -> dict[str, float]:
        labels = list(range(spec.num_classes)) or [None]
        images = {}
        for label in labels:
            condition = {"label": label} if label is not None else {}
            condition.update({c: float(np.mean(spec.covariate_ranges[c])) for c in spec.covariates})
            request = SynthesisRequest(n=1, condition=condition, seed=0, steps=10)
            volume = generate_volumes(model, settings, spec, request, device=device)[0]
            images[f"label {label}" if label is not None else "sample"] = volume
        run.log_montage(images, f"montages/samples-step{step:07d}.png")
        return {}

    return validate


def synthesis_training(cfg: PipelineConfig, dist, source: str) -> SynthesisTraining:
    """Set-up for ``cfg.model.kind`` in ``autoencoder``/``latent_diffusion``/``flow``."""
    if cfg.model.kind == "autoencoder":
        return autoencoder_training(cfg, dist, source)
    if cfg.model.kind == "flow":
        from medgen.stages.train_flow import flow_training

        return flow_training(cfg, dist, source)
    return latent_diffusion_training(cfg, dist, source)
