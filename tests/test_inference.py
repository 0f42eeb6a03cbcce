"""Sliding-window enhancement, units and grids, diffusion uncertainty, and the stages end to end."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from medgen.config import ModelConfig, PipelineConfig
from medgen.errors import ConfigError, InputError
from medgen.inference.enhance import enhance_volume, enhance_with
from medgen.inference.grid import fine_affine, upsample_grid_aligned
from medgen.inference.loading import LoadedModel, load_model
from medgen.inference.sliding import WindowPlan, plan_windows, sliding_window_predict
from medgen.models import build_model
from medgen.volume import Volume, VolumeMeta
from tests.torch_helpers import TINY_UNET, one_torch_thread  # noqa: F401 (fixture)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class AddOne(torch.nn.Module):
    def forward(self, x, noise_level=None):
        return x + 1


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("shape", [(37, 50, 23), (9, 12, 5)])
def test_add_one_predictor_returns_input_plus_one_everywhere(overlap, shape):
    image = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(0)) * 100
    plan = plan_windows(AddOne(), shape, "cpu", cpu_roi_vox=(16, 16, 16))
    out = sliding_window_predict(AddOne(), image, plan, overlap=overlap)
    assert out.shape == image.shape
    torch.testing.assert_close(out, image + 1, rtol=0, atol=1e-3)  # float32 on values ~ +-300


def test_cpu_window_plan_fits_small_volumes_and_rejects_bad_overlap():
    assert plan_windows(AddOne(), (100, 40, 7), "cpu") == WindowPlan((64, 48, 16), 2)
    with pytest.raises(ValueError, match=r"`overlap` must be in \[0, 1\), got 1.0"):
        sliding_window_predict(AddOne(), torch.zeros(1, 1, 4, 4, 4), WindowPlan((4, 4, 4), 1), overlap=1.0)


def hu_volume(shape=(40, 40, 16)) -> Volume:
    """A CT phantom stored as unsigned integers with a -1024 intercept, like many scanners."""
    from medgen.samples import ct_head_phantom

    hu, affine = ct_head_phantom(shape, (48 / shape[0], 48 / shape[1], 48 / shape[2]), seed=0)
    stored = (hu.astype(np.int32) + 1024).astype(np.uint16)
    return Volume(stored, affine, VolumeMeta(modality="CT", units="HU"), slope=1.0, intercept=-1024.0)


def test_output_stays_in_hounsfield_units_on_the_input_grid():
    volume = hu_volume()
    model = build_model(ModelConfig(unet=TINY_UNET))  # residual network at init: the identity
    result = enhance_volume(model, volume, progress=False)
    out = result.volume
    assert out.shape == volume.shape
    np.testing.assert_array_equal(out.affine, volume.affine)
    assert out.meta.units == "HU" and out.meta.modality == "CT" and out.slope == 1.0 and out.intercept == 0.0
    np.testing.assert_allclose(out.array, volume.values(), atol=1e-3)
    assert out.meta.provenance[-1] == "enhanced by medgen" and volume.meta.provenance == []
    # A model that adds one normalised unit adds exactly the normalisation scale, in HU.
    shifted = enhance_volume(AddOne(), volume, norm=result.norm, progress=False).volume
    np.testing.assert_allclose(shifted.array - volume.values(), result.norm.scale, rtol=1e-5)


def test_four_d_volumes_are_enhanced_frame_by_frame():
    volume = hu_volume()
    frames = np.stack([volume.values(), volume.values() + 10], axis=-1)
    out = enhance_volume(
        build_model(ModelConfig(unet=TINY_UNET)), Volume(frames, volume.affine), progress=False
    ).volume
    assert out.shape == frames.shape
    np.testing.assert_allclose(out.array, frames, atol=1e-3)


def test_thick_slices_are_refined_at_their_true_positions():
    from medgen.data.degrade import ThickSlices

    # A volume linear in world z: any correct resampling reproduces it exactly.
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 20.0]
    k = np.arange(32)
    z_mm = affine[2, 2] * k + affine[2, 3]
    clean = Volume(np.broadcast_to(z_mm.astype(np.float32), (8, 8, 32)).copy(), affine)
    thick = ThickSlices(factor=2)(clean)
    assert thick.shape == (8, 8, 16)
    refined = upsample_grid_aligned(thick.values(), (1, 1, 2))
    np.testing.assert_allclose(fine_affine(thick.affine, (1, 1, 2)), affine, atol=1e-9)
    np.testing.assert_allclose(refined[:, :, 1:-1], clean.array[:, :, 1:-1], atol=1e-3)
    # Through enhance_volume with an identity model: same grid and values as the thin volume.
    out = enhance_volume(
        build_model(ModelConfig(unet=TINY_UNET)),
        thick,
        upsample_factor=(1, 1, 2),
        norm_mode="fixed",
        norm_lower=0.0,
        norm_upper=100.0,
        progress=False,
    ).volume
    assert out.shape == clean.shape
    np.testing.assert_allclose(out.affine, affine, atol=1e-9)
    np.testing.assert_allclose(out.array[:, :, 1:-1], clean.array[:, :, 1:-1], atol=1e-3)


def tiny_diffusion_config(n_samples: int = 3) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "model": {
                "kind": "diffusion",
                "noise_conditioning": True,
                "diffusion": {
                    "channels": [8, 8],
                    "attention_levels": [False, False],
                    "norm_num_groups": 4,
                    "sampling_steps": 2,
                    "n_samples": n_samples,
                },
            },
            "data": {"normalisation": {"mode": "fixed", "lower": -1000, "upper": 1000}},
        }
    )


def test_diffusion_gives_mean_and_uncertainty_in_physical_units():
    cfg = tiny_diffusion_config()
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():  # MONAI zero-initialises the output: make samples differ
            if not p.any():
                torch.nn.init.normal_(p, std=0.05)
    volume = hu_volume((16, 16, 8))  # small: MONAI's mid-block self-attention is quadratic
    result = enhance_with(LoadedModel(model, cfg), volume, progress=False)
    assert result.volume.shape == result.uncertainty.shape == volume.shape
    assert result.uncertainty.meta.units == "HU"
    u = result.uncertainty.array
    assert np.all(np.isfinite(u)) and u.min() >= 0 and u.max() > 0
    again = enhance_with(LoadedModel(model, cfg), volume, progress=False)
    np.testing.assert_array_equal(again.volume.array, result.volume.array)  # seeded sampling


class Zeros(torch.nn.Module):
    def forward(self, x, noise_level=None):
        return torch.zeros_like(x)


def test_box_predictor_treats_a_box_as_the_whole_scan_and_runs_in_float32(monkeypatch):
    import medgen.inference.enhance as enhance_module

    cfg = PipelineConfig.model_validate({"data": {"normalisation": {"mode": "percentile", "lower": 0.0, "upper": 100.0}}})
    loaded = LoadedModel(Zeros(), cfg)
    scan = hu_volume((32, 32, 16))
    result = enhance_with(loaded, scan, progress=False)
    calls = []
    real = enhance_module.enhance_volume
    monkeypatch.setattr(enhance_module, "enhance_volume", lambda *a, **k: calls.append(k) or real(*a, **k))
    predict = enhance_module.box_predictor(loaded, scan, result)
    box = scan.values(np.float32)[8:24, 8:24, :] + 500.0  # a box whose own percentiles differ
    out = predict(box)
    # A model that outputs normalised 0 gives the whole scan's lower percentile, not the box's.
    assert np.allclose(out, scan.values(np.float32).min(), atol=1e-3)
    assert not np.allclose(out, box.min(), atol=1.0)
    assert calls and calls[0]["amp"] is False and calls[0]["norm"] is result.norm


@pytest.mark.parametrize("n_samples, probe_samples", [(4, 2), (1, 1)])
def test_box_predictor_draws_at_most_two_diffusion_samples(monkeypatch, n_samples, probe_samples):
    import medgen.inference.enhance as enhance_module

    cfg = tiny_diffusion_config(n_samples)
    torch.manual_seed(0)
    loaded = LoadedModel(build_model(cfg), cfg)
    scan = hu_volume((16, 16, 8))
    result = enhance_with(loaded, scan, progress=False)
    calls = []
    real = enhance_module.enhance_volume
    monkeypatch.setattr(enhance_module, "enhance_volume", lambda *a, **k: calls.append(k) or real(*a, **k))
    out = enhance_module.box_predictor(loaded, scan, result)(scan.values(np.float32)[:8])
    assert out.shape == (8, 16, 8)
    assert [c["n_samples"] for c in calls] == [probe_samples]
    assert cfg.model.diffusion.n_samples == n_samples  # the config itself is left alone


def test_load_model_rebuilds_exported_weights_and_prefers_ema(tmp_path):
    from medgen.training.objectives import SupervisedObjective
    from medgen.training.trainer import Trainer

    cfg = PipelineConfig.model_validate({"model": {"unet": TINY_UNET}})

    class Pairs:
        def batch(self, step):
            clean = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(step))
            return {"clean": clean, "degraded": clean * 0.9}

    trainer = Trainer(
        build_model(cfg),
        SupervisedObjective(),
        Pairs(),
        total_steps=2,
        ema_decay=0.5,
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_every=2,
        metadata={"config": cfg.model_dump(mode="json")},
    )
    trainer.fit()
    exported = trainer.export_model(tmp_path / "model.pt")
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = trainer.ema.module(x)
        for source in (exported, tmp_path / "ckpt" / "last.pt"):
            loaded = load_model(source)
            assert loaded.kind == "unet" and loaded.config == cfg
            torch.testing.assert_close(loaded.model(x), expected)
    broken = torch.load(exported, weights_only=True)
    broken["metadata_json"] = '{"config": {"model": {"unet": {"features": [8, 8, 8, 8, 8, 8]}}}}'
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(InputError, match=r"broken\.pt: weights do not match the stored config"):
        load_model(tmp_path / "broken.pt")


# -- the stages, end to end, with a real local MLflow store -------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from medgen.io import save
    from medgen.samples import mr_brain_phantom

    root = tmp_path_factory.mktemp("stages")
    for i, contrast in enumerate(("T1", "T2")):
        image, affine = mr_brain_phantom((40, 48, 40), 3.5, seed=i, contrast=contrast)
        save(Volume(image, affine, VolumeMeta(modality="MR")), root / f"clean{i}.nii.gz")
    (root / "pipe.yaml").write_text(textwrap.dedent("""
        name: tiny
        experiment: stage-test
        model: {kind: unet, noise_conditioning: true, unet: {features: [4, 4, 8, 8, 16, 4]}}
        training: {steps: 2, batch_size: 1, checkpoint_every: 2, log_every: 1, val_every: 2, out_dir: run, ema_decay: 0.9}
        degradations: [{name: rician, params: {sigma_fraction: [0.02, 0.06]}}]
        data: {train: [clean0.nii.gz], val: [clean1.nii.gz], patch_size_vox: [32, 32, 32]}
        """))
    return root


def test_stages_train_enhance_evaluate_degrade_with_mlflow(workspace, monkeypatch):
    from medgen.stages.degrade import degrade
    from medgen.stages.enhance import enhance
    from medgen.stages.evaluate import evaluate
    from medgen.stages.train import train
    from medgen.tracking import Tracker

    monkeypatch.chdir(workspace)
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    noisy = degrade(
        workspace / "clean1.nii.gz", workspace / "noisy.nii.gz", noise="rician", sigma=0.05, seed=3
    )
    again = degrade(
        workspace / "clean1.nii.gz", workspace / "noisy2.nii.gz", noise="rician", sigma=0.05, seed=3
    )
    from medgen.io import load

    np.testing.assert_array_equal(load(noisy.output).array, load(again.output).array)
    assert noisy.steps[0][0] == "rician" and noisy.steps[0][1]["seed"] == 3

    summary = train(workspace / "pipe.yaml", progress=False)
    assert summary.final_step == 2 and summary.model_path == workspace / "run" / "model.pt"
    tracker = Tracker("stage-test", uri=uri)
    run = tracker.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.kind"] == "unet" and run.data.params["training.steps"] == "2"
    assert len(run.data.params["data.sha256"]) == 64 and "data.train" not in run.data.params
    assert {"loss", "lr", "val/psnr", "val/ssim", "val/ms_ssim", "val/psnr_fg"} <= set(run.data.metrics)
    artifacts = {
        a.path
        for folder in ("config", "montages", "model")
        for a in tracker.client.list_artifacts(summary.run_id, folder)
    }
    assert {
        "config/pipe.yaml",
        "model/model.pt",
        "model/medgen_model.json",
        "montages/val0-step0000002.png",
    } <= artifacts

    # The stored config rebuilds the network but holds no local paths (they may name people).
    import json

    from medgen.training.checkpoint import load_checkpoint

    stored = json.loads(load_checkpoint(summary.model_path)["metadata_json"])
    assert stored["config"]["data"]["train"] == [] and stored["config"]["data"]["val"] == []
    assert stored["data_sha256"] == run.data.params["data.sha256"]
    assert str(workspace) not in json.dumps(stored)

    # Resuming a finished training does no more steps and keeps the same run.
    resumed = train(workspace / "pipe.yaml", progress=False)
    assert resumed.steps_done == 0 and resumed.resumed_from_step == 2 and resumed.run_id == summary.run_id

    out = enhance(noisy.output, summary.model_uri, workspace / "den.nii.gz", progress=False)
    den = load(out.output)
    noisy_volume = load(noisy.output)
    assert den.shape == noisy_volume.shape
    np.testing.assert_allclose(den.affine, noisy_volume.affine)
    assert tracker.get_run(out.run_id).data.params["model.kind"] == "unet"

    dicom = enhance(noisy.output, summary.model_path, workspace / "den_dicom", format="dicom", progress=False)
    assert len(list(dicom.output.glob("*.dcm"))) == noisy_volume.shape[2]

    scores = evaluate(out.output, workspace / "clean1.nii.gz", compare={"degraded": noisy.output})
    assert set(scores.rows) == {"output", "degraded"}
    assert 0 < scores.foreground_fraction < 1
    logged = tracker.get_run(scores.run_id).data.metrics
    assert logged["output/psnr"] == pytest.approx(scores.rows["output"]["psnr"])

    cropped = noisy_volume.with_array(noisy_volume.array[:-1])
    cropped.save(workspace / "cropped.nii.gz")
    with pytest.raises(
        InputError, match=r"cropped\.nii\.gz: grid \(39, 48, 40\) differs from the reference's \(40, 48, 40\)"
    ):
        evaluate(workspace / "cropped.nii.gz", workspace / "clean1.nii.gz")


def test_bad_config_stops_before_any_work(workspace, tmp_path, monkeypatch):
    from medgen.stages.train import train

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text((workspace / "pipe.yaml").read_text().replace("steps: 2", "stpes: 2"))
    with pytest.raises(
        ConfigError, match=r"bad\.yaml: training\.stpes: unknown key \(did you mean 'steps'\?\)"
    ):
        train(bad, tracking_uri=f"sqlite:///{tmp_path / 'never.db'}")
    sr = tmp_path / "sr.yaml"
    sr.write_text(
        (workspace / "pipe.yaml")
        .read_text()
        .replace("{name: rician", "{name: thick_slices, params: {factor: 2}}, {name: rician")
    )
    with pytest.raises(
        ConfigError, match=r"model\.upsample_factor: the degradations coarsen the grid by \[1, 1, 2\]"
    ):
        train(sr, tracking_uri=f"sqlite:///{tmp_path / 'never.db'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "sr.yaml"]


def test_typer_commands_register_and_run(workspace, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from medgen.stages.enhance_cli import COMMANDS, register

    app = typer.Typer()
    register(app)
    assert sorted(c.name for c in app.registered_commands) == sorted(COMMANDS) == ["degrade", "enhance", "evaluate", "train"]
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    runner = CliRunner()
    done = runner.invoke(app, ["degrade", "clean0.nii.gz", "--out", "cli_noisy.nii.gz", "--noise", "gaussian", "--sigma", "0.03", "--seed", "1"])
    assert done.exit_code == 0, done.output
    assert "wrote cli_noisy.nii.gz" in done.output and (workspace / "cli_noisy.nii.gz").is_file()
    done = runner.invoke(app, ["evaluate", "cli_noisy.nii.gz", "--reference", "clean0.nii.gz", "--compare", "same=clean0.nii.gz"])
    assert done.exit_code == 0, done.output
    assert "psnr_fg" in done.output and "same" in done.output
    done = runner.invoke(app, ["evaluate", "cli_noisy.nii.gz", "--reference", "clean0.nii.gz", "--compare", "oops"])
    assert done.exit_code == 2 and "expected NAME=PATH, got 'oops'" in done.output


def test_enhance_adapt_reweights_a_denoiser_by_sure_and_logs_it(workspace, monkeypatch):
    from medgen.io import load
    from medgen.metrics.quality import psnr
    from medgen.stages.degrade import degrade
    from medgen.stages.enhance import enhance
    from medgen.stages.train import train
    from medgen.tracking import Tracker

    monkeypatch.chdir(workspace)
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = train(workspace / "pipe.yaml", progress=False).model_path  # 2 steps: a weak model
    noisy = degrade(workspace / "clean1.nii.gz", workspace / "noisy_a.nii.gz", noise="rician", sigma=0.05, seed=5)
    plain = enhance(noisy.output, model, workspace / "plain.nii.gz", progress=False)
    adapted = enhance(noisy.output, model, workspace / "adapted.nii.gz", adapt_seconds=5, progress=False)
    clean = load(workspace / "clean1.nii.gz").values(np.float32)
    r = float(np.percentile(clean, 99.5))
    out = load(adapted.output)
    assert out.shape == clean.shape
    np.testing.assert_allclose(out.affine, load(plain.output).affine)
    assert psnr(out.values(np.float32), clean, r) > psnr(load(plain.output).values(np.float32), clean, r) + 3.0
    tracker = Tracker("stage-test", uri=uri)
    params = tracker.get_run(adapted.run_id).data.params
    assert params["adapt.method"] == "sure-let-rician" and params["adapt.n_extra_estimates"] == "1"
    assert float(params["adapt.noise_sigma"]) == pytest.approx(0.05 * r, rel=0.25)  # estimated from the scan
    assert "adapt.json" in {a.path for a in tracker.client.list_artifacts(adapted.run_id)}


def test_enhance_adapt_trains_slice_upsampling_on_the_scan(workspace, tmp_path, monkeypatch):
    from medgen.data.degrade import ThickSlices
    from medgen.io import load, save
    from medgen.stages.enhance import enhance
    from medgen.stages.train import train

    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    sr = workspace / "sr.yaml"
    sr.write_text(
        (workspace / "pipe.yaml").read_text()
        .replace("noise_conditioning: true", "noise_conditioning: false, task: super_resolution, upsample_factor: [1, 1, 2]")
        .replace("{name: rician, params: {sigma_fraction: [0.02, 0.06]}}", "{name: thick_slices, params: {factor: 2, axis: 2}}")
        .replace("out_dir: run", "out_dir: run_sr")
    )
    model = train(sr, progress=False).model_path
    clean = load(workspace / "clean1.nii.gz")
    thick = ThickSlices(factor=2, axis=2)(clean)
    save(thick, tmp_path / "thick.nii.gz")
    plain = load(enhance(tmp_path / "thick.nii.gz", model, tmp_path / "plain.nii.gz", progress=False).output)
    adapted = load(enhance(tmp_path / "thick.nii.gz", model, tmp_path / "sr.nii.gz", adapt_seconds=3, progress=False).output)
    assert adapted.shape == plain.shape == clean.shape
    np.testing.assert_allclose(adapted.affine, plain.affine, atol=1e-9)
    # Every pair of thin slices averages back to its thick slice: the acquired data are kept.
    thick_values = load(tmp_path / "thick.nii.gz").values(np.float32)
    np.testing.assert_allclose(
        ThickSlices(factor=2, axis=2)(adapted.values(np.float32)), thick_values, atol=1e-3 * float(thick_values.max())
    )
