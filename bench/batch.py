"""Batch throughput: studies/s for 1, 2 and N local workers, ledger overhead, Ray vs local.

Generates an archive of ``--studies`` DICOM studies (``--shape`` voxels each) and runs the
identity pipeline with montage export and metrics (CPU work in every stage, no model) over
it, into a fresh output folder per configuration. Prints one table:

* studies/s and per-study overhead (wall time x workers / studies minus the mean time the
  stages themselves took) for 1, 2 and N local workers, and for Ray with 2 actors;
* the ledger's own cost per study (every write one study causes, timed on its own) as a
  fraction of a study's processing time;
* overlapped vs sequential I/O in one local worker, on an I/O-heavy case: ``--io-studies``
  gzip-compressed NIfTI scans (``--io-shape``), ingest + enhance + metrics, where the model
  is the identity waiting ``--model-seconds`` per volume (the CPU stays free, as with a GPU
  model): studies/s side by side.

    python bench/batch.py [--studies 24] [--shape 64 64 48] [--workers-max N] [--no-ray]
                          [--io-studies 12] [--io-shape 128 128 64] [--model-seconds 0.5] [--io-only]
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


IO_PIPELINE = """\
name: bench-batch-io
stages:
  - ingest: {{}}
  - enhance: {{model: identity, identity_seconds: {seconds}}}
  - metrics: {{}}
"""


def make_nifti_archive(root: Path, n: int, shape: tuple[int, int, int]) -> None:
    """``n`` gzip-compressed NIfTI scans: smooth anatomy-like structure plus noise (float32,
    so gzip has real work, as with scanner data)."""
    import numpy as np

    from medgen.io import save
    from medgen.volume import Volume

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = (np.sqrt((grid ** 2).sum(0)) < 0.8).astype(np.float32) * 400
    for i in range(n):
        save(Volume(body + rng.normal(0, 20, shape).astype(np.float32), np.eye(4)), root / f"scan{i:04d}.nii.gz")


def make_archive(root: Path, n: int, shape: tuple[int, int, int]) -> None:
    from tests.dicom_factory import write_series

    for i in range(n):
        write_series(root / f"study{i:04d}" / "CT", shape=shape, series_uid=f"1.2.826.0.2.{i}")


def run(pipeline: Path, src: Path, out: Path, workers: int, executor: str = "local", overlap: bool = True) -> dict:
    from medgen.archive.ledger import Ledger
    from medgen.batch.driver import run_batch

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_batch(pipeline, src, out, workers=workers, executor=executor, track=False, progress=False,
                        overlap_io=overlap)
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
    parser.add_argument("--io-studies", type=int, default=12)
    parser.add_argument("--io-shape", type=int, nargs=3, default=[128, 128, 64])
    parser.add_argument("--model-seconds", type=float, default=0.5)
    parser.add_argument("--io-only", action="store_true", help="only the overlapped vs sequential I/O rows")
    args = parser.parse_args()
    io_rows(args)
    if not args.io_only:
        scaling_rows(args)


def io_rows(args) -> None:
    """One local worker, overlapped vs sequential I/O, on gzip NIfTI with a model that waits."""
    with tempfile.TemporaryDirectory(prefix="medgen-bench-batch-io-") as tmp:
        tmp = Path(tmp)
        make_nifti_archive(tmp / "archive", args.io_studies, tuple(args.io_shape))
        size_mb = sum(p.stat().st_size for p in (tmp / "archive").iterdir()) / args.io_studies / 1e6
        pipeline = tmp / "p.yaml"
        pipeline.write_text(IO_PIPELINE.format(seconds=args.model_seconds))
        rows = [(name, run(pipeline, tmp / "archive", tmp / name, 1, overlap=overlap))
                for name, overlap in (("sequential", False), ("overlapped", True))]
    shape = "x".join(map(str, args.io_shape))
    print(f"{args.io_studies} gzip NIfTI studies of {shape} float32 ({size_mb:.1f} MB each), ingest + enhance + "
          f"metrics, model = identity waiting {args.model_seconds} s per volume, 1 local worker, {os.cpu_count()} CPUs")
    print(f"{'I/O':<11} {'wall s':>8} {'studies/s':>10} {'speed-up':>9} {'work s/study':>13}")
    base = rows[0][1]["rate"]
    for name, r in rows:
        print(f"{name:<11} {r['wall']:>8.2f} {r['rate']:>10.3f} {r['rate'] / base:>9.2f} {r['work']:>13.3f}")
    print()


def scaling_rows(args) -> None:
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
