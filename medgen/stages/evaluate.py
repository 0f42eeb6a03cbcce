"""``medgen evaluate OUT --reference CLEAN``: PSNR, SSIM, MS-SSIM and NRMSE against a reference.

Every metric is computed on the whole volume and inside the reference's foreground (body or
head) mask, where a model cannot score by cleaning the background. Other volumes (the
degraded input, baselines) can be scored in the same table. The data range of PSNR/SSIM is
explicit: the reference's max minus min unless given. Results go to an MLflow run as
``<row>/<metric>`` metrics, and -- to be read side by side -- as a table with one row per
scored volume (``evaluate/table.json``, also ``evaluate/results.csv``), a chart with the
volumes side by side for each metric (``evaluate/comparison.png``), the summary as JSON
(``evaluate/summary.json``) and a montage of the reference and every scored volume.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medgen.errors import InputError

METRIC_ORDER = ("psnr", "psnr_fg", "ssim", "ssim_fg", "ms_ssim", "nrmse", "nrmse_fg")
_UNITS = {"psnr": "dB", "psnr_fg": "dB"}


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

    def metric_names(self) -> list[str]:
        """The metrics present in any row, in :data:`METRIC_ORDER` (others after them)."""
        present = {m for r in self.rows.values() for m in r}
        return [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))

    def table_rows(self) -> list[dict[str, float | str | None]]:
        """One row per scored volume: ``{"method": name, "psnr": ..., ...}`` (``None`` where absent)."""
        return [{"method": name, **{m: row.get(m) for m in self.metric_names()}} for name, row in self.rows.items()]


def comparison_figure(rows: Mapping[str, Mapping[str, float]], metrics: list[str] | None = None):
    """Grouped bars: one panel per metric, the scored volumes side by side in each.

    Parameters
    ----------
    rows : mapping of name -> {metric: value}
        As :attr:`EvaluateSummary.rows`.
    metrics : list of str, optional
        Panels, in order; default every metric present, in :data:`METRIC_ORDER`.

    Returns
    -------
    matplotlib.figure.Figure
        Drawn without pyplot (no global state); up to four panels a row; each volume keeps
        its colour in every panel, the best bar of a panel is outlined, values are written
        on the bars.
    """
    from matplotlib.figure import Figure

    names = list(rows)
    if metrics is None:
        present = {m for r in rows.values() for m in r}
        metrics = [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))
    n = max(len(metrics), 1)
    ncols = min(n, 4)
    nrows = -(-n // ncols)
    width = max(2.4, 0.55 * len(names) + 0.9)
    fig = Figure(figsize=(min(width * ncols, 40.0), 3.6 * nrows), dpi=100, layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for spare in axes[n:]:
        spare.remove()
    colours = [f"C{i % 10}" for i in range(len(names))]
    for ax, metric in zip(axes, metrics):
        values = [rows[name].get(metric, np.nan) for name in names]
        finite = [v for v in values if np.isfinite(v)]
        heights = [v if np.isfinite(v) else 0.0 for v in values]  # inf PSNR: identical volumes
        bars = ax.bar(range(len(names)), heights, color=colours)
        lower_better = metric.startswith("nrmse")
        if len(finite) > 1:
            best = min(finite) if lower_better else max(finite)
            for bar, v in zip(bars, values):
                if v == best:
                    bar.set_edgecolor("black")
                    bar.set_linewidth(2.0)
        for bar, v in zip(bars, values):
            if not np.isnan(v):
                text = (f"{v:.2f}" if metric.startswith("psnr") else f"{v:.3f}") if np.isfinite(v) else str(v)
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
        unit = f" ({_UNITS[metric]})" if metric in _UNITS else ""
        ax.set_title(f"{metric}{unit}\n{'lower' if lower_better else 'higher'} is better", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        if finite:
            lo, hi = min(finite), max(finite)
            if metric.startswith("psnr") or lo > 0.5 * hi:  # zoom in where bars would all look alike
                span = (hi - lo) or abs(hi) or 1.0
                ax.set_ylim(max(0.0, lo - 0.6 * span) if lo >= 0 else lo - 0.6 * span, hi + 0.35 * span)
            elif hi > 0:
                ax.set_ylim(top=hi * 1.12)  # room for the value on the tallest bar
    return fig


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
    from medgen.run_names import input_key, run_name
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
    volumes = {}
    for name, path in sources.items():
        volume = volumes[name] = load_volume(path)
        values = volume.values(np.float32)
        if values.shape != ref.shape:
            raise InputError(
                path, f"grid {values.shape} differs from the reference's {ref.shape}; resample it first"
            )
        if not np.allclose(volume.affine, ref_volume.affine, atol=1e-3):
            notes.append(f"{name}: affine differs from the reference's (compared voxel by voxel)")
        rows[name] = quality_report(values, ref, rng, mask=mask)
    summary = EvaluateSummary(
        rows=rows,
        data_range=rng,
        foreground_fraction=float(mask.mean()) if mask is not None else 1.0,
        notes=notes,
    )
    name = run_name(
        "evaluate", input_key(out, volumes["output"]), "vs-" + input_key(reference, ref_volume),
        f"{len(rows)}-methods",
    )
    tracker = Tracker(experiment, uri=tracking_uri)
    with tracker.run(name, parent_id=parent_run_id, tags={"medgen.stage": "evaluate"}) as run:
        run.log_params(
            {
                **volume_facts(ref_volume, "reference"),
                "data_range": rng,
                "foreground": foreground,
                "rows": list(rows),
            }
        )
        run.log_metrics(
            {f"{row_name}/{metric}": value for row_name, row in rows.items() for metric, value in row.items()}
        )
        run.log_table(summary.table_rows(), "evaluate/table.json", csv_file="evaluate/results.csv")
        run.log_dict(
            {"data_range": rng, "foreground": foreground, "foreground_fraction": summary.foreground_fraction,
             "rows": rows, "notes": notes},
            "evaluate/summary.json",
        )
        run.log_figure(comparison_figure(rows, summary.metric_names()), "evaluate/comparison.png")
        run.log_montage({"reference": ref_volume, **volumes}, "evaluate/montage.png")
        summary.run_id = run.run_id
    return summary
