"""Synthesis sampling and outputs: determinism, conditioning, DDPM/DDIM/rectified flow,
known-answer reverse diffusion, split decoding, synthetic marking (NIfTI, DICOM, sidecar,
MLflow) and one-line errors from ``medgen synthesize``.

The tiny models come from :mod:`tests.synthesis_helpers` (trained once per session).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medgen.errors import InputError
from medgen.inference.synthesis import SynthesisRequest, check_latent_shape, decode_latents, resolve_condition
from medgen.validate import ParameterError
from tests.synthesis_helpers import EXPERIMENT, GRID_SPACING_MM, models
from tests.torch_helpers import one_torch_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NOT_SYNTHESIS = r"is an autoencoder model, not a synthesis \(latent_diffusion or flow\) model"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return models(tmp_path_factory)


@pytest.fixture(scope="module")
def ldm(synth):
    """DDPM-trained, conditioned on ``label`` (2 classes) and ``age_years``."""
    from medgen.inference.loading import load_synthesis_model

    return load_synthesis_model(synth.ldm.model_path)


@pytest.fixture(scope="module")
def rflow(synth):
    from medgen.inference.loading import load_synthesis_model

    return load_synthesis_model(synth.rflow.model_path)


def make(model, **request) -> list[np.ndarray]:
    request.setdefault("steps", 3)
    return [v.array for v in model.generate(SynthesisRequest(**request))]


# -- determinism and conditioning -----------------------------------------------------------


def test_a_sample_depends_only_on_seed_and_index(ldm):
    three = make(ldm, n=3, seed=7, condition={"label": 1})
    assert all(np.array_equal(a, b) for a, b in zip(three, make(ldm, n=3, seed=7, condition={"label": 1})))
    for i in range(3):  # made alone, or second in a batch: the same volume
        assert np.array_equal(make(ldm, n=1, seed=7, first_index=i, condition={"label": 1})[0], three[i])
    assert not np.array_equal(three[0], three[1])
    other = make(ldm, n=1, seed=8, condition={"label": 1})[0]
    assert np.abs(other - three[0]).mean() > 1.0  # physical units; the volumes span ~1000


def test_conditions_change_the_sample_and_are_recorded(ldm):
    (zero,) = ldm.generate(SynthesisRequest(seed=3, steps=3, condition={"label": 0}))
    (one,) = ldm.generate(SynthesisRequest(seed=3, steps=3, condition={"label": 1}))
    (old,) = ldm.generate(SynthesisRequest(seed=3, steps=3, condition={"label": 1, "age_years": 85}))
    assert not np.array_equal(zero.array, one.array) and not np.array_equal(one.array, old.array)
    lo, hi = ldm.spec.covariate_ranges["age_years"]
    record = one.meta.acquisition["synthesis"]
    # An omitted covariate takes the middle of its training range.
    assert record["condition"] == {"label": 1, "age_years": pytest.approx((lo + hi) / 2)}
    assert old.meta.acquisition["synthesis"]["condition"] == {"label": 1, "age_years": 85.0}
    assert (record["seed"], record["index"], record["sampler"], record["steps"]) == (3, 0, "ddim", 3)
    assert one.meta.acquisition["synthetic"] is True and one.meta.series_key == "synthetic-s3-00000"
    # On the training grid (2 mm, centred at 0 mm), in the training scans' units.
    assert one.shape == (32, 32, 32) and one.meta.modality == "MR"
    np.testing.assert_allclose(one.affine[:3, :3], np.diag([GRID_SPACING_MM] * 3))
    np.testing.assert_allclose(one.affine @ [15.5, 15.5, 15.5, 1.0], [0, 0, 0, 1], atol=1e-9)


def test_guidance_pushes_away_from_the_unconditional_prediction(ldm):
    plain = make(ldm, seed=2, condition={"label": 1})[0]
    (guided,) = ldm.generate(SynthesisRequest(seed=2, steps=3, condition={"label": 1}, guidance_scale=3.0))
    assert np.isfinite(guided.array).all() and not np.array_equal(guided.array, plain)
    assert guided.meta.acquisition["synthesis"]["guidance_scale"] == 3.0
    # Without a label there is nothing to guide towards: the scale changes nothing.
    assert np.array_equal(make(ldm, seed=2, guidance_scale=3.0)[0], make(ldm, seed=2)[0])


# -- samplers ---------------------------------------------------------------------------------


def test_ddpm_ddim_and_rectified_flow_give_finite_volumes(ldm, rflow):
    ddpm = make(ldm, seed=1, sampler="ddpm", condition={"label": 0})[0]
    assert np.array_equal(ddpm, make(ldm, seed=1, sampler="ddpm", condition={"label": 0})[0])  # seeded steps
    ddim = make(ldm, seed=1, sampler="ddim", condition={"label": 0})[0]
    assert not np.array_equal(ddpm, ddim)
    # A flow model samples with rectified flow by default (its config says so).
    assert rflow.settings.training == rflow.settings.sampler == "rflow"
    (flow,) = rflow.generate(SynthesisRequest(seed=1, steps=4))
    assert flow.meta.acquisition["synthesis"]["sampler"] == "rflow"
    for volume in (ddpm, ddim, flow.array):
        assert volume.shape == (32, 32, 32) and np.isfinite(volume).all() and volume.std() > 0


def test_ddpm_by_default_walks_every_training_timestep(ldm):
    (volume,) = ldm.generate(SynthesisRequest(seed=0, sampler="ddpm", condition={"label": 0}))
    assert volume.meta.acquisition["synthesis"]["steps"] == ldm.settings.num_train_timesteps == 100
    assert np.isfinite(volume.array).all()


@pytest.mark.parametrize(
    ("which", "request_args", "message"),
    [
        ("ldm", {"sampler": "rflow"}, r"`sampler` 'rflow' does not fit a model trained with ddpm: use ddpm or ddim"),
        ("rflow", {"sampler": "ddim"}, r"`sampler` 'ddim' does not fit a model trained with rflow: use rflow"),
        ("ldm", {"sampler": "rflw"},
         r"`sampler` must be one of 'ddpm', 'ddim', 'rflow'; got 'rflw' \(did you mean 'rflow'\?\)"),
        ("ldm", {"steps": 101}, r"`steps` must be <= 100, got 101"),
        ("ldm", {"steps": 0}, r"`steps` must be an integer >= 1, got 0"),
        ("ldm", {"guidance_scale": -1.0}, r"`guidance_scale` must be >= 0, got -1\.0"),
        ("ldm", {"n": 0}, r"`n` must be an integer >= 1, got 0"),
    ],
    ids=["rflow-on-ddpm", "ddim-on-rflow", "typo", "too-many-steps", "zero-steps", "negative-guidance", "n-0"],
)
def test_sampling_requests_the_model_cannot_serve_are_refused(ldm, rflow, which, request_args, message):
    model = {"ldm": ldm, "rflow": rflow}[which]
    with pytest.raises(ParameterError, match=rf"^{message}$"):
        model.generate(SynthesisRequest(**request_args))


def test_a_flow_config_with_a_diffusion_sampler_stops_at_load_time():
    from medgen.config import PipelineConfig

    with pytest.raises(ValueError, match=r"`sampler` 'ddim' cannot sample a model trained with 'rflow': use rflow"):
        PipelineConfig.model_validate(
            {"model": {"kind": "latent_diffusion", "latent_diffusion": {"training": "rflow", "sampler": "ddim"}}}
        )


# -- reverse diffusion with a known answer -----------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_reverse_diffusion_with_the_true_noise_recovers_x0(kind):
    from medgen.inference.sampling import reverse_diffusion
    from medgen.inference.schedulers import ddpm_sampling_scheduler, sampling_scheduler

    make_scheduler = sampling_scheduler if kind == "ddim" else ddpm_sampling_scheduler
    scheduler = make_scheduler(10, 1000, "scaled_linear_beta", "epsilon")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 2, 4, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    alphas = scheduler.alphas_cumprod
    first = int(scheduler.timesteps[0])
    x_start = alphas[first].sqrt() * x0 + (1 - alphas[first]).sqrt() * noise
    seen = []

    def true_noise(x, t):  # the noise that puts x on the path from x0 at t
        seen.append(t)
        return (x - alphas[t].sqrt() * x0) / (1 - alphas[t]).sqrt()

    out = reverse_diffusion(true_noise, x_start, scheduler, step_generator=torch.Generator().manual_seed(1))
    assert seen == [int(t) for t in scheduler.timesteps] and len(seen) == 10
    # (float32: 1 / sqrt(1 - alpha_bar) near t = 0 amplifies rounding ~30x)
    torch.testing.assert_close(out, x0, atol=1e-4 if kind == "ddim" else 5e-4, rtol=0)


def test_rectified_flow_with_the_true_velocity_lands_on_x0():
    from medgen.inference.sampling import reverse_diffusion
    from medgen.inference.schedulers import rflow_scheduler

    scheduler = rflow_scheduler(1000, 7)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 2, 4, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert int(scheduler.timesteps[0]) == 1000  # starts from pure noise
    out = reverse_diffusion(lambda x, t: x0 - noise, noise, scheduler)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


SIGMA = 0.5  # data x0 ~ N(0, SIGMA^2) per voxel: the best possible predictor is known in closed form


def gaussian_samples(kind: str, steps: int) -> torch.Tensor:
    """Sample N(0, SIGMA^2) data with the exact posterior-mean predictor of ``kind``'s target,
    through the schedulers :mod:`medgen.inference.synthesis` picks for each sampler."""
    from medgen.inference.sampling import reverse_diffusion
    from medgen.inference.synthesis import DiffusionSettings, scheduler_for, step_eta

    training = "rflow" if kind == "rflow" else "ddpm"
    settings = DiffusionSettings(training=training, num_train_timesteps=1000, prediction_type="epsilon")
    scheduler = scheduler_for(settings, kind, steps)
    if kind == "rflow":  # x_t = (1 - s) x0 + s n, s = t / T; v = E[x0 - n | x_t]

        def predict(x, t):
            s = t / 1000
            return ((1 - s) * SIGMA**2 - s) / ((1 - s) ** 2 * SIGMA**2 + s**2) * x
    else:  # x_t = sqrt(a) x0 + sqrt(1 - a) n; eps = E[n | x_t]
        a = scheduler.alphas_cumprod

        def predict(x, t):
            return (1 - a[t]).sqrt() * x / (a[t] * SIGMA**2 + 1 - a[t])

    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    return reverse_diffusion(predict, x, scheduler, step_generator=torch.Generator().manual_seed(1), eta=step_eta(kind))


@pytest.mark.parametrize(("kind", "steps"), [("ddim", 50), ("ddpm", 1000), ("rflow", 50)])
def test_samplers_with_the_ideal_predictor_reproduce_gaussian_data(kind, steps):
    samples = gaussian_samples(kind, steps)
    assert float(samples.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(samples.std()) == pytest.approx(SIGMA, rel=0.04)


def test_ddpm_with_skipped_steps_reproduces_gaussian_data():
    """MONAI's DDPMScheduler only steps t -> t-1; fewer steps go through DDIM with eta = 1."""
    assert float(gaussian_samples("ddpm", 100).std()) == pytest.approx(SIGMA, rel=0.1)


