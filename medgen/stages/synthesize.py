"""``medgen synthesize``: generate volumes with a latent diffusion model or a normalizing flow
over whole latent grids, marked synthetic.

Outputs in ``out/``: ``synthetic-s<seed>-<index>.nii.gz`` with a JSON sidecar (``"synthetic":
true``, model, seed, condition, sampler, steps; a flow's temperature), or one derived DICOM series per volume
(ImageType ``DERIVED\\SECONDARY\\SYNTHETIC``, SeriesDescription starting "SYNTHETIC", no
patient identity); a montage of the first samples; ``synthesis.json`` listing them. An
MLflow run records the request, seconds and peak memory per volume, and the montage.

With ``gate`` (a calibrated flow, ``--gate``) each generated volume is judged before it is
written (:mod:`medgen.stages.gating`): does it look like the scans the gate was trained on?
``warn`` writes every volume, with the verdict in its sidecar record (``"gate"``) and a
``WARNING:`` line for an "out" one; ``skip`` does not write an "out" volume. Sample indices
stay as they are (no replacement is drawn, so a seed still gives the same volumes), and the
summary, ``synthesis.json`` and the MLflow run (``gate/n_out``, ``gate/fraction_out``, a
table of verdicts) say which samples were out and why.
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
    records: list[dict[str, Any]] = field(default_factory=list)  # the written volumes'
    n: int = 0  # volumes generated (written or skipped)
    gate: dict[str, str] | None = None  # {"model", "policy"} when gated
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # one per generated sample, when gated
    skipped: list[dict[str, Any]] = field(default_factory=list)  # samples the gate kept out (policy skip)

    @property
    def n_out(self) -> int:
        return sum(1 for v in self.verdicts if v["verdict"] == "out")

    def gate_lines(self) -> list[str]:
        """What a person reads about the gate: the count, then one line per skipped sample."""
        if self.gate is None:
            return []
        action = "skipped" if self.gate["policy"] == "skip" else "written anyway"
        lines = [f"gate {self.gate['model']}: {self.n_out} of {self.n} generated volume(s) out ({action})"]
        lines += [f"skipped sample {s['index']} ({s['volume']}): {s['reason']}" for s in self.skipped]
        return lines


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
    gate: str | Path | None = None,
    gate_policy: str = "warn",
) -> SynthesizeSummary:
    """Generate ``n`` volumes with ``model`` into ``out`` (see the module docstring).

    ``sampler``/``steps``/``guidance_scale`` are latent diffusion's, ``temperature`` a flow's
    (scale of its base noise, default 1); each is refused by the other family. ``gate`` (a
    calibrated flow: file, run folder or MLflow URI) judges each generated volume before it
    is written; ``gate_policy`` says what an "out" one gets: ``warn`` (written, with a
    warning) or ``skip`` (not written; listed in ``summary.skipped``).

    Raises
    ------
    ParameterError
        ``n`` < 1, an unknown condition key or an out-of-range label, a sampler the model was
        not trained for, an option of the other family, an unknown format or gate policy.
    InputError
        ``model`` is not a synthesis model (or a flow over pooled regions), or a bundle
        folder without weights; ``gate`` is not a calibrated flow.
    """
    import torch

    from medgen.inference.loading import load_synthesis_model
    from medgen.inference.synthesis import SynthesisRequest
    from medgen.stages import gating

    n = check_int("n", n, minimum=1)
    fmt = look_up_option("format", format, FORMATS)
    gate_option = gating.option_from_flags(gate, gate_policy)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    synth = load_synthesis_model(model, device=dev, tracking_uri=tracking_uri)
    condition = dict(condition or {})

    def request(index: int) -> SynthesisRequest:
        return SynthesisRequest(n=1, condition=condition, seed=seed, sampler=sampler, steps=steps,
                                guidance_scale=guidance_scale, first_index=index, temperature=temperature)  # fmt: skip

    synth.check(request(0))  # bad requests stop before any work
    flow_gate = None
    if gate_option is not None:  # a gate that is no calibrated flow stops before any work too
        from medgen.inference.gate import load_gate

        flow_gate = load_gate(gate_option.model, device=dev, tracking_uri=tracking_uri)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths, volumes, records, generated, verdicts = [], [], [], [], []
    for i in range(n):
        volume = synth.generate(request(i), device=dev, slab_latent_vox=slab_latent_vox, progress=progress)[0]
        generated.append(volume.meta.acquisition["synthesis"])
        if flow_gate is not None:
            verdict = flow_gate.check(volume, name=volume.meta.series_key)
            verdicts.append(verdict)
            gating.warn(f"generated volume {volume.meta.series_key}", verdict, gate_option.policy,
                        anyway="written anyway", skipped="NOT written", what="gate")
            if not verdict.inside and gate_option.policy == "skip":
                continue  # no replacement drawn: sample i of this seed stays the same volume
            _mark(volume, verdict, gate_option)
        paths.append(_write(volume, out_dir, fmt))
        records.append({"file": paths[-1].name, **volume.meta.acquisition["synthesis"]})
        if len(volumes) < MONTAGE_SAMPLES:
            volumes.append(volume)
    seconds = (time.perf_counter() - started) / n
    peak = peak_memory_mb(dev)
    from medgen.io.atomic import atomic_write_bytes
    from medgen.io.montage import montage_grid

    gated = _gate_report(gate_option, verdicts, written={r["index"] for r in records})
    listing = {"synthetic": True, "model": str(model), "n": n, "volumes": records}
    if gated is not None:
        listing["gate"] = {**gated["option"], **gated["metrics"], "skipped": gated["skipped"]}
    atomic_write_bytes(out_dir / "synthesis.json", (json.dumps(listing, indent=2) + "\n").encode())
    # Every volume kept out leaves nothing to show.
    montage = montage_grid({v.meta.series_key: v for v in volumes}, out_dir / "montage.png") if volumes else None
    run_id = _track(synth, generated, records, montage, seconds, peak, gated, tracking_uri, parent_run_id,
                    experiment)
    return SynthesizeSummary(paths, seconds, peak, run_id, records, n=n,
                             gate=None if gated is None else gated["option"],
                             verdicts=[] if gated is None else gated["rows"],
                             skipped=[] if gated is None else gated["skipped"])  # fmt: skip


def _mark(volume, verdict, option) -> None:
    """The verdict in the volume's synthesis record (so in its sidecar); an "out" volume
    written anyway says so in its provenance too. The voxels are untouched."""
    from medgen.stages import gating

    volume.meta.acquisition["synthesis"]["gate"] = gating.record_entry(verdict, option)
    if not verdict.inside:
        volume.meta.provenance.append(f"written although the gate found it out: {verdict.reason}")


def _gate_report(option, verdicts, written: set[int]) -> dict[str, Any] | None:
    """The gate's verdicts on all samples (sample i got verdicts[i]): the option as recorded,
    ``gate/*`` metrics, one row per sample and the skipped samples with their reasons."""
    if option is None:
        return None
    from medgen.stages import gating

    rows = [{"index": i, "volume": v.name, "verdict": v.verdict, "score": v.score, "z": v.z, "reason": v.reason,
             "written": i in written} for i, v in enumerate(verdicts)]  # fmt: skip
    skipped = [{"index": i, "volume": v.name, "score": v.score, "z": v.z, "reason": gating.gated_reason(v)}
               for i, v in enumerate(verdicts) if i not in written]  # fmt: skip
    return {"option": {"model": gating.model_label(option.model), "policy": option.policy},
            "metrics": gating.out_metrics(verdicts), "rows": rows, "skipped": skipped}  # fmt: skip


def _track(synth, generated, records, montage, seconds, peak, gated, tracking_uri, parent_run_id,
           experiment) -> str | None:
    from medgen.tracking import Tracker

    first = generated[0]  # the request as the model resolved it (written or not)
    tracker = Tracker(experiment, uri=tracking_uri)
    run_id = tracker.start_run("synthesize", parent_id=parent_run_id, tags={"medgen.stage": "synthesize", "medgen.synthetic": "true"})
    status = "FAILED"
    try:
        sampling = {k: first[k] for k in ("sampler", "steps", "guidance_scale", "temperature") if k in first}
        tracker.log_params(run_id, {
            "model": synth.source, "n": len(generated), "seed": first["seed"], **sampling,
            **{f"condition.{k}": v for k, v in first["condition"].items()},
        })  # fmt: skip
        tracker.log_metrics(run_id, {"synthesis/seconds_per_volume": seconds, "synthesis/peak_memory_mb": peak,
                                     "synthesis/n_written": float(len(records))})  # fmt: skip
        if gated is not None:
            tracker.log_params(run_id, {f"gate.{k}": v for k, v in gated["option"].items()})
            tracker.log_metrics(run_id, gated["metrics"])
            tracker.log_table(run_id, gated["rows"], "gate/verdicts.json", csv_file="gate/verdicts.csv")
        if montage is not None:
            tracker.log_artifact(run_id, montage, "montages")
        listing = {"synthetic": True, "volumes": records}
        if gated is not None:
            listing["skipped"] = gated["skipped"]
        tracker.log_dict(run_id, listing, "synthesis.json")
        status = "FINISHED"
    finally:
        tracker.end_run(run_id, status)
    return run_id
