"""`medgen run`: stages in order under one MLflow parent run, validated before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from medgen.errors import ConfigError
from medgen.pipeline import load_pipeline, run_pipeline
from medgen.samples import mr_brain_phantom
from medgen.volume import Volume


@pytest.fixture()
def scans(tmp_path: Path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    for seed, name in ((0, "train"), (1, "test")):
        values, affine = mr_brain_phantom((32, 36, 32), 3.5, seed=seed)
        Volume(values, affine).save(folder / f"{name}.nii.gz")
    return folder


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_training_config(tmp_path: Path, scans: Path) -> Path:
    return write_yaml(tmp_path / "train.yaml", {
        "name": "tiny", "experiment": "pipeline-test",
        "model": {"kind": "unet", "unet": {"features": [4, 4, 8, 8, 16, 4]}},
        "training": {"steps": 2, "batch_size": 1, "checkpoint_every": 2, "val_every": 2, "log_every": 1,
                     "out_dir": str(tmp_path / "runs"), "amp": False},
        "degradations": [{"name": "rician", "params": {"sigma_fraction": 0.05}}],
        "data": {"train": [str(scans / "train.nii.gz")], "val": [str(scans / "test.nii.gz")],
                 "patch_size_vox": [32, 32, 32]},
    })


def test_pipeline_runs_every_stage_under_one_parent_run(tmp_path, scans):
    out = tmp_path / "out"
    pipeline = write_yaml(tmp_path / "pipe.yaml", {
        "name": "tiny-pipeline", "experiment": "pipeline-test",
        "stages": [
            {"ingest": {"src": "scans", "out": "out/ingest"}},
            {"degrade": {"clean": "scans/test.nii.gz", "out": "out/noisy.nii.gz", "sigma": 0.05, "seed": 3}},
            {"train": {"config": str(tiny_training_config(tmp_path, scans))}},
            {"enhance": {"scan": "out/noisy.nii.gz", "out": "out/denoised.nii.gz"}},
            {"baseline": {"scan": "out/noisy.nii.gz", "out": "out/smoothed.nii.gz", "method": "gaussian"}},
            {"evaluate": {"out": "out/denoised.nii.gz", "reference": "scans/test.nii.gz",
                          "compare": {"degraded": "out/noisy.nii.gz", "gaussian": "out/smoothed.nii.gz"}}},
            {"export": {"volume": "out/denoised.nii.gz", "dicom": "out/dicom", "montage": "out/denoised.png"}},
        ],
    })
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_pipeline(pipeline, tracking_uri=uri, progress=False)

    kinds = [kind for kind, _ in result.results]
    assert kinds == ["ingest", "degrade", "train", "enhance", "baseline", "evaluate", "export"]
    evaluation = dict(result.results)["evaluate"]
    assert set(evaluation.rows) >= {"degraded", "gaussian"} and len(evaluation.rows) == 3
    assert all(np.isfinite(row["psnr"]) for row in evaluation.rows.values())
    assert len(list((out / "dicom").glob("*.dcm"))) == 32 and (out / "denoised.png").is_file()

    from medgen.tracking import Tracker

    tracker = Tracker("pipeline-test", uri=uri)
    parent = tracker.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["pipeline.stages"].startswith("ingest,degrade")
    children = tracker.child_runs(result.run_id)
    assert len(children) >= 5  # degrade, train, enhance, baseline, evaluate each log a nested run


def test_unknown_key_stops_before_any_work(tmp_path):
    pipeline = write_yaml(tmp_path / "pipe.yaml", {
        "name": "bad", "stages": [{"degrade": {"clean": "x.nii.gz", "out": "y.nii.gz", "sigmaa": 1}}],
    })
    with pytest.raises(ConfigError, match=r"pipe\.yaml: stages\.0\.degrade\.sigmaa"):
        load_pipeline(pipeline)
    assert not (tmp_path / "y.nii.gz").exists()


def test_a_stage_item_must_name_exactly_one_stage(tmp_path):
    pipeline = write_yaml(tmp_path / "pipe.yaml", {"name": "bad", "stages": [
        {"ingest": {"src": "a", "out": "b"}, "export": {"volume": "c"}}]})
    with pytest.raises(ConfigError, match="exactly one of"):
        load_pipeline(pipeline)


def test_paths_are_relative_to_the_pipeline_file(tmp_path):
    (tmp_path / "sub").mkdir()
    pipeline = write_yaml(tmp_path / "sub" / "pipe.yaml", {"name": "p", "stages": [
        {"export": {"volume": "../v.nii.gz", "montage": "m.png"}}]})
    step = load_pipeline(pipeline).stages[0].step
    assert step.volume == (tmp_path / "v.nii.gz").resolve()
    assert step.montage == (tmp_path / "sub" / "m.png").resolve()


def test_synthesis_stages_run_in_a_pipeline(tmp_path: Path):
    """cohort -> autoencoder -> latent diffusion -> synthesize, the model passed on implicitly."""
    cohort = tmp_path / "cohort"
    common = {"batch_size": 2, "checkpoint_every": 2, "log_every": 1, "amp": False}
    write_yaml(tmp_path / "vae.yaml", {
        "name": "vae", "experiment": "pipeline-test",
        "model": {"kind": "autoencoder", "autoencoder": {"channels": [4, 8], "attention_levels": [False, False],
                                                         "latent_channels": 2, "norm_num_groups": 4},
                  "discriminator": {"channels": 4, "num_layers_d": 1}},
        "training": {"steps": 2, "val_every": 2, "ema_decay": None, "out_dir": str(tmp_path / "vae"), **common},
        "data": {"labels_csv": str(cohort / "labels.csv"), "grid": {"shape_vox": [16, 16, 16], "spacing_mm": [4, 4, 4]},
                 "patch_size_vox": [16, 16, 16]},
    })  # fmt: skip
    write_yaml(tmp_path / "ldm.yaml", {
        "name": "ldm", "experiment": "pipeline-test",
        "model": {"kind": "latent_diffusion", "latent_diffusion": {
            "autoencoder": str(tmp_path / "vae" / "model.pt"), "channels": [8, 8], "attention_levels": [False, False],
            "norm_num_groups": 4, "num_head_channels": 8, "num_classes": 2, "sampling_steps": 2}},
        "training": {"steps": 2, "val_every": 10, "out_dir": str(tmp_path / "ldm"), **common},
        "data": {"labels_csv": str(cohort / "labels.csv")},
    })  # fmt: skip
    pipeline = write_yaml(tmp_path / "pipe.yaml", {"name": "synth", "experiment": "pipeline-test", "stages": [
        {"cohort": {"out": "cohort", "n_per_class": 2, "shape_vox": [16, 16, 16]}},
        {"train": {"config": "vae.yaml"}},
        {"train": {"config": "ldm.yaml"}},
        {"synthesize": {"out": "synth", "n": 2, "condition": {"label": 1}}},
    ]})  # fmt: skip
    result = run_pipeline(pipeline, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", progress=False)
    kinds = [kind for kind, _ in result.results]
    assert kinds == ["cohort", "train", "train", "synthesize"]
    synth = result.results[-1][1]
    assert [p.name for p in synth.paths] == ["synthetic-s0-00000.nii.gz", "synthetic-s0-00001.nii.gz"]
    assert all(r["condition"] == {"label": 1} for r in synth.records)


def test_synthesize_without_a_latent_diffusion_model_stops_with_one_line(tmp_path: Path):
    pipeline = write_yaml(tmp_path / "pipe.yaml", {"name": "p", "stages": [{"synthesize": {"out": "synth"}}]})
    with pytest.raises(ConfigError, match="synthesize: no `model` given and no latent_diffusion train stage before it"):
        run_pipeline(pipeline, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", progress=False)
