"""Typer command for ``medgen synthesize`` (registered by :func:`register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

_TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."


def synthesize_command(
    model: Annotated[
        str,
        typer.Option("--model", "-m", metavar="MODEL",
                     help="Latent diffusion or flow (regions: null) model file, MLflow URI (runs:/<id>/model, "
                          "models:/<name>/<v>) or a local MONAI bundle folder."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="OUT", help="Output folder.")],
    n: Annotated[int, typer.Option("--n", help="How many volumes.")] = 1,
    condition: Annotated[
        list[str] | None,
        typer.Option("--condition", "-c", metavar="KEY=VALUE", help="Class label or covariate, e.g. label=1; repeatable."),
    ] = None,
    sampler: Annotated[
        str | None, typer.Option("--sampler", help="Latent diffusion: ddpm, ddim or rflow (default: the model's). Not for flows.")
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="Latent diffusion sampling steps (default: the model's; ddpm: every training "
                                     "timestep). Not for flows (one exact pass)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same volumes.")] = 0,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help="Latent diffusion: classifier-free guidance scale (1 = none). Not for flows.")
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option("--temperature", help="Flows: scale of the base noise (default 1; below 1 trades diversity for "
                                           "fidelity, 0 gives one volume). Not for latent diffusion."),
    ] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="nifti or dicom.")] = "nifti",  # noqa: A002
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    slab: Annotated[
        int | None,
        typer.Option("--slab", metavar="LATENT_VOX", help="Decode exactly in slabs this many latent voxels thick (bounded memory)."),
    ] = None,
    gate: Annotated[
        str | None,
        typer.Option("--gate", metavar="FLOW",
                     help="Judge each generated volume with this gate (a calibrated flow: file, run folder or "
                          "MLflow URI) before writing it."),
    ] = None,
    gate_policy: Annotated[
        str,
        typer.Option("--gate-policy",
                     help="What a volume the gate finds out gets: warn (written, with a warning) or skip (not "
                          "written; the other samples keep their indices)."),
    ] = "warn",
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help=_TRACKING_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Generate synthetic volumes (always marked synthetic) with a latent diffusion model or a
    normalizing flow trained on whole latent grids (`regions: null`); a class-conditioned flow
    given no label draws each volume's label from its training class frequencies.

    With --gate the count of volumes found out is printed, and each skipped sample with its
    reason; when --gate-policy skip leaves nothing to write the exit status is 3."""
    from medgen.stages.synthesize import parse_conditions, synthesize

    summary = synthesize(
        model, out, n=n, condition=parse_conditions(condition), sampler=sampler, steps=steps, seed=seed,
        guidance_scale=guidance, temperature=temperature, format=format, device=device, slab_latent_vox=slab,
        tracking_uri=tracking_uri, progress=not quiet, gate=gate, gate_policy=gate_policy,
    )  # fmt: skip
    typer.echo(
        f"wrote {len(summary.paths)} synthetic volume(s) to {out}  "
        f"({summary.seconds_per_volume:.1f} s per volume, peak memory {summary.peak_memory_mb:.0f} MB, "
        f"MLflow run {summary.run_id})"
    )
    for line in summary.gate_lines():
        typer.echo(line)
    if not summary.paths:  # as `medgen enhance --gate-policy skip`: nothing written is status 3
        raise typer.Exit(3)


def register(app: typer.Typer) -> None:
    """Add ``synthesize`` to ``app``."""
    app.command("synthesize")(synthesize_command)
