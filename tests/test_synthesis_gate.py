"""The gate as an option of synthesis: ``synthesize(gate=, gate_policy=)``, ``medgen synthesize
--gate --gate-policy`` and ``synthesize.gate`` in pipeline files.

The shared tiny rectified-flow model and gate flow (:mod:`tests.synthesis_helpers`) do the
work; which samples are "out" is chosen by each test: the real gate scores every volume, and
a patched :meth:`FlowGate.check` then turns the chosen sample indices "out" and the others
"in" (a tiny model's own verdicts on its samples would be a coin toss to assert on).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.synthesis_helpers import EXPERIMENT, flow_yaml, models
from tests.torch_helpers import one_torch_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 3
N = 3
FORCED_REASON = "chosen out by the test"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The rflow model, the gate flow, and an ungated run of N samples to compare with."""
    import torch

    from medgen.stages.synthesize import synthesize

    synth = models(tmp_path_factory)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = str(synth.rflow.model_path)
        flow = str(synth.train("gate-flow", flow_yaml("gate_flow_run")).model_path)
        ungated = synthesize(model, tmp_path_factory.mktemp("ungated"), n=N, seed=SEED, tracking_uri=synth.uri,
                             experiment=EXPERIMENT, progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return {"model": model, "flow": flow, "uri": synth.uri, "ungated": ungated}


@pytest.fixture()
def out_indices(monkeypatch):
    """A set of sample indices the gate will find "out" (the test fills it in); every other
    sample is "in". The real gate still scores each volume: its score and z are kept."""
    from medgen.inference.gate import FlowGate, GateVerdict

    chosen: set[int] = set()
    real_check = FlowGate.check

    def check(self, volume, name=""):
        scored = real_check(self, volume, name)
        index = volume.meta.acquisition["synthesis"]["index"]
        reason = FORCED_REASON if index in chosen else "typical (test)"
        return GateVerdict(name, index not in chosen, scored.score, scored.z, reason)

    monkeypatch.setattr(FlowGate, "check", check)
    return chosen


def _gated(setup, out, policy: str):
    from medgen.stages.synthesize import synthesize

    return synthesize(setup["model"], out, n=N, seed=SEED, gate=setup["flow"], gate_policy=policy,
                      tracking_uri=setup["uri"], experiment=EXPERIMENT, progress=False)  # fmt: skip


def _sidecar(path):
    return json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())


def test_skip_writes_only_the_in_samples_identical_to_an_ungated_run(setup, out_indices, tmp_path, capsys):
    out_indices.add(1)
    summary = _gated(setup, tmp_path, "skip")

    ungated = {p.name: p for p in setup["ungated"].paths}
    assert [p.name for p in summary.paths] == [f"synthetic-s{SEED}-00000.nii.gz", f"synthetic-s{SEED}-00002.nii.gz"]
    assert not (tmp_path / f"synthetic-s{SEED}-00001.nii.gz").exists()
    for path in summary.paths:  # same indices, no replacement drawn: the very same files
        assert path.read_bytes() == ungated[path.name].read_bytes()
    assert (summary.n, summary.n_out) == (N, 1)
    [skipped] = summary.skipped
    assert skipped["index"] == 1 and skipped["volume"] == f"synthetic-s{SEED}-00001"
    assert FORCED_REASON in skipped["reason"] and "out of the gate's distribution" in skipped["reason"]
    assert summary.gate == {"model": "gate_flow_run/model.pt", "policy": "skip"}
    assert "1 of 3 generated volume(s) out (skipped)" in summary.gate_lines()[0]
    assert "NOT written (gate policy skip)" in capsys.readouterr().err

    kept = _sidecar(summary.paths[0])["synthesis"]["gate"]
    assert (kept["verdict"], kept["policy"], kept["model"]) == ("in", "skip", "gate_flow_run/model.pt")
    listing = json.loads((tmp_path / "synthesis.json").read_text())
    assert [v["index"] for v in listing["volumes"]] == [0, 2] and listing["n"] == N
    assert listing["gate"]["gate/n_out"] == 1 and [s["index"] for s in listing["gate"]["skipped"]] == [1]


def test_warn_writes_every_sample_with_its_verdict_in_the_sidecar(setup, out_indices, tmp_path, capsys):
    out_indices.add(2)
    summary = _gated(setup, tmp_path, "warn")

    assert len(summary.paths) == N and summary.skipped == [] and summary.n_out == 1
    err = capsys.readouterr().err
    assert f"WARNING: gate: generated volume synthetic-s{SEED}-00002 is OUT" in err and "written anyway" in err
    for path, row in zip(summary.paths, summary.verdicts):
        sidecar = _sidecar(path)
        entry = sidecar["synthesis"]["gate"]
        assert entry["verdict"] == row["verdict"] and entry["score"] == pytest.approx(row["score"])
        assert entry["z"] == pytest.approx(row["z"]) and entry["reason"] and entry["policy"] == "warn"
        assert entry["model"] == "gate_flow_run/model.pt" and sidecar["synthetic"] is True
    assert [r["verdict"] for r in summary.verdicts] == ["in", "in", "out"]
    assert any("gate found it out" in line for line in _sidecar(summary.paths[2])["Provenance"])


