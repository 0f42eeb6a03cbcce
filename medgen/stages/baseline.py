"""Classical denoising baselines as a stage: non-local means or Gaussian smoothing.

They run on the same input as a model so a pipeline can score both against the clean
reference. The noise level is estimated from the scan itself (no reference needed). The
MLflow run (``baseline:nlm:<input key>``) holds a montage of input, output and what was
removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

BaselineMethod = Literal["nlm", "gaussian"]


@dataclass
class BaselineSummary:
    output: Path
    method: str
    noise_sigma: float
    seconds: float
    run_id: str | None


def baseline(
    scan: str | Path,
    out: str | Path,
    *,
    method: BaselineMethod = "nlm",
    noise: Literal["gaussian", "rician"] = "rician",
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    experiment: str = "medgen",
) -> BaselineSummary:
    """Denoise ``scan`` with a classical method and write ``out`` (same grid and units)."""
    import numpy as np

    from medgen.baselines.denoise import estimate_noise_sigma, gaussian_denoise, nlm_denoise
    from medgen.io.writers import save
    from medgen.stages.common import load_volume
    from medgen.run_names import input_key, run_name
    from medgen.tracking import Tracker
    from medgen.validate import look_up_option

    method = look_up_option("method", method, ("nlm", "gaussian"))
    volume = load_volume(scan)
    values = volume.values(np.float32)
    start = time.perf_counter()
    sigma = estimate_noise_sigma(values, rician=noise == "rician")
    if method == "nlm":
        cleaned = nlm_denoise(values, sigma, rician=noise == "rician")
    else:
        cleaned = gaussian_denoise(values, 1.0)
    seconds = time.perf_counter() - start
    result = volume.with_array(np.asarray(cleaned, dtype=np.float32))
    result.meta.provenance.append(f"baseline:{method} noise_sigma={sigma:.4g}")
    output = save(result, out)
    tracker = Tracker(experiment, uri=tracking_uri)
    name = run_name("baseline", method, input_key(scan, volume))
    tags = {"medgen.kind": "baseline", "medgen.stage": "baseline"}
    with tracker.run(name, parent_id=parent_run_id, tags=tags) as run:
        run.log_params({"method": method, "noise": noise, "noise_sigma": sigma})
        run.log_metrics({"seconds": seconds})
        removed = result.with_array(values - np.asarray(cleaned, dtype=np.float32))
        run.log_montage({"input": volume, "output": result, "difference": removed}, "montage.png")
        return BaselineSummary(Path(output), method, float(sigma), seconds, run.run_id)
