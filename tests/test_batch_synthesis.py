"""A synthesis batch: one ledger "study" per sample, marked synthetic, resumable, and the
same volumes as ``medgen synthesize`` makes with the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medgen.archive.ledger import Ledger
from medgen.batch.driver import run_batch
from medgen.errors import ConfigError, InputError
from tests.synthesis_helpers import models
from tests.torch_helpers import one_torch_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONDITIONS = [{"label": 0, "age_years": 70}, {"label": 1, "age_years": 70}]


@pytest.fixture(scope="module")
def ldm_path(tmp_path_factory) -> Path:
    return models(tmp_path_factory).ldm.model_path


def _pipeline(path: Path, model: Path, n: int = 2, conditions=CONDITIONS) -> Path:
    stage = {"model": str(model), "n_per_condition": n, "conditions": conditions, "seed": 3, "steps": 2,
             "device": "cpu"}
    path.write_text(json.dumps({"name": "synth-batch", "stages": [{"synthesize": stage}]}))  # JSON is YAML
    return path


def _volumes(out: Path) -> dict[str, np.ndarray]:
    from medgen.stages.common import load_volume

    with Ledger.open(out) as ledger:
        return {s.study_key: load_volume(out / s.steps[0].outputs[0][0]).values(np.float32)
                for s in ledger.studies(("synthesize",)) if s.status == "done"}


def test_samples_are_ledger_studies_marked_synthetic_and_match_medgen_synthesize(ldm_path, tmp_path):
    from medgen.stages.synthesize import synthesize

    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_batch(_pipeline(tmp_path / "p.yaml", ldm_path), None, out, tracking_uri=uri, progress=False)
    assert (summary.total, summary.done_now, summary.failed_now, summary.exit_code) == (4, 4, 0, 0)
    with Ledger.open(out) as ledger:
        studies = ledger.studies(("synthesize",))
    assert [s.study_key for s in studies] == [f"synthetic-age_years70_label{c}-0000{i}" for c in (0, 1) for i in (0, 1)]
    assert {s.kind for s in studies} == {"synthetic"}
    for s in studies:
        names = [n for n, _, _ in s.steps[0].outputs]
        assert names == [f"studies/{s.study_key}/{s.study_key}.nii.gz", f"studies/{s.study_key}/{s.study_key}.json"]
        sidecar = json.loads((out / names[1]).read_text())
        assert sidecar["synthetic"] is True
        assert s.steps[0].metrics["synthetic"] is True and s.steps[0].metrics["seed"] == 3
    volumes = _volumes(out)
    for c, condition in enumerate(CONDITIONS):  # sample i of a condition: noise from (seed, i), as synthesize draws it
        direct = synthesize(ldm_path, tmp_path / f"direct{c}", n=2, condition=condition, seed=3, steps=2,
                            device="cpu", progress=False, tracking_uri=uri)
        for i, path in enumerate(direct.paths):
            from medgen.stages.common import load_volume

            np.testing.assert_array_equal(volumes[f"synthetic-age_years70_label{c}-0000{i}"],
                                          load_volume(path).values(np.float32))
    assert "kind" in (out / "studies.csv").read_text().splitlines()[0]
    assert (out / "studies.csv").read_text().count(",synthetic,") == 4


def test_a_lost_sample_is_remade_identically_and_more_samples_add_only_themselves(ldm_path, tmp_path):
    out = tmp_path / "out"
    pipeline = _pipeline(tmp_path / "p.yaml", ldm_path)
    run_batch(pipeline, None, out, track=False, progress=False)
    before = _volumes(out)
    lost = "synthetic-age_years70_label1-00001"
    with Ledger.open(out) as ledger:  # as a kill while it was being written leaves it
        ledger.mark_running(lost, "synthesize", worker="local-9", fingerprint="x", run_id="dead")
    (out / "studies" / lost / f"{lost}.nii.gz").unlink()
    again = run_batch(pipeline, None, out, track=False, progress=False)
    assert (again.taken_back, again.done_now, again.done_before) == (1, 1, 3)
    np.testing.assert_array_equal(_volumes(out)[lost], before[lost])
    more = run_batch(_pipeline(pipeline, ldm_path, n=3), None, out, track=False, progress=False)
    assert (more.total, more.done_now, more.done_before) == (6, 2, 4)


def test_synthesis_pipelines_take_no_archive_and_stand_alone(ldm_path, tmp_path):
    pipeline = _pipeline(tmp_path / "p.yaml", ldm_path)
    with pytest.raises(InputError, match="reads no archive"):
        run_batch(pipeline, tmp_path, tmp_path / "out", track=False, progress=False)
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(f"name: x\nstages:\n  - ingest: {{}}\n  - synthesize: {{model: {ldm_path}}}\n")
    with pytest.raises(ConfigError, match="a synthesis pipeline has one stage"):
        run_batch(mixed, None, tmp_path / "out2", track=False, progress=False)
    archive = tmp_path / "archive.yaml"
    archive.write_text("name: x\nstages:\n  - ingest: {}\n  - enhance: {model: identity}\n")
    with pytest.raises(InputError, match="give the archive folder"):
        run_batch(archive, None, tmp_path / "out3", track=False, progress=False)


def test_a_request_the_model_cannot_serve_is_refused_before_any_sample(ldm_path, tmp_path):
    # Label 7 is not one of the model's classes: one error naming the pipeline, no ledger work.
    pipeline = _pipeline(tmp_path / "bad.yaml", ldm_path, conditions=[{"label": 0, "age_years": 70}, {"label": 7}])
    with pytest.raises(InputError, match=r"bad\.yaml.*synthesize:.*label") as caught:
        run_batch(pipeline, None, tmp_path / "out", track=False, progress=False)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out" / "studies").exists()
    missing = _pipeline(tmp_path / "missing.yaml", tmp_path / "no-such-model.pt")
    with pytest.raises(InputError, match=r"missing\.yaml.*no-such-model\.pt"):
        run_batch(missing, None, tmp_path / "out2", track=False, progress=False)
