"""Synthesis with a normalizing flow over whole latent grids: volumes on the model's grid and
in its units, marked synthetic; per-sample seeds as latent diffusion's; temperature; class
labels (given, or drawn from the class prior); pooled flows refused; ``medgen synthesize``.

The tiny autoencoder and flows come from :mod:`tests.synthesis_helpers` (trained once).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from medgen.errors import InputError
from medgen.inference.synthesis import SynthesisRequest
from medgen.validate import ParameterError
from tests.synthesis_helpers import EXPERIMENT, GRID_SPACING_MM, models
from tests.torch_helpers import one_torch_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
POOLED = r"is a flow over pooled latent regions \(an input gate\) and cannot be decoded into volumes; " \
         r"train a flow with `model.flow.regions: null` to synthesize"  # fmt: skip


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return models(tmp_path_factory)


@pytest.fixture(scope="module")
def flow(synth):
    from medgen.inference.loading import load_synthesis_model

    return load_synthesis_model(synth.decodable_flow.model_path)


def make(model, **request) -> list[np.ndarray]:
    return [v.array for v in model.generate(SynthesisRequest(**request))]


def test_flow_volumes_are_on_the_grid_in_its_units_and_marked_synthetic(flow, synth):
    assert flow.is_flow and flow.model.decodable and flow.model.dim == 2 * 8**3
    volumes = flow.generate(SynthesisRequest(n=2, seed=3, condition={"label": 1}))
    assert len(volumes) == 2
    for i, volume in enumerate(volumes):
        assert volume.shape == (32, 32, 32) and volume.spacing_mm == pytest.approx([GRID_SPACING_MM] * 3)
        assert volume.meta.units == flow.spec.units and volume.meta.modality == flow.spec.modality
        assert np.all(np.isfinite(volume.array))
        assert volume.meta.acquisition["synthetic"] is True
        assert volume.meta.provenance[0].startswith("SYNTHETIC")
        record = volume.meta.acquisition["synthesis"]
        assert record == {"model": str(synth.decodable_flow.model_path), "seed": 3, "index": i, "condition": {"label": 1},
                          "sampler": "flow", "steps": 1, "temperature": 1.0}  # fmt: skip
    assert not np.array_equal(volumes[0].array, volumes[1].array)


def test_a_flow_sample_depends_only_on_seed_and_index(flow):
    three = make(flow, n=3, seed=7, condition={"label": 0})
    again = make(flow, n=3, seed=7, condition={"label": 0})
    assert all(np.array_equal(a, b) for a, b in zip(three, again, strict=True))
    for i in range(3):  # made alone: the same volume as in the batch of three
        assert np.array_equal(make(flow, n=1, seed=7, first_index=i, condition={"label": 0})[0], three[i])
    other = make(flow, n=1, seed=8, condition={"label": 0})[0]
    assert not np.array_equal(other, three[0])
    assert not np.array_equal(make(flow, n=1, seed=7, condition={"label": 1})[0], three[0])


def test_temperature_zero_decodes_the_flow_image_of_the_base_mode(flow):
    cold = [make(flow, n=1, seed=s, temperature=0.0, condition={"label": 1})[0] for s in (0, 1)]
    assert np.array_equal(cold[0], cold[1])  # no randomness left: every seed gives it
    model = flow.model
    with torch.no_grad():
        latents = model.latents_from_features(model.sample_features(torch.zeros(1, model.dim), torch.tensor([1])))
        expected = model.decode(latents)[0, 0].numpy() * flow.spec.intensity_scale + flow.spec.intensity_offset
    np.testing.assert_allclose(cold[0], expected, rtol=1e-5, atol=1e-5 * abs(flow.spec.intensity_scale))
    # Noise scaled by the temperature: a cooler sample lies between the mode and the hot one.
    hot = make(flow, n=1, seed=4, condition={"label": 1})[0]
    warm = make(flow, n=1, seed=4, temperature=0.5, condition={"label": 1})[0]
    assert np.abs(warm - cold[0]).mean() < np.abs(hot - cold[0]).mean()


def test_slab_decoding_gives_the_whole_decoding(flow):
    request = SynthesisRequest(n=1, seed=6, condition={"label": 0})
    whole = flow.generate(request)[0].array
    slabs = flow.generate(request, slab_latent_vox=2)[0].array
    np.testing.assert_allclose(slabs, whole, atol=1e-4 * abs(flow.spec.intensity_scale))


def test_no_label_draws_one_per_sample_from_the_class_prior(flow):
    volumes = flow.generate(SynthesisRequest(n=8, seed=2))
    records = [v.meta.acquisition["synthesis"] for v in volumes]
    assert all(r["label_from_class_prior"] is True for r in records)
    labels = [r["condition"]["label"] for r in records]
    assert set(labels) == {0, 1}  # both classes (3 + 3 training scans) among 8 draws
    # The drawn label is the one used: the same volume as asking for it.
    given = flow.generate(SynthesisRequest(n=1, seed=2, first_index=5, condition={"label": labels[5]}))[0]
    assert np.array_equal(given.array, volumes[5].array)


@pytest.mark.parametrize(
    ("request_args", "message"),
    [
        ({"sampler": "ddim"}, r"`sampler` 'ddim' does not apply to a flow model: it samples in one exact pass; leave `sampler` out"),
        ({"steps": 5}, r"`steps` does not apply to a flow model: it samples in one exact pass; leave `steps` out \(got 5\)"),
        ({"guidance_scale": 3.0}, r"`guidance_scale` does not apply to a flow model; leave it out \(got 3\.0\)"),
        ({"temperature": -1.0}, r"`temperature` must be >= 0, got -1\.0"),
        ({"condition": {"label": 2}}, r"condition `label` must be in 0\.\.1, got 2"),
        ({"condition": {"age_years": 3}}, r"unknown condition 'age_years'; this model takes: label"),
    ],
    ids=["sampler", "steps", "guidance", "temperature", "label", "covariate"],
)
def test_requests_a_flow_cannot_serve_are_refused(flow, request_args, message):
    with pytest.raises(ParameterError, match=rf"^{message}$"):
        flow.check(SynthesisRequest(**request_args))
    with pytest.raises(ParameterError, match=rf"^{message}$"):
        flow.generate(SynthesisRequest(**request_args))
    flow.check(SynthesisRequest(sampler="flow", steps=1, guidance_scale=1.0))  # what a flow does anyway


def test_latent_diffusion_refuses_a_temperature():
    from medgen.data.synthesis_data import SynthesisSpec
    from medgen.inference.synthesis import DiffusionSettings, check_request

    spec = SynthesisSpec(shape_vox=[32] * 3, spacing_mm=[2.0] * 3)
    check_request(DiffusionSettings(), spec, SynthesisRequest(temperature=1.0))  # changes nothing: taken
    only_flows = r"^`temperature` applies to flow models only, not to latent diffusion \(got 0\.5\)$"
    with pytest.raises(ParameterError, match=only_flows):
        check_request(DiffusionSettings(), spec, SynthesisRequest(temperature=0.5))


def test_a_pooled_flow_is_refused_in_one_line(synth):
    from medgen.inference.loading import load_synthesis_model

    path = synth.pooled_flow.model_path
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: {POOLED}$"):
        load_synthesis_model(path)


def test_synthetic_dataset_serves_flow_volumes(flow, synth):
    from medgen.augment.dataset import SyntheticDataset

    dataset = SyntheticDataset(synth.decodable_flow.model_path, n=2, condition={"label": 1}, seed=3, normalise="none")
    assert (dataset.sampler, dataset.steps) == ("flow", 1)
    expected = make(flow, n=2, seed=3, condition={"label": 1})
    assert np.array_equal(dataset.volume(1).array, expected[1])


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from medgen.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["synthesize", *args])
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


def test_cli_synthesizes_with_a_flow(synth, tmp_path, capsys):
    import nibabel as nib

    from medgen.tracking import Tracker

    code, out, err = run_cli(capsys, "--model", str(synth.decodable_flow.model_path), "--out", str(tmp_path),
                             "--n", "2", "-c", "label=1", "--temperature", "0.7", "--seed", "9",
                             "--tracking-uri", synth.uri, "-q")  # fmt: skip
    assert code == 0, err
    assert out.startswith(f"wrote 2 synthetic volume(s) to {tmp_path}")
    path = tmp_path / "synthetic-s9-00001.nii.gz"
    assert nib.load(path).header["descrip"].tobytes().decode().startswith("SYNTHETIC")
    sidecar = json.loads((tmp_path / "synthetic-s9-00001.json").read_text())
    assert sidecar["synthetic"] is True
    record = sidecar["synthesis"]
    assert (record["sampler"], record["steps"], record["temperature"], record["index"]) == ("flow", 1, 0.7, 1)
    assert record["condition"] == {"label": 1}
    run_id = out.rsplit("MLflow run ", 1)[1].strip(" )\n")
    params = Tracker(EXPERIMENT, uri=synth.uri).get_run(run_id).data.params
    assert (params["sampler"], params["steps"], params["temperature"]) == ("flow", "1", "0.7")
    assert "guidance_scale" not in params


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "10"], r"`steps` does not apply to a flow model: it samples in one exact pass; leave `steps` out \(got 10\)"),
        (["--model", "{pooled}"], rf".*pooled_flow_run/model\.pt: {POOLED}"),
    ],
    ids=["steps", "pooled"],
)
def test_cli_refuses_what_a_flow_cannot_do_in_one_line(synth, tmp_path, capsys, args, message):
    args = [a.replace("{pooled}", str(synth.pooled_flow.model_path)) for a in args]
    code, out, err = run_cli(capsys, "--model", str(synth.decodable_flow.model_path), "--out", str(tmp_path / "out"),
                             "--tracking-uri", synth.uri, "-q", *args)  # fmt: skip
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(rf"medgen: error: {message}", lines[0]), err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_pipeline_passes_a_decodable_flow_to_synthesize(synth, tmp_path):
    """train (flow, ``regions: null``) -> synthesize with no model named: the flow is used;
    the step's ``temperature`` reaches the volumes."""
    import yaml

    from medgen.pipeline import run_pipeline
    from tests.synthesis_helpers import synthesis_flow_yaml

    synth.autoencoder  # noqa: B018 (the flow's autoencoder)
    config = synth.root / "pipeline-flow.yaml"  # beside the cohort its paths name
    config.write_text(synthesis_flow_yaml(str(tmp_path / "flow_run"), steps=4))
    stages = [{"train": {"config": str(config)}},
              {"synthesize": {"out": "synth", "n": 1, "condition": {"label": 0}, "temperature": 0.5}}]  # fmt: skip
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "flow-synth", "experiment": EXPERIMENT, "stages": stages}))
    result = run_pipeline(pipeline, tracking_uri=synth.uri, progress=False)
    record = result.results[-1][1].records[0]
    assert record["model"] == str(tmp_path / "flow_run" / "model.pt")
    assert (record["sampler"], record["temperature"], record["condition"]) == ("flow", 0.5, {"label": 0})
