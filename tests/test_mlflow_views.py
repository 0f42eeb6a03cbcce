"""MLflow as a user sees it: run names that say what each run did, and something to look at.

One tiny pipeline (ingest, degrade, train 2 steps, enhance as it is and adapted, a Gaussian
baseline, evaluate, export) runs into a real local SQLite store; the tests read it back the
way the MLflow UI does: run names, params, table artifacts, images.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from medgen.samples import mr_brain_phantom
from medgen.volume import Volume

PHI_NAME = "Doe^Jane_19700101"  # a file named after a patient and a birth date


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The pipeline's run tree: (tracker, parent run id, {stage: [child runs]}, result, folder)."""
    import torch

    torch.set_num_threads(1)
    from medgen.pipeline import run_pipeline
    from medgen.stages.export import export
    from medgen.tracking import Tracker

    root = tmp_path_factory.mktemp("views")
    scans = root / "scans"
    scans.mkdir()
    for seed, name in ((0, "train"), (1, PHI_NAME)):
        values, affine = mr_brain_phantom((32, 36, 32), 3.5, seed=seed)
        Volume(values, affine).save(scans / f"{name}.nii.gz")
    train_cfg = _write_yaml(root / "train.yaml", {
        "name": "tiny", "experiment": "views",
        "model": {"kind": "unet", "unet": {"features": [4, 4, 8, 8, 16, 4]}},
        "training": {"steps": 2, "batch_size": 1, "checkpoint_every": 2, "val_every": 2, "log_every": 1,
                     "out_dir": str(root / "runs"), "amp": False},
        "degradations": [{"name": "rician", "params": {"sigma_fraction": 0.05}}],
        "data": {"train": [str(scans / "train.nii.gz")], "val": [str(scans / f"{PHI_NAME}.nii.gz")],
                 "patch_size_vox": [32, 32, 32]},
    })
    clean = f"scans/{PHI_NAME}.nii.gz"
    pipeline = _write_yaml(root / "pipe.yaml", {
        "name": "views", "experiment": "views",
        "stages": [
            {"ingest": {"src": "scans", "out": "out/ingest"}},
            {"degrade": {"clean": clean, "out": "out/noisy.nii.gz", "sigma": 0.05, "seed": 3}},
            {"train": {"config": str(train_cfg)}},
            {"enhance": {"scan": "out/noisy.nii.gz", "out": "out/model.nii.gz"}},
            {"enhance": {"scan": "out/noisy.nii.gz", "out": "out/adapted.nii.gz", "adapt_steps": 1}},
            {"baseline": {"scan": "out/noisy.nii.gz", "out": "out/smoothed.nii.gz", "method": "gaussian"}},
            {"evaluate": {"out": "out/adapted.nii.gz", "reference": clean,
                          "compare": {"degraded": "out/noisy.nii.gz", "model_without_adapt": "out/model.nii.gz",
                                      "gaussian": "out/smoothed.nii.gz"}}},
            {"export": {"volume": "out/adapted.nii.gz", "montage": "out/adapted.png"}},
        ],
    })
    uri = f"sqlite:///{root / 'mlflow.db'}"
    result = run_pipeline(pipeline, tracking_uri=uri, progress=False)
    tracker = Tracker("views", uri=uri)

    def runs_by_stage() -> dict[str, list]:
        found: dict[str, list] = {}
        for run in tracker.child_runs(result.run_id):
            found.setdefault(run.data.tags.get("medgen.stage", "?"), []).append(run)
        return found

    if "export" not in runs_by_stage():  # a pipeline that passes export no tracking target
        export(root / "out" / "adapted.nii.gz", montage=root / "out" / "adapted.png", tracking_uri=uri,
               parent_run_id=result.run_id, experiment="views")
    return tracker, result.run_id, runs_by_stage(), result, root


def _artifacts(tracker, run_id: str, folder: str | None = None) -> set[str]:
    found = set()
    for item in tracker.client.list_artifacts(run_id, folder):
        found |= _artifacts(tracker, run_id, item.path) if item.is_dir else {item.path}
    return found


