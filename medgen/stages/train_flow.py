"""What ``medgen train`` needs for ``model.kind: flow``: a normalizing flow over a frozen
autoencoder's latents, trained by exact maximum likelihood and calibrated as an input gate.

Every scan is put on the autoencoder's common grid, normalised as the autoencoder's training
scans were, and encoded once (with its left-right mirror when ``flip_augment``); the flow
then trains on fresh posterior samples. ``calibration_fraction`` of the scans (stratified by
label) never reach the flow: after training their scores, beside the training scans', set
the gate's threshold (:class:`medgen.inference.gate.Calibration`), stored in the model file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medgen.config import PipelineConfig
from medgen.data.scan_descriptors import DESCRIPTOR_RESOLUTION
from medgen.data.synthesis_data import CohortRecord, LatentBatches, read_labels_csv, split_records
from medgen.errors import ConfigError, InputError
from medgen.stages.train_synthesis import (
    SynthesisTraining,
    _spec,
    _volume,
    build_on_autoencoder,
    encode_all,
    load_base_autoencoder,
    on_autoencoder_grid,
    with_mirrors,
)


def _flow_records(cfg: PipelineConfig, source: str) -> tuple[list[CohortRecord], list[CohortRecord]]:
    """(training, calibration) scans: ``data.val`` calibrates when given, else a held-back
    ``calibration_fraction`` of the labels CSV or of ``data.train``."""
    from medgen.stages.common import expand_paths

    f = cfg.model.flow
    if cfg.data.labels_csv:
        records = read_labels_csv(cfg.data.labels_csv, (), need_label=f.num_classes > 0)
        train, held = split_records(records, f.calibration_fraction, cfg.training.seed)
    elif cfg.data.train:
        train = [CohortRecord(p) for p in expand_paths(cfg.data.train, "data.train")]
        if cfg.data.val:
            held = [CohortRecord(p) for p in expand_paths(cfg.data.val, "data.val")]
        else:
            train, held = split_records(train, f.calibration_fraction, cfg.training.seed)
    else:
        raise ConfigError(f"{source}: data.train: no training scans given (or set data.labels_csv)")
    if len(train) < 2 or len(held) < 2:
        raise ConfigError(
            f"{source}: a flow needs at least 2 training and 2 held-back calibration scans, "
            f"got {len(train)} and {len(held)} (add scans or raise model.flow.calibration_fraction)"
        )
    if f.num_classes:
        for r in train + held:
            if r.label is None or not 0 <= r.label < f.num_classes:
                raise InputError(cfg.data.labels_csv, f"{r.path.name}: label {r.label} is outside 0..{f.num_classes - 1}")
    return train, held


def _prepared(cfg: PipelineConfig, records: list[CohortRecord]):
    """Volumes on the grid, normalised images ``(N, D, H, W)`` and descriptors ``(N, K)``."""
    from medgen.inference.gate import prepare_scan, unscorable_reason
    from medgen.inference.normalise import IntensityNorm

    grid, n = cfg.data.grid, cfg.data.normalisation
    volumes, images, descriptors = [], [], []
    for record in records:
        volume = _volume(record, cfg)  # already on the grid
        reason = unscorable_reason(volume.values(np.float32))
        if reason is not None:
            raise InputError(record.path, f"cannot train a flow on it: {reason}")
        image, desc = prepare_scan(volume, grid.shape_vox, grid.spacing_mm, n, cfg.model.flow.intensity_descriptors)
        volumes.append(volume)
        images.append(image)
        descriptors.append(desc)
    norms = [IntensityNorm.fit(v.values(np.float32), n.mode, n.lower, n.upper) for v in volumes]
    stacked = np.stack(descriptors).astype(np.float32) if cfg.model.flow.intensity_descriptors else None
    return volumes, norms, np.stack(images), stacked


@torch.no_grad()
def flow_scores(model, images: np.ndarray, descriptors: np.ndarray | None, device) -> list[float]:
    """Negative log-likelihood per feature of normalised images (posterior-mean latents)."""
    model = model.to(device).eval()
    means, _ = encode_all(model, images, device)
    d = None if descriptors is None else torch.from_numpy(descriptors)
    return [
        float(model.nll_per_feature(means[i : i + 1].to(device), None if d is None else d[i : i + 1].to(device))[0])
        for i in range(len(means))
    ]


def standardisation_floor(model, means: torch.Tensor) -> torch.Tensor:
    """Smallest SD per feature: for latent features 5 % of the spread of all latent values
    (a regional mean that moves less than that is the same anatomy), for descriptors the
    difference that matters in their own units (:data:`DESCRIPTOR_RESOLUTION`)."""
    floor = torch.full((model.dim,), 0.05 * float(means.std()) + 1e-6)
    if model.num_descriptors:
        floor[model.latent_dim :] = torch.tensor(DESCRIPTOR_RESOLUTION)
    return floor


def flow_training(cfg: PipelineConfig, dist, source: str) -> SynthesisTraining:
    from medgen.inference.gate import SCORE_NAME, Calibration
    from medgen.models.registry import flow_latent_shape
    from medgen.training.objectives_synthesis import FlowObjective

    f = cfg.model.flow
    ae = load_base_autoencoder(f.autoencoder, "model.flow.autoencoder", source)
    cfg = on_autoencoder_grid(cfg, ae, source)
    # Scans must be normalised exactly as the autoencoder's training scans were.
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"normalisation": ae.config.data.normalisation})})
    latent_shape = flow_latent_shape(cfg)
    if f.regions is not None and any(r > s for r, s in zip(f.regions, latent_shape)):
        raise ConfigError(f"{source}: model.flow.regions: at most the latent grid {latent_shape} per axis, got {f.regions}")

    train_records, held_records = _flow_records(cfg, source)
    volumes, norms, images, descriptors = _prepared(cfg, train_records)
    labels = np.array([r.label for r in train_records]) if f.num_classes else None
    if f.flip_augment:
        images, descriptors, labels = with_mirrors(images, descriptors, labels)
    model, means, stds = build_on_autoencoder(cfg, ae, images, dist.device)
    d = None if descriptors is None else torch.from_numpy(descriptors)
    model.set_standardisation(model.raw_features(means, d), standardisation_floor(model, means))
    if f.num_classes:
        counts = np.bincount(labels, minlength=f.num_classes) + 1.0  # +1: no class gets zero prior
        model.class_log_prior.copy_(torch.from_numpy(np.log(counts / counts.sum())).float())
    batches = LatentBatches(means, stds, labels, None, cfg.training.batch_size, seed=cfg.training.seed,
                            rank=dist.rank, descriptors=descriptors)  # fmt: skip
    spec = _spec(cfg, volumes, norms)
    spec.latent_shape = list(means.shape[1:])
    metadata = {
        "synthesis": spec.to_dict(),
        "autoencoder_source": Path(f.autoencoder).name if "://" not in f.autoencoder else f.autoencoder,
        "autoencoder_step": int(ae.metadata.get("step", 0) or 0),
        "flow_features": model.dim,
    }
    held = _prepared(cfg, held_records)[2:] if dist.is_main else None
    n_train = len(train_records)

    def make_validator(run, device):
        def validate(trained, step: int) -> dict[str, float]:
            return {f"val/held_back_{SCORE_NAME}": float(np.mean(flow_scores(trained, *held, device)))}

        return validate if held is not None else None

    def finalise(trained, run) -> dict:
        device = dist.device
        held_scores = flow_scores(trained, *held, device)
        train_scores = flow_scores(trained, images[:n_train], None if descriptors is None else descriptors[:n_train], device)
        calibration = Calibration.fit(held_scores, train_scores, f.false_positive_rate)
        if run is not None:
            run.log_metrics({
                f"gate/held_back_{SCORE_NAME}_mean": calibration.centre,
                "gate/held_back_sd": calibration.spread,
                f"gate/train_{SCORE_NAME}_mean": float(np.mean(train_scores)),
                "gate/z_threshold": calibration.z_threshold,
                "gate/n_held_back": len(held_scores),
            })  # fmt: skip
        return {"gate": calibration.to_dict()}

    return SynthesisTraining(
        config=cfg,
        paths=[r.path for r in train_records],
        batches=batches,
        model=model,
        objective=FlowObjective(f.feature_noise),
        metadata=metadata,
        make_validator=make_validator,
        finalise=finalise,
    )
