"""The normalizing flow and its input gate: features, likelihood, calibration, verdicts,
training end to end (resume, model file, MLflow) and ``medgen check``."""

from __future__ import annotations

import json
import textwrap

import nibabel as nib
import numpy as np
import pytest
import torch

from medgen.config import PipelineConfig, load_config
from medgen.data.scan_descriptors import DESCRIPTOR_NAMES, intensity_descriptors
from medgen.errors import ConfigError, InputError
from medgen.inference.gate import Calibration, unscorable_reason
from tests.synthesis_helpers import EXPERIMENT, models

FLOW = (
    "{{kind: flow, flow: {{autoencoder: ae_run/model.pt, regions: {regions}, transforms: 2, "
    "hidden_features: [16, 16], calibration_fraction: 0.3}}}}"
)


def flow_yaml(out_dir: str, steps: int = 40, regions: str = "[1, 1, 1]", checkpoint_every: int | None = None) -> str:
    return textwrap.dedent(f"""
        name: flow
        experiment: {EXPERIMENT}
        model: {FLOW.format(regions=regions)}
        training: {{steps: {steps}, batch_size: 8, lr: 0.003, checkpoint_every: {checkpoint_every or steps},
                    log_every: 5, val_every: 20, out_dir: {out_dir}, ema_decay: null, amp: false, device: cpu}}
        data: {{labels_csv: cohort/labels.csv}}
        """)


def _tiny_flow(regions=(2, 2, 2), descriptors=6, num_classes=0):
    from monai.networks.nets import AutoencoderKL

    from medgen.models.flow import LatentFlow

    ae = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 4), attention_levels=(False, False),
                       latent_channels=2, num_res_blocks=1, norm_num_groups=2)  # fmt: skip
    torch.manual_seed(0)
    return LatentFlow(ae, 2, (4, 4, 4), regions=regions, num_descriptors=descriptors, transforms=2,
                      hidden_features=(8,), num_classes=num_classes)  # fmt: skip


# -- configuration ----------------------------------------------------------------------
def test_flow_kind_is_a_synthesis_model_and_shipped_configs_load():
    cfg = PipelineConfig.model_validate({"model": {"kind": "flow"}})
    assert cfg.model.task == "synthesis"
    assert cfg.model.flow.regions == [2, 2, 2] and cfg.model.flow.false_positive_rate == 0.01
    for name in ("flow-mr", "demo-flow"):
        loaded = load_config(f"configs/{name}.yaml")
        assert loaded.model.kind == "flow" and loaded.model.flow.autoencoder.endswith("model.pt")


