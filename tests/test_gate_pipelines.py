"""The input gate as an option: ``medgen enhance --gate``, ``enhance.gate`` in pipeline files,
and ``enhance.gate`` in batch pipelines (the ``gated`` ledger state, report, resume, retry).

One tiny autoencoder and flow (:mod:`tests.synthesis_helpers`) and a 2-step denoiser are
trained once for the module. The "out" scan is an in-distribution scan with its values
multiplied by 100 (the flow's intensity descriptors see it at thousands of SDs); the "in"
scans are the flow's own cohort.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from medgen.archive.ledger import Ledger
from medgen.batch.driver import run_batch
from medgen.io import load, save
from medgen.volume import Volume
from tests.synthesis_helpers import flow_yaml, models
from tests.torch_helpers import one_torch_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STAGES = ("ingest", "enhance", "export", "metrics")
DENOISER = """\
name: tiny-denoiser
experiment: gate-test
model: {kind: unet, noise_conditioning: true, unet: {features: [4, 4, 8, 8, 16, 4]}}
training: {steps: 2, batch_size: 1, checkpoint_every: 2, log_every: 1, val_every: 2, out_dir: denoiser_run,
           ema_decay: null, device: cpu}
degradations: [{name: rician, params: {sigma_fraction: [0.02, 0.06]}}]
data: {train: [cohort/sub-0001.nii.gz], val: [cohort/sub-0002.nii.gz], patch_size_vox: [32, 32, 32]}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The shared models' folder with a trained flow, a denoiser, an "in" and an "out" scan."""
    import torch

    from medgen.stages.train import train

    synth = models(tmp_path_factory)
    synth.autoencoder  # noqa: B018 (the flow encodes with it)
    flow = synth.train("gate-flow", flow_yaml("gate_flow_run"))
    root = tmp_path_factory.mktemp("gate")
    (synth.root / "gate-denoiser.yaml").write_text(DENOISER)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        denoiser = train(synth.root / "gate-denoiser.yaml", tracking_uri=synth.uri, progress=False)
    finally:
        torch.set_num_threads(before)
    source = load(synth.root / "cohort" / "sub-0003.nii.gz")
    save(Volume(source.values(np.float32) * 100, source.affine, source.meta), root / "scaled_x100.nii.gz")
    shutil.copy(synth.root / "cohort" / "sub-0001.nii.gz", root / "typical.nii.gz")
    return {"root": root, "flow": str(flow.model_path), "denoiser": str(denoiser.model_path),
            "uri": f"sqlite:///{root / 'mlflow.db'}", "cohort": synth.root / "cohort"}


def _run(setup, run_id: str):
    from medgen.tracking import Tracker

    return Tracker("medgen", uri=setup["uri"]).get_run(run_id)


# -- medgen enhance -------------------------------------------------------------------------


def test_skip_writes_nothing_for_an_out_scan_and_enhances_an_in_scan(setup, tmp_path, capsys):
    from medgen.stages.enhance import enhance

    root = setup["root"]
    common = dict(gate=setup["flow"], gate_policy="skip", tracking_uri=setup["uri"], progress=False)
    out = enhance(root / "scaled_x100.nii.gz", setup["denoiser"], tmp_path / "out.nii.gz", **common)
    assert out.output is None and not (tmp_path / "out.nii.gz").exists()
    assert out.gate["verdict"] == "out" and out.gate["z"] > 100
    assert "out of the gate's distribution" in out.skipped and "likelihood far below" in out.skipped
    assert "WARNING: input gate:" in capsys.readouterr().err
    run = _run(setup, out.run_id)
    assert run.data.tags["medgen.gate_verdict"] == "out" and run.data.tags["medgen.skipped"] == out.skipped
    assert run.data.metrics["gate/z"] == pytest.approx(out.gate["z"]) and run.data.params["gate.policy"] == "skip"

    kept = enhance(root / "typical.nii.gz", setup["denoiser"], tmp_path / "in.nii.gz", **common)
    assert kept.skipped is None and kept.output.is_file()
    assert "WARNING" not in capsys.readouterr().err
    entry = json.loads((tmp_path / "in.json").read_text())["InputGate"]
    assert entry["Verdict"] == "in" and entry["Policy"] == "skip" and entry["Model"] == "gate_flow_run/model.pt"
    assert _run(setup, kept.run_id).data.tags["medgen.gate_verdict"] == "in"


