"""``OUT/report.html`` and ``OUT/studies.csv``: what a batch did, for people.

The report is one self-contained page (images inlined as base64 PNG, a few lines of inline
script to sort the table; nothing is fetched from the network): counts, failures with their
reasons, studies the input gate kept out (score, z, reason), the per-study table (click a
header to sort; with a gate, its verdict per study), montages of a sample of studies
(input / output / difference, each view at least 256 pixels, windows stated) and timing.
Studies appear under their pseudonymous keys only.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from medgen.archive.ledger import Ledger, StudyState
from medgen.io.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from medgen.batch.driver import BatchSummary
    from medgen.batch.spec import BatchPipeline

REPORT_NAME = "report.html"
TABLE_NAME = "studies.csv"
METRIC_COLUMNS = ("psnr_vs_input", "ssim_vs_input", "mean_abs_change", "sigma_input", "sigma_output")


def _number(value) -> object:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)


def study_rows(ledger: Ledger, stages, gate: bool = False) -> list[dict[str, object]]:
    """One dict per study: key, status, reason, seconds per stage and total, metrics; with
    ``gate``, the input gate's verdict, score and z (a study enhanced although "out" says so
    in its reason)."""
    rows = []
    for s in ledger.studies(stages):
        row: dict[str, object] = {"study": s.study_key, "kind": s.kind, "status": s.status, "reason": s.reason}
        for step in s.steps:
            row[f"{step.stage}_s"] = round(step.seconds, 3) if step.seconds is not None and step.status == "done" else ""
        row["total_s"] = round(s.seconds, 3)
        metrics = s.metrics
        if gate:
            row["gate"] = metrics.get("gate", "")
            row["gate_score"], row["gate_z"] = _number(metrics.get("gate_score")), _number(metrics.get("gate_z"))
            if s.status == "done" and metrics.get("gate") == "out":
                row["reason"] = f"input gate: out, enhanced anyway (policy warn): {metrics.get('gate_reason', '')}"
        for m in METRIC_COLUMNS:
            row[m] = _number(metrics.get(m))
        rows.append(row)
    return rows


def _has_gate(pipeline: BatchPipeline) -> bool:
    return getattr(pipeline.model_settings(), "gate", None) is not None


def write_study_table(ledger: Ledger, pipeline: BatchPipeline, out: Path) -> Path:
    """``OUT/studies.csv``: :func:`study_rows` as CSV (atomically)."""
    rows = study_rows(ledger, pipeline.stage_names, _has_gate(pipeline))
    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["study", "status", "reason"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_bytes(out / TABLE_NAME, buf.getvalue().encode())


def _montage_sample(studies: list[StudyState], out: Path, n: int) -> list[tuple[str, Path]]:
    """Up to ``n`` montages of done studies, spread evenly over the sorted keys."""
    done = [s for s in studies if s.status == "done"]
    found = []
    for s in done:
        for step in s.steps:
            if step.stage == "export":
                found.extend((s.study_key, out / name) for name, _, _ in step.outputs if name.endswith("_montage.png"))
    if len(found) <= n:
        return found
    stride = len(found) / n
    return [found[int(i * stride)] for i in range(n)]


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


_STYLE = """
body{font-family:sans-serif;margin:20px;background:#fafafa;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:28px}
.counts span{display:inline-block;margin-right:18px;padding:8px 14px;border-radius:6px;background:#e8eef6;font-size:16px}
.counts .failed{background:#f6e0e0} .counts .done{background:#e0f2e0}
table{border-collapse:collapse;font-size:13px;background:white}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right} td:first-child,th:first-child{text-align:left;font-family:monospace}
th{background:#eee;cursor:pointer;user-select:none} th:hover{background:#ddd}
tr.failed td{background:#fbeaea} tr.gated td{background:#fdf3dc} .reason{text-align:left}
.counts .gated{background:#fbeccb}
figure{display:inline-block;margin:8px;vertical-align:top} figcaption{font-family:monospace}
"""
_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
    rows.sort(function(a, b){
      var x = a.cells[col].textContent, y = b.cells[col].textContent, nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c; });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def render_report(ledger: Ledger, pipeline: BatchPipeline, summary: BatchSummary) -> str:
    """The report page as a string (see the module docstring)."""
    stages = pipeline.stage_names
    studies = ledger.studies(stages)
    rows = study_rows(ledger, stages, _has_gate(pipeline))
    counts = ledger.counts(stages)
    esc = html.escape
    gate = getattr(pipeline.model_settings(), "gate", None)
    gate_text = ""
    if gate is not None:
        from medgen.stages.gating import model_label

        gate_text = f" &middot; input gate: {esc(model_label(gate.model))} (policy {esc(gate.policy)})"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>medgen batch: {esc(pipeline.name)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>medgen batch: {esc(pipeline.name)}</h1>",
        f"<p>stages: {' &rarr; '.join(esc(s) for s in stages)} &middot; model: "
        f"{esc(Path(pipeline.model_settings().model).name)}{gate_text} &middot; written "
        f"{esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
        "<div class='counts'>",
        f"<span>{counts['total']} studies</span><span class='done'>{counts['done']} done</span>",
        f"<span class='failed'>{counts['failed']} failed</span>",
        f"<span class='gated'>{counts['gated']} gated out</span>" if gate is not None or counts["gated"] else "",
        f"<span>{counts['pending'] + counts['running']} pending</span>",
        f"<span>{summary.broken_files} files outside any study</span></div>",
    ]
    parts.append("<h2>Timing</h2><p>")
    parts.append(f"this run: {summary.done_now + summary.failed_now} studies in {summary.seconds:.1f} s "
                 f"({summary.studies_per_second:.2f} studies/s)")
    done = [s for s in studies if s.status == "done"]
    if done:
        mean = sum(s.seconds for s in done) / len(done)
        per_stage = {st: sum((x.seconds or 0) for s in done for x in s.steps if x.stage == st) / len(done) for st in stages}
        parts.append(f"; mean per study {mean:.2f} s (" + ", ".join(f"{k} {v:.2f} s" for k, v in per_stage.items()) + ")")
    parts.append("</p>")
    failed = [s for s in studies if s.status == "failed"]
    parts.append(f"<h2>Failures ({len(failed)})</h2>")
    if failed:
        parts.append("<table><thead><tr><th>study</th><th>reason</th></tr></thead><tbody>")
        parts.extend(f"<tr class='failed'><td>{esc(s.study_key)}</td><td class='reason'>{esc(s.reason)}</td></tr>"
                     for s in failed)
        parts.append("</tbody></table>")
    else:
        parts.append("<p>none</p>")
    if gate is not None or counts["gated"]:
        parts.append(_gated_section(studies))
    parts.append("<h2>Studies (click a column to sort)</h2>")
    columns = list(rows[0]) if rows else ["study", "status"]
    parts.append("<table class='sortable' id='studies'><thead><tr>")
    parts.extend(f"<th>{esc(c)}</th>" for c in columns)
    parts.append("</tr></thead><tbody>")
    for row in rows:
        cls = f" class='{row['status']}'" if row["status"] in ("failed", "gated") else ""
        parts.append(f"<tr{cls}>" + "".join(
            f"<td{' class=reason' if c == 'reason' else ''}>{esc(str(row[c]))}</td>" for c in columns) + "</tr>")
    parts.append("</tbody></table>")
    sample = _montage_sample(studies, summary.out, pipeline.report.sample_montages)
    parts.append(f"<h2>Montages ({len(sample)} studies): input, output, difference</h2>")
    for key, path in sample:
        if path.is_file():
            parts.append(f"<figure>{_img_tag(path, key)}<figcaption>{esc(key)} &middot; {esc(path.name)}</figcaption></figure>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def _gated_section(studies: list[StudyState]) -> str:
    """Studies the input gate kept out (policy skip): score, z and why."""
    esc = html.escape
    gated = [s for s in studies if s.status == "gated"]
    parts = [f"<h2>Kept out by the input gate ({len(gated)})</h2>"]
    if not gated:
        parts.append("<p>none</p>")
        return "\n".join(parts)
    head = "".join(f"<th>{c}</th>" for c in ("study", "NLL/feature", "z (SD)", "reason"))
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>")
    for s in gated:
        m = s.metrics
        parts.append(f"<tr class='gated'><td>{esc(s.study_key)}</td><td>{esc(str(_number(m.get('gate_score'))))}</td>"
                     f"<td>{esc(str(_number(m.get('gate_z'))))}</td><td class='reason'>{esc(s.reason)}</td></tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def write_report(ledger: Ledger, pipeline: BatchPipeline, summary: BatchSummary) -> Path:
    """Write ``OUT/report.html`` atomically; returns its path."""
    return atomic_write_bytes(summary.out / REPORT_NAME, render_report(ledger, pipeline, summary).encode())