# -- split decoding --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_latent(synth, ldm):
    """A cohort scan on a 48³ grid of 1.5 mm, encoded: scaled latent (1, 2, 12, 12, 12)."""
    from medgen.data.synthesis_data import onto_grid
    from medgen.inference.normalise import IntensityNorm
    from medgen.io import load

    values, _ = onto_grid(load(synth.cohort_csv.parent / "sub-0001.nii.gz"), (48, 48, 48), (1.5, 1.5, 1.5))
    x = torch.from_numpy(IntensityNorm.fit(values, "percentile", 0.5, 99.5).forward(values))[None, None]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    latent, _ = ldm.model.encode(x)
    whole = decode_latents(ldm.model, latent)
    torch.set_num_threads(before)
    return latent, whole


def test_split_decoding_gives_the_whole_decoding(ldm, big_latent):
    latent, whole = big_latent
    assert whole.shape == (1, 1, 48, 48, 48)
    assert torch.equal(decode_latents(ldm.model, latent, slab_latent_vox=12), whole)  # one slab: one pass
    for slab in (1, 3, 5):
        split = decode_latents(ldm.model, latent, slab_latent_vox=slab)
        assert split.shape == whole.shape
        torch.testing.assert_close(split, whole, atol=1e-4, rtol=1e-4)


