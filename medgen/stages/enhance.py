"""``medgen enhance SCAN --model MODEL --out OUT``: enhance one scan with a trained model.

SCAN is a NIfTI/NRRD/MHA file or a DICOM file/folder holding one series; MODEL a model file,
a training checkpoint, or an MLflow URI (``runs:/<id>/model``, ``models:/<name>/<version>``).
The output lies on the input's grid (the refined grid for super-resolution), in its
orientation and units (HU stays HU), written as NIfTI or as a derived DICOM series. Diffusion
models also write the per-voxel uncertainty (standard deviation over samples) beside it as
``<name>_uncertainty.nii.gz``. The run is logged to MLflow with timings and a montage.

With ``gate`` (a calibrated flow, ``--gate``) the scan is first judged by the input gate
(:mod:`medgen.stages.gating`): an "out" scan is enhanced with a loud warning (policy
``warn``) or not at all (``skip``: no output, the summary says why); the verdict goes into
the sidecar and the MLflow run either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medgen.errors import InputError
from medgen.io.suffixes import NIFTI_SUFFIXES, image_suffix
from medgen.validate import ParameterError, check_int, check_non_negative, literal_options, look_up_option

OutputFormatName = Literal["nifti", "dicom"]


@dataclass
class EnhanceSummary:
    """What ``enhance`` wrote and how long it took (``output`` is None when ``skipped``)."""

    output: Path | None
    uncertainty: Path | None
    run_id: str | None
    seconds_total: float
    seconds_inference: float
    voxels_per_second: float
    window_vox: tuple[int, int, int]
    window_batch: int
    device: str
    noise_level: float | None
    skipped: str | None = None  # why nothing was written (the gate kept the scan out)
    gate: dict | None = None  # the gate's verdict (GateVerdict.to_dict()), when gated


def uncertainty_path(out: Path) -> Path:
    """``x.nii.gz`` -> ``x_uncertainty.nii.gz``; a DICOM folder ``x`` -> ``x_uncertainty.nii.gz``."""
    name = out.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return out.with_name(name[: -len(suffix)] + "_uncertainty" + suffix)
    return out.with_name(name + "_uncertainty.nii.gz")


def _source_dataset(scan: Path):
    """The first DICOM header of a DICOM input (acquisition tags for the derived series)."""
    import pydicom

    files = sorted(p for p in scan.rglob("*") if p.is_file()) if scan.is_dir() else [scan]
    for f in files:
        try:
            return pydicom.dcmread(f, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
    return None


def _adapt(loaded, volume, result, seconds: float | None, steps: int | None, run, dev, overlap: float, seed: int,
           progress: bool):
    """Adapt the model's output to the scan (``--adapt``/``--adapt-steps``) and log what was done."""
    from medgen.adapt.with_model import adapt_with_model
    from medgen.inference.enhance import box_predictor

    predict = box_predictor(loaded, volume, result, device=dev, overlap=overlap, seed=seed)
    log = print if progress else None
    t0 = time.perf_counter()
    adapted = adapt_with_model(
        loaded, volume, result.volume, seconds, max_steps=steps, predict=predict, seed=seed, device=dev, log=log
    )
    first = adapted.records[0]
    entry = adapted.sidecar_entry()
    # Measured values (per-step time, estimates) are metrics, not params: they differ run to run.
    measured = ("seconds_per_step", "seconds_estimate", "steps_estimate", "below_minimum_steps", "stopped_by")
    run.log_params(
        {
            "adapt.seconds_budget": seconds if seconds is not None else "none",
            "adapt.steps_budget": steps if steps is not None else "none",
            "adapt.method": first.get("method", ""),
            **{
                f"adapt.{k}": v for k, v in first.get("params", {}).items()
                if k not in ("spacing_mm", "steps_budget", "seconds_cap", *measured)
            },
        }
    )
    metrics = {
        "adapt.seconds": time.perf_counter() - t0,
        "adapt.steps": float(entry["StepsRun"]),
        "adapt.below_minimum_steps": float(entry["BelowMinimumSteps"]),
        "adapt.stopped_by_clock": float(entry["StoppedBy"] == "time"),
    }
    for key in ("seconds_per_step", "seconds_estimate"):
        if key in first.get("params", {}):
            metrics[f"adapt.{key}"] = float(first["params"][key])
    run.log_metrics(metrics)
    if entry["BelowMinimumSteps"]:
        run.set_tags({"medgen.adapt_warning": f"only {entry['StepsRun']} steps (minimum {entry['StepsMinimum']})"})
    for i, loss in enumerate(first.get("losses", [])):
        if i % 10 == 0:
            run.log_metrics({"adapt.loss": loss}, step=i)
    run.log_dict({"frames": adapted.records}, "adapt.json")
    return adapted.volume


