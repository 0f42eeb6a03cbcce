"""``medgen batch`` and ``medgen status``: options live here; ``register(app)`` adds them.

Exit status of ``medgen batch``: 0 every study done (or kept out by the input gate, by
policy: listed with score and reason); 3 some studies failed (each listed with its reason,
also in ``OUT/report.html``); 4 no study found; 1 an unusable folder or
another batch already writing to OUT; 2 a usage error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def batch_command(
    pipeline: Annotated[Path, typer.Argument(exists=True, dir_okay=False, metavar="PIPELINE.yaml",
                                             help="Batch pipeline file (stages per study).")],
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False, metavar="RESULTS",
                                      help="Output folder: studies/, ledger, report.html.")],
    input: Annotated[Path | None, typer.Option("--input", "-i", exists=True, file_okay=False, metavar="ARCHIVE",  # noqa: A002
                                               help="Folder of studies, searched recursively; only read "
                                                    "(none for a synthesis pipeline).")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="Worker processes (or Ray actors).")] = 1,
    executor: Annotated[str, typer.Option("--executor", help="local (default) or ray.")] = "local",
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Ray cluster (e.g. auto); default: a local Ray.")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Run failed studies again.")] = False,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="MLflow URI (default: sqlite:///mlflow.db here).")] = None,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="Do not log the batch to MLflow.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Run PIPELINE.yaml over every study under ARCHIVE; rerun to resume or pick up new studies.

    A killed run resumes where it stopped, in the same MLflow run; finished studies are never
    redone unless the pipeline or model changed; failed studies keep their reason (see
    `medgen status`), and studies an input gate kept out (enhance.gate, policy skip) stay
    `gated` until the gate changes. A synthesis pipeline (one `synthesize` stage) takes no
    --input: each sample it makes is a study of the ledger.
    """
    from medgen.batch.driver import run_batch

    summary = run_batch(pipeline, input, out, workers=workers, executor=executor, retry_failed=retry_failed,
                        ray_address=ray_address, tracking_uri=tracking_uri, track=not no_tracking,
                        progress=not quiet)
    for line in summary.lines():
        typer.echo(line)
    for key, reason in summary.failed[:20]:
        typer.echo(f"failed: {key}: {reason}", err=True)
    if len(summary.failed) > 20:
        typer.echo(f"... and {len(summary.failed) - 20} more failed (see {summary.report})", err=True)
    for key, reason in summary.gated[:20]:
        typer.echo(f"gated: {key}: {reason}", err=True)
    if len(summary.gated) > 20:
        typer.echo(f"... and {len(summary.gated) - 20} more gated out (see {summary.report})", err=True)
    if summary.mlflow_run_id:
        typer.echo(f"MLflow run {summary.mlflow_run_id}")
    raise typer.Exit(summary.exit_code)


def status_command(
    out: Annotated[Path, typer.Argument(exists=True, file_okay=False, metavar="RESULTS",
                                        help="Output folder of a batch.")],
) -> None:
    """Done / running / failed (with reasons) / pending studies, throughput and ETA."""
    from medgen.batch.status import read_status

    for line in read_status(out).lines():
        typer.echo(line)


def register(app: typer.Typer) -> None:
    """Add ``batch`` and ``status`` to the ``medgen`` app."""
    app.command("batch", epilog=__doc__.split("\n\n")[1])(batch_command)
    app.command("status")(status_command)


if __name__ == "__main__":  # `python -m medgen.stages.batch_cli batch ...` before the CLI wires it
    import sys

    from medgen.errors import MedgenError

    _app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_show_locals=False)
    register(_app)
    try:
        _app(prog_name="medgen")
    except MedgenError as exc:
        print(f"medgen: error: {exc}", file=sys.stderr)
        sys.exit(1)