def test_split_decoding_refuses_a_decoder_it_cannot_split(ldm, big_latent):
    import copy

    from medgen.inference.split_decode import split_decode
    from medgen.validate import ParameterError

    latent, _ = big_latent
    ae = copy.deepcopy(ldm.model.autoencoder)
    ae.decoder.blocks[1] = torch.nn.MultiheadAttention(4, 1)
    with pytest.raises(ParameterError, match="split decoding cannot run a decoder block of type MultiheadAttention"):
        split_decode(ae, latent, 4)


# -- outputs: marked synthetic everywhere ------------------------------------------------------


@pytest.fixture(scope="module")
def written(synth, ldm, tmp_path_factory):
    from medgen.stages.synthesize import synthesize

    out = tmp_path_factory.mktemp("synthesized")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    kwargs = dict(n=2, steps=3, seed=5, condition={"label": 1, "age_years": 60}, tracking_uri=synth.uri,
                  experiment=EXPERIMENT, progress=False)  # fmt: skip
    first = synthesize(synth.ldm.model_path, out / "a", **kwargs)
    second = synthesize(synth.ldm.model_path, out / "b", **kwargs)
    torch.set_num_threads(before)
    return first, second


def test_nifti_outputs_are_marked_synthetic_and_reproducible(written, synth):
    import nibabel as nib

    from medgen.io import load

    first, second = written
    assert [p.name for p in first.paths] == ["synthetic-s5-00000.nii.gz", "synthetic-s5-00001.nii.gz"]
    for a, b in zip(first.paths, second.paths):
        assert a.read_bytes() == b.read_bytes()  # same seed: byte-identical files
    path = first.paths[1]
    assert nib.load(path).header["descrip"].tobytes().decode().startswith("SYNTHETIC")
    sidecar = json.loads(path.with_name("synthetic-s5-00001.json").read_text())
    assert sidecar["synthetic"] is True
    record = sidecar["synthesis"]
    assert record["model"] == str(synth.ldm.model_path) and record["seed"] == 5 and record["index"] == 1
    assert record["condition"] == {"label": 1, "age_years": 60.0}
    assert (record["sampler"], record["steps"]) == ("ddim", 3)
    volume = load(path)
    assert volume.meta.acquisition["synthetic"] is True and volume.shape == (32, 32, 32)
    listing = json.loads((path.parent / "synthesis.json").read_text())
    assert listing["synthetic"] is True and [v["file"] for v in listing["volumes"]] == [p.name for p in first.paths]
    assert (path.parent / "montage.png").stat().st_size > 0


