"""``medgen degrade CLEAN --out DEGRADED --noise rician --sigma 0.05``: seeded test pairs.

Builds the degraded partner of a clean scan with the physical degradation models of
:mod:`medgen.data.degrade`: optional thick slices (``thick_factor`` thin slices averaged into
one, placed at their true position) and then noise. ``sigma`` is relative: a fraction of the
scan's robust intensity span (99.5th minus 0.5th percentile), so ``0.05`` is 5 % on MR and CT
alike; ``noise="lowdose_ct"`` takes ``dose_fraction`` instead. The same seed gives the same
output, bit for bit. Logged to MLflow with every parameter and a montage of the clean
scan, the degraded one and their difference (degraded minus clean); the run is named after what was done, e.g.
``degrade:rician-sigma0.05-seed1:mr_t2_phantom``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medgen.validate import (
    ParameterError,
    check_fraction,
    check_int,
    check_positive,
    literal_options,
    look_up_option,
)

NoiseName = Literal["gaussian", "rician", "lowdose_ct", "none"]


@dataclass
class DegradeSummary:
    """What ``degrade`` wrote, with every parameter it used (noise seed included)."""

    output: Path
    steps: list[tuple[str, dict]]
    run_id: str | None


def degrade(
    clean: str | Path,
    out: str | Path,
    noise: NoiseName = "rician",
    sigma: float = 0.05,
    seed: int = 0,
    *,
    thick_factor: int = 1,
    thick_axis: int = 2,
    dose_fraction: float = 0.25,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    experiment: str = "medgen",
) -> DegradeSummary:
    """Degrade ``clean`` and write ``out`` (NIfTI, or any format :func:`medgen.io.save` knows).

    Parameters
    ----------
    clean : path
        The clean scan (file or DICOM folder with one series).
    out : path
        Output file, e.g. ``noisy.nii.gz``.
    noise : {"gaussian", "rician", "lowdose_ct", "none"}
    sigma : float > 0
        Noise standard deviation as a fraction of the robust intensity span
        (``gaussian``/``rician``).
    seed : int
        Noise seed.
    thick_factor : int >= 1
        Merge this many thin slices along ``thick_axis`` first (1: keep the grid).
    dose_fraction : float in (0, 1]
        Dose of the simulated low-dose CT (``lowdose_ct``).
    """
    from medgen.data.degrade import DegradationChain, build_degradation
    from medgen.io import save
    from medgen.stages.common import load_volume, volume_facts
    from medgen.run_names import input_key, run_name
    from medgen.tracking import Tracker

    noise = look_up_option("noise", noise, literal_options(NoiseName))
    thick_factor = check_int("thick_factor", thick_factor, minimum=1)
    steps = []
    if thick_factor > 1:
        steps.append(build_degradation("thick_slices", factor=thick_factor, axis=thick_axis))
    if noise in ("gaussian", "rician"):
        steps.append(build_degradation(noise, sigma_fraction=check_positive("sigma", sigma), seed=seed))
    elif noise == "lowdose_ct":
        steps.append(
            build_degradation(
                "lowdose_ct", dose_fraction=check_fraction("dose_fraction", dose_fraction), seed=seed
            )
        )
    if not steps:
        raise ParameterError("nothing to do: `noise` is 'none' and `thick_factor` is 1")
    volume = load_volume(clean)
    chain = DegradationChain(steps)
    degraded = chain(volume)
    out = save(degraded, Path(out), sidecar=True)
    what = [f"thick{thick_factor}x"] if thick_factor > 1 else []
    if noise in ("gaussian", "rician"):
        what.append(f"{noise}-sigma{sigma:g}-seed{seed}")
    elif noise == "lowdose_ct":
        what.append(f"lowdose_ct-dose{dose_fraction:g}-seed{seed}")
    name = run_name("degrade", "+".join(what), input_key(clean, volume))
    tracker = Tracker(experiment, uri=tracking_uri)
    with tracker.run(name, parent_id=parent_run_id, tags={"medgen.stage": "degrade"}) as run:
        params = {**volume_facts(volume, "input"), **volume_facts(degraded, "output"), "seed": seed}
        for i, (name, used) in enumerate(chain.last_params):
            params[f"step{i}.name"] = name
            params.update({f"step{i}.{k}": v for k, v in used.items()})
        run.log_params(params)
        images = {"clean": volume, "degraded": degraded}
        if degraded.shape == volume.shape:
            images["difference"] = degraded.with_array(
                degraded.values(np.float32) - volume.values(np.float32)
            )
        run.log_montage(images, "montage.png")
        run_id = run.run_id
    return DegradeSummary(output=out, steps=list(chain.last_params), run_id=run_id)