def test_flow_config_rejects_bad_values(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {kind: flow, flow: {false_positive_rate: 0.7}}\n")
    with pytest.raises(ConfigError, match="model.flow.false_positive_rate"):
        load_config(path)


# -- the model --------------------------------------------------------------------------
def test_pooled_features_are_region_means_and_sds_plus_descriptors():
    flow = _tiny_flow()
    latents = torch.randn(3, 2, 4, 4, 4)
    raw = flow.raw_features(latents, torch.ones(3, 6))
    assert raw.shape == (3, 2 * 2 * 8 + 6) == (3, flow.dim)
    # The first region of channel 0 is the 2x2x2 corner block.
    assert torch.allclose(raw[:, 0], latents[:, 0, :2, :2, :2].mean(dim=(1, 2, 3)), atol=1e-6)
    assert torch.allclose(raw[:, 16], latents[:, 0, :2, :2, :2].std(dim=(1, 2, 3), unbiased=False), atol=1e-4)
    assert torch.equal(raw[:, -6:], torch.ones(3, 6))
    with pytest.raises(ValueError, match="intensity descriptors"):
        flow.raw_features(latents)


def test_standardised_features_have_zero_mean_unit_sd_on_the_fitting_set():
    flow = _tiny_flow(regions=None, descriptors=0)
    latents = 3.0 + 2.0 * torch.randn(50, 2, 4, 4, 4)
    flow.set_standardisation(flow.raw_features(latents))
    f = flow.features(latents)
    assert f.shape == (50, 128)
    assert torch.allclose(f.mean(0), torch.zeros(128), atol=1e-5)
    assert torch.allclose(f.std(0), torch.ones(128), atol=1e-4)


def test_flow_sampling_inverts_scoring_and_grid_flows_decode_back_to_latents():
    flow = _tiny_flow(regions=None, descriptors=0).eval()
    noise = torch.randn(4, flow.dim)
    features = flow.sample_features(noise)
    dist = flow.flow()
    assert torch.allclose(dist.transform(features), noise, atol=1e-4)
    assert torch.isfinite(flow.log_prob(features)).all()
    latents = flow.latents_from_features(features)
    assert latents.shape == (4, 2, 4, 4, 4)
    assert torch.allclose(flow.raw_features(latents), features * flow.feature_std + flow.feature_mean, atol=1e-5)


def test_pooled_flow_cannot_be_decoded():
    flow = _tiny_flow()
    with pytest.raises(ValueError, match="regions: null"):
        flow.latents_from_features(torch.zeros(1, flow.dim))


def test_class_conditional_flow_without_label_is_the_prior_weighted_mixture():
    flow = _tiny_flow(num_classes=2).eval()
    features = torch.randn(5, flow.dim)
    with torch.no_grad():
        per_class = torch.stack([flow.log_prob(features, torch.tensor([c])) for c in (0, 1)], dim=1)
        mixture = flow.log_prob(features)
    expected = torch.logsumexp(per_class + torch.log(torch.tensor([0.5, 0.5])), dim=1)
    assert torch.allclose(mixture, expected, atol=1e-5)


# -- descriptors, calibration, unscorable inputs ----------------------------------------
def _head(seed=0):
    from medgen.samples import mr_brain_phantom

    values, affine = mr_brain_phantom((32, 36, 32), 6.0, seed=seed)
    return values.astype(np.float32), affine


def test_descriptors_see_what_normalisation_hides():
    head, _ = _head()
    d = dict(zip(DESCRIPTOR_NAMES, intensity_descriptors(head)))
    assert dict(zip(DESCRIPTOR_NAMES, intensity_descriptors(head * 100)))["log10_range"] == pytest.approx(d["log10_range"] + 2)
    inverted = dict(zip(DESCRIPTOR_NAMES, intensity_descriptors(head.max() - head)))
    assert d["border_level"] < 0.1 < 0.9 < inverted["border_level"]
    clipped = dict(zip(DESCRIPTOR_NAMES, intensity_descriptors(np.minimum(head, np.percentile(head[head > 0], 60)))))
    assert clipped["log10_saturation"] > d["log10_saturation"] + 1
    ct_like = dict(zip(DESCRIPTOR_NAMES, intensity_descriptors(head - 1000)))
    assert ct_like["zero_point"] > 0.5 and abs(d["zero_point"]) < 0.05
    noisy = head + np.random.default_rng(0).normal(0, 0.3 * head.max(), head.shape).astype(np.float32)
    assert dict(zip(DESCRIPTOR_NAMES, intensity_descriptors(noisy)))["log10_noise"] > d["log10_noise"] + 0.5


def test_calibration_threshold_follows_the_stated_false_positive_rate():
    cal = Calibration.fit([1.0, 2.0, 3.0], [0.0, 0.1], 0.01)
    assert cal.centre == 2.0 and cal.spread == pytest.approx(1.0)
    # Two-sided 1 % prediction interval from 3 scans: t(0.995, 2 dof) * sqrt(1 + 1/3).
    assert cal.z_threshold == pytest.approx(9.925 * (4 / 3) ** 0.5, abs=1e-2)
    many = np.random.default_rng(0).normal(size=5000)
    assert Calibration.fit(many, [], 0.05).z_threshold == pytest.approx(1.96, abs=1e-2)  # large n: normal
    inside, low, high = cal.judge("a", 3.0), cal.judge("b", 14.0), cal.judge("c", -12.0)
    assert inside.inside and inside.z == pytest.approx(1.0)
    assert not low.inside and "far below" in low.reason and "12.0 SD" in low.reason
    assert not high.inside and "atypically high" in high.reason
    assert not cal.judge("d", float("inf")).inside
    with pytest.raises(ValueError, match="at least 2"):
        Calibration.fit([1.0], [], 0.01)


def test_unscorable_inputs_have_their_reason():
    assert unscorable_reason(np.zeros((4, 4, 4))) == "empty volume (every voxel is 0)"
    assert "constant volume (every voxel is 7" in unscorable_reason(np.full((4, 4, 4), 7.0))
    nan = np.ones((4, 4, 4)); nan[0, 0, 0] = np.nan; nan[1, 1, 1] = 2  # fmt: skip
    assert unscorable_reason(nan) == "1 voxel(s) are NaN or infinite"
    assert "not a 3D volume" in unscorable_reason(np.ones((4, 4)))
    assert unscorable_reason(np.arange(64.0).reshape(4, 4, 4)) is None


# -- training end to end ----------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    m = models(tmp_path_factory)
    m.autoencoder  # noqa: B018
    return m, m.train("flow", flow_yaml("flow_run"))


def _scan(m, name):
    from medgen.stages.common import load_volume

    return load_volume(m.cohort_csv.parent / name)


def test_trained_flow_stores_its_calibration_and_logs_to_mlflow(trained):
    from medgen.inference.loading import load_model
    from medgen.tracking import Tracker

    m, summary = trained
    loaded = load_model(summary.model_path)
    gate = loaded.metadata["gate"]
    assert loaded.kind == "flow" and len(gate["held_back_scores"]) == 2 and len(gate["train_scores"]) == 4
    assert gate["false_positive_rate"] == 0.01 and gate["spread"] > 0
    assert gate["centre"] == pytest.approx(np.mean(gate["held_back_scores"]))
    assert loaded.metadata["synthesis"]["shape_vox"] == [32, 32, 32]
    metrics = Tracker(EXPERIMENT, uri=m.uri).get_run(summary.run_id).data.metrics
    assert "gate/z_threshold" in metrics and "val/held_back_nll_per_dim" in metrics and "nll_per_dim" in metrics


def test_gate_verdicts_on_scaled_empty_nan_and_reshaped_scans(trained):
    from medgen.inference.gate import load_gate

    m, summary = trained
    gate = load_gate(summary.model_path)
    scan = _scan(m, "sub-0001.nii.gz")
    values = scan.values(np.float32)
    scaled = gate.check(scan.with_array(values * 100), "x100")
    assert not scaled.inside and "far below" in scaled.reason and scaled.z > gate.calibration.z_threshold
    assert gate.check(scan.with_array(np.zeros_like(values)), "empty").reason == "empty volume (every voxel is 0)"
    nan = values.copy(); nan[3, 3, 3] = np.nan  # fmt: skip
    verdict = gate.check(scan.with_array(nan), "nan")
    assert not verdict.inside and verdict.score is None and "NaN" in verdict.reason
    # Another shape and voxel size is resampled onto the flow's grid like training scans.
    from medgen.volume import Volume

    other = Volume(values[2:-3, 1:, :-4].copy(), np.diag([1.7, 1.9, 2.3, 1.0]), scan.meta)
    assert np.isfinite(gate.check(other, "reshaped").score)
    assert gate.score(scan) == gate.score(scan)  # deterministic: posterior means, no sampling


def test_gate_refuses_a_model_that_is_not_a_flow(trained):
    from medgen.inference.gate import load_gate

    m, _ = trained
    with pytest.raises(InputError, match="not .*|is an autoencoder model"):
        load_gate(m.autoencoder.model_path)


def test_flow_training_resumes_to_the_same_step(trained, tmp_path_factory):
    m, _ = trained
    first = m.train("flow_part", flow_yaml("flow_resume", steps=20, checkpoint_every=10))
    assert first.final_step == 20
    from medgen.stages.train import train

    path = m.root / "flow_more.yaml"
    path.write_text(flow_yaml("flow_resume", steps=30, checkpoint_every=10))
    resumed = train(path, tracking_uri=m.uri, progress=False)
    assert resumed.resumed_from_step == 20 and resumed.final_step == 30 and resumed.steps_done == 10


def test_too_few_scans_to_calibrate_is_a_config_error(trained, tmp_path_factory):
    from medgen.stages.train import train

    m, _ = trained
    path = m.root / "flow_small.yaml"
    path.write_text(flow_yaml("flow_small").replace("data: {labels_csv: cohort/labels.csv}",
                                                    "data: {train: [cohort/sub-0001.nii.gz, cohort/sub-0002.nii.gz]}"))
    with pytest.raises(ConfigError, match="2 held-back calibration scans"):
        train(path, tracking_uri=m.uri, progress=False)


def test_check_command_judges_each_scan_and_names_unreadable_files(trained, tmp_path):
    from typer.testing import CliRunner

    from medgen.cli import app

    m, summary = trained
    scan = _scan(m, "sub-0002.nii.gz")
    nib.save(nib.Nifti1Image(scan.values(np.float32) * 100, scan.affine), tmp_path / "x100.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "verdicts.json"
    args = ["check", str(m.cohort_csv.parent / "sub-0002.nii.gz"), str(tmp_path / "x100.nii.gz"),
            str(tmp_path / "broken.nii.gz"), "--model", str(summary.model_path), "--json", str(out), "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    rows = {r["name"]: r for r in json.loads(out.read_text())["scans"]}
    assert rows["x100.nii.gz"]["verdict"] == "out" and rows["broken.nii.gz"]["verdict"] == "error"
    assert rows["broken.nii.gz"]["reason"] and rows["sub-0002.nii.gz"]["score"] is not None
    assert "x100.nii.gz" in result.output and "far below" in result.output


def test_check_pipeline_step_writes_verdicts_and_an_mlflow_run(trained, tmp_path):
    from medgen.pipeline import run_pipeline
    from medgen.tracking import Tracker

    m, summary = trained
    scan = _scan(m, "sub-0003.nii.gz")
    nib.save(nib.Nifti1Image(scan.values(np.float32) * 100, scan.affine), tmp_path / "x100.nii.gz")
    (tmp_path / "gate.yaml").write_text(textwrap.dedent(f"""
        name: gate-check
        experiment: {EXPERIMENT}
        stages:
          - check:
              model: {summary.model_path}
              scans: [x100.nii.gz, {m.cohort_csv.parent / "sub-0003.nii.gz"}]
              out: verdicts.json
        """))
    result = run_pipeline(tmp_path / "gate.yaml", tracking_uri=m.uri, progress=False)
    rows = json.loads((tmp_path / "verdicts.json").read_text())["scans"]
    assert [r["name"] for r in rows] == ["x100.nii.gz", "sub-0003.nii.gz"] and rows[0]["verdict"] == "out"
    tracker = Tracker(EXPERIMENT, uri=m.uri)
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    check = [r for r in runs if r.data.tags.get("medgen.stage") == "check"]
    assert len(check) == 1 and check[0].data.metrics["scans_out"] >= 1