def test_warn_enhances_an_out_scan_with_a_warning_and_the_verdict_in_the_sidecar(setup, tmp_path, capsys):
    from medgen.stages.enhance import enhance

    out = enhance(setup["root"] / "scaled_x100.nii.gz", setup["denoiser"], tmp_path / "out.nii.gz",
                  gate=setup["flow"], tracking_uri=setup["uri"], progress=False)  # fmt: skip
    assert out.skipped is None and out.output.is_file()
    err = capsys.readouterr().err
    assert "WARNING: input gate:" in err and "is OUT" in err and "enhancing it anyway" in err
    entry = json.loads((tmp_path / "out.json").read_text())["InputGate"]
    assert entry["Verdict"] == "out" and entry["Policy"] == "warn"
    assert entry["Score"] == pytest.approx(out.gate["score"]) and entry["Z"] > 100 and entry["Reason"]
    run = _run(setup, out.run_id)
    assert run.data.tags["medgen.gate_verdict"] == "out" and "gate/score" in run.data.metrics


def test_enhance_cli_gate_options_and_exit_status(setup, tmp_path):
    from typer.testing import CliRunner

    from medgen.cli import app

    args = ["enhance", str(setup["root"] / "scaled_x100.nii.gz"), "--model", setup["denoiser"],
            "--gate", setup["flow"], "--tracking-uri", setup["uri"], "--quiet"]  # fmt: skip
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a.nii.gz"), "--gate-policy", "skip"])
    assert done.exit_code == 3, done.output
    assert "skipped" in done.output and not (tmp_path / "a.nii.gz").exists()
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b.nii.gz"), "--gate-policy", "maybe"])
    assert done.exit_code != 0 and "`gate_policy` must be one of 'warn', 'skip'" in str(done.exception)


def test_pipeline_file_gate_is_resolved_against_the_file_and_checked(tmp_path):
    from medgen.errors import ConfigError
    from medgen.pipeline import load_pipeline

    path = tmp_path / "p.yaml"
    path.write_text("name: p\nstages:\n  - enhance: {scan: a.nii.gz, out: b.nii.gz, model: m.pt,\n"
                    "               gate: {model: runs/flow/model.pt, policy: skip}}\n")  # fmt: skip
    gate = load_pipeline(path).stages[0].step.gate
    assert gate.model == str((tmp_path / "runs/flow/model.pt").resolve()) and gate.policy == "skip"
    path.write_text(path.read_text().replace("policy: skip", "policy: skip, treshold: 3"))
    with pytest.raises(ConfigError, match="treshold"):
        load_pipeline(path)


# -- medgen batch ---------------------------------------------------------------------------


def _archive(setup, root: Path) -> None:
    """Four studies from the flow's cohort and one scaled x100."""
    for i in range(1, 5):
        (root / f"study{i}").mkdir(parents=True)
        shutil.copy(setup["cohort"] / f"sub-000{i}.nii.gz", root / f"study{i}" / "scan.nii.gz")
    (root / "odd").mkdir()
    shutil.copy(setup["root"] / "scaled_x100.nii.gz", root / "odd" / "scan.nii.gz")


def _pipeline(path: Path, flow: str, policy: str) -> Path:
    path.write_text(textwrap.dedent(f"""\
        name: gated
        stages:
          - ingest: {{}}
          - enhance: {{model: identity, device: cpu, gate: {{model: {flow}, policy: {policy}}}}}
          - export: {{montage: true}}
          - metrics: {{}}
        """))
    return path