def _download(tracker, run_id: str, path: str, dst: Path) -> Path:
    return Path(tracker.client.download_artifacts(run_id, path, str(dst)))


def test_two_enhance_runs_have_different_names_that_say_what_they_did(demo):
    _, _, by_stage, _, _ = demo
    names = sorted(r.info.run_name for r in by_stage["enhance"])
    assert names == ["enhance:tiny:adapt-1steps:noisy", "enhance:tiny:no-adapt:noisy"]


def test_every_stage_run_is_named_stage_first(demo):
    _, _, by_stage, _, _ = demo
    assert set(by_stage) >= {"ingest", "degrade", "train", "enhance", "baseline", "evaluate", "export"}
    for stage, runs in by_stage.items():
        for run in runs:
            assert run.info.run_name.startswith(f"{stage}:"), run.info.run_name
            assert len(run.info.run_name.split(":")) >= 3, run.info.run_name
    assert by_stage["baseline"][0].info.run_name == "baseline:gaussian:noisy"
    assert by_stage["train"][0].info.run_name == "train:tiny:unet-denoise:2steps:1-scan"
    assert by_stage["ingest"][0].info.run_name == "ingest:2-volumes:2-new:0-quarantined"
    assert by_stage["export"][0].info.run_name == "export:montage:adapted"
    degrade = by_stage["degrade"][0].info.run_name
    assert re.fullmatch(r"degrade:rician-sigma0\.05-seed3:file-[0-9a-f]{12}", degrade), degrade
    evaluate = by_stage["evaluate"][0].info.run_name
    assert re.fullmatch(r"evaluate:adapted:vs-file-[0-9a-f]{12}:4-methods", evaluate), evaluate


def test_no_patient_data_or_local_paths_in_run_names_params_or_tags(demo):
    tracker, parent_id, by_stage, _, root = demo
    runs = [tracker.get_run(parent_id), *(r for runs in by_stage.values() for r in runs)]
    forbidden = ["Doe", "Jane", "19700101", str(root), str(Path.home()), "/tmp/"]
    for run in runs:
        texts = [run.info.run_name, *run.data.params, *run.data.params.values()]
        texts += [v for k, v in run.data.tags.items() if not k.startswith("mlflow.")]
        for text in texts:
            for bad in forbidden:
                assert bad not in text, (run.info.run_name, text, bad)


def test_evaluate_logs_a_table_with_one_row_per_method_a_chart_and_the_results(demo, tmp_path):
    from PIL import Image

    tracker, _, by_stage, result, _ = demo
    run = by_stage["evaluate"][0]
    summary = dict(result.results)["evaluate"]
    assert _artifacts(tracker, run.info.run_id) >= {
        "evaluate/table.json", "evaluate/results.csv", "evaluate/summary.json", "evaluate/comparison.png",
        "evaluate/montage.png",
    }
    table = json.loads(_download(tracker, run.info.run_id, "evaluate/table.json", tmp_path).read_text())
    assert table["columns"][:2] == ["method", "psnr"]
    methods = [row[0] for row in table["data"]]
    assert methods == list(summary.rows)  # in the order they were scored
    assert sorted(methods) == ["degraded", "gaussian", "model_without_adapt", "output"]
    psnr = {row[0]: row[1] for row in table["data"]}
    assert psnr == pytest.approx({name: row["psnr"] for name, row in summary.rows.items()})
    logged = json.loads(run.data.tags["mlflow.loggedArtifacts"])
    assert {"path": "evaluate/table.json", "type": "table"} in logged  # the UI's table view
    csv_lines = _download(tracker, run.info.run_id, "evaluate/results.csv", tmp_path).read_text().splitlines()
    assert csv_lines[0].startswith("method,psnr,") and len(csv_lines) == 5
    # The flat metrics are kept for whatever reads them.
    assert run.data.metrics["output/psnr"] == pytest.approx(summary.rows["output"]["psnr"])
    assert len([m for m in run.data.metrics if "/" in m]) == 4 * len(summary.rows["output"])
    chart = Image.open(_download(tracker, run.info.run_id, "evaluate/comparison.png", tmp_path))
    assert chart.width >= 600 and chart.height >= 250
    pixels = np.asarray(chart.convert("RGB"))
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 20  # bars, text and axes, not a blank canvas


