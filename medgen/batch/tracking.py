"""The MLflow run of a batch: one run per batch, carried over its restarts.

A batch run that is SIGKILLed never closes its MLflow run, which would stay ``RUNNING``
forever. So every run is tagged with the output folder's ``batch_id`` (from the ledger),
and the ledger records which MLflow run each start logged to. The next start of the same
batch (same output folder; it holds the batch lock, so no other start is alive):

* reopens the run of the previous start when that start did not finish (killed, or
  interrupted with Ctrl-C) and the pipeline is the same one: one run per batch over its
  restarts, tag ``medgen.batch.attempts`` counting the starts, per-start numbers logged at
  step = attempt;
* otherwise (the pipeline changed, the run is in another store or experiment) starts a new
  run that names the one it follows (tag ``medgen.batch.continues``);
* marks ``KILLED`` every other run of this batch still ``RUNNING`` (a start killed between
  creating its run and recording it in the ledger leaves one).

At the end the run gets the whole per-study table (``studies.csv``, ``studies.json`` as an
MLflow table, both rewritten, never appended to) and ``report.html``.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medgen.archive.ledger import Ledger
    from medgen.batch.driver import BatchSummary
    from medgen.batch.spec import BatchPipeline
    from medgen.tracking import Tracker

BATCH_ID_TAG = "medgen.batch.id"
ATTEMPTS_TAG = "medgen.batch.attempts"
CONTINUES_TAG = "medgen.batch.continues"
TABLE_ARTIFACT = "studies.json"


@dataclass
class BatchRun:
    """The MLflow run a batch start logs to; ``attempt`` is 1 for a new run, n for its n-th start."""

    tracker: Tracker
    run_id: str
    attempt: int = 1
    continues: str | None = None  # the killed run a new run follows, when it could not be reopened


def pipeline_digest(pipeline: BatchPipeline) -> str:
    """What must match for a restart to continue the same MLflow run."""
    return hashlib.sha256(pipeline.model_dump_json().encode()).hexdigest()[:16]


def start_batch_run(ledger: Ledger, pipeline: BatchPipeline, pipeline_path: Path | None, summary: BatchSummary,
                    workers: int, executor: str, tracking_uri: str | None) -> BatchRun:
    """Reopen the run a killed start of this batch left, or start one (see the module doc);
    recorded in the ledger for batch run ``summary.run_id``."""
    from medgen.tracking import Tracker

    tracker = Tracker(pipeline.experiment, uri=tracking_uri)
    batch_id = ledger.batch_id()
    digest = pipeline_digest(pipeline)
    left_open = _open_runs(tracker, batch_id)
    earlier = [r for r in ledger.runs() if r["run_id"] != summary.run_id]
    candidate = None
    if earlier and earlier[-1]["status"] != "finished" and earlier[-1]["mlflow_run_id"]:
        candidate = earlier[-1]["mlflow_run_id"]
    elif left_open:
        candidate = left_open[0]  # newest first: killed before the ledger heard of it
    batch_run = _reopen(tracker, candidate, batch_id, digest) if candidate else None
    for run_id in {*left_open, candidate} - {None, batch_run and batch_run.run_id}:
        _close_killed(tracker, run_id)
    if batch_run is None:
        tags = {"medgen.kind": "batch", "medgen.stage": "batch", BATCH_ID_TAG: batch_id}
        if candidate:
            tags[CONTINUES_TAG] = candidate
        run_id = tracker.start_run(f"batch:{pipeline.name} ({summary.total} studies, {executor} x{workers})",
                                   tags=tags)
        batch_run = BatchRun(tracker, run_id, 1, candidate)
        tracker.log_params(run_id, {"pipeline.name": pipeline.name, "pipeline.digest": digest,
                                    "pipeline.stages": ",".join(pipeline.stage_names)})
        gate = getattr(pipeline.model_settings(), "gate", None)
        if gate is not None:
            from medgen.stages.gating import model_label

            tracker.log_params(run_id, {"gate.model": model_label(gate.model), "gate.policy": gate.policy})
        if pipeline_path is not None:
            tracker.log_artifact(run_id, pipeline_path)
    ledger.set_mlflow_run(summary.run_id, batch_run.run_id)
    # What may differ from one start to the next: tags (overwritten) and metrics at step = attempt.
    tracker.set_tags(batch_run.run_id, {ATTEMPTS_TAG: batch_run.attempt, "batch.run_id": summary.run_id,
                                        "executor": executor, "workers": workers})
    tracker.log_metrics(batch_run.run_id, {"studies_total": summary.total,
                                           "studies_done_before": summary.done_before}, step=batch_run.attempt)
    summary.mlflow_run_id = batch_run.run_id
    return batch_run


def end_batch_run(batch_run: BatchRun, summary: BatchSummary, status: str) -> None:
    """This start's numbers (at step = attempt), the whole per-study table and the report;
    the run closed ``FINISHED``, or ``KILLED`` when the start was interrupted."""
    tracker, run_id = batch_run.tracker, batch_run.run_id
    done = summary.total - summary.pending - len(summary.failed) - len(summary.gated)
    tracker.log_metrics(run_id, {"studies_done": done, "studies_done_now": summary.done_now,
                                 "studies_failed": len(summary.failed), "studies_gated": len(summary.gated),
                                 "studies_pending": summary.pending, "studies_per_second": summary.studies_per_second,
                                 "seconds": summary.seconds}, step=batch_run.attempt)
    for name in ("studies.csv", "report.html"):
        if (summary.out / name).is_file():
            tracker.log_artifact(run_id, summary.out / name)
    if (summary.out / "studies.csv").is_file():
        log_whole_table(tracker, run_id, study_table(summary.out / "studies.csv"), TABLE_ARTIFACT)
    tracker.end_run(run_id, "FINISHED" if status == "finished" else "KILLED")


def log_whole_table(tracker: Tracker, run_id: str, columns: dict[str, list], artifact_file: str) -> None:
    """``columns`` as the run's MLflow table ``artifact_file``, replacing an earlier one
    (MLflow's ``log_table`` appends to a table that exists: a restart would repeat rows)."""
    existing = {a.path for a in tracker.client.list_artifacts(run_id)}
    if artifact_file not in existing:
        tracker.log_table(run_id, columns, artifact_file)
        return
    import pandas as pd

    from medgen.tracking import check_no_phi

    check_no_phi(columns, "table columns")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        pd.DataFrame(columns).to_json(path, orient="split", index=False, date_format="iso")  # as log_table writes it
        tracker.log_artifact(run_id, path)


def study_table(path: Path) -> dict[str, list]:
    """``studies.csv`` as columns for MLflow's table view: timings and metrics as numbers,
    blanks as None; keys, status and reasons stay text (a key may look like a number)."""
    import csv

    def cell(column: str, text: str):
        if text == "":
            return None
        if column in ("study", "kind", "status", "reason", "gate"):
            return text
        try:
            return float(text)
        except ValueError:
            return text

    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return {k: [cell(k, r[k]) for r in rows] for k in reader.fieldnames or ()}


def _open_runs(tracker: Tracker, batch_id: str) -> list[str]:
    """Ids of this batch's runs still ``RUNNING``, newest first."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`{BATCH_ID_TAG}` = '{batch_id}' and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"])
    return [r.info.run_id for r in runs]


def _reopen(tracker: Tracker, run_id: str, batch_id: str, digest: str) -> BatchRun | None:
    """The run ``run_id`` running again, when it is this batch's, in this experiment, with
    this pipeline; else None."""
    run = tracker.find_run(run_id)
    if run is None:  # another store, or deleted
        return None
    if (run.info.experiment_id != tracker.experiment_id or run.data.tags.get(BATCH_ID_TAG) != batch_id
            or run.data.params.get("pipeline.digest") != digest):
        return None
    tracker.reopen_run(run_id)
    attempts = int(run.data.tags.get(ATTEMPTS_TAG, "1") or 1)
    return BatchRun(tracker, run_id, attempts + 1)


def _close_killed(tracker: Tracker, run_id: str) -> None:
    run = tracker.find_run(run_id)
    if run is not None and run.info.status == "RUNNING":
        tracker.end_run(run_id, "KILLED")


__all__ = ["BatchRun", "end_batch_run", "log_whole_table", "pipeline_digest", "start_batch_run", "study_table"]