def test_the_mlflow_run_records_the_gate(setup, out_indices, tmp_path):
    from medgen.tracking import Tracker

    out_indices.update({0, 2})
    summary = _gated(setup, tmp_path, "skip")

    tracker = Tracker(EXPERIMENT, uri=setup["uri"])
    run = tracker.get_run(summary.run_id)
    assert (run.data.params["gate.model"], run.data.params["gate.policy"]) == ("gate_flow_run/model.pt", "skip")
    assert run.data.params["n"] == str(N) and run.data.metrics["synthesis/n_written"] == 1
    assert run.data.metrics["gate/n_out"] == 2 and run.data.metrics["gate/fraction_out"] == pytest.approx(2 / 3)
    local = tracker.client.download_artifacts(summary.run_id, "gate/verdicts.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    rows = dict(zip(table["columns"], zip(*table["data"])))
    assert list(rows["verdict"]) == ["out", "in", "out"] and list(rows["written"]) == [False, True, False]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """``medgen synthesize ARGS`` as the console script runs it: (exit status, stdout, stderr)."""
    from medgen.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["synthesize", *args])
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


def test_cli_reports_the_gate_and_exits_3_when_nothing_is_written(setup, out_indices, tmp_path, capsys):
    out_indices.update({0, 1})
    args = ["--model", setup["model"], "--n", "2", "--seed", str(SEED), "--gate", setup["flow"],
            "--tracking-uri", setup["uri"], "--quiet"]  # fmt: skip
    code, out, _ = _cli(capsys, *args, "--out", str(tmp_path / "warn"))
    assert code == 0 and "wrote 2 synthetic volume(s)" in out
    assert "2 of 2 generated volume(s) out (written anyway)" in out

    code, out, err = _cli(capsys, *args, "--out", str(tmp_path / "skip"), "--gate-policy", "skip")
    assert code == 3 and "wrote 0 synthetic volume(s)" in out and f"skipped sample 1 (synthetic-s{SEED}-00001)" in out
    assert err.count("NOT written (gate policy skip)") == 2
    assert not list((tmp_path / "skip").glob("*.nii.gz")) and not (tmp_path / "skip" / "montage.png").exists()

    code, out, err = _cli(capsys, *args, "--out", str(tmp_path / "typo"), "--gate-policy", "skp")
    assert code == 1 and err.strip() == (
        "medgen: error: `gate_policy` must be one of 'warn', 'skip'; got 'skp' (did you mean 'skip'?)"
    )
    assert not (tmp_path / "typo").exists()


def _pipeline(tmp_path, model: str, gate: str) -> object:
    path = tmp_path / "synth.yaml"
    path.write_text(textwrap.dedent(f"""
        name: gated-synthesis
        experiment: {EXPERIMENT}
        stages:
          - synthesize: {{out: out, model: {model}, n: 2, seed: {SEED}, gate: {gate}}}
        """))
    return path


def test_the_pipeline_step_takes_a_gate_and_refuses_a_misspelt_key(setup, out_indices, tmp_path):
    from medgen.errors import ConfigError
    from medgen.pipeline import load_pipeline, run_pipeline

    flow = Path(setup["flow"])
    (tmp_path / "flows").symlink_to(flow.parent.parent)  # the gate named relative to the pipeline file
    relative = f"flows/{flow.parent.name}/{flow.name}"
    path = _pipeline(tmp_path, setup["model"], f"{{model: {relative}, policy: skip}}")
    step = load_pipeline(path).stages[0].step
    assert step.gate.model == str((tmp_path / relative).resolve()) and step.gate.policy == "skip"

    out_indices.add(0)
    [(kind, summary)] = run_pipeline(path, tracking_uri=setup["uri"], progress=False).results
    assert kind == "synthesize" and [p.name for p in summary.paths] == [f"synthetic-s{SEED}-00001.nii.gz"]
    assert [s["index"] for s in summary.skipped] == [0]

    misspelt = f"{{model: {relative}, polcy: skip}}"
    for bad, key in ((misspelt, "polcy"), (f"{{model: {relative}, policy: drop}}", "policy")):
        with pytest.raises(ConfigError, match=rf"synth\.yaml: stages\.0\.synthesize\.gate\.{key}: "):
            load_pipeline(_pipeline(tmp_path, setup["model"], bad))