def test_degrade_baseline_ingest_and_export_runs_have_something_to_look_at(demo, tmp_path):
    from PIL import Image

    tracker, _, by_stage, _, root = demo
    expected = {"degrade": "montage.png", "baseline": "montage.png", "export": "montage.png",
                "ingest": "ingest/series.json"}
    for stage, artifact in expected.items():
        run_id = by_stage[stage][0].info.run_id
        assert artifact in _artifacts(tracker, run_id), stage
    for stage in ("degrade", "baseline"):
        image = Image.open(_download(tracker, by_stage[stage][0].info.run_id, "montage.png", tmp_path / stage))
        assert image.height > 3 * 32  # input, output and difference rows
    exported = _download(tracker, by_stage["export"][0].info.run_id, "montage.png", tmp_path / "export")
    assert exported.read_bytes() == (root / "out" / "adapted.png").read_bytes()


def test_ingest_table_names_series_by_pseudonymous_keys_only(demo, tmp_path):
    tracker, _, by_stage, _, _ = demo
    run = by_stage["ingest"][0]
    assert "ingest/series.csv" in _artifacts(tracker, run.info.run_id)
    table = json.loads(_download(tracker, run.info.run_id, "ingest/series.json", tmp_path).read_text())
    assert table["columns"] == ["series", "status", "files", "volumes", "reason"]
    assert len(table["data"]) == 2
    for series, status, files, volumes, _ in table["data"]:
        assert re.fullmatch(r"[0-9a-f]{12}", series) and status == "done" and files == 1
        assert volumes == f"{series}.nii.gz"
    text = json.dumps(table)
    assert "Doe" not in text and "19700101" not in text and "train" not in text
    assert run.data.metrics["volumes"] == 2 and run.data.metrics["series_converted"] == 2


def test_batch_run_logs_its_per_study_table(tmp_path):
    from medgen.batch.driver import run_batch
    from medgen.tracking import Tracker
    from tests.dicom_factory import write_series

    src = tmp_path / "archive"
    for i in range(2):
        write_series(src / f"SMITH_JOHN_{i}" / "CT", shape=(12, 10, 6), series_uid=f"1.2.826.0.7.{i}",
                     patient_name=f"SMITH^JOHN{i}", patient_id=f"PID{i:05d}")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: views-batch\nstages:\n  - ingest: {}\n  - enhance: {model: identity}\n"
                        "  - export: {dicom: false, montage: true}\n  - metrics: {}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_batch(pipeline, src, tmp_path / "out", workers=1, tracking_uri=uri, progress=False)
    assert summary.done_now == 2
    tracker = Tracker("medgen-batch", uri=uri)
    run_id = summary.mlflow_run_id
    assert {"studies.csv", "studies.json", "report.html"} <= _artifacts(tracker, run_id)
    table = json.loads(_download(tracker, run_id, "studies.json", tmp_path / "dl").read_text())
    assert table["columns"][:3] == ["study", "kind", "status"]
    assert len(table["data"]) == 2 and all(row[2] == "done" for row in table["data"])
    total = table["columns"].index("total_s")
    assert all(isinstance(row[total], float) for row in table["data"])
    assert "SMITH" not in json.dumps(table) and "PID0000" not in json.dumps(table)


def test_comparison_figure_puts_methods_side_by_side_per_metric():
    from medgen.stages.evaluate import comparison_figure

    rows = {"output": {"psnr": 31.0, "ssim": 0.91, "nrmse": 0.05},
            "nlm": {"psnr": 29.5, "ssim": 0.88, "nrmse": 0.07}}
    fig = comparison_figure(rows)
    axes = fig.get_axes()
    assert [ax.get_title().split("\n")[0] for ax in axes] == ["psnr (dB)", "ssim", "nrmse"]
    for ax in axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["output", "nlm"]
        assert len(ax.patches) == 2
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
