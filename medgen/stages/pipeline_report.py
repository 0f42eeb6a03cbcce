"""What ``medgen run`` prints after each stage: one or two lines, the metrics as a table."""

from __future__ import annotations

from typing import Any


def print_stage(kind: str, result: Any) -> None:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    if kind == "ingest":
        console.print(f"[bold]ingest[/bold]: {len(result.volumes_written)} volumes written, "
                      f"{result.series_unchanged} series unchanged, {result.series_quarantined} quarantined")
    elif kind == "train":
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.val_metrics.items()))
        console.print(f"[bold]train[/bold]: {result.steps_done} steps in {result.seconds:.0f} s -> "
                      f"{result.model_path} {metrics}")
    elif kind == "enhance" and result.skipped:
        from rich.markup import escape

        console.print(f"[bold]enhance[/bold]: skipped by the input gate: {escape(result.skipped)}")
    elif kind == "enhance":
        gate = f", input gate: {result.gate['verdict']}" if result.gate else ""
        console.print(f"[bold]enhance[/bold]: {result.output} in {result.seconds_total:.1f} s "
                      f"({result.voxels_per_second:,.0f} voxels/s on {result.device}){gate}")
    elif kind == "baseline":
        console.print(f"[bold]baseline[/bold] {result.method}: {result.output} in {result.seconds:.1f} s")
    elif kind == "degrade":
        console.print(f"[bold]degrade[/bold]: {getattr(result, 'output', result)}")
    elif kind == "evaluate":
        console.print(result.table())
    elif kind == "export":
        picture = f", montage {result.montage}" if result.montage else ""
        console.print(f"[bold]export[/bold]: {len(result.dicom_files)} DICOM files{picture}")
    elif kind == "cohort":
        console.print(f"[bold]cohort[/bold]: {result}")
    elif kind == "synthesize":
        console.print(f"[bold]synthesize[/bold]: {len(result.paths)} synthetic volumes, "
                      f"{result.seconds_per_volume:.1f} s each, peak memory {result.peak_memory_mb:.0f} MB")
        for line in result.gate_lines():
            console.print(line, markup=False)
    elif kind == "evaluate_synthesis":
        metrics = result.get("metrics", {}) if isinstance(result, dict) else {}
        shown = ", ".join(f"{k.removeprefix('synthesis/')}={v:.4g}" for k, v in sorted(metrics.items()))
        console.print(f"[bold]evaluate_synthesis[/bold]: {shown}")
    elif kind == "check":
        from medgen.stages.check import print_table

        print_table(result)
    elif kind == "augment":
        console.print("[bold]augment[/bold]:\n" + result.table())
