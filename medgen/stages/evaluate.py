"""``medgen evaluate OUT --reference CLEAN``: PSNR, SSIM, MS-SSIM and NRMSE against a reference.

Every metric is computed on the whole volume and inside the reference's foreground (body or
head) mask, where a model cannot score by cleaning the background. Other volumes (the
degraded input, baselines) can be scored in the same table. The data range of PSNR/SSIM is
explicit: the reference's max minus min unless given. Results go to an MLflow run as
``<row>/<metric>`` metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medgen.errors import InputError

METRIC_ORDER = ("psnr", "psnr_fg", "ssim", "ssim_fg", "ms_ssim", "nrmse", "nrmse_fg")


@dataclass
class EvaluateSummary:
    """Metrics per scored volume (``rows[name][metric]``) and how they were computed."""

    rows: dict[str, dict[str, float]]
    data_range: float
    foreground_fraction: float
    run_id: str | None = None
    notes: list[str] = field(default_factory=list)

    def table(self):
        """A :class:`rich.table.Table` of the rows (best value per column in bold)."""
        from rich.table import Table

        table = Table(title=f"quality vs reference (data range {self.data_range:g})", title_justify="left")
        table.add_column("volume", style="bold")
        metrics = [m for m in METRIC_ORDER if any(m in r for r in self.rows.values())]
        for m in metrics:
            table.add_column(m, justify="right")
        best = {}
        for m in metrics:
            values = [r[m] for r in self.rows.values() if m in r]
            best[m] = min(values) if m.startswith("nrmse") else max(values)
        for name, row in self.rows.items():
            cells = []
            for m in metrics:
                if m not in row:
                    cells.append("")
                    continue
                text = f"{row[m]:.2f}" if m.startswith("psnr") else f"{row[m]:.4f}"
                cells.append(f"[bold]{text}[/bold]" if len(self.rows) > 1 and row[m] == best[m] else text)
            table.add_row(name, *cells)
        return table


def evaluate(
    out: str | Path,
    reference: str | Path,
    *,
    compare: Mapping[str, str | Path] | None = None,
    data_range: float | None = None,
    foreground: bool = True,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    experiment: str = "medgen",
) -> EvaluateSummary:
    """Score ``out`` (and each of ``compare``) against ``reference``.

    Parameters
    ----------
    out, reference : path
        Volumes on the same grid (NIfTI/NRRD/MHA file or DICOM file/folder).
    compare : mapping of name -> path, optional
        More rows, e.g. ``{"degraded": ..., "nlm": ...}``.
    data_range : float, optional
        PSNR/SSIM data range in the reference's units; default its max minus min.
    foreground : bool
        Also score inside :func:`medgen.metrics.masks.foreground_mask` of the reference.

    Raises
    ------
    InputError
        A volume's grid shape differs from the reference's.
    """
    from medgen.metrics.masks import foreground_mask
    from medgen.metrics.quality import quality_report
    from medgen.stages.common import load_volume, reference_data_range, volume_facts
    from medgen.tracking import Tracker

    ref_volume = load_volume(reference)
    ref = ref_volume.values(np.float32)
    if ref.ndim != 3:
        raise InputError(reference, f"expected a 3D reference volume, got shape {ref.shape}")
    rng = float(data_range) if data_range is not None else reference_data_range(ref)
    if not rng > 0:
        raise InputError(reference, f"`data_range` must be > 0, got {rng}")
    mask = foreground_mask(ref) if foreground else None
    sources = {"output": Path(out), **{k: Path(v) for k, v in (compare or {}).items()}}
    rows: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    for name, path in sources.items():
        volume = load_volume(path)
        values = volume.values(np.float32)
        if values.shape != ref.shape:
            raise InputError(
                path, f"grid {values.shape} differs from the reference's {ref.shape}; resample it first"
            )
        if not np.allclose(volume.affine, ref_volume.affine, atol=1e-3):
            notes.append(f"{name}: affine differs from the reference's (compared voxel by voxel)")
        rows[name] = quality_report(values, ref, rng, mask=mask)
    tracker = Tracker(experiment, uri=tracking_uri)
    with tracker.run("evaluate", parent_id=parent_run_id, tags={"medgen.stage": "evaluate"}) as run:
        run.log_params(
            {
                **volume_facts(ref_volume, "reference"),
                "data_range": rng,
                "foreground": foreground,
                "rows": list(rows),
            }
        )
        run.log_metrics(
            {f"{name}/{metric}": value for name, row in rows.items() for metric, value in row.items()}
        )
        run_id = run.run_id
    return EvaluateSummary(
        rows=rows,
        data_range=rng,
        foreground_fraction=float(mask.mean()) if mask is not None else 1.0,
        run_id=run_id,
        notes=notes,
    )
