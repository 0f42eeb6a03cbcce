"""``medgen train PIPELINE.yaml``: train an enhancement model and log it to MLflow.

The config is validated before any work. Training resumes from ``<out_dir>/checkpoints/last.pt``
when it exists (exactly: same batches, same weights as an uninterrupted run). Under
``torchrun --nproc_per_node N -m medgen.stages.train PIPELINE.yaml`` it runs data-parallel
(gloo on the CPU, NCCL on GPUs); only rank 0 writes files and talks to MLflow.

Outputs in ``training.out_dir``: ``checkpoints/step-*.pt`` + ``last.pt`` (full training state)
and ``model.pt`` (the weights to enhance with, EMA when kept, plus the metadata that rebuilds the
network). The MLflow run holds the flattened config as params, the config file, the data hash,
losses per step, validation PSNR/SSIM/MS-SSIM/NRMSE, montages and the model.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgen.config import SYNTHESIS_KINDS, PipelineConfig, load_config
from medgen.errors import ConfigError

MODEL_FILE = "model.pt"
CHECKPOINT_DIR = "checkpoints"
VAL_CROP_VOX = (96, 96, 96)


@dataclass
class TrainSummary:
    """What a training run produced."""

    config: PipelineConfig
    model_path: Path | None
    model_uri: str | None
    run_id: str | None
    steps_done: int
    final_step: int
    seconds: float
    resumed_from_step: int = 0
    last_logs: dict[str, float] = field(default_factory=dict)
    val_metrics: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def portable_config(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` without local paths (data files, output folder), for checkpoints and MLflow:
    folder names may name patients, and the data is identified by its hash instead."""
    ld = cfg.model.latent_diffusion
    autoencoder = Path(ld.autoencoder).name if ld.autoencoder and "://" not in ld.autoencoder else ld.autoencoder
    return cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"train": [], "val": [], "labels_csv": None}),
            "training": cfg.training.model_copy(update={"out_dir": Path(".")}),
            "model": cfg.model.model_copy(
                update={"latent_diffusion": ld.model_copy(update={"autoencoder": autoencoder})}
            ),
        }
    )


def build_objective(cfg: PipelineConfig):
    """The training objective for ``cfg.model.kind``."""
    from medgen.training.objectives import AdversarialObjective, DiffusionObjective, SupervisedObjective

    loss = cfg.training.loss
    kind = cfg.model.kind
    if kind == "unet":
        return SupervisedObjective(l1=loss.l1, ssim=loss.ssim)
    if kind == "gan":
        from medgen.models import build_discriminator

        return AdversarialObjective(
            build_discriminator(cfg),
            l1=loss.l1,
            ssim=loss.ssim,
            adversarial=loss.adversarial,
            lr=cfg.training.discriminator_lr,
        )
    d = cfg.model.diffusion
    return DiffusionObjective(d.num_train_timesteps, d.schedule, d.prediction_type, d.target, d.target_scale)


def _check_patch_size(cfg: PipelineConfig, source: str) -> None:
    multiple = 16 if cfg.model.kind in ("unet", "gan") else 2 ** (len(cfg.model.diffusion.channels) - 1)
    minimum = 32 if cfg.model.kind in ("unet", "gan") else multiple
    for axis, side in enumerate(cfg.data.patch_size_vox):
        if side % multiple or side < minimum:
            raise ConfigError(
                f"{source}: data.patch_size_vox.{axis}: must be a multiple of {multiple} and >= {minimum} "
                f"for a {cfg.model.kind} model, got {side}"
            )


def grid_shrink_factor(cfg: PipelineConfig) -> list[float] | None:
    """How much the degradations coarsen the grid per axis (None when drawn from a range)."""
    shrink = [1.0, 1.0, 1.0]
    for spec in cfg.degradations:
        factor = spec.params.get("factor", 2)
        if isinstance(factor, list):
            return None
        if spec.name == "thick_slices":
            shrink[int(spec.params.get("axis", 2))] *= float(factor)
        elif spec.name == "downsample":
            shrink = [s * float(factor) for s in shrink]
    return shrink