def test_synthesize_logs_its_request_to_mlflow(written, synth):
    from medgen.tracking import Tracker

    first, second = written
    tracker = Tracker(EXPERIMENT, uri=synth.uri)
    run = tracker.get_run(first.run_id)
    assert first.run_id != second.run_id and run.info.status == "FINISHED"
    assert run.data.tags["medgen.synthetic"] == "true" and run.data.tags["medgen.stage"] == "synthesize"
    params = run.data.params
    assert (params["n"], params["seed"], params["sampler"], params["steps"]) == ("2", "5", "ddim", "3")
    assert (params["condition.label"], params["condition.age_years"]) == ("1", "60.0")
    assert run.data.metrics["synthesis/seconds_per_volume"] == pytest.approx(first.seconds_per_volume)
    assert run.data.metrics["synthesis/peak_memory_mb"] > 0
    artifacts = {a.path for a in tracker.client.list_artifacts(first.run_id)}
    artifacts |= {a.path for a in tracker.client.list_artifacts(first.run_id, "montages")}
    assert {"synthesis.json", "montages/montage.png"} <= artifacts


@pytest.fixture(scope="module")
def dicom_series(synth, ldm, tmp_path_factory):
    from medgen.stages.synthesize import synthesize

    out = tmp_path_factory.mktemp("dicom")
    summary = synthesize(synth.ldm.model_path, out, n=1, steps=2, seed=4, format="dicom",
                         tracking_uri=synth.uri, experiment=EXPERIMENT, progress=False)  # fmt: skip
    return summary.paths[0]


def test_dicom_outputs_say_synthetic_and_carry_no_source_identity(synth, dicom_series):
    import pydicom

    files = sorted(dicom_series.glob("*.dcm"))
    assert dicom_series.name == "synthetic-s4-00000" and len(files) == 32
    subjects = {line.split(",")[1] for line in synth.cohort_csv.read_text().splitlines()[1:]}
    assert subjects == {f"sub-{i:04d}" for i in range(1, 7)}
    for f in (files[0], files[-1]):
        ds = pydicom.dcmread(f)
        assert "SYNTHETIC" in list(ds.ImageType) and ds.SeriesDescription.startswith("SYNTHETIC")
        assert str(ds.PatientName) == ds.PatientID == "synthetic-s4-00000"
        assert not any(s in str(ds) for s in subjects)  # no cohort subject appears anywhere
    sidecar = json.loads((dicom_series.parent / "synthetic-s4-00000.json").read_text())
    assert sidecar["synthetic"] is True and sidecar["synthesis"]["seed"] == 4


def test_a_synthetic_dicom_series_stays_marked_when_read_back(dicom_series):
    from medgen.io import load

    volume = load(dicom_series)
    assert "SYNTHETIC" in volume.meta.acquisition["ImageType"]  # the tag itself is read
    assert volume.meta.acquisition.get("synthetic") is True


