"""``medgen check SCAN... --model FLOW``: the input gate's verdict for each scan.

Each scan is read, scored by the flow and judged by the typicality test stored with it
(:mod:`medgen.inference.gate`). A file that cannot be read is "error" with a one-line
reason and the others go on. Results print as a table; ``--json`` also writes them (the
names are the scans' file names, never a patient's).

Exit status: 0 every scan is in; 3 some scan is out or could not be read; 1 the model
cannot be used as a gate; 2 a usage error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from medgen.errors import MedgenError


@dataclass
class CheckSummary:
    """Verdicts in input order; ``errors`` are (name, reason) of unreadable inputs."""

    verdicts: list = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 3 if self.errors or any(not v.inside for v in self.verdicts) else 0

    def rows(self) -> list[dict]:
        rows = [v.to_dict() for v in self.verdicts]
        rows += [{"name": n, "verdict": "error", "inside": False, "score": None, "z": None, "reason": r} for n, r in self.errors]
        return rows

    def write_json(self, path: Path, model: str) -> None:
        """The verdicts as JSON, written atomically."""
        from medgen.io.atomic import atomic_write_bytes

        atomic_write_bytes(path, json.dumps({"model": model, "scans": self.rows()}, indent=2).encode())


def check_scans(paths: list[Path], model: str, *, device: str = "cpu", tracking_uri: str | None = None) -> CheckSummary:
    """Judge every scan in ``paths`` with the flow gate ``model``.

    Raises
    ------
    InputError
        ``model`` is not a calibrated flow.
    """
    from medgen.inference.gate import load_gate
    from medgen.stages.common import load_volume

    gate = load_gate(model, device=device, tracking_uri=tracking_uri)
    summary = CheckSummary()
    for path in paths:
        try:
            volume = load_volume(path)
        except MedgenError as exc:
            summary.errors.append((Path(path).name, getattr(exc, "reason", str(exc))))
            continue
        summary.verdicts.append(gate.check(volume, name=Path(path).name))
    return summary


def check_stage(
    scans: list[Path], model: str, *, out: Path | None = None, experiment: str = "medgen",
    tracking_uri: str | None = None, parent_run_id: str | None = None,
) -> CheckSummary:
    """:func:`check_scans` as a pipeline stage: verdicts as JSON (``out``) and one MLflow run
    with the counts and the verdict table."""
    from medgen.run_names import run_name
    from medgen.tracking import Tracker

    summary = check_scans(scans, model, tracking_uri=tracking_uri)
    rows = summary.rows()
    if out is not None:
        summary.write_json(out, Path(model).name)
    n_out = sum(r["verdict"] == "out" for r in rows)
    tracker = Tracker(experiment, uri=tracking_uri)
    name = run_name("check", Path(model).parent.name, f"{len(rows)}-scans", f"{n_out}-out")
    with tracker.run(name, parent_id=parent_run_id, tags={"medgen.stage": "check"}) as run:
        run.log_params({"gate.model": Path(model).name, "n_scans": len(rows)})
        run.log_metrics({"scans_in": sum(r["verdict"] == "in" for r in rows), "scans_out": n_out,
                         "scans_unreadable": len(summary.errors)})  # fmt: skip
        table = {k: [r[k] if r[k] is not None else float("nan") for r in rows] for k in ("name", "verdict", "score", "z", "reason")}
        run.log_table(table, "check/verdicts.json", csv_file="check/verdicts.csv")
    return summary


def print_table(summary: CheckSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False)
    for column in ("scan", "verdict", "NLL/feature", "z (SD)", "reason"):
        table.add_column(column)
    for row in summary.rows():
        score = "-" if row["score"] is None else f"{row['score']:.3f}"
        z = "-" if row["z"] is None else f"{row['z']:+.1f}"
        table.add_row(row["name"], row["verdict"], score, z, row["reason"])
    Console(width=160).print(table)


def check_command(
    scans: Annotated[list[Path], typer.Argument(metavar="SCAN...", help="NIfTI files or DICOM series folders.")],
    model: Annotated[str, typer.Option("--model", "-m", metavar="FLOW", help="Flow model file, run folder or MLflow URI.")],
    json_out: Annotated[Path | None, typer.Option("--json", metavar="FILE", help="Also write the verdicts as JSON.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="MLflow URI for runs:/ and models:/ models.")] = None,
) -> None:
    """Is each scan like the scans the model was trained on? In/out with the reason in words."""
    from medgen.training.distributed import pick_device

    summary = check_scans(scans, model, device=str(pick_device(device)), tracking_uri=tracking_uri)
    print_table(summary)
    if json_out is not None:
        summary.write_json(json_out, model)
    raise typer.Exit(summary.exit_code)


def register(app: typer.Typer) -> None:
    """Add ``check`` to the ``medgen`` app."""
    app.command("check", epilog=__doc__.split("\n\n")[2])(check_command)
