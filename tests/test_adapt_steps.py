"""Step budgets for per-scan adaptation: exact step counts, load-independent results, the
below-minimum warning, and what the sidecar and MLflow record (``--adapt-steps``)."""

from __future__ import annotations

import json
import textwrap
import threading
import time

import numpy as np
import pytest

from medgen.adapt.common import AdaptRecord, budgeted_loop
from medgen.data.degrade import ThickSlices
from medgen.samples import mr_brain_phantom
from tests.torch_helpers import one_torch_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small planes and batches keep each SMORE step at a few milliseconds on one thread.
FAST = {"batch": 2, "crop": (16, 32)}


@pytest.fixture(scope="module")
def thick() -> np.ndarray:
    image, _ = mr_brain_phantom((24, 24, 24), 7.5, seed=3)
    return ThickSlices(factor=2, axis=2)(image)


def smore(low: np.ndarray, **kwargs) -> tuple[np.ndarray, dict]:
    from medgen.adapt.super_resolution import adapt_super_resolution

    record: dict = {}
    args = {"factor": 2, "axis": 2, "seed": 0, "record": record, **FAST}
    args.update(kwargs)
    return adapt_super_resolution(low, (7.5, 7.5, 15.0), **args), record


# -- the loop ---------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [None, 3600.0])
def test_a_step_budget_runs_exactly_that_many_steps_with_a_step_schedule(cap):
    seen: list[tuple[int, float]] = []
    rec = budgeted_loop(lambda i, p: seen.append((i, p)) or 1.0, cap, 7, AdaptRecord("t"), min_steps=5)
    assert rec.steps == 7 and len(rec.losses) == 7
    assert [p for _, p in seen] == [i / 7 for i in range(7)]  # by steps, never by the clock
    assert rec.params["stopped_by"] == "steps" and rec.params["below_minimum_steps"] is False
    assert rec.params["steps_budget"] == 7 and rec.params["seconds_cap"] == cap


def test_the_clock_is_only_a_safety_cap_and_says_when_it_ended_the_run():
    rec = budgeted_loop(lambda i, p: time.sleep(0.02) or 1.0, 0.1, 1000, AdaptRecord("t"), min_steps=50)
    assert 1 <= rec.steps < 50
    assert rec.params["stopped_by"] == "time" and rec.params["below_minimum_steps"] is True


def test_time_estimate_up_front_then_progress_with_an_eta():
    lines: list[str] = []
    budgeted_loop(lambda i, p: time.sleep(0.002) or 1.0, None, 12, AdaptRecord("smore"), lines.append, log_every=5)
    assert lines[0].startswith("smore: 12 steps at ") and "s/step: about" in lines[0]
    assert "(measured on steps 2-4)" in lines[0]
    assert lines[1].startswith("smore: step 5/12, ") and ", ETA " in lines[1] and "loss 1" in lines[1]
    capped: list[str] = []
    rec = budgeted_loop(lambda i, p: time.sleep(0.01) or 1.0, 0.2, 10_000, AdaptRecord("smore"), capped.append)
    assert "clock cap will stop it after about" in capped[0] and rec.params["seconds_estimate"] > 0.2


def test_a_budget_is_required():
    from medgen.adapt.common import check_budget

    with pytest.raises(ValueError, match=r"give a time budget `seconds` or a step budget `max_steps`"):
        check_budget(None, None)
    with pytest.raises(ValueError, match=r"`max_steps` must be an integer >= 0, got -3"):
        check_budget(None, -3)


# -- SMORE with a step budget ------------------------------------------------------------


def test_smore_honours_the_step_budget_exactly_and_records_it(thick, capsys):
    out, record = smore(thick, seconds=None, max_steps=9, min_steps=5)
    assert out.shape == (24, 24, 24)
    assert record["steps"] == 9 and len(record["losses"]) == 9
    p = record["params"]
    assert (p["steps_budget"], p["seconds_cap"], p["steps_minimum"]) == (9, None, 5)
    assert p["stopped_by"] == "steps" and p["below_minimum_steps"] is False and p["seconds_per_step"] > 0
    assert capsys.readouterr().err == ""  # at or above the minimum: no warning


