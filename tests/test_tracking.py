"""MLflow tracking through explicit clients: a real SQLite store, model URIs, a real server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from medgen.errors import InputError
from medgen.tracking import (
    DEFAULT_TRACKING_URI,
    Tracker,
    check_no_phi,
    default_tracking_uri,
    flatten_config,
    is_model_uri,
    resolve_model_uri,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables takes seconds)."""
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}"


def test_flatten_config_dots_nested_keys_and_keeps_scalars():
    flat = flatten_config({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None, "f": {}, "g": Path("x/y")})
    assert flat == {"a.b.c": 1, "a.d": "[1, 2]", "e": None, "f": "{}", "g": "x/y"}


def test_phi_keys_are_refused_in_any_spelling():
    check_no_phi(["training.lr", "input.modality", "patient_weight_kg_note"])
    for key in ("PatientName", "dicom.PatientID", "source/patient_birth_date", "meta.AccessionNumber"):
        with pytest.raises(ValueError, match=rf"`params` must not name patient identifiers, got '{key}'"):
            check_no_phi([key])


def test_default_uri_is_local_sqlite_unless_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri() == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    assert Tracker("x").uri == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert Tracker("x").uri == "http://127.0.0.1:1"
    assert Tracker("x", uri="sqlite:///other.db").uri == "sqlite:///other.db"


def test_runs_params_metrics_artifacts_and_nesting(store, tmp_path):
    tracker = Tracker("unit", uri=store)
    parent = tracker.start_run("pipeline", tags={"medgen.stage": "pipeline"})
    with tracker.run("train", parent_id=parent, tags={"medgen.stage": "train"}) as run:
        run.log_params(flatten_config({"training": {"lr": 0.001, "steps": 3}, "model": {"features": [4, 8]}}))
        run.log_metrics({"loss": 0.5}, step=1)
        run.log_metrics({"loss": 0.25, "skipped": float("nan")}, step=2)
        (tmp_path / "config.yaml").write_text("training: {steps: 3}\n")
        run.log_artifact(tmp_path / "config.yaml", "config")
        child_id = run.run_id
    tracker.end_run(parent)

    child = tracker.get_run(child_id)
    assert child.info.status == "FINISHED"
    assert child.data.params == {"training.lr": "0.001", "training.steps": "3", "model.features": "[4, 8]"}
    assert child.data.metrics == {"loss": 0.25}
    history = tracker.client.get_metric_history(child_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert [r.info.run_id for r in tracker.child_runs(parent)] == [child_id]
    assert [a.path for a in tracker.client.list_artifacts(child_id, "config")] == ["config/config.yaml"]
    # Artifacts live beside the database, not in the working directory.
    artifact_uri = child.info.artifact_uri
    assert artifact_uri.startswith(Path(store[len("sqlite:///") :]).parent.as_uri())


def test_failed_block_marks_run_failed_and_phi_is_refused(store):
    tracker = Tracker("unit", uri=store)
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.run("broken") as run:
            raise RuntimeError("boom")
    assert tracker.get_run(run.run_id).info.status == "FAILED"
    with tracker.run("phi") as run:
        with pytest.raises(ValueError, match="must not name patient identifiers, got 'PatientName'"):
            run.log_params({"PatientName": "DOE^JOHN"})
        with pytest.raises(ValueError, match="`tags` must not name patient identifiers"):
            run.set_tags({"dicom.PatientID": "123"})
    assert tracker.get_run(run.run_id).data.params == {}
    with pytest.raises(ValueError, match="`status` must be one of FINISHED, FAILED, KILLED, got 'DONE'"):
        tracker.end_run(run.run_id, "DONE")


def test_model_checkpoint_round_trip_through_run_and_registry_uris(store, tmp_path):
    tracker = Tracker("unit", uri=store)
    checkpoint = tmp_path / "model.pt"
    torch.save({"format": "medgen-model", "w": torch.arange(3.0)}, checkpoint)
    with tracker.run("train") as run:
        registered = run.log_model_checkpoint(
            checkpoint, {"kind": "unet", "config_json": "{}"}, registered_name="denoiser"
        )
        run_uri = f"runs:/{run.run_id}/model"
    assert registered == "models:/denoiser/1"
    for uri in (run_uri, registered, "models:/denoiser/latest"):
        local = resolve_model_uri(
            uri, dst_dir=tmp_path / uri.replace(":", "_").replace("/", "_"), tracking_uri=store
        )
        assert local.name == "model.pt"
        assert torch.equal(torch.load(local, weights_only=True)["w"], torch.arange(3.0))
        meta = json.loads((local.parent / "medgen_model.json").read_text())
        assert meta["kind"] == "unet"
    assert resolve_model_uri(checkpoint) == checkpoint
    assert resolve_model_uri(tmp_path) == checkpoint  # a folder holding model.pt
    with pytest.raises(InputError, match=r"models:/nope/1: cannot fetch the model from MLflow"):
        resolve_model_uri("models:/nope/1", dst_dir=tmp_path / "x", tracking_uri=store)
    with pytest.raises(InputError, match=r"absent\.pt: no such model file"):
        resolve_model_uri(tmp_path / "absent.pt")
    assert is_model_uri("runs:/abc/model") and not is_model_uri("runs/abc")


def test_a_model_downloaded_without_a_destination_is_removed_when_the_process_exits(store, tmp_path):
    tracker = Tracker("unit", uri=store)
    checkpoint = tmp_path / "model.pt"
    torch.save({"format": "medgen-model", "w": torch.ones(2)}, checkpoint)
    with tracker.run("train") as run:
        run.log_model_checkpoint(checkpoint, {"kind": "unet", "config_json": "{}"})
        uri = f"runs:/{run.run_id}/model"
    script = (
        "import sys, torch\n"
        "from medgen.tracking import resolve_model_uri\n"
        "a = resolve_model_uri(sys.argv[1], tracking_uri=sys.argv[2])\n"
        "b = resolve_model_uri(sys.argv[1], tracking_uri=sys.argv[2])\n"
        "assert a != b and torch.load(a, weights_only=True)['w'].sum() == 2\n"
        "print(a)\n"
    )
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script, uri, store], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    local = Path(done.stdout.strip().splitlines()[-1])
    assert local.name == "model.pt" and local.is_relative_to(tmp_path)
    assert not local.exists()
    assert not list(tmp_path.glob("medgen-models-*"))  # the process's folder went with it


