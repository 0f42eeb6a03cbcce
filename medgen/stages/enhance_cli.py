"""Typer commands for ``medgen train``, ``enhance``, ``evaluate`` and ``degrade``.

Register them on the main app with :func:`register` (``register(app)`` in ``medgen/cli.py``).
Each command parses options, calls its stage function and prints a short summary; heavy
imports (torch, MONAI, MLflow) happen inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

_TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def train_command(
    config: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, metavar="PIPELINE.yaml", help="Pipeline config (YAML)."),
    ],
    no_resume: Annotated[
        bool, typer.Option("--no-resume", help="Start over even if checkpoints exist.")
    ] = False,
    register_as: Annotated[
        str | None, typer.Option("--register-as", help="Also register the model under this name.")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help=_TRACKING_HELP)
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train the model of PIPELINE.yaml; resumes from its last checkpoint.

    For several processes: torchrun --nproc_per_node N -m medgen.stages.train PIPELINE.yaml
    """
    from medgen.stages.train import train

    summary = train(
        config, resume=not no_resume, tracking_uri=tracking_uri, register_as=register_as, progress=not quiet
    )
    console = _console()
    if summary.resumed_from_step:
        console.print(f"resumed from step {summary.resumed_from_step}")
    console.print(
        f"trained {summary.steps_done} steps (to step {summary.final_step}) in {summary.seconds:.1f} s"
    )
    for key, value in sorted(summary.val_metrics.items()):
        console.print(f"  {key} = {value:.4f}")
    console.print(f"model: {summary.model_path}")
    console.print(f"MLflow: {summary.model_uri}  (run {summary.run_id})")