def test_smore_below_the_minimum_warns_in_one_line_on_stderr(thick, capsys):
    _, record = smore(thick, seconds=None, max_steps=3)  # the default minimum is 200
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("WARNING: smore ran only 3 training steps, below the minimum of 200")
    assert "(the step budget ended it)" in err and "--adapt-steps" in err
    assert record["params"]["below_minimum_steps"] is True
    smore(thick, seconds=None, max_steps=3, warn=False)  # the flag alone
    assert capsys.readouterr().err == ""
    smore(thick, seconds=0)  # no training asked for: nothing to warn about
    assert capsys.readouterr().err == ""


def _burn(stop: threading.Event) -> None:
    """Keep a core busy (numpy releases the GIL) until ``stop`` is set."""
    a = np.random.default_rng(0).standard_normal((256, 256))
    while not stop.is_set():
        a = np.tanh(a @ a.T * 1e-3)


def test_a_fixed_step_count_gives_the_same_output_bit_for_bit_idle_or_loaded(thick):
    idle, rec_idle = smore(thick, seconds=None, max_steps=12, min_steps=0)
    again, _ = smore(thick, seconds=None, max_steps=12, min_steps=0)
    np.testing.assert_array_equal(again, idle)
    stop = threading.Event()
    burners = [threading.Thread(target=_burn, args=(stop,), daemon=True) for _ in range(2)]
    for t in burners:
        t.start()
    try:
        # A generous clock cap too: with a step budget the clock must not change anything.
        loaded, rec_loaded = smore(thick, seconds=600.0, max_steps=12, min_steps=0)
    finally:
        stop.set()
        for t in burners:
            t.join()
    assert rec_loaded["steps"] == rec_idle["steps"] == 12
    np.testing.assert_array_equal(loaded, idle)
    assert rec_loaded["losses"] == rec_idle["losses"]


def test_the_cost_of_a_step_does_not_grow_with_the_volume():
    import torch

    from medgen.adapt.super_resolution import _PlaneSet

    shapes = []
    for side in (20, 90):
        planes = _PlaneSet()
        planes.add(np.random.default_rng(side).random((side, side, side)).astype(np.float32), 2, 0, 1)
        batch = planes.sample(4, (16, 32), torch.Generator().manual_seed(0))
        shapes.append([tuple(t.shape) for t in batch])
    assert shapes[0] == shapes[1] == [(4, 1, 16, 32), (4, 2, 16, 32), (4, 2, 16, 32)]


def test_a_clock_cap_shorter_than_the_step_budget_stops_early_and_says_so(thick, capsys):
    _, record = smore(thick, seconds=0.05, max_steps=10_000, min_steps=10_000)
    assert record["steps"] < 10_000 and record["params"]["stopped_by"] == "time"
    assert "(the clock cap ended it)" in capsys.readouterr().err


# -- the enhance stage: --adapt-steps, sidecar, MLflow -----------------------------------


@pytest.fixture(scope="module")
def sr_model(tmp_path_factory):
    from medgen.io import load, save
    from medgen.stages.train import train
    from medgen.volume import Volume, VolumeMeta

    root = tmp_path_factory.mktemp("adapt_steps")
    for i, contrast in enumerate(("T1", "T2")):
        image, affine = mr_brain_phantom((32, 32, 32), 4.5, seed=i, contrast=contrast)
        save(Volume(image, affine, VolumeMeta(modality="MR")), root / f"clean{i}.nii.gz")
    (root / "sr.yaml").write_text(textwrap.dedent("""
        name: tiny-sr
        experiment: adapt-steps-test
        model: {kind: unet, task: super_resolution, upsample_factor: [1, 1, 2], unet: {features: [4, 4, 8, 8, 16, 4]}}
        training: {steps: 1, batch_size: 1, checkpoint_every: 1, log_every: 1, val_every: 1, out_dir: run, ema_decay: 0.9}
        degradations: [{name: thick_slices, params: {factor: 2, axis: 2}}]
        data: {train: [clean0.nii.gz], val: [clean1.nii.gz], patch_size_vox: [32, 32, 32]}
        """))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    model = train(root / "sr.yaml", tracking_uri=uri, progress=False).model_path
    save(ThickSlices(factor=2, axis=2)(load(root / "clean1.nii.gz")), root / "thick.nii.gz")
    return root, model, uri


