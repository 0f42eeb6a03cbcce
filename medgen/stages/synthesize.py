"""``medgen synthesize``: generate volumes with a latent diffusion model or a normalizing flow
over whole latent grids, marked synthetic.

Outputs in ``out/``: ``synthetic-s<seed>-<index>.nii.gz`` with a JSON sidecar (``"synthetic":
true``, model, seed, condition, sampler, steps; a flow's temperature), or one derived DICOM series per volume
(ImageType ``DERIVED\\SECONDARY\\SYNTHETIC``, SeriesDescription starting "SYNTHETIC", no
patient identity); a montage of the first samples; ``synthesis.json`` listing them. An
MLflow run records the request, seconds and peak memory per volume, and the montage.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgen.validate import ParameterError, check_int, look_up_option

FORMATS = ("nifti", "dicom")
MONTAGE_SAMPLES = 4


@dataclass
class SynthesizeSummary:
    """What :func:`synthesize` wrote."""

    paths: list[Path]
    seconds_per_volume: float
    peak_memory_mb: float
    run_id: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)


def parse_conditions(items: list[str] | None) -> dict[str, str]:
    """``["label=1", "age_years=70"]`` -> ``{"label": "1", "age_years": "70"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ParameterError(f"`--condition` must look like KEY=VALUE (e.g. label=1), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def peak_memory_mb(device) -> float:
    """Peak memory of this process so far: GPU allocations on CUDA, else resident CPU memory."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0


def _write(volume, out_dir: Path, fmt: str) -> Path:
    from medgen.io.sidecar import sidecar_path, write_sidecar

    key = volume.meta.series_key
    if fmt == "dicom":
        from medgen.io.dicom_writer import write_dicom_series

        folder = out_dir / key
        record = volume.meta.acquisition["synthesis"]
        write_dicom_series(
            volume, folder, series_description=f"SYNTHETIC medgen seed {record['seed']} #{record['index']}",
            image_type=("DERIVED", "SECONDARY", "SYNTHETIC"), overwrite=True, uid_seed=f"medgen-{key}",
        )  # fmt: skip
        write_sidecar(volume, out_dir / f"{key}.json")
        return folder
    from medgen.io.nifti import write_nifti

    path = write_nifti(volume, out_dir / f"{key}.nii.gz")
    write_sidecar(volume, sidecar_path(path))
    return path


def synthesize(
    model: str | Path,
    out: str | Path,
    *,
    n: int = 1,
    condition: Mapping[str, Any] | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    temperature: float | None = None,
    format: str = "nifti",  # noqa: A002
    device: str = "auto",
    slab_latent_vox: int | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    experiment: str = "medgen",
    progress: bool = True,
) -> SynthesizeSummary:
    """Generate ``n`` volumes with ``model`` into ``out`` (see the module docstring).

    ``sampler``/``steps``/``guidance_scale`` are latent diffusion's, ``temperature`` a flow's
    (scale of its base noise, default 1); each is refused by the other family.

    Raises
    ------
    ParameterError
        ``n`` < 1, an unknown condition key or an out-of-range label, a sampler the model was
        not trained for, an option of the other family, an unknown format.
    InputError
        ``model`` is not a synthesis model (or a flow over pooled regions), or a bundle
        folder without weights.
    """
    import torch

    from medgen.inference.loading import load_synthesis_model
    from medgen.inference.synthesis import SynthesisRequest

    n = check_int("n", n, minimum=1)
    fmt = look_up_option("format", format, FORMATS)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    synth = load_synthesis_model(model, device=dev, tracking_uri=tracking_uri)
    condition = dict(condition or {})

    def request(index: int) -> SynthesisRequest:
        return SynthesisRequest(n=1, condition=condition, seed=seed, sampler=sampler, steps=steps,
                                guidance_scale=guidance_scale, first_index=index, temperature=temperature)  # fmt: skip

    synth.check(request(0))  # bad requests stop before any work
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths, volumes, records = [], [], []
    for i in range(n):
        volume = synth.generate(request(i), device=dev, slab_latent_vox=slab_latent_vox, progress=progress)[0]
        paths.append(_write(volume, out_dir, fmt))
        records.append({"file": paths[-1].name, **volume.meta.acquisition["synthesis"]})
        if len(volumes) < MONTAGE_SAMPLES:
            volumes.append(volume)
    seconds = (time.perf_counter() - started) / n
    peak = peak_memory_mb(dev)
    from medgen.io.atomic import atomic_write_bytes
    from medgen.io.montage import montage_grid

    listing = {"synthetic": True, "model": str(model), "n": n, "volumes": records}
    atomic_write_bytes(out_dir / "synthesis.json", (json.dumps(listing, indent=2) + "\n").encode())
    montage = montage_grid({v.meta.series_key: v for v in volumes}, out_dir / "montage.png")
    run_id = _track(synth, records, montage, seconds, peak, tracking_uri, parent_run_id, experiment)
    return SynthesizeSummary(paths, seconds, peak, run_id, records)


def _track(synth, records, montage, seconds, peak, tracking_uri, parent_run_id, experiment) -> str | None:
    from medgen.tracking import Tracker

    first = records[0]
    tracker = Tracker(experiment, uri=tracking_uri)
    run_id = tracker.start_run("synthesize", parent_id=parent_run_id, tags={"medgen.stage": "synthesize", "medgen.synthetic": "true"})
    status = "FAILED"
    try:
        sampling = {k: first[k] for k in ("sampler", "steps", "guidance_scale", "temperature") if k in first}
        tracker.log_params(run_id, {
            "model": synth.source, "n": len(records), "seed": first["seed"], **sampling,
            **{f"condition.{k}": v for k, v in first["condition"].items()},
        })  # fmt: skip
        tracker.log_metrics(run_id, {"synthesis/seconds_per_volume": seconds, "synthesis/peak_memory_mb": peak})
        tracker.log_artifact(run_id, montage, "montages")
        tracker.log_dict(run_id, {"synthetic": True, "volumes": records}, "synthesis.json")
        status = "FINISHED"
    finally:
        tracker.end_run(run_id, status)
    return run_id