def enhance_command(
    scan: Annotated[
        Path, typer.Argument(exists=True, metavar="SCAN", help="NIfTI/NRRD/MHA file or DICOM folder.")
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            metavar="MODEL",
            help="Model file or MLflow URI (runs:/<id>/model, models:/<name>/<version>).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="OUT", help="Output .nii.gz, or a folder with --format dicom."),
    ],
    format: Annotated[str, typer.Option("--format", "-f", help="nifti or dicom.")] = "nifti",  # noqa: A002
    adapt: Annotated[
        float,
        typer.Option(
            "--adapt",
            metavar="SECONDS",
            help="Self-supervised adaptation to the scan, budget in seconds (0: off); with --adapt-steps "
            "only a safety cap on the clock.",
        ),
    ] = 0.0,
    adapt_steps: Annotated[
        int | None,
        typer.Option(
            "--adapt-steps",
            metavar="N",
            min=1,
            help="Adapt with a budget of N training steps (super-resolution): the same result on an idle "
            "or a busy machine; the time is estimated up front. Rules over --adapt.",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    overlap: Annotated[
        float, typer.Option("--overlap", min=0.0, max=0.95, help="Sliding-window overlap.")
    ] = 0.25,
    seed: Annotated[int, typer.Option("--seed", help="Seed of diffusion sampling.")] = 0,
    gate: Annotated[
        str | None,
        typer.Option(
            "--gate",
            metavar="FLOW",
            help="Judge SCAN first with this input gate (a calibrated flow: file, run folder or MLflow URI).",
        ),
    ] = None,
    gate_policy: Annotated[
        str,
        typer.Option(
            "--gate-policy",
            help="What a scan the gate finds out gets: warn (enhanced, with a warning) or skip (not enhanced, "
            "exit status 3).",
        ),
    ] = "warn",
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help=_TRACKING_HELP)
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Enhance SCAN with MODEL; the output keeps the input's grid, orientation and units.

    With --gate the verdict (in/out, score, reason) is printed and kept in the sidecar and
    the MLflow run; a scan skipped by --gate-policy skip writes nothing and exits with 3.
    """
    from medgen.stages.enhance import enhance

    s = enhance(
        scan,
        model,
        out,
        format=format,
        adapt_seconds=adapt,
        adapt_steps=adapt_steps,
        device=device,
        overlap=overlap,
        seed=seed,
        tracking_uri=tracking_uri,
        progress=not quiet,
        gate=gate,
        gate_policy=gate_policy,
    )
    console = _console()
    if s.gate is not None:
        console.print(f"input gate: {s.gate['verdict']} ({s.gate['reason']})", markup=False)
    if s.skipped:
        console.print(f"skipped {scan}: {s.skipped}; nothing written; MLflow run {s.run_id}", markup=False)
        raise typer.Exit(3)
    console.print(f"wrote {s.output}" + (f" and {s.uncertainty}" if s.uncertainty else ""))
    console.print(
        f"{s.seconds_inference:.1f} s inference ({s.voxels_per_second / 1e6:.2f} Mvox/s on {s.device}, "
        f"window {list(s.window_vox)} x{s.window_batch}), {s.seconds_total:.1f} s total; MLflow run {s.run_id}"
    )


def evaluate_command(
    out: Annotated[Path, typer.Argument(exists=True, metavar="OUT", help="The enhanced volume.")],
    reference: Annotated[
        Path, typer.Option("--reference", "-r", exists=True, metavar="CLEAN", help="The clean reference.")
    ],
    compare: Annotated[
        list[str] | None,
        typer.Option(
            "--compare",
            "-c",
            metavar="NAME=PATH",
            help="Another volume to score, e.g. degraded=noisy.nii.gz (repeatable).",
        ),
    ] = None,
    data_range: Annotated[
        float | None,
        typer.Option("--data-range", help="PSNR/SSIM data range (default: reference max - min)."),
    ] = None,
    no_foreground: Annotated[
        bool, typer.Option("--no-foreground", help="Skip the foreground-mask scores.")
    ] = False,
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help=_TRACKING_HELP)
    ] = None,
) -> None:
    """PSNR / SSIM / MS-SSIM / NRMSE of OUT (and --compare volumes) against CLEAN, as a table."""
    from medgen.stages.evaluate import evaluate

    others = {}
    for item in compare or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"expected NAME=PATH, got {item!r}", param_hint="--compare")
        others[name] = Path(path)
    s = evaluate(
        out,
        reference,
        compare=others,
        data_range=data_range,
        foreground=not no_foreground,
        tracking_uri=tracking_uri,
    )
    console = _console()
    console.print(s.table())
    for note in s.notes:
        console.print(f"note: {note}", markup=False)
    console.print(f"MLflow run {s.run_id}")


def degrade_command(
    clean: Annotated[
        Path, typer.Argument(exists=True, metavar="CLEAN", help="Clean scan (file or DICOM folder).")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="DEGRADED", help="Output file, e.g. noisy.nii.gz.")
    ],
    noise: Annotated[str, typer.Option("--noise", help="gaussian, rician, lowdose_ct or none.")] = "rician",
    sigma: Annotated[
        float, typer.Option("--sigma", help="Noise std as a fraction of the robust intensity span.")
    ] = 0.05,
    seed: Annotated[int, typer.Option("--seed", help="Noise seed.")] = 0,
    thick: Annotated[
        int, typer.Option("--thick", min=1, help="Average this many thin slices into one first.")
    ] = 1,
    dose_fraction: Annotated[
        float, typer.Option("--dose-fraction", help="Dose of the simulated low-dose CT.")
    ] = 0.25,
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help=_TRACKING_HELP)
    ] = None,
) -> None:
    """Build a degraded test partner of CLEAN (seeded: same seed, same output)."""
    from medgen.stages.degrade import degrade

    s = degrade(
        clean,
        out,
        noise=noise,
        sigma=sigma,
        seed=seed,
        thick_factor=thick,
        dose_fraction=dose_fraction,
        tracking_uri=tracking_uri,
    )
    console = _console()
    for name, params in s.steps:
        console.print(f"{name}: {params}", markup=False)
    console.print(f"wrote {s.output}; MLflow run {s.run_id}")


COMMANDS = {
    "train": train_command,
    "enhance": enhance_command,
    "evaluate": evaluate_command,
    "degrade": degrade_command,
}


def register(app: typer.Typer) -> None:
    """Add ``train``, ``enhance``, ``evaluate`` and ``degrade`` to ``app``."""
    for name, function in COMMANDS.items():
        app.command(name)(function)