def _check_grid(cfg: PipelineConfig, source: str) -> None:
    shrink = grid_shrink_factor(cfg)
    if shrink is not None and [float(f) for f in cfg.model.upsample_factor] != shrink:
        wanted = [int(s) if float(s).is_integer() else s for s in shrink]
        raise ConfigError(
            f"{source}: model.upsample_factor: the degradations coarsen the grid by {wanted}; "
            f"the model must refine it as much, got {cfg.model.upsample_factor}"
        )


def check_trainable(cfg: PipelineConfig, source: str) -> None:
    """Rules across sections, checked before any work: patch sizes the network can pool, and a
    model that refines the grid exactly as much as the degradations coarsen it (synthesis
    models check their shapes when their data is prepared)."""
    if cfg.model.kind in SYNTHESIS_KINDS:
        return
    _check_patch_size(cfg, source)
    _check_grid(cfg, source)


def _training_volumes(cfg: PipelineConfig):
    from medgen.stages.common import expand_paths, load_volume, require_3d
    from medgen.training.patches import TrainingVolume

    if not cfg.data.train:
        raise ConfigError("data.train: no training scans given")
    paths = expand_paths(cfg.data.train, "data.train")
    n = cfg.data.normalisation
    volumes = [
        TrainingVolume.from_volume(
            require_3d(load_volume(p), p), n.mode, n.lower, n.upper, cfg.data.foreground_only, name=p.name
        )
        for p in paths
    ]
    return paths, volumes


def _validation_pairs(cfg: PipelineConfig) -> list[tuple[Any, Any]]:
    """(degraded, clean) Volume pairs from ``data.val``: a central crop, degraded once (seeded)."""
    from medgen.data.degrade import DegradationChain, build_degradation
    from medgen.stages.common import absolute_noise_params, central_crop, expand_paths, load_volume, require_3d

    pairs = []
    if not cfg.data.val:
        return pairs
    shrink = [int(round(f)) for f in (grid_shrink_factor(cfg) or [1.0, 1.0, 1.0])]
    for i, path in enumerate(expand_paths(cfg.data.val, "data.val")):
        full = require_3d(load_volume(path), path)
        if full.array.ndim == 4:
            full = full.with_array(full.array[..., 0], full.slope, full.intercept)
        values = full.values(np.float32)
        clean = central_crop(full, VAL_CROP_VOX, multiple=shrink)
        clean = clean.with_array(clean.values(np.float32))
        steps = [
            build_degradation(
                s.name, seed=cfg.training.seed + 1000 + i, **absolute_noise_params(s.params, values)
            )
            for s in cfg.degradations
        ]
        degraded = DegradationChain(steps)(clean) if steps else clean
        pairs.append((degraded, clean))
    return pairs


