"""The ``medgen`` command line.

Each command is a few lines: parse options, call one stage function, print its summary,
exit with its status. Stages are imported inside the commands, so ``medgen --help`` and
``medgen ingest`` never load torch or MONAI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from medgen.stages.ingest import IngestSummary

EXIT_STATUS_HELP = (
    "Exit status: 0 every image series converted (or already up to date); "
    "1 an unusable input or output folder; 2 a usage error; "
    "3 some files or series quarantined (see the summary); "
    "4 nothing usable found."
)

app = typer.Typer(
    name="medgen",
    help="Medical image enhancement and synthesis: ingest scans, train, enhance, evaluate.",
    epilog=EXIT_STATUS_HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    # Locals of a failing frame may hold patient data: never print them.
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from medgen import __version__

        typer.echo(f"medgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Medical image enhancement and synthesis: ingest scans, train, enhance, evaluate."""


@app.command(epilog=EXIT_STATUS_HELP)
def ingest(
    src: Annotated[
        Path,
        typer.Argument(
            exists=True,
            file_okay=False,
            dir_okay=True,
            metavar="SRC",
            help="Folder of scans, searched recursively.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            file_okay=False,
            metavar="DST",
            help="Output folder (NIfTI, sidecars, manifest).",
        ),
    ],
    workers: Annotated[
        int, typer.Option("--workers", "-j", min=1, help="Series converted in parallel processes.")
    ] = 1,
    keep_phi: Annotated[
        bool,
        typer.Option(
            "--keep-phi",
            help="Keep patient data: name, ID, dates and descriptions in sidecars and output "
            "names, real source paths in messages, manifest and log (default: pseudonyms).",
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or summary; problems only.")
    ] = False,
    max_image_mb: Annotated[
        float,
        typer.Option(
            "--max-image-mb",
            min=1,
            help="Refuse, before decoding, any image declaring a larger decoded size (MB).",
        ),
    ] = 2048.0,
    max_lines: Annotated[
        int,
        typer.Option("--max-lines", min=0, help="Quarantine lines shown before a count."),
    ] = 20,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an internal error.")
    ] = False,
    locate: Annotated[
        list[str] | None,
        typer.Option(
            "--locate",
            metavar="PSEUDONYM",
            help="Convert nothing; print the real path under SRC of a pseudonymous file name "
            "(as in messages, manifest, log, SourceFiles) or of a series key. Repeatable.",
        ),
    ] = None,
) -> None:
    """Convert every DICOM series, NIfTI and NRRD/MHA file under SRC to NIfTI + JSON.

    Reruns only convert what is new or changed (see OUT/manifest.sqlite); a run that was
    stopped resumes where it left off. Files that cannot be used are reported, one line
    each, and do not stop the rest. Input files are never modified.
    """
    from medgen.errors import MedgenError
    from medgen.stages.ingest import ingest as run_ingest

    if locate:
        _print_located(src, out, locate)
        return
    try:
        summary = run_ingest(
            src, out, workers=workers, keep_phi=keep_phi, progress=not quiet,
            max_image_mb=max_image_mb,
        )
    except MedgenError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug in medgen: one line unless --debug
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        typer.echo(
            f"medgen: internal error: {type(exc).__name__}: {first} "
            "(a bug in medgen; rerun with --debug for the traceback)",
            err=True,
        )
        raise typer.Exit(1) from None
    _print_ingest_summary(summary, quiet=quiet, max_lines=max_lines)
    raise typer.Exit(summary.exit_code)


def _print_located(src: Path, out: Path, queries: list[str]) -> None:
    """``PSEUDONYM -> real/path`` per match on stdout; exit 4 when one matches nothing."""
    from medgen.stages.ingest_names import locate

    found = locate(src, out, queries)
    for query, paths in found.items():
        for path in paths:
            typer.echo(f"{query} -> {path}")
        if not paths:
            typer.echo(f"{query}: no file under SRC has this pseudonym", err=True)
    raise typer.Exit(0 if all(found.values()) else 4)


def _print_ingest_summary(summary: IngestSummary, *, quiet: bool, max_lines: int = 20) -> None:
    """A table of what happened, then one line per quarantined file or series (the first
    ``max_lines``, then a count; all of them are in the manifest)."""
    from rich.console import Console
    from rich.table import Table

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if not quiet:
        out = Console(highlight=False, soft_wrap=True)
        table = Table(
            title=f"medgen ingest -> {summary.dst}", show_header=False, title_justify="left"
        )
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_row("volumes written", str(len(summary.volumes_written)))
        table.add_row(
            "series unchanged", f"{summary.series_unchanged} ({summary.volumes_unchanged} volumes)"
        )
        table.add_row("series quarantined", str(summary.series_quarantined))
        table.add_row("files skipped", str(len(summary.skipped)))
        for what, n in summary.skipped_by_kind().items():
            table.add_row(f"  {what}", str(n), style="dim")
        out.print(table)
        for note in summary.notes:
            out.print(f"note: {note}", markup=False)
    for path, reason in summary.quarantined[:max_lines]:
        err.print(f"quarantined: {path}: {reason}", markup=False)
    hidden = len(summary.quarantined) - max_lines
    if hidden > 0:
        err.print(
            f"... and {hidden} more quarantined (see {summary.dst / 'manifest.sqlite'})",
            markup=False,
        )
    if summary.warnings_logged and not quiet:
        err.print(
            f"{summary.warnings_logged} reader warnings written to {summary.log_path}",
            markup=False,
        )
    if summary.quarantined and summary.pseudonymous:
        err.print(
            "file names above are pseudonyms (no patient data in names); "
            "`medgen ingest SRC -o DST --locate NAME` prints the real path",
            markup=False,
        )
    if summary.exit_code == 4:
        where = "the input folder" if summary.pseudonymous else str(summary.src)
        err.print(f"nothing usable found in {where}", markup=False)


@app.command("run")
def run_pipeline_command(
    pipeline: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, metavar="PIPELINE.yaml", help="Pipeline file.")
    ],
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help="MLflow URI (default: sqlite:///mlflow.db here).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run the stages of PIPELINE.yaml in order, under one MLflow parent run."""
    from medgen.pipeline import run_pipeline
    from medgen.stages.pipeline_report import print_stage

    result = run_pipeline(pipeline, tracking_uri=tracking_uri, progress=not quiet, on_stage=print_stage)
    from medgen.tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    typer.echo(f"\npipeline '{result.name}' done: MLflow parent run {result.run_id}")
    typer.echo(f"open the MLflow UI with:  mlflow ui --backend-store-uri {uri}")


def _register_enhancement_commands() -> None:
    """train, enhance, evaluate, degrade, synthesize, evaluate-synthesis, batch, status, check:
    options live beside their stages."""
    from medgen.stages.enhance_cli import register
    from medgen.stages.evaluate_synthesis import register as register_evaluate_synthesis
    from medgen.stages.batch_cli import register as register_batch
    from medgen.stages.check import register as register_check
    from medgen.stages.synthesis_cli import register as register_synthesis

    register(app)
    register_synthesis(app)
    register_evaluate_synthesis(app)
    register_batch(app)
    register_check(app)


_register_enhancement_commands()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app; bad input ends in one line, not a traceback."""
    # Importing MONAI imports MLflow, which would otherwise send telemetry.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from medgen.errors import MedgenError

    try:
        app(args=argv, prog_name="medgen")
    except MedgenError as exc:
        print(f"medgen: error: {exc}", file=sys.stderr)
        sys.exit(1)