def enhance(
    scan: str | Path,
    model: str | Path,
    out: str | Path,
    format: OutputFormatName = "nifti",  # noqa: A002 - the user-facing option name
    adapt_seconds: float = 0.0,
    *,
    adapt_steps: int | None = None,
    device: str = "auto",
    overlap: float = 0.25,
    seed: int = 0,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    experiment: str = "medgen",
    progress: bool = True,
    gate: str | Path | None = None,
    gate_policy: str = "warn",
) -> EnhanceSummary:
    """Enhance ``scan`` with ``model`` and write ``out``.

    Parameters
    ----------
    scan : path
        NIfTI/NRRD/MHA file or DICOM file/folder (one series).
    model : str or path
        Model file, training checkpoint, or MLflow model URI.
    out : path
        ``.nii``/``.nii.gz`` file for ``format="nifti"``; a new folder for ``format="dicom"``.
    format : {"nifti", "dicom"}
    adapt_seconds : float
        Self-supervised adaptation to this scan (0: none; see :mod:`medgen.adapt.with_model`):
        denoising models have their output re-weighted with non-local features by SURE on
        the scan itself; super-resolution models hand over to a sub-slice network trained
        on the scan's in-plane detail for this many seconds -- or, with ``adapt_steps``, this
        is only a safety cap on the clock.
    adapt_steps : int >= 1, optional
        Step budget of the super-resolution adaptation (``--adapt-steps``); turns adaptation
        on by itself. It rules over ``adapt_seconds``: exactly this many steps run (unless the
        clock cap ends it first), so the output does not depend on the machine's load. The
        time it will take is estimated after 4 steps and printed; fewer steps than the
        method's minimum (200 for SMORE) print one warning line on stderr and set
        ``BelowMinimumSteps`` in the sidecar and ``adapt.below_minimum_steps`` in MLflow.
        The denoising fit has no steps: any budget runs it once.
    device : {"auto", "cpu", "cuda"}
    overlap : float in [0, 1)
        Sliding-window overlap.
    seed : int
        Seed of diffusion sampling.
    tracking_uri, parent_run_id, experiment
        Where the MLflow run goes.
    gate : str or path, optional
        A calibrated flow model (file, run folder or MLflow URI): the input gate that
        judges the scan first (see the module doc).
    gate_policy : {"warn", "skip"}
        What an "out" scan gets: enhanced with a warning on stderr, or skipped (nothing
        written; ``skipped`` says why).
    """
    from medgen.inference.enhance import enhance_with
    from medgen.inference.loading import load_model
    from medgen.io import save
    from medgen.stages import gating
    from medgen.stages.common import load_volume, require_3d, volume_facts
    from medgen.run_names import input_key, run_name
    from medgen.tracking import Tracker
    from medgen.training.distributed import pick_device

    started = time.perf_counter()
    fmt = look_up_option("format", format, literal_options(OutputFormatName))
    gate_option = None
    if gate is not None:
        policy = look_up_option("gate_policy", gate_policy, gating.GATE_POLICIES)
        gate_option = gating.GateOption(model=str(gate), policy=policy)
    adapt_seconds = check_non_negative("adapt_seconds", adapt_seconds)
    if adapt_steps is not None:
        adapt_steps = check_int("adapt_steps", adapt_steps, minimum=1)
    if not 0.0 <= overlap < 1.0:
        raise ParameterError(f"`overlap` must be in [0, 1), got {overlap}")
    scan, out = Path(scan), Path(out)
    if fmt == "nifti" and not out.name.endswith((".nii", ".nii.gz")):
        raise InputError(out, "a NIfTI output must end in .nii or .nii.gz (or use --format dicom)")
    volume = require_3d(load_volume(scan), scan)
    dev = pick_device(device)
    loaded = load_model(model, device=dev, tracking_uri=tracking_uri)
    verdict = None
    if gate_option is not None:
        from medgen.inference.gate import load_gate

        flow = load_gate(gate_option.model, device=dev, tracking_uri=tracking_uri)
        verdict = flow.check(volume, name=input_key(scan, volume))
        gating.warn(str(scan), verdict, gate_option.policy)
        if not verdict.inside and gate_option.policy == "skip":
            return _skipped(scan, volume, loaded, verdict, gate_option, dev, started, experiment, tracking_uri,
                            parent_run_id)

    if adapt_steps is not None:
        adapted = f"adapt-{adapt_steps}steps"
    elif adapt_seconds > 0:
        adapted = f"adapt-{adapt_seconds:g}s"
    else:
        adapted = "no-adapt"
    tracker = Tracker(experiment, uri=tracking_uri)
    with tracker.run(
        run_name("enhance", loaded.config.name, adapted, input_key(scan, volume)),
        parent_id=parent_run_id,
        tags={"medgen.stage": "enhance", "medgen.model_kind": loaded.kind},
    ) as run:
        run.log_params(
            {
                **volume_facts(volume, "input"),
                "model.kind": loaded.kind,
                "model.config_name": loaded.config.name,
                "model.source": (
                    str(model) if str(model).startswith(("runs:/", "models:/")) else Path(str(model)).name
                ),
                "model.train_run_id": loaded.metadata.get("mlflow_run_id") or "",
                "device": str(dev),
                "overlap": overlap,
                "seed": seed,
                "format": fmt,
            }
        )
        if verdict is not None:
            gating.log_verdict(run, verdict, gate_option)
        result = enhance_with(loaded, volume, device=dev, overlap=overlap, seed=seed, progress=progress)
        output = result.volume
        if adapt_seconds > 0 or adapt_steps is not None:
            output = _adapt(loaded, volume, result, adapt_seconds or None, adapt_steps, run, dev, overlap, seed,
                            progress)
        written = output if verdict is None else gating.with_verdict(output, verdict, gate_option)
        if fmt == "dicom":
            kwargs = {"series_description": f"medgen {loaded.kind} enhanced"}
            if scan.is_dir() or image_suffix(scan.name) is None:
                source = _source_dataset(scan)
                if source is not None:
                    kwargs["source_dataset"] = source
            save(written, out, format="dicom", **kwargs)
        else:
            save(written, out, sidecar=True)
        u_path = None
        if result.uncertainty is not None:
            u_path = save(result.uncertainty, uncertainty_path(out))
        voxels = int(np.prod(result.volume.shape))
        total = time.perf_counter() - started
        run.log_params(
            {
                "window_vox": list(result.plan.roi_vox),
                "window_batch": result.plan.batch,
                **volume_facts(result.volume, "output"),
            }
        )
        metrics = {
            "seconds_inference": result.seconds,
            "seconds_total": total,
            "voxels_per_second": voxels / max(result.seconds, 1e-9),
        }
        if result.noise_level is not None:
            metrics["noise_level_normalised"] = result.noise_level
        run.log_metrics(metrics)
        images = {"input": volume, "output": output}
        if output is not result.volume:
            images["model output"] = result.volume
        if result.uncertainty is not None:
            images["uncertainty"] = result.uncertainty
        run.log_montage(images, "montage.png")
        run_id = run.run_id
    return EnhanceSummary(
        output=out,
        uncertainty=u_path,
        run_id=run_id,
        seconds_total=time.perf_counter() - started,
        seconds_inference=result.seconds,
        voxels_per_second=voxels / max(result.seconds, 1e-9),
        window_vox=result.plan.roi_vox,
        window_batch=result.plan.batch,
        device=str(dev),
        noise_level=result.noise_level,
        gate=None if verdict is None else verdict.to_dict(),
    )