def test_enhance_adapt_steps_records_steps_and_the_warning_in_sidecar_and_mlflow(sr_model, capsys):
    from medgen.stages.enhance import enhance
    from medgen.tracking import Tracker

    root, model, uri = sr_model
    s = enhance(root / "thick.nii.gz", model, root / "sr.nii.gz", adapt_steps=6, progress=True, tracking_uri=uri,
                experiment="adapt-steps-test")
    captured = capsys.readouterr()
    assert "smore: 6 steps at " in captured.out  # the time estimate, shown up front
    warnings = [line for line in captured.err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "ran only 6 training steps, below the minimum of 200" in warnings[0]
    sidecar = json.loads((root / "sr.json").read_text())
    entry = sidecar["Adaptation"]
    assert entry["Method"] == "smore" and entry["StepsRun"] == 6 and entry["StepsBudget"] == 6
    assert entry["SecondsCap"] is None and entry["StepsMinimum"] == 200
    assert entry["BelowMinimumSteps"] is True and entry["StoppedBy"] == "steps"
    assert "adapted to the scan: smore, 6 steps" in sidecar["Provenance"]
    run = Tracker("adapt-steps-test", uri=uri).get_run(s.run_id)
    assert run.data.params["adapt.steps_budget"] == "6" and run.data.params["adapt.seconds_budget"] == "none"
    assert run.data.metrics["adapt.steps"] == 6.0 and run.data.metrics["adapt.below_minimum_steps"] == 1.0
    assert run.data.metrics["adapt.stopped_by_clock"] == 0.0 and run.data.metrics["adapt.seconds_per_step"] > 0
    assert run.data.tags["medgen.adapt_warning"] == "only 6 steps (minimum 200)"


def test_enhance_adapt_steps_is_checked_and_the_pipeline_passes_it_on(sr_model):
    from medgen.pipeline import EnhanceStep
    from medgen.stages.enhance import enhance

    root, model, uri = sr_model
    with pytest.raises(ValueError, match=r"`adapt_steps` must be an integer >= 1, got 0"):
        enhance(root / "thick.nii.gz", model, root / "x.nii.gz", adapt_steps=0, tracking_uri=uri)
    step = EnhanceStep(scan="a.nii.gz", out="b.nii.gz", adapt_steps=300, adapt_seconds=900)
    assert step.adapt_steps == 300 and step.adapt_seconds == 900
    with pytest.raises(ValueError, match="adapt_steps"):
        EnhanceStep(scan="a.nii.gz", out="b.nii.gz", adapt_steps=0)


def test_cli_adapt_steps_option(sr_model, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from medgen.stages.enhance_cli import register

    root, model, uri = sr_model
    app = typer.Typer()
    register(app)
    monkeypatch.chdir(root)
    runner = CliRunner()
    args = ["enhance", "thick.nii.gz", "--model", str(model), "--out", "cli.nii.gz", "--tracking-uri", uri, "-q"]
    bad = runner.invoke(app, [*args, "--adapt-steps", "0"])
    assert bad.exit_code == 2 and "--adapt-steps" in bad.output
    done = runner.invoke(app, [*args, "--adapt-steps", "4", "--adapt", "600"])
    assert done.exit_code == 0, done.output
    entry = json.loads((root / "cli.json").read_text())["Adaptation"]
    assert entry["StepsRun"] == 4 and entry["SecondsCap"] == 600.0 and entry["StoppedBy"] == "steps"
