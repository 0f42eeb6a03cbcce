"""Batch throughput: studies/s for 1, 2 and N local workers, ledger overhead, Ray vs local.

Generates an archive of ``--studies`` DICOM studies (``--shape`` voxels each) and runs the
identity pipeline with montage export and metrics (CPU work in every stage, no model) over
it, into a fresh output folder per configuration. Prints one table:

* studies/s and per-study overhead (wall time x workers / studies minus the mean time the
  stages themselves took) for 1, 2 and N local workers, and for Ray with 2 actors;
* the ledger's own cost per study (every write one study causes, timed on its own) as a
  fraction of a study's processing time.

    python bench/batch.py [--studies 24] [--shape 64 64 48] [--workers-max N] [--no-ray]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PIPELINE = """\
name: bench-batch
stages:
  - ingest: {}
  - enhance: {model: identity}
  - export: {dicom: false, montage: true}
  - metrics: {}
"""


def make_archive(root: Path, n: int, shape: tuple[int, int, int]) -> None:
    from tests.dicom_factory import write_series

    for i in range(n):
        write_series(root / f"study{i:04d}" / "CT", shape=shape, series_uid=f"1.2.826.0.2.{i}")


def run(pipeline: Path, src: Path, out: Path, workers: int, executor: str = "local") -> dict:
    from medgen.archive.ledger import Ledger
    from medgen.batch.driver import run_batch

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_batch(pipeline, src, out, workers=workers, executor=executor, track=False, progress=False)
    wall = time.perf_counter() - t0
    with Ledger.open(out) as ledger:
        studies = ledger.studies(("ingest", "enhance", "export", "metrics"))
    work = sum(s.seconds for s in studies) / max(len(studies), 1)
    return {"wall": wall, "studies": summary.done_now, "rate": summary.done_now / wall,
            "work": work, "overhead": wall * workers / max(summary.done_now, 1) - work}


def ledger_cost(n: int = 200) -> float:
    """Seconds of ledger writes per study: 4 stages x (running + done) + one heartbeat."""
    from medgen.archive.ledger import Ledger, StudyEntry

    stages = ("ingest", "enhance", "export", "metrics")
    with tempfile.TemporaryDirectory() as tmp, Ledger.open(tmp) as ledger:
        ledger.sync_studies([StudyEntry(f"k{i:05d}", "dicom", 40, "fp") for i in range(n)], stages)
        t0 = time.perf_counter()
        for i in range(n):
            key = f"k{i:05d}"
            for stage in stages:
                ledger.mark_running(key, stage, worker="w0", fingerprint="f", run_id="r")
                ledger.mark_done(key, stage, fingerprint="f", outputs=[(f"studies/{key}/a.nii.gz", 1000, "0" * 64)],
                                 metrics={"psnr": 30.0}, seconds=0.1)
            ledger.heartbeat([key])
        return (time.perf_counter() - t0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 48])
    parser.add_argument("--workers-max", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medgen-bench-batch-") as tmp:
        tmp = Path(tmp)
        make_archive(tmp / "archive", args.studies, tuple(args.shape))
        pipeline = tmp / "p.yaml"
        pipeline.write_text(PIPELINE)
        rows = []
        for w in sorted({1, 2, args.workers_max}):
            rows.append((f"local x{w}", w, run(pipeline, tmp / "archive", tmp / f"out{w}", w)))
        if not args.no_ray:
            try:
                import ray  # noqa: F401

                rows.append(("ray x2", 2, run(pipeline, tmp / "archive", tmp / "ray", 2, "ray")))
            except ImportError:
                print("ray not installed: no Ray row (pip install 'medgen[ray]')")
        per_study_ledger = ledger_cost()
    base = rows[0][2]["rate"]
    print(f"{args.studies} studies of {args.shape[0]}x{args.shape[1]}x{args.shape[2]} voxels, "
          f"identity + montage + metrics, {os.cpu_count()} CPUs")
    print(f"{'executor':<10} {'wall s':>8} {'studies/s':>10} {'speed-up':>9} {'work s/study':>13} {'overhead s/study':>17}")
    for name, _w, r in rows:
        print(f"{name:<10} {r['wall']:>8.2f} {r['rate']:>10.2f} {r['rate'] / base:>9.2f} {r['work']:>13.3f} "
              f"{r['overhead']:>17.3f}")
    work = rows[0][2]["work"]
    print(f"ledger writes per study: {per_study_ledger * 1000:.2f} ms = {100 * per_study_ledger / work:.2f} % "
          f"of a study's processing ({work:.3f} s)")


if __name__ == "__main__":
    main()