def _skipped(scan: Path, volume, loaded, verdict, option, dev, started: float, experiment: str,
             tracking_uri: str | None, parent_run_id: str | None) -> EnhanceSummary:
    """A scan the gate kept out (policy ``skip``): an MLflow run that says so, no output."""
    from medgen.stages import gating
    from medgen.stages.common import volume_facts
    from medgen.run_names import input_key, run_name
    from medgen.tracking import Tracker

    reason = gating.gated_reason(verdict)
    tracker = Tracker(experiment, uri=tracking_uri)
    tags = {"medgen.stage": "enhance", "medgen.model_kind": loaded.kind, "medgen.skipped": reason}
    with tracker.run(run_name("enhance", loaded.config.name, "gated-out", input_key(scan, volume)),
                     parent_id=parent_run_id, tags=tags) as run:
        run.log_params({**volume_facts(volume, "input"), "model.kind": loaded.kind,
                        "model.config_name": loaded.config.name})
        gating.log_verdict(run, verdict, option)
        run_id = run.run_id
    return EnhanceSummary(output=None, uncertainty=None, run_id=run_id, seconds_total=time.perf_counter() - started,
                          seconds_inference=0.0, voxels_per_second=0.0, window_vox=(0, 0, 0), window_batch=0,
                          device=str(dev), noise_level=None, skipped=reason, gate=verdict.to_dict())