def test_montage_and_image_artifacts(store, tmp_path):
    import numpy as np

    from medgen.volume import Volume

    tracker = Tracker("unit", uri=store)
    volume = Volume(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32), np.eye(4))
    with tracker.run("pictures") as run:
        run.log_montage({"input": volume, "output": volume}, "montages/example.png")
        run.log_image(np.arange(64.0).reshape(8, 8), "images/ramp.png")
    paths = {
        a.path for folder in ("montages", "images") for a in tracker.client.list_artifacts(run.run_id, folder)
    }
    assert paths == {"montages/example.png", "images/ramp.png"}


def test_log_table_from_rows_or_columns_with_a_csv_beside_it(store, tmp_path):
    import numpy as np

    tracker = Tracker("unit", uri=store)
    rows = [{"method": "unet", "psnr": np.float32(31.5)}, {"method": "nlm", "psnr": 29.0, "ssim": 0.8}]
    with tracker.run("tables") as run:
        run.log_table(rows, "eval/table.json", csv_file="eval/table.csv")
        run.log_table({"study": ["a1", "b2"], "seconds": [1.5, 2.0]}, "studies.json")
    got = json.loads(Path(tracker.client.download_artifacts(run.run_id, "eval/table.json", str(tmp_path))).read_text())
    assert got["columns"] == ["method", "psnr", "ssim"]
    assert got["data"] == [["unet", 31.5, None], ["nlm", 29.0, 0.8]]
    csv_text = Path(tracker.client.download_artifacts(run.run_id, "eval/table.csv", str(tmp_path))).read_text()
    assert csv_text.splitlines() == ["method,psnr,ssim", "unet,31.5,", "nlm,29.0,0.8"]
    logged = json.loads(tracker.get_run(run.run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": "eval/table.json", "type": "table"} in logged
    assert {"path": "studies.json", "type": "table"} in logged


def test_log_table_refuses_phi_columns_uneven_columns_and_other_formats(store):
    tracker = Tracker("unit", uri=store)
    with tracker.run("bad tables") as run:
        with pytest.raises(ValueError, match=r"`table columns` must not name patient identifiers, got 'PatientName'"):
            run.log_table([{"study": "a", "PatientName": "x"}], "t.json")
        with pytest.raises(ValueError, match=r"`data` columns must have one length, got lengths \[1, 2\]"):
            run.log_table({"a": [1], "b": [1, 2]}, "t.json")
        with pytest.raises(ValueError, match=r"`artifact_file` must end in .json, got 't.csv'"):
            run.log_table({"a": [1]}, "t.csv")


def test_run_names_and_input_keys_carry_no_patient_data_or_paths(tmp_path):
    from medgen.run_names import input_key, run_name
    from medgen.volume import Volume, VolumeMeta

    assert run_name("enhance", "demo-denoise-mr", "adapt-500steps", "mr_t2_noisy") == (
        "enhance:demo-denoise-mr:adapt-500steps:mr_t2_noisy"
    )
    assert input_key(tmp_path / "mr_t2_noisy.nii.gz") == "mr_t2_noisy"
    assert input_key(tmp_path / "a1b2c3d4e5f6_s3.nii.gz") == "a1b2c3d4e5f6_s3"  # an ingest output
    for phi in ("Doe^Jane.nii.gz", "scan_19700101.nii", "PID1234567.nrrd"):
        key = input_key(tmp_path / phi)
        assert key.startswith("file-") and key == input_key(Path("/elsewhere") / phi), key
    dicom = tmp_path / "DOE_JANE_19700101"
    dicom.mkdir()
    key = input_key(dicom)
    assert key.startswith("dicom-") and "DOE" not in key and str(tmp_path) not in key
    volume = Volume(np.zeros((2, 2, 2), np.float32), np.eye(4), VolumeMeta(series_key="419dd42e3c5e"))
    assert input_key(dicom, volume) == "419dd42e3c5e"


def test_log_figure_logs_a_png(store, tmp_path):
    from matplotlib.figure import Figure

    tracker = Tracker("unit", uri=store)
    fig = Figure(figsize=(3, 2))
    fig.subplots().bar([0, 1], [1.0, 2.0])
    with tracker.run("figure") as run:
        run.log_figure(fig, "charts/bars.png")
    png = Path(tracker.client.download_artifacts(run.run_id, "charts/bars.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- a real server --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_mlflow_server_round_trip(tmp_path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited early: {server.stderr.read()[-2000:]!r}")
            if time.monotonic() > deadline:
                pytest.fail("mlflow server did not answer /health within 90 s")
            time.sleep(0.5)

        tracker = Tracker("server-test", uri=uri)
        (tmp_path / "note.txt").write_text("hello")
        with tracker.run("remote") as run:
            run.log_params({"training.lr": 0.01})
            run.log_metrics({"val/psnr": 31.5}, step=7)
            run.log_artifact(tmp_path / "note.txt")
        # Read back through a fresh client.
        fresh = Tracker("server-test", uri=uri)
        got = fresh.get_run(run.run_id)
        assert got.info.status == "FINISHED"
        assert got.data.params == {"training.lr": "0.01"}
        assert got.data.metrics == {"val/psnr": 31.5}
        local = fresh.client.download_artifacts(run.run_id, "note.txt", str(tmp_path / "back"))
        assert Path(local).read_text() == "hello"
        assert any((tmp_path / "artifacts").rglob("note.txt"))  # stored by the server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
