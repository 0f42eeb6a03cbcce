"""Input gate benchmark: does the flow gate tell scans like its training set from the rest?

One run trains (or takes) the autoencoder, trains the flow on a phantom MR cohort (its own
held-back fifth calibrates the threshold), then scores held-out in-distribution scans (a
cohort of other subjects) and out-of-distribution inputs of six kinds
(:mod:`bench.gate_inputs`), side by side with two plain scorers fitted on the same training
scans (:mod:`bench.gate_baselines`): raw-intensity histogram distance and autoencoder
reconstruction error. Printed per kind: AUROC against the in-distribution scans and the
share flagged at the stored threshold (false-positive rate on the in-distribution row).

The gate's threshold is the one stored with the model; the baselines' is the 99th
percentile of their scores on the same held-back calibration scans.

    .venv/bin/python bench/gate.py                       # ~10 min on 2 CPU cores
    .venv/bin/python bench/gate.py --regions 1 1 1 --autoencoder /bench_out/gate/vae/model.pt
    .venv/bin/python bench/gate.py --flow /bench_out/gate/flow/model.pt   # score an existing flow
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.gate_baselines import HistogramDistance, ReconstructionError, auroc, rates_at  # noqa: E402
from bench.gate_inputs import KINDS, REAL_CT_PATH, ood_cases  # noqa: E402
from bench.synthesize import vae_config, write_yaml  # noqa: E402


def cohort(folder: Path, n_per_class: int, seed: int) -> Path:
    from medgen.samples_cohort import write_cohort

    csv = folder / "labels.csv"
    return csv if csv.is_file() else write_cohort(folder, n_per_class=n_per_class, seed=seed, workers=2)


def volumes_of(csv: Path, records=None):
    from medgen.data.synthesis_data import read_labels_csv
    from medgen.stages.common import load_volume

    records = read_labels_csv(csv) if records is None else records
    return [load_volume(r.path) for r in records]


def train_gate(work: Path, args, train_csv: Path) -> Path:
    from medgen.stages.train import train

    uri = f"sqlite:///{work / 'mlflow.db'}"
    ae = args.autoencoder
    if ae is None:
        grid = {"shape_vox": [args.size] * 3, "spacing_mm": [args.fov / args.size] * 3}
        cfg = vae_config(work, "vae", args, args.device, {"labels_csv": str(train_csv), "val_fraction": 0.1, "grid": grid})
        started = time.perf_counter()
        ae = train(cfg, tracking_uri=uri, progress=False, resume=False).model_path
        print(f"autoencoder: {args.ae_steps} steps in {time.perf_counter() - started:.0f} s")
    flow = write_yaml(work / "flow.yaml", {
        "name": "bench-gate-flow", "experiment": "bench-gate",
        "model": {"kind": "flow", "flow": {
            "autoencoder": str(ae), "regions": args.regions, "transforms": args.transforms,
            "hidden_features": [args.hidden, args.hidden], "feature_noise": args.feature_noise,
            "calibration_fraction": 0.2, "false_positive_rate": args.fpr}},
        "training": {"steps": args.flow_steps, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4, "warmup_steps": 50,
                     "ema_decay": 0.99, "amp": False, "val_every": 10**6, "checkpoint_every": 10**6,
                     "log_every": 100, "device": args.device, "out_dir": str(work / "flow")},
        "data": {"labels_csv": str(train_csv)},
    })  # fmt: skip
    started = time.perf_counter()
    model = train(flow, tracking_uri=uri, progress=False, resume=False).model_path
    print(f"flow: {args.flow_steps} steps in {time.perf_counter() - started:.0f} s")
    return model


def gate_distance(gate, volume) -> float:
    """|z| of the gate's typicality test (inf when the scan cannot be scored): both tails."""
    verdict = gate.check(volume)
    return float("inf") if verdict.z is None else abs(verdict.z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/bench_out/gate"))
    parser.add_argument("--n-per-class", type=int, default=30, help="training cohort: subjects per class")
    parser.add_argument("--n-test-per-class", type=int, default=25, help="held-out in-distribution subjects per class")
    parser.add_argument("--size", type=int, default=32, help="autoencoder grid side (voxels)")
    parser.add_argument("--fov", type=float, default=72.0, help="grid field of view in mm (cohort heads are ~66 mm)")
    parser.add_argument("--ae-steps", type=int, default=300)
    parser.add_argument("--autoencoder", type=Path, default=None, help="use this trained autoencoder")
    parser.add_argument("--flow", type=Path, default=None, help="score with this trained flow (no training)")
    parser.add_argument("--flow-steps", type=int, default=1000)
    parser.add_argument("--regions", type=int, nargs=3, default=[2, 2, 2])
    parser.add_argument("--transforms", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--feature-noise", type=float, default=0.1)
    parser.add_argument("--ood-seeds", type=int, default=4, help="sets of out-of-distribution cases")
    parser.add_argument("--fpr", type=float, default=0.01, help="the gate's stated false-positive rate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from medgen.data.synthesis_data import read_labels_csv, split_records
    from medgen.inference.gate import load_gate

    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    train_csv = cohort(work / "train", args.n_per_class, seed=0)
    test_csv = cohort(work / "test", args.n_test_per_class, seed=1)
    gate = load_gate(args.flow or train_gate(work, args, train_csv), device=args.device)

    train_records, held_records = split_records(read_labels_csv(train_csv), 0.2, seed=0)  # the flow's own split
    train_volumes, held_volumes = volumes_of(train_csv, train_records), volumes_of(train_csv, held_records)
    test_volumes = volumes_of(test_csv)
    scorers = {
        "flow gate": (lambda v: gate_distance(gate, v), gate.calibration.z_threshold),
        "histogram (W1)": HistogramDistance("wasserstein").fit(train_volumes),
        "AE recon. error": ReconstructionError.from_gate(gate).fit(train_volumes),
    }
    thresholds = {}
    for name, scorer in list(scorers.items()):
        if isinstance(scorer, tuple):
            scorers[name], thresholds[name] = scorer
        else:
            scorers[name] = scorer.score
            thresholds[name] = float(np.quantile([scorer.score(v) for v in held_volumes], 0.99))

    started = time.perf_counter()
    id_scores = {name: [fn(v) for v in test_volumes] for name, fn in scorers.items()}
    seconds_per_scan = (time.perf_counter() - started) / len(test_volumes)
    cases = {kind: [] for kind in KINDS}
    for seed in range(args.ood_seeds):  # each seed: other source scans, phantoms and noise
        for kind, found in ood_cases(test_volumes, seed=seed, ct_path=REAL_CT_PATH if seed == 0 else None).items():
            cases[kind] += found
    results = {"in-distribution": {name: {"n": len(test_volumes), "fpr": rates_at(thresholds[name], s)}
                                   for name, s in id_scores.items()}}  # fmt: skip
    per_case = []
    for kind in KINDS:
        results[kind] = {}
        for name, fn in scorers.items():
            scores = [fn(v) for _, v in cases[kind]]
            results[kind][name] = {"n": len(scores), "auroc": auroc(id_scores[name], scores),
                                   "tpr": rates_at(thresholds[name], scores)}  # fmt: skip
            if name == "flow gate":
                per_case += [(kind, case, s) for (case, _), s in zip(cases[kind], scores)]

    names = list(scorers)
    print(f"\ntraining scans {len(train_volumes)} (+ mirrors), calibration {len(held_volumes)}, "
          f"held-out in-distribution {len(test_volumes)}; flow regions {args.regions}, stated FPR {args.fpr:.0%}; "
          f"gate threshold |z| > {gate.calibration.z_threshold:.2f}; scoring {seconds_per_scan:.2f} s/scan (all scorers)")  # fmt: skip
    print(f"{'kind':<18}{'n':>4}  " + "".join(f"{n + ' AUROC / flagged':>34}" for n in names))
    row = results["in-distribution"]
    print(f"{'in-distribution':<18}{len(test_volumes):>4}  " + "".join(f"{'FPR ' + format(row[n]['fpr'], '.1%'):>34}" for n in names))
    for kind in KINDS:
        row = results[kind]
        cells = "".join(f"{format(row[n]['auroc'], '.3f') + ' / ' + format(row[n]['tpr'], '.0%'):>34}" for n in names)
        print(f"{kind:<18}{row[names[0]]['n']:>4}  {cells}")
    print("\nflow gate per case (|z|):")
    for kind, case, s in per_case:
        print(f"  {kind:<16} {case:<28} {s:8.1f}  {'out' if s > gate.calibration.z_threshold else 'IN'}")
    (work / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                   "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