# -- one clear line for bad input ------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ({"lable": 1}, r"unknown condition 'lable' \(did you mean 'label'\?\); this model takes: label, age_years"),
        ({"label": 2}, r"condition `label` must be in 0\.\.1, got 2"),
        ({"label": "1.5"}, r"condition `label` must be an integer, got '1\.5'"),
        ({"label": 0.5}, r"condition `label` must be an integer, got 0\.5"),
        ({"age_years": "old"}, r"condition `age_years` must be a number, got 'old'"),
        ({"age_years": float("inf")}, r"condition `age_years` must be finite, got inf"),
    ],
    ids=["typo", "out-of-range", "not-integer-text", "not-integer", "covariate-text", "covariate-inf"],
)
def test_bad_conditions_are_one_line_each(ldm, condition, message):
    with pytest.raises(ParameterError, match=rf"^{message}$"):
        resolve_condition(ldm.spec, condition)


def test_latent_shapes_the_denoiser_cannot_halve_are_refused(ldm):
    assert check_latent_shape((2, 8, 8, 8), 2) == [2, 8, 8, 8]
    odd = r"^latent shape \[9, 8, 8\] cannot be taken by this denoiser: sides must be multiples of 2$"
    with pytest.raises(ParameterError, match=odd):
        check_latent_shape((2, 9, 8, 8), 2)
    with pytest.raises(ParameterError, match=r"^latent shape must be \(channels, d, h, w\), got \[8, 8, 8\]$"):
        check_latent_shape((8, 8, 8), 2)
    from dataclasses import replace

    broken = replace(ldm, spec=replace(ldm.spec, latent_shape=[2, 7, 8, 8]))
    with pytest.raises(ParameterError, match=r"latent shape \[7, 8, 8\] cannot be taken by this denoiser"):
        broken.generate(SynthesisRequest(steps=2))


def test_an_autoencoder_is_not_a_synthesis_model(synth, tmp_path):
    from medgen.stages.synthesize import synthesize

    with pytest.raises(InputError, match=rf"ae_run/model\.pt: {NOT_SYNTHESIS}$"):
        synthesize(synth.autoencoder.model_path, tmp_path / "out", tracking_uri=synth.uri, progress=False)
    assert not (tmp_path / "out").exists()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from medgen.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["synthesize", *args])
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


def test_cli_writes_synthetic_volumes(synth, tmp_path, capsys):
    from medgen.io import load

    code, out, err = run_cli(capsys, "--model", str(synth.ldm.model_path), "--out", str(tmp_path), "--n", "1",
                             "--sampler", "ddpm", "--steps", "3", "--condition", "label=0", "-c", "age_years=50",
                             "--seed", "9", "--tracking-uri", synth.uri, "--quiet")  # fmt: skip
    assert code == 0, err
    assert out.startswith(f"wrote 1 synthetic volume(s) to {tmp_path}")
    volume = load(tmp_path / "synthetic-s9-00000.nii.gz")
    assert volume.meta.acquisition["synthetic"] is True
    record = json.loads((tmp_path / "synthetic-s9-00000.json").read_text())["synthesis"]
    assert record["condition"] == {"label": 0, "age_years": 50.0}
    assert (record["sampler"], record["steps"]) == ("ddpm", 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "0"], r"`n` must be an integer >= 1, got 0"),
        (["--condition", "label"], r"`--condition` must look like KEY=VALUE \(e\.g\. label=1\), got 'label'"),
        (["-c", "lable=1"], r"unknown condition 'lable' \(did you mean 'label'\?\); this model takes: .*"),
        (["-c", "label=7"], r"condition `label` must be in 0\.\.1, got 7"),
        (["-c", "label=one"], r"condition `label` must be an integer, got 'one'"),
        (["--sampler", "rflow"], r"`sampler` 'rflow' does not fit a model trained with ddpm: use ddpm or ddim"),
        (["--format", "png"], r"`format` must be one of 'nifti', 'dicom'; got 'png'"),
        (["--model", "{ae}"], rf".*ae_run/model\.pt: {NOT_SYNTHESIS}"),
    ],
    ids=["n-0", "no-equals", "unknown-key", "label-range", "label-text", "sampler", "format", "autoencoder"],
)
def test_cli_bad_input_is_one_line_and_exit_1(synth, tmp_path, capsys, args, message):
    import re

    model = str(synth.ldm.model_path)
    args = [a.replace("{ae}", str(synth.autoencoder.model_path)) for a in args]
    code, out, err = run_cli(capsys, "--model", model, "--out", str(tmp_path / "out"), "--steps", "2",
                             "--tracking-uri", synth.uri, "-q", *args)  # fmt: skip
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(rf"medgen: error: {message}", lines[0]), err
    assert "Traceback" not in out + err
    assert list(tmp_path.glob("out/*.nii.gz")) == []  # nothing written