def _make_validator(cfg: PipelineConfig, pairs, tracker_run, device):
    """``on_validate(model, step)``: enhance each validation pair, return mean metrics, log montages."""
    from medgen.inference.enhance import enhance_with
    from medgen.inference.loading import LoadedModel
    from medgen.metrics.masks import foreground_mask
    from medgen.metrics.quality import quality_report
    from medgen.stages.common import reference_data_range

    def validate(model, step: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        for i, (degraded, clean) in enumerate(pairs):
            result = enhance_with(LoadedModel(model, cfg), degraded, device=device, progress=False)
            ref = clean.values(np.float32)
            out = result.volume.values(np.float32)
            report = quality_report(out, ref, reference_data_range(ref), mask=foreground_mask(ref))
            for key, value in report.items():
                sums[key] = sums.get(key, 0.0) + value
            if tracker_run is not None:
                images = {
                    "degraded": degraded,
                    "output": result.volume,
                    "reference": clean,
                    "difference": clean.with_array(out - ref),
                }
                if result.uncertainty is not None:
                    images["uncertainty"] = result.uncertainty
                tracker_run.log_montage(images, f"montages/val{i}-step{step:07d}.png")
        return {f"val/{k}": v / len(pairs) for k, v in sums.items()} if pairs else {}

    return validate


def train(
    config_path: str | Path,
    *,
    resume: bool = True,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    register_as: str | None = None,
    progress: bool = True,
) -> TrainSummary:
    """Train the model described by ``config_path``.

    Parameters
    ----------
    config_path : path
        Pipeline YAML (see :mod:`medgen.config`); validated before anything else happens.
    resume : bool
        Continue from ``<out_dir>/checkpoints/last.pt`` when present.
    tracking_uri : str, optional
        MLflow tracking URI (default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
    parent_run_id : str, optional
        Nest this run under a pipeline's parent run.
    register_as : str, optional
        Also register the model under this name in the MLflow model registry.

    Returns
    -------
    TrainSummary
        On ranks other than 0 the paths, URI and run id are None.
    """
    import torch

    from medgen.config import config_to_json
    from medgen.models import build_model, count_parameters
    from medgen.stages.common import files_sha256
    from medgen.training.checkpoint import load_checkpoint
    from medgen.training.distributed import init_distributed, shutdown_distributed
    from medgen.training.patches import DegradationSpec, PatchPairs
    from medgen.training.trainer import LAST_CHECKPOINT, Trainer

    config_path = Path(config_path)
    cfg = load_config(config_path)
    check_trainable(cfg, str(config_path))
    t = cfg.training
    dist = init_distributed(t.device)
    try:
        seed_everything(t.seed + dist.rank)
        synthesis = None
        if cfg.model.kind in SYNTHESIS_KINDS:
            from medgen.stages.train_synthesis import synthesis_training

            synthesis = synthesis_training(cfg, dist, str(config_path))
            cfg, paths, batches = synthesis.config, synthesis.paths, synthesis.batches
            model, objective = synthesis.model, synthesis.objective
        else:
            paths, volumes = _training_volumes(cfg)
            batches = PatchPairs(
                volumes,
                [DegradationSpec(d.name, dict(d.params)) for d in cfg.degradations],
                cfg.data.patch_size_vox,
                t.batch_size,
                seed=t.seed,
                rank=dist.rank,
            )
            torch.manual_seed(t.seed)  # identical initial weights on every rank
            model = build_model(cfg)
            objective = build_objective(cfg)
        seed_everything(t.seed + dist.rank)

        out_dir = Path(t.out_dir)
        ckpt_dir = out_dir / CHECKPOINT_DIR
        last = ckpt_dir / LAST_CHECKPOINT
        previous_run_id = None
        if resume and last.is_file():
            import json

            previous_run_id = json.loads(load_checkpoint(last).get("metadata_json") or "{}").get(
                "mlflow_run_id"
            )

        data_hash = files_sha256(paths) if dist.is_main else ""
        tracker = run = None
        if dist.is_main:
            from medgen.run_names import run_name
            from medgen.tracking import RunHandle, Tracker, flatten_config

            tracker = Tracker(cfg.experiment, uri=tracking_uri)
            if previous_run_id is not None and tracker.reopen_run(previous_run_id):
                run_id = previous_run_id
            else:
                n_scans = f"{len(paths)}-scan" + ("s" if len(paths) != 1 else "")
                what = cfg.model.kind if cfg.model.task == "synthesis" else f"{cfg.model.kind}-{cfg.model.task}"
                run_id = tracker.start_run(
                    run_name("train", cfg.name, what, f"{cfg.training.steps}steps", n_scans),
                    parent_id=parent_run_id,
                    tags={
                        "medgen.stage": "train",
                        "medgen.model_kind": cfg.model.kind,
                        "medgen.task": cfg.model.task,
                    },
                )
                params = flatten_config(cfg.model_dump(mode="json"))
                params.update(
                    {
                        "data.n_train_scans": len(paths),
                        "data.sha256": data_hash,
                        "model.n_parameters": count_parameters(model),
                        "world_size": dist.world_size,
                    }
                )
                for key in ("data.train", "data.val", "data.labels_csv", "training.out_dir",
                            "model.latent_diffusion.autoencoder", "model.flow.autoencoder"):  # fmt: skip
                    params.pop(key, None)  # local paths may name people; the hash identifies the data
                tracker.log_params(run_id, params)
                tracker.log_artifact(run_id, config_path, "config")
            run = RunHandle(tracker, run_id)

        metadata = {
            "config": portable_config(cfg).model_dump(mode="json"),
            "config_name": cfg.name,
            "data_sha256": data_hash,
            "mlflow_run_id": run.run_id if run is not None else None,
        }
        if synthesis is not None:
            metadata.update(synthesis.metadata)
            validator = synthesis.make_validator(run, dist.device) if dist.is_main and synthesis.make_validator else None
        else:
            pairs = _validation_pairs(cfg) if dist.is_main else []
            validator = _make_validator(cfg, pairs, run, dist.device) if pairs else None
        trainer = Trainer(
            model,
            objective,
            batches,
            total_steps=t.steps,
            lr=t.lr,
            weight_decay=t.weight_decay,
            lr_schedule=t.lr_schedule,
            warmup_steps=t.warmup_steps,
            grad_clip_norm=t.grad_clip_norm,
            ema_decay=t.ema_decay,
            amp=t.amp,
            checkpoint_dir=ckpt_dir,
            checkpoint_every=t.checkpoint_every,
            log_every=t.log_every,
            val_every=t.val_every if validator is not None else 0,
            metadata=metadata,
            dist=dist,
            on_log=(lambda step, logs: run.log_metrics(logs, step=step)) if run is not None else None,
            on_validate=validator,
            progress=progress,
        )
        resumed_from = 0
        if resume and trainer.resume():
            resumed_from = trainer.step
        status = "FAILED"
        try:
            result = trainer.fit()
            if synthesis is not None and synthesis.finalise is not None and dist.is_main:
                trainer.metadata.update(synthesis.finalise(trainer.inference_model, run))
            model_path = trainer.export_model(out_dir / MODEL_FILE)
            model_uri = None
            val_metrics: dict[str, float] = {}
            if run is not None and model_path is not None:
                run.log_metrics(
                    {"train/seconds": result.seconds, "train/final_step": result.final_step},
                    step=result.final_step,
                )
                model_meta = {
                    "format": "medgen-model",
                    "kind": cfg.model.kind,
                    "task": cfg.model.task,
                    "config_json": config_to_json(portable_config(cfg)),
                    "step": result.final_step,
                    "load_with": "medgen.inference.loading.load_model",
                }
                model_uri = run.log_model_checkpoint(model_path, model_meta, registered_name=register_as)
                run.set_tags({"medgen.model_uri": model_uri})
                latest = tracker.get_run(run.run_id).data.metrics
                val_metrics = {k: v for k, v in latest.items() if k.startswith("val/")}
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if run is not None:
                tracker.end_run(run.run_id, status)
        return TrainSummary(
            config=cfg,
            model_path=model_path,
            model_uri=model_uri,
            run_id=run.run_id if run is not None else None,
            steps_done=result.steps_done,
            final_step=result.final_step,
            seconds=result.seconds,
            resumed_from_step=resumed_from,
            last_logs=result.last_logs,
            val_metrics=val_metrics,
        )
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> None:
    """``python -m medgen.stages.train PIPELINE.yaml`` (what ``torchrun`` launches)."""
    import argparse
    import os
    import sys

    from medgen.errors import MedgenError

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = argparse.ArgumentParser(prog="medgen.stages.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    parser.add_argument("--register-as", default=None, help="register the model under this name")
    args = parser.parse_args(argv)
    try:
        started = time.perf_counter()
        summary = train(args.config, resume=not args.no_resume, register_as=args.register_as)
    except MedgenError as exc:
        print(f"medgen: error: {exc}", file=sys.stderr)
        sys.exit(1)
    if summary.model_path is not None:
        print(f"model: {summary.model_path}  ({summary.model_uri})  {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
