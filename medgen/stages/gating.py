"""The input gate as an option of enhancement: ``gate: {model: FLOW, policy: warn|skip}``.

A scan is judged by the gate (:mod:`medgen.inference.gate`) before it is enhanced. With
``warn`` an "out" scan is enhanced anyway, with one loud warning line; with ``skip`` it is
not enhanced at all. Either way the verdict (score, z, reason) is recorded: in the output's
sidecar (``"InputGate"``), in the stage's MLflow run (``gate/score``, ``gate/z``, tag
``medgen.gate_verdict``) and, in a batch, in the ledger and the report. Nothing here imports
torch: batch specs and pipeline files use :class:`GateOption` without loading a model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

GatePolicy = Literal["warn", "skip"]
GATE_POLICIES: tuple[str, ...] = ("warn", "skip")


class GateOption(BaseModel):
    """``gate:`` of an enhancement stage: the flow model that judges each scan, and what
    to do with a scan it finds "out" (``warn``: enhance with a warning; ``skip``: do not)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    policy: GatePolicy = "warn"


def is_uri(model: str) -> bool:
    """MLflow model URIs and other URLs are not paths on this machine."""
    return model.startswith(("runs:", "models:")) or "://" in model


def resolve_model_path(model: str, base: Path) -> str:
    """``model`` made absolute against ``base`` (the folder of the file naming it); URIs,
    absolute paths and ``identity`` stay as they are."""
    if model == "identity" or is_uri(model):
        return model
    path = Path(model).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def sidecar_entry(verdict, option: GateOption) -> dict[str, Any]:
    """What the output's sidecar says about the gate (``"InputGate"``)."""
    return {"Verdict": verdict.verdict, "Score": verdict.score, "Z": verdict.z, "Reason": verdict.reason,
            "Policy": option.policy, "Model": model_label(option.model)}  # fmt: skip


def model_label(model: str) -> str:
    """A model's name for records: the URI, or the file (``run/model.pt``), never a full path."""
    if is_uri(model):
        return model
    path = Path(model)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def score_text(verdict) -> str:
    """``NLL/feature 3.210, z +9.5`` (what could be scored)."""
    parts = []
    if verdict.score is not None:
        parts.append(f"NLL/feature {verdict.score:.3f}")
    if verdict.z is not None:
        parts.append(f"z {verdict.z:+.1f}")
    return ", ".join(parts) or "not scorable"


def gated_reason(verdict) -> str:
    """One line for a scan the gate kept out: its score and why."""
    return f"out of the gate's distribution ({score_text(verdict)}): {verdict.reason}"


def warning_line(subject: str, verdict, policy: str, *, anyway: str = "enhancing it anyway",
                 skipped: str = "NOT enhanced", what: str = "input gate") -> str:
    """The loud line printed for an "out" scan (or generated volume) under either policy."""
    action = f"{anyway} (gate policy warn)" if policy == "warn" else f"{skipped} (gate policy skip)"
    return f"WARNING: {what}: {subject} is OUT ({score_text(verdict)}): {verdict.reason}; {action}"


def warn(subject: str, verdict, policy: str, **wording: str) -> None:
    """Print :func:`warning_line` on stderr (nothing for an "in" scan)."""
    if not verdict.inside:
        print(warning_line(subject, verdict, policy, **wording), file=sys.stderr, flush=True)


def log_verdict(run, verdict, option: GateOption) -> None:
    """The verdict in an MLflow run: params ``gate.*``, metrics ``gate/score`` and ``gate/z``,
    tags ``medgen.gate_verdict`` and ``medgen.gate_reason``."""
    run.log_params({"gate.model": model_label(option.model), "gate.policy": option.policy})
    run.log_metrics({k: v for k, v in (("gate/score", verdict.score), ("gate/z", verdict.z)) if v is not None})
    run.set_tags({"medgen.gate_verdict": verdict.verdict, "medgen.gate_reason": verdict.reason})


def verdict_metrics(verdict) -> dict[str, Any]:
    """A verdict as a batch study's metrics (the per-study table's gate columns)."""
    return {"gate": verdict.verdict, "gate_score": verdict.score, "gate_z": verdict.z,
            "gate_reason": verdict.reason}  # fmt: skip


def worst(verdicts: list) -> Any:
    """The verdict that speaks for several volumes of one study: the first "out" one, else
    the one farthest from the held-back scans."""
    out = [v for v in verdicts if not v.inside]
    if out:
        return out[0]
    return max(verdicts, key=lambda v: abs(v.z) if v.z is not None else float("inf"))


def with_verdict(volume, verdict, option: GateOption):
    """``volume`` (same voxels) whose sidecar will carry the gate's verdict."""
    marked = volume.with_array(volume.array, volume.slope, volume.intercept)
    marked.meta.acquisition["InputGate"] = sidecar_entry(verdict, option)
    if not verdict.inside:
        marked.meta.provenance.append(f"enhanced although the input gate found the input out: {verdict.reason}")
    return marked


# -- the gate over generated volumes (synthesis: a quality filter on each sample) ---------------


def option_from_flags(gate: str | Path | None, policy: str) -> GateOption | None:
    """``--gate``/``--gate-policy`` as a :class:`GateOption` (None without a gate); an unknown
    policy is a one-line ParameterError before any work."""
    if gate is None:
        return None
    from medgen.validate import look_up_option

    return GateOption(model=str(gate), policy=look_up_option("gate_policy", policy, GATE_POLICIES))


def record_entry(verdict, option: GateOption) -> dict[str, Any]:
    """:func:`sidecar_entry` with lower-case keys, for records that are lower-case already
    (a synthetic volume's ``"synthesis"`` record)."""
    return {key.lower(): value for key, value in sidecar_entry(verdict, option).items()}


def out_metrics(verdicts: list) -> dict[str, float]:
    """``gate/n_out`` and ``gate/fraction_out`` over several verdicts (none: both 0)."""
    n_out = sum(1 for v in verdicts if not v.inside)
    return {"gate/n_out": float(n_out), "gate/fraction_out": n_out / len(verdicts) if verdicts else 0.0}