def test_batch_gates_out_a_study_keeps_it_gated_on_resume_and_retry_and_reruns_on_a_new_policy(setup, tmp_path):
    from medgen.batch.status import read_status

    src, out = tmp_path / "archive", tmp_path / "results"
    _archive(setup, src)
    pipeline = _pipeline(tmp_path / "p.yaml", setup["flow"], "skip")
    first = run_batch(pipeline, src, out, workers=1, track=False, progress=False)
    assert (first.done_now, first.failed_now, first.gated_now, first.total) == (4, 0, 1, 5)
    assert first.exit_code == 0 and "1 gated out" in first.lines()[1]
    with Ledger.open(out) as ledger:
        studies = ledger.studies(STAGES)
    gated = [s for s in studies if s.status == "gated"]
    assert len(gated) == 1 and not [s for s in studies if s.status == "failed"]
    key = gated[0].study_key
    step = next(st for st in gated[0].steps if st.stage == "enhance")
    assert step.status == "gated" and "likelihood far below" in step.reason and not step.outputs
    assert step.metrics["gate"] == "out" and step.metrics["gate_z"] > 100
    assert not list((out / "studies" / key).glob("*_enhanced*"))
    assert all(s.metrics["gate"] == "in" for s in studies if s.status == "done")
    report = (out / "report.html").read_text()
    assert "Kept out by the input gate (1)" in report and "1 gated out" in report
    assert f"<tr class='gated'><td>{key}</td>" in report
    assert "gate_score" in (out / "studies.csv").read_text().splitlines()[0]
    status = read_status(out)
    assert status.counts["gated"] == 1 and status.counts["done"] == 4 and status.gated[0][0] == key
    assert any(line.startswith(f"gated: {key}: enhance:") for line in status.lines())

    again = run_batch(pipeline, src, out, workers=1, track=False, progress=False)
    assert (again.done_now, again.gated_now, again.done_before) == (0, 0, 4)
    assert "1 kept out by the input gate" in again.lines()[0]
    retried = run_batch(pipeline, src, out, workers=1, track=False, progress=False, retry_failed=True)
    assert (retried.done_now, retried.gated_now, retried.retried) == (0, 0, 0)

    _pipeline(pipeline, setup["flow"], "warn")  # the policy is part of the fingerprint
    warned = run_batch(pipeline, src, out, workers=1, track=False, progress=False)
    assert (warned.done_now, warned.gated_now, len(warned.gated)) == (5, 0, 0)
    with Ledger.open(out) as ledger:
        odd = next(s for s in ledger.studies(STAGES) if s.study_key == key)
    assert odd.status == "done" and odd.metrics["gate"] == "out"
    sidecar = json.loads(next((out / "studies" / key).glob("*_enhanced.json")).read_text())
    assert sidecar["InputGate"]["Verdict"] == "out" and sidecar["InputGate"]["Policy"] == "warn"
    assert "enhanced anyway (policy warn)" in (out / "studies.csv").read_text()


def test_the_gate_model_identity_and_policy_are_part_of_the_enhance_fingerprint(tmp_path):
    from medgen.batch.spec import load_batch_pipeline, stage_fingerprints

    pipeline = load_batch_pipeline(_pipeline(tmp_path / "p.yaml", "flows/gate.pt", "skip"))
    assert pipeline.settings("enhance").gate.model == str((tmp_path / "flows/gate.pt").resolve())
    a = stage_fingerprints(pipeline, "input", "model", "sha256:aaa")
    b = stage_fingerprints(pipeline, "input", "model", "sha256:bbb")
    assert a["ingest"] == b["ingest"] and a["enhance"] != b["enhance"] and a["metrics"] != b["metrics"]
    warn = load_batch_pipeline(_pipeline(tmp_path / "w.yaml", "flows/gate.pt", "warn"))
    assert stage_fingerprints(warn, "input", "model", "sha256:aaa")["enhance"] != a["enhance"]
